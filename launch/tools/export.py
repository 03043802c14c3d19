"""Export a DeepSpeed checkpoint to plain consolidated weights for inference.

    python -m tritower.launch.tools.export --checkpoint runs/clip_tiny/checkpoints --out exports/clip_tiny
    python -m tritower.launch.tools.export --checkpoint runs/lit/checkpoints --tag step00000400 \\
        --out exports/lit --dtype bf16
    python -m tritower.launch.tools.export --checkpoint runs/3t/checkpoints --out exports/3t_a05 --alpha 0.5
    python -m tritower.launch.tools.export --checkpoint runs/clip_tiny/checkpoints --out exports/oc --format open_clip

Writes ``OUT/model.safetensors`` (every tensor of the full CLIP model, locked towers included),
``OUT/config.json`` (model section, tower specs, image preprocessing, context length, where each
tensor came from) and the tokenizer vocabulary (``OUT/vocab.txt``). ``tritower.model.load_export``
reads it back without DeepSpeed. Works on ZeRO-0/1/2/3 checkpoints of any world size, in one
process, without a process group (DeepSpeed's own ``zero_to_fp32`` does the merging).
``--format open_clip`` writes the same weights as a folder ``open_clip.create_model_and_transforms(
"local-dir:OUT")`` loads instead (``export_open_clip.py``; refused, naming why, where open_clip
cannot express the model).

Where each tensor comes from, in order of preference:

1. the checkpoint's fp32 master copy (trainable parameters, merged from every rank's partition);
2. a locked (``L``) tower's pretrained source file, rebuilt with ``build_clip``; where the
   checkpoint also holds a copy (a frozen parameter inside the engine), the two must agree in the
   training precision, otherwise the source file changed since training and the export stops;
3. the checkpoint's copy of a frozen parameter or buffer (training precision). ZeRO-1's
   ``zero_to_fp32`` silently drops frozen parameters (read in DeepSpeed 0.19.8), so for stages 0-2 they
   are read from the engine's full ``module`` state instead.

Any model tensor left without a source, and any checkpoint tensor the model does not have, is an
error naming the keys: nothing is exported with random weights.

Three Towers (setting 3T): by default the export is a plain CLIP, the main towers f and g and
their heads only (the 3T heads and the third tower are training-time parts). ``--alpha A`` exports
the alpha mixture instead (``tritower.evaluation.three_towers``): f, g, the 3T heads and the
third tower h (from ``model.third.pretrained``, checked against the sha256 the run recorded), and
the loaded model's ``similarity`` is exactly A <f(x), g(t)> + (1-A) <h_g(h(x)), g_h(g(t))>.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pickle
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from tritower.launch.checkpoint.manifest import MANIFEST, locate, read_manifest
from tritower.launch.cli import parse_options
from tritower.launch.config import ConfigError
from tritower.launch.tools.checkpoint_merge import (
    ExportError,
    assemble_state,
    check_locked_identities,
    locked_prefixes,
    model_config_from,
    read_checkpoint,
)
from tritower.losses.config import SIGLIP_INIT_BIAS
from tritower.model import (
    ModelConfig,
    build_clip,
    build_third_tower,
    parse_setting,
    resolve_trainable,
    text_tower_spec,
    trainable_rules,
)
from tritower.model.architecture import FORMAT
from tritower.model.config import migrate_model
from tritower.model.precision import dtype_of
from tritower.model.settings import THREE_TOWER_PARAMETERS

FORMAT_VERSION = 1
EXPORT_PRECISIONS = ("fp32", "bf16")
EXPORT_FORMATS = ("native", "open_clip")


def tokenizer_source(data: dict) -> str:
    """The vocabulary the run tokenised with (same rule as the trainer's ``resolve_data``)."""
    from tritower.data import DataConfig, ensure_builtin_data

    data_cfg = DataConfig(**data)
    if data_cfg.uses_builtin:
        return ensure_builtin_data(data_cfg).vocab_path
    if not data_cfg.vocab:
        raise ExportError("the run's data.vocab is empty and it did not use built-in data: pass --vocab")
    return data_cfg.vocab


def copy_tokenizer(source: str, out: Path) -> dict:
    """Copy the WordPiece ``vocab.txt`` (or a tokenizer folder's files) into ``out``."""
    from tritower.data.tokenizer import resolve_vocab

    try:
        vocab = resolve_vocab(source)
    except FileNotFoundError:
        from tritower.model.pretrained import resolve_source

        folder = resolve_source(source)
        target = out / "tokenizer"
        target.mkdir(exist_ok=True)
        names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "spiece.model")
        present = [n for n in names if (folder / n).is_file()]
        for name in present:
            shutil.copy2(folder / name, target / name)
        if not present:
            raise ExportError(f"no tokenizer files in {folder}") from None
        return {"kind": "folder", "path": "tokenizer", "source": source}
    shutil.copy2(vocab, out / "vocab.txt")
    digest = hashlib.sha256((out / "vocab.txt").read_bytes()).hexdigest()
    return {"kind": "wordpiece", "path": "vocab.txt", "lowercase": True, "source": source, "sha256": digest}


def export(
    checkpoint: str | Path,
    out: str | Path,
    *,
    tag: str | None = None,
    dtype: str = "fp32",
    vocab: str | None = None,
    pretrained: dict[str, str] | None = None,
    alpha: float | None = None,
    format: str = "native",
) -> dict:
    """Export one checkpoint tag into ``out``; returns the written ``config.json`` as a dict.

    ``vocab`` overrides the run's tokenizer source; ``pretrained`` ({"image": path,
    ...}) overrides where locked towers' pretrained files are now. ``alpha`` (3T runs only)
    exports the alpha mixture with the third tower instead of the plain CLIP (module docstring).
    ``format="open_clip"`` writes an open_clip ``local-dir:`` folder (``export_open_clip``) and
    returns its ``open_clip_config.json``, provenance under ``tritower``.
    """
    from tritower.data.tokenizer import build_text_tokenizer
    from tritower.launch.tools import export_open_clip

    if format not in EXPORT_FORMATS:
        raise ExportError(f"--format {format!r}: one of {EXPORT_FORMATS}")

    folder, tag = locate(checkpoint, tag)
    if (folder / tag / MANIFEST).is_file():  # a file lost or cut since the save: name it
        try:
            read_manifest(folder / tag)
        except ValueError as error:
            raise ExportError(f"cannot export {folder / tag}: {error}; export another tag") from None
    try:
        tensors = read_checkpoint(folder, tag)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:  # no manifest to name the file
        detail = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        raise ExportError(
            f"cannot read {folder / tag} ({detail}): a file of it is damaged; export another tag"
        ) from None
    saved = tensors.client_state.get("config")
    if not saved:
        raise ExportError(f"{folder / tag} carries no training config in its client state")
    model = migrate_model(saved["model"])
    for role, moved in (pretrained or {}).items():
        model[role] = {**model.get(role, {}), "pretrained": moved}
    cfg = model_config_from(model)
    if alpha is not None and not cfg.parsed.three_towers:
        raise ExportError(f"--alpha applies to Three Towers runs (model.setting=3T) only; this run is {cfg.setting!r}")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise ExportError(f"--alpha {alpha}: the 3T mixing weight must be in [0, 1]")
    if format == "open_clip":
        try:  # refused before the model is built or anything written
            export_open_clip.check_expressible(cfg, alpha)
        except export_open_clip.OpenClipExportError as error:
            raise ExportError(f"--format open_clip: {error}") from None
    train_precision = saved.get("deepspeed", {}).get("precision", "fp32")
    # The trainer's rule (model_setup.text_tokenizer_source): data.vocab, else a pretrained text
    # tower's own folder, else the built-in data's vocabulary.
    own = cfg.parsed.text.pretrained if cfg.parsed.text.is_pretrained and not saved["data"].get("vocab") else ""
    vocab_source = vocab or own or tokenizer_source(saved["data"])
    tokenizer = build_text_tokenizer(vocab_source)

    # The trainer seeds before building; seeding here too makes untouched initial values (a
    # locked head frozen as the identity, say) identical to the run's.
    torch.manual_seed(saved.get("train", {}).get("seed", 0))
    # A SigLIP run's model holds a learnable logit_bias (its value comes from the checkpoint).
    logit_bias = SIGLIP_INIT_BIAS if (saved.get("loss") or {}).get("kind") == "sigmoid" else None
    model = build_clip(cfg, vocab_size=cfg.vocab_size or len(tokenizer), logit_bias=logit_bias)
    third_tower = build_third_tower(cfg) if alpha is not None else None
    check_locked_identities(model, tensors.client_state.get("locked") or {}, third_tower)
    trainable = resolve_trainable(model, trainable_rules(cfg))
    prefixes = locked_prefixes(cfg)
    reference = model.state_dict()
    locked = {k: (not trainable[k]) if k in trainable else k.startswith(prefixes) for k in reference}
    sources = {k: getattr(getattr(model, k.split(".")[0]), "source", "initialisation") for k in reference}
    state, origins = assemble_state(reference, locked, tensors, dtype_of(train_precision), sources)
    model.load_state_dict(state, strict=True)

    extra = {
        "training": {k: saved.get(k) for k in ("experiment", "data", "eval", "train", "deepspeed")},
        "source": {
            "checkpoint": str(folder),
            "tag": tag,
            "step": tensors.client_state.get("step"),
            "zero_stage": tensors.zero_stage,
            "world_size": tensors.world_size,
        },
        "tensors": {
            "total": len(reference),
            **origins,
            "locked_sources": sorted(
                {sources[k] for k in reference if locked[k]}
                | ({third_tower.source} if third_tower is not None else set())
            ),
        },
    }
    if format == "open_clip":
        try:
            return export_open_clip.write_open_clip(model, cfg, out, vocab_source, dtype=dtype, extra=extra)
        except export_open_clip.OpenClipExportError as error:
            raise ExportError(f"--format open_clip: {error}") from None
    return write_export(model, cfg, out, vocab_source, dtype=dtype, extra=extra, third_tower=third_tower, alpha=alpha)


def write_export(
    model: torch.nn.Module,
    cfg: ModelConfig,
    out: str | Path,
    vocab_source: str,
    *,
    dtype: str = "fp32",
    extra: dict | None = None,
    third_tower: torch.nn.Module | None = None,
    alpha: float | None = None,
) -> dict:
    """Write ``model`` (a CLIPModel built from ``cfg``) as an export folder; returns config.json.

    ``extra`` adds keys to config.json (provenance: training sections, source, tensor origins).
    A 3T model is written as a plain CLIP (its 3T heads and temperatures dropped) unless ``alpha``
    is given: then the 3T heads stay and ``third_tower`` (h: a ``LockedTower`` or image tower) is
    written under ``third_tower.*``, and ``config.json``'s ``three_towers`` records alpha.
    """
    from safetensors.torch import save_file

    from tritower.model.mixture import check_alpha

    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    target_dtype = dtype_of(dtype)
    state = model.state_dict()
    three_towers = None
    if alpha is not None:
        if not getattr(model, "three_towers", False) or third_tower is None:
            raise ExportError("an alpha-mixed export needs a 3T model and its third tower")
        tower = getattr(third_tower, "tower", third_tower)  # a LockedTower holds the ImageTower
        state.update({f"third_tower.{k}": v for k, v in tower.state_dict().items()})
        three_towers = {
            "alpha": check_alpha(alpha),
            "third_tower": cfg.third.tower or cfg.image.tower,
            "third_width": tower.width,
            "third_source": getattr(third_tower, "source", ""),
        }
    else:
        # At alpha = 1 (no mixing) inference uses f and g only: the export costs what CLIP costs.
        state = {k: v for k, v in state.items() if k.split(".", 1)[0] not in THREE_TOWER_PARAMETERS}
    # clone(): safetensors refuses views that share storage.
    weights = {k: (v.to(target_dtype) if v.is_floating_point() else v).contiguous().clone() for k, v in state.items()}
    save_file(weights, str(out / "model.safetensors"), metadata={"format": FORMAT})
    # The run's image inputs: model.image.image_size/mean/std overrides included.
    image_spec, text_spec = cfg.parsed.image_spec, text_tower_spec(cfg.text.tower)
    pretrained_text = cfg.parsed.text.is_pretrained
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "model": dataclasses.asdict(cfg),
        "vocab_rows": model.text_tower.vocab_rows,
        "text_pooling": model.text_tower.pooling,
        "image_tower_spec": dataclasses.asdict(image_spec),
        "text_tower_spec": dataclasses.asdict(text_spec),
        # A pretrained text encoder's architecture is its own config.json, not the registry's.
        "text_encoder_config": model.text_tower.model.config.to_dict() if pretrained_text else None,
        "image_preprocessing": {
            "image_size": image_spec.image_size,
            "mean": list(image_spec.mean),
            "std": list(image_spec.std),
            "interpolation": image_spec.interpolation,
            "resize": f"shorter side, {image_spec.interpolation}, centre crop",
        },
        "context_length": text_spec.context_length,
        "tokenizer": copy_tokenizer(vocab_source, out),
        "logit_bias": getattr(model, "logit_bias", None) is not None,
        # null: a plain CLIP (f, g). Otherwise the alpha mixture with the third tower h.
        "three_towers": three_towers,
        **(extra or {}),
    }
    (out / "config.json").write_text(json.dumps(config, indent=1, default=str) + "\n")
    return config


def parse_pretrained(items: list[str]) -> dict[str, str]:
    """``image=PATH`` / ``text=PATH`` -> {"image": PATH, ...}."""
    result = {}
    for item in items:
        tower, _, path = item.partition("=")
        if tower not in ("image", "text", "third") or not path:
            raise ExportError(f"--pretrained {item!r}: write image=PATH, text=PATH or third=PATH")
        result[tower] = path
    return result


@dataclass
class ExportOptions:
    """Options of the export command (``--field=value`` or ``--field value``)."""

    checkpoint: str
    """A run's checkpoints folder, or one tag folder in it."""
    out: str
    """Output folder."""
    tag: str | None = None
    """Tag to export; None: the folder's ``latest``."""
    dtype: Literal[EXPORT_PRECISIONS] = "fp32"
    """Precision of the written weights."""
    vocab: str | None = None
    """Tokenizer source, if the run's has moved."""
    pretrained: list[str] = field(default_factory=list)
    """Where a locked tower's pretrained file is now: ``image=PATH``, ``text=PATH`` or ``third=PATH``."""
    alpha: float | None = None
    """3T runs only: export the alpha mixture of the main towers and the third tower, score =
    A <f, g> + (1-A) <h_g(h), g_h(g)>; None: a plain CLIP (f and g)."""
    format: Literal[EXPORT_FORMATS] = "native"
    """``native`` (``tritower.inference.load_export``) or ``open_clip`` (a folder for open_clip's
    ``create_model_and_transforms('local-dir:OUT')``)."""


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 exported, 2 a usage error or a checkpoint that cannot be exported (one line)."""
    try:
        options = parse_options(
            ExportOptions,
            argv,
            command="python -m tritower.launch.tools.export",
            example="--checkpoint runs/clip_tiny/checkpoints --out exports/clip_tiny",
        )
    except ConfigError as error:
        print(f"tritower export: error: {error}", file=sys.stderr)
        return 2
    try:
        config = export(
            options.checkpoint,
            options.out,
            tag=options.tag,
            dtype=options.dtype,
            vocab=options.vocab,
            pretrained=parse_pretrained(options.pretrained),
            alpha=options.alpha,
            format=options.format,
        )
    except (ExportError, FileNotFoundError) as error:
        print(f"tritower export: {error}", file=sys.stderr)
        return 2
    if options.format == "open_clip":
        config = {**config["tritower"], "three_towers": None}  # provenance sits under "tritower"
    source, tensors = config["source"], config["tensors"]
    print(
        f"exported {source['checkpoint']}/{source['tag']} (step {source['step']}, ZeRO-{source['zero_stage']}, "
        f"{source['world_size']} ranks) to {options.out} as {config['dtype']}"
        + (f" in open_clip's format (checked against tritower: {config['verified']})" if "verified" in config else "")
    )
    for origin, count in tensors.items():
        if origin not in ("total", "locked_sources"):
            print(f"  {count:6d} tensors from {origin}")
    for locked_source in tensors["locked_sources"]:
        print(f"  locked weights from {locked_source}")
    if config["three_towers"]:
        print(f"  3T alpha mixture, alpha={config['three_towers']['alpha']:g} (third tower included)")
    elif parse_setting(config["model"]["setting"]).three_towers:
        print("  3T run exported as a plain CLIP (main towers only); --alpha A exports the mixture")
    return 0


if __name__ == "__main__":
    sys.exit(main())
