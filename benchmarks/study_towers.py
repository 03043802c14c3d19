"""The pretrained image towers of the LiT / 3T study (``benchmarks/study.py``), made once per
study and cached in ``<out>/towers/<kind>/``: ``matched`` and ``mismatched`` pretrained by
``launch/tools/pretrain_image.py`` on the scenes' colour x shape or shape labels, ``real`` the
converted ImageNet EfficientNet-Lite0 with its training-scene embeddings precomputed; each
described by its held-out accuracy on its own labels and a linear probe on the captions' labels.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tritower.benchmarks.study import Budget

TOWER_LABELS = {"matched": "colour_shape", "mismatched": "shape"}
"""``pretrain_image``'s label set of each pretrained scene tower."""


def data_args(budget: Budget, cache: Path) -> list[str]:
    """The ``--data.*`` options every command of the study takes: the cache and the budget's data."""
    return [f"--data.cache_dir={cache}", *(f"--data.{k}={v}" for k, v in budget.data.items())]


def prepare_tower(kind: str, out: Path, budget: Budget, cache: Path, styles: str = "") -> dict:
    """Makes (once) and describes one pretrained image tower: its weights, architecture, its
    held-out accuracy on its own labels and a linear probe on the captions' 30 colour x shape labels.
    ``styles``: pretrain on the built-in scenes drawn in those styles (``broad``; "" = plain), into
    ``towers/<kind>-<styles>``."""
    folder = out / "towers" / (f"{kind}-{styles}" if styles else kind)
    info_path = folder / "tower.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if kind == "real":
        from tritower.launch.tools.convert_efficientnet import main as convert

        weights = folder / "efficientnet_lite0.safetensors"
        if convert(["--out", str(weights)]) != 0:
            raise RuntimeError("convert_efficientnet failed (see its message above)")
        info = {"arch": "efficientnet_lite0", "labels": "ImageNet-1k", "own_accuracy": None}
        info["embeddings"] = precompute_embeddings(weights, folder / "embeddings", budget, cache)
    else:
        from tritower.launch.tools.pretrain_image import SIDECAR, parse_args, pretrain

        argv = [
            f"--tower={budget.image_tower}",
            f"--labels={TOWER_LABELS[kind]}",
            f"--steps={budget.pretrain_steps}",
            f"--batch_size={budget.pretrain_batch}",
            f"--warmup_steps={max(1, budget.pretrain_steps // 10)}",
            f"--out={folder}",
            *data_args(budget, cache),
            *([f"--data.builtin_styles={styles}"] if styles else []),
        ]
        config = parse_args(argv)
        previous = folder / SIDECAR
        # A tower pretrained into this folder with the same options (by an interrupted study, or by
        # pretrain_image itself with --out=<folder>) is reused: pretraining is the costliest step.
        sidecar = json.loads(previous.read_text()) if previous.exists() else None
        if sidecar is None or any(sidecar["config"].get(k) != v for k, v in _pretrain_options(config).items()):
            sidecar = pretrain(config)
        weights = folder / "image_tower.safetensors"
        info = {"arch": budget.image_tower, "labels": TOWER_LABELS[kind], "own_accuracy": sidecar["held_out_accuracy"]}
        info["styles"] = styles or "plain"
        info["command"] = "python launch/tools/pretrain_image.py " + " ".join(argv)
    info |= {"weights": str(weights), "probe_top1": probe_accuracy(info["arch"], weights, budget, cache)}
    info["prepare_s"] = round(time.time() - started, 1)
    info_path.write_text(json.dumps(info, indent=1) + "\n")
    return info


def precompute_embeddings(weights: Path, folder: Path, budget: Budget, cache: Path) -> str:
    """EfficientNet-Lite0's embeddings of the training scenes, once per study
    (``launch/tools/precompute.py``, one fixed 224 px crop per scene): its runs then never run
    the locked tower on training images (``Lu``, ``LU``, ``LL``: the tower is not even built). A run's budget
    is under one epoch of the 20,000 scenes, so one crop per scene is what random crops would
    have given it too. Evaluation still runs the tower on the held-out images."""
    from tritower.launch.tools.precompute import main as precompute

    if (folder / "meta.json").exists():
        return str(folder)
    argv = ["--tower=efficientnet_lite0", f"--checkpoint={weights}", "--shards=builtin", "--experiment=clip_tiny"]
    argv += [f"--out={folder}", "--num_workers=1", "--overwrite", *data_args(budget, cache)]
    if precompute(argv) != 0:
        raise RuntimeError("precompute failed (see its message above)")
    return str(folder)


def _pretrain_options(config: object) -> dict:
    """The options that make two pretrained towers the same tower."""
    keys = (
        "tower",
        "labels",
        "steps",
        "batch_size",
        "lr",
        "warmup_steps",
        "seed",
        "single_shape_only",
        "shape_fraction",
    )
    return {k: getattr(config, k) for k in keys}


def probe_accuracy(arch: str, weights: Path, budget: Budget, cache: Path) -> float:
    """Logistic-regression probe on the tower's features of the held-out scenes (half fit, half
    scored) over the 30 colour x shape classes: how much of what the captions say the tower sees."""
    import torch

    from tritower.data import build_tokenizer, ensure_builtin_data, load_eval_set
    from tritower.data.config import DataConfig
    from tritower.evaluation.linear_probe import logistic_probe_metrics
    from tritower.model import image_tower_spec, load_image_tower

    data = DataConfig(cache_dir=str(cache), **{k: type(getattr(DataConfig(), k))(v) for k, v in budget.data.items()})
    builtin = ensure_builtin_data(data)
    spec = image_tower_spec(arch)
    evalset = load_eval_set(
        builtin.eval_shards, build_tokenizer(str(builtin.vocab_path)), spec.image_size, spec.mean, spec.std, 8
    )
    tower = load_image_tower(arch, weights).eval()
    with torch.no_grad():
        features = torch.cat([tower(chunk) for chunk in evalset.images.split(128)])
    return logistic_probe_metrics(features, evalset.labels, C=10.0)["linear_probe_top1"]
