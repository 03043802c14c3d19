"""Supervised pretraining of an image tower: a registry tower + a linear classifier trained with
cross-entropy on labelled webdataset shards (by default the built-in scenes' 30 colour x shape
labels). The result is an image tower checkpoint that LiT/3T runs load as L or U.

    python launch/tools/pretrain_image.py                                  # vit_scene_tiny, ~4-5 min idle
    python launch/tools/pretrain_image.py --tower=vit_test --steps=20 --out=runs/pretrain_vit_test
    python launch/tools/pretrain_image.py --labels=shape --out=runs/pretrain_shape  # no colour: a deficient tower

On the built-in scenes the defaults train on the single-shape scenes only and learn shape before
colour (``single_shape_only``, ``shape_fraction``): trained on all scenes and on the 30 classes
from the start, the tower learned colour and hardly any shape (33.7% held-out, docs/study.md).

Writes ``<out>/image_tower.safetensors`` (the timm module's weights plus ``head.*``, the
classifier, which the loader drops) and ``<out>/image_tower.json`` naming the registry tower;
then train with ``--model.setting=Lu --model.image.tower=<tower>
--model.image.pretrained=<out>/image_tower.safetensors``.

Plain PyTorch in one process (no DeepSpeed): it is a small tool for small towers.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tritower.data.config import DataConfig
from tritower.launch.cli import parse_overrides
from tritower.launch.config import ConfigError
from tritower.launch.optim.config import OptimConfig
from tritower.launch.optim.optimizers import client_scheduler
from tritower.model import build_image_tower, file_sha256, image_tower_spec
from tritower.model.settings import decays

CHECKPOINT = "image_tower.safetensors"
SIDECAR = "image_tower.json"


@dataclass
class PretrainImageConfig:
    """Options of the image-tower pretraining command (``--field=value`` on the command line)."""

    tower: str = "vit_scene_tiny"
    """Image tower name from the registry."""
    steps: int = 400
    """Optimizer steps (the defaults' held-out accuracy: docs/study.md, "The matched tower")."""
    batch_size: int = 128
    """Images per step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (linear warm-up, then cosine decay to 0)."""
    warmup_steps: int = 30
    """Steps of linear warm-up."""
    weight_decay: float = 0.05
    """AdamW weight decay on matrices (none on biases and norms)."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing."""
    seed: int = 0
    """Seed of the initialisation and the data order."""
    out: str = "runs/pretrain_image"
    """Output folder of the checkpoint and its JSON sidecar."""
    log_every: int = 25
    """Print a progress line every N steps."""
    eval_samples: int = 0
    """Held-out images to score at the end (0 = all of the eval shards)."""
    labels: str = "colour_shape"
    """Built-in scenes only: which labels supervise the tower. ``colour_shape`` = the 30 classes the
    captions describe; ``shape`` (5 classes) or ``colour`` (6) leave out what the captions also
    need, which makes a deficient tower (the mismatched towers of the Three Towers paper).
    User shards take their labels as they are (``colour_shape``)."""
    single_shape_only: bool = True
    """Built-in scenes only: supervise with the training scenes that hold one shape (75% of them).
    A two-shape scene's label names its first shape, drawn at random, so the image cannot tell
    which object it means. User shards are read as they are (measured effect: docs/study.md)."""
    shape_fraction: float = 0.5
    """Built-in scenes, ``labels=colour_shape`` only: the first ``shape_fraction`` of the steps
    supervise only the shape (the shape marginal of the 30 colour x shape logits), the rest the 30
    classes, because trained on the 30 classes from the start the tower learns colour and hardly
    any shape (docs/study.md). 0 = the 30 classes from the start."""
    data: DataConfig = field(default_factory=DataConfig)
    """Shards and loader settings; empty ``train_shards`` = the built-in scenes. User shards
    need an integer class label under ``data.label_key`` (default the json's ``label``) and ``data.vocab`` (the loader
    tokenises captions even though this command does not use them)."""


LABEL_SETS = ("colour_shape", "shape", "colour")


def relabel(labels: torch.Tensor, label_set: str) -> torch.Tensor:
    """Maps built-in colour x shape labels (colour-major: ``colour * 5 + shape``, see
    ``data/scenes.py: CLASSNAMES``) to the chosen label set; -1 (no label) stays -1."""
    from tritower.data.scenes import SHAPES

    if label_set == "colour_shape":
        return labels
    mapped = labels % len(SHAPES) if label_set == "shape" else labels // len(SHAPES)
    return torch.where(labels >= 0, mapped, labels)


def num_labels(label_set: str, num_classes: int) -> int:
    """Classes of the chosen label set (``num_classes`` = colour x shape classes of the data)."""
    from tritower.data.scenes import COLOURS, SHAPES

    return {"colour_shape": num_classes, "shape": len(SHAPES), "colour": len(COLOURS)}[label_set]


def _data(cfg: PretrainImageConfig) -> tuple[list[str], list[str], str, int]:
    """(train shards, eval shards, vocabulary, number of classes)."""
    from tritower.data import ensure_builtin_data, expand_shards

    if cfg.data.train_shards in ("", "builtin"):
        builtin = ensure_builtin_data(cfg.data)
        return (builtin.train_shards, builtin.eval_shards, str(builtin.vocab_path), len(builtin.classnames))
    if not cfg.data.vocab:
        raise ValueError("data.vocab is required with user shards")
    eval_shards = expand_shards(cfg.data.eval_shards) if cfg.data.eval_shards else []
    classnames = Path(eval_shards[0]).parent / "classnames.txt" if eval_shards else None
    if classnames is None or not classnames.is_file():
        raise ValueError("user shards need eval shards with a classnames.txt beside them")
    return (expand_shards(cfg.data.train_shards), eval_shards, cfg.data.vocab, len(classnames.read_text().split("\n")))


def shape_logits(logits: torch.Tensor) -> torch.Tensor:
    """[B, 30] colour x shape logits (colour-major, ``data/scenes.py: CLASSNAMES``) -> [B, 5] shape
    logits whose softmax is the 30-class softmax summed over the colours of each shape."""
    from tritower.data.scenes import COLOURS, SHAPES

    return logits.unflatten(1, (len(COLOURS), len(SHAPES))).logsumexp(1)


def single_shape_keys(shards: list[str]) -> set[str]:
    """Keys of the built-in scenes in ``shards`` that hold one shape (each json's ``shapes``)."""
    import tarfile

    keys: set[str] = set()
    for path in shards:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    if len(meta["shapes"]) == 1:
                        keys.add(meta["key"])
    return keys


def pretrain(cfg: PretrainImageConfig) -> dict:
    """Trains, evaluates and writes the checkpoint; returns the sidecar's contents."""
    from tritower.data import build_tokenizer, build_train_loader, load_eval_set

    torch.manual_seed(cfg.seed)
    spec = image_tower_spec(cfg.tower)
    train_shards, eval_shards, vocab, num_classes = _data(cfg)
    num_classes = num_labels(cfg.labels, num_classes)
    tokenizer = build_tokenizer(vocab)
    loader_args = dict(tokenizer=tokenizer, image_size=spec.image_size, mean=spec.mean, std=spec.std, context_length=8)
    loader = build_train_loader(
        cfg.data, shards=train_shards, rank=0, world_size=1, per_rank_batch=cfg.batch_size, seed=cfg.seed, **loader_args
    )
    builtin = cfg.data.uses_builtin
    singles = single_shape_keys(train_shards) if cfg.single_shape_only and builtin else None
    shape_steps = round(cfg.shape_fraction * cfg.steps) if builtin and cfg.labels == "colour_shape" else 0
    tower = build_image_tower(cfg.tower)
    classifier = nn.Linear(spec.width, num_classes)
    model = nn.Sequential(tower, classifier).train()
    decay = [p for name, p in model.named_parameters() if decays(name, p)]
    no_decay = [p for name, p in model.named_parameters() if not decays(name, p)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.999),
    )
    # The trainer's one schedule implementation: warm-up, then cosine to 0.
    scheduler = client_scheduler(OptimConfig(warmup_steps=cfg.warmup_steps, min_lr_ratio=0.0), cfg.steps)(optimizer)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    print(
        f"pretrain_image: {cfg.tower} ({sum(p.numel() for p in tower.parameters()):,} "
        f"parameters) + linear classifier over {num_classes} {cfg.labels} classes, {cfg.steps} steps of "
        f"{cfg.batch_size}"
        + (f" (the first {shape_steps} on the shape only)" if shape_steps else "")
        + (f"; {len(singles)} single-shape training scenes" if singles is not None else ""),
        flush=True,
    )

    started, seen, correct, running, logged = time.time(), 0, 0, 0.0, 0
    batches = iter(loader)
    for step in range(cfg.steps):
        batch = next(batches)
        keep = batch["label"] >= 0  # samples without a label cannot supervise
        if singles is not None:
            keep &= torch.tensor([key in singles for key in batch["key"]])
        images, labels = batch["image"][keep], relabel(batch["label"][keep], cfg.labels)
        logits = model(images)
        if step < shape_steps:  # shape first: the 30-class head's shape marginal
            logits, labels = shape_logits(logits), relabel(labels, "shape")
        loss = loss_fn(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        running += loss.item()
        correct += int((logits.argmax(-1) == labels).sum())
        seen += int(labels.numel())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            print(
                f"step {step + 1}/{cfg.steps}  loss {running / (step + 1 - logged):.3f}  "
                f"train acc {correct / max(1, seen):.3f}  "
                f"lr {scheduler.get_last_lr()[0]:.2e}  {time.time() - started:.0f}s",
                flush=True,
            )
            running, correct, seen, logged = 0.0, 0, 0, step + 1

    accuracy = float("nan")
    if eval_shards:
        evalset = load_eval_set(eval_shards, max_samples=cfg.eval_samples, **loader_args)
        model.eval()
        with torch.no_grad():
            predictions = torch.cat([model(chunk).argmax(-1) for chunk in evalset.images.split(256)])
        accuracy = float((predictions == relabel(evalset.labels, cfg.labels)).float().mean())
        print(
            f"held-out top-1 accuracy {accuracy:.3f} on {len(predictions)} images (chance {1 / num_classes:.3f})",
            flush=True,
        )
    return _save(cfg, tower, classifier, num_classes, accuracy)


def _save(cfg: PretrainImageConfig, tower: nn.Module, classifier: nn.Linear, num_classes: int, accuracy: float) -> dict:
    from safetensors.torch import save_file

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in tower.model.state_dict().items()}
    # The classifier is saved under timm's name ``head``: the loader drops it, and a timm model
    # with ``num_classes`` classes can load the whole file.
    state |= {f"head.{k}": v.contiguous() for k, v in classifier.state_dict().items()}
    save_file(state, str(out / CHECKPOINT))
    sidecar = {
        "tower": cfg.tower,
        "weights": CHECKPOINT,
        "sha256": file_sha256(out / CHECKPOINT),
        "num_classes": num_classes,
        "labels": cfg.labels,
        "steps": cfg.steps,
        "held_out_accuracy": accuracy,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "data"},
    }
    (out / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n")
    print(f"wrote {out / CHECKPOINT} and {out / SIDECAR}", flush=True)
    return sidecar


def parse_args(argv: list[str]) -> PretrainImageConfig:
    """``--field=value`` / ``--data.field=value`` overrides of PretrainImageConfig (``launch/cli.py``)."""
    cfg = parse_overrides(PretrainImageConfig(), argv, prog="python -m tritower.launch.tools.pretrain_image")
    try:
        cfg.data.__post_init__()  # re-validate after overrides
    except ValueError as error:
        raise ConfigError(f"data: {error}") from None
    if not 0.0 <= cfg.shape_fraction < 1.0:
        raise ConfigError(f"shape_fraction must be in [0, 1), got {cfg.shape_fraction}")
    if cfg.labels not in LABEL_SETS:
        raise ConfigError(f"labels={cfg.labels!r} is not a label set; use one of {', '.join(LABEL_SETS)}")
    if cfg.labels != "colour_shape" and cfg.data.train_shards not in ("", "builtin"):
        raise ConfigError(
            f"labels={cfg.labels} needs the built-in scenes; user shards use their own labels (colour_shape)"
        )
    return cfg


def main(argv: list[str]) -> int:
    try:
        cfg = parse_args(argv)
    except ConfigError as error:
        print(f"pretrain_image: config error: {error}", file=sys.stderr)
        return 2
    pretrain(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
