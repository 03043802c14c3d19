"""What a DeepSpeed checkpoint holds, merged over ranks in one process, and where each tensor of
the exported model comes from (``launch/tools/export.py`` explains the order of preference).

Hand-written around DeepSpeed's ``zero_to_fp32``, which does the merging: it drops frozen
parameters below ZeRO-3 and knows nothing of locked towers' pretrained sources, so the origins,
the locked-tower checks and the errors naming keys are ours.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tritower.launch.checkpoint.manifest import check_locked
from tritower.model import ModelConfig

SHOWN = 8  # keys named per kind in an error


class ExportError(RuntimeError):
    """The checkpoint cannot be exported faithfully; the message names the keys or files."""


@dataclass
class CheckpointTensors:
    """What one DeepSpeed tag holds, merged over ranks."""

    folder: Path
    tag: str
    client_state: dict
    zero_stage: int
    world_size: int
    master: dict[str, torch.Tensor]
    """fp32 master weights of the trainable parameters, plus buffers (zero_to_fp32)."""
    frozen: dict[str, torch.Tensor] = field(default_factory=dict)
    """Copies of frozen parameters in the training precision (not in ``master``)."""


def _model_states_file(tag_dir: Path) -> Path:
    # Rank 0's file: ZeRO names it zero_pp_rank_0_mp_rank_00_*, stage 0 mp_rank_00_*.
    for name in ("zero_pp_rank_0_mp_rank_00_model_states.pt", "mp_rank_00_model_states.pt"):
        if (tag_dir / name).is_file():
            return tag_dir / name
    raise FileNotFoundError(f"{tag_dir}: no rank-0 model states file")


def read_checkpoint(folder: Path, tag: str) -> CheckpointTensors:
    """Merge one tag's weights over all ranks, in this process, without a process group."""
    tag_dir = folder / tag
    # DeepSpeed pickles its own objects into the states file: weights_only=False is required,
    # so only export checkpoints you trust, as with any pickle.
    states = torch.load(_model_states_file(tag_dir), map_location="cpu", weights_only=False)
    stage = int((states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0))
    module = states["module"]
    client_state = {k: v for k, v in states.items() if k in ("step", "config", "world_size", "locked")}
    if stage == 0:
        # No partitioning: the module state is the full model (fp32 training keeps no extra
        # master copy); nothing is frozen-but-dropped.
        master = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
        return CheckpointTensors(folder, tag, client_state, 0, int(states.get("dp_world_size", 1)), master)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    # zero_to_fp32 prints progress (and tqdm bars) per file; keep the export's output readable.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        master = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=tag)
    trainable = {name for group in states.get("param_shapes") or [] for name in group}
    frozen_names = set(states.get("frozen_param_shapes") or {})
    frozen = {name: master.pop(name) for name in frozen_names if name in master}
    if stage <= 2:
        # ZeRO-1 writes no frozen_param_shapes, so zero_to_fp32 drops frozen parameters; below
        # stage 3 the engine's module state holds every parameter whole, in training precision.
        buffers = set(states.get("buffer_names") or [])
        for name, tensor in module.items():
            if name not in master and name not in frozen and name not in trainable and name not in buffers:
                frozen[name] = tensor
    return CheckpointTensors(folder, tag, client_state, stage, int(states.get("dp_world_size", 1)), master, frozen)


def model_config_from(saved: dict) -> ModelConfig:
    """The run's ModelConfig from its saved dict (older flat layouts too); unknown fields are an
    error, not dropped."""
    try:
        return ModelConfig.from_dict(saved)
    except ValueError as error:
        raise ExportError(
            f"the checkpoint's model config does not read here ({error}); "
            "export with the tritower version that trained it"
        ) from None


def locked_prefixes(cfg: ModelConfig) -> tuple[str, ...]:
    """Module prefixes of the L towers: their tensors may come from the pretrained source."""
    return tuple(f"{tower.role}_tower." for tower in cfg.parsed.main_towers if tower.locked)


def assemble_state(
    reference: dict[str, torch.Tensor],
    locked: dict[str, bool],
    checkpoint: CheckpointTensors,
    train_dtype: torch.dtype,
    sources: dict[str, str],
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Pick every tensor of ``reference`` (the freshly built model's state dict) from its source.

    ``locked[key]`` says whether ``key`` belongs to a locked part (its value in ``reference``
    then came from a pretrained file or a fixed initialisation, named in ``sources[key]``).
    Returns (state dict, count of tensors per origin). Raises ExportError naming missing,
    unexpected, mis-shaped and disagreeing keys.
    """
    state: dict[str, torch.Tensor] = {}
    origins = {"checkpoint (fp32 master)": 0, "locked source": 0, "checkpoint (frozen copy)": 0}
    missing, disagree, shapes = [], [], []
    for key, expected in reference.items():
        if key in checkpoint.master:
            value, origin = checkpoint.master[key], "checkpoint (fp32 master)"
        elif locked.get(key, False):
            value, origin = expected, "locked source"
            copy = checkpoint.frozen.get(key)
            if copy is not None and not torch.equal(copy.to(train_dtype), expected.to(train_dtype)):
                disagree.append(f"{key} (source {sources.get(key, '?')})")
        elif key in checkpoint.frozen:
            value, origin = checkpoint.frozen[key], "checkpoint (frozen copy)"
        else:
            missing.append(key)
            continue
        if value.shape != expected.shape:
            shapes.append(f"{key}: model {list(expected.shape)}, checkpoint {list(value.shape)}")
            continue
        state[key] = value.to(expected.dtype) if value.is_floating_point() else value
        origins[origin] += 1
    unexpected = sorted((set(checkpoint.master) | set(checkpoint.frozen)) - set(reference))
    problems = []
    for label, keys, hint in (
        (
            "missing (not in the checkpoint and not part of a locked tower)",
            missing,
            "the checkpoint does not hold them and no pretrained source provides them",
        ),
        (
            "unexpected (in the checkpoint, not in the model)",
            unexpected,
            "the checkpoint was written by a different model config",
        ),
        ("with a different shape", shapes, "the model config does not match the checkpoint"),
        (
            "locked tensors that differ from their pretrained source",
            disagree,
            "the pretrained file changed since training: pass the original one",
        ),
    ):
        if keys:
            more = f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else ""
            problems.append(f"{len(keys)} {label}: {keys[:SHOWN]}{more}; {hint}")
    if problems:
        raise ExportError(f"{checkpoint.folder / checkpoint.tag}: " + " | ".join(problems))
    return state, origins


def check_locked_identities(
    model: torch.nn.Module, identities: dict[str, dict[str, str]], third_tower: torch.nn.Module | None = None
) -> None:
    """The checkpointer's locked-tower identity check (``checkpointer.check_locked``) against the
    files this export loads now. ``third_tower`` is 3T's h when the export holds it (``--alpha``)."""
    from tritower.model import file_sha256

    current = {}
    for name in identities:
        tower = third_tower if name == "third_tower" else getattr(model, name, None)
        source = getattr(tower, "source", "")
        if source:  # the third tower is not part of a plain export
            current[name] = {"source": source, "sha256": file_sha256(source)}
    try:
        check_locked(identities, current, "the checkpoint")
    except ValueError as error:
        raise ExportError(f"{error} (export: pass the original file with --pretrained)") from None
