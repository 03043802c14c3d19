"""Turns a ZeRO policy file plus the training config into the dict ``deepspeed.initialize`` takes.

``zero_configs/*.json`` hold the ZeRO and precision policy only. The fields the trainer owns
(batch sizes, accumulation, clipping, optimizer and schedule, which precision is on) say
``"auto"`` there and are filled here, in this one place. A JSON that fixes one of them to a value
other than the training config's is an error naming both values.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from tritower.launch.config import ConfigError, TrainConfig
from tritower.launch.optim.config import OptimConfig
from tritower.launch.optim.optimizers import client_optimizer_needed
from tritower.suggest import closest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent

# Top-level keys a policy file may hold; anything else is a typo or belongs in the training config.
ALLOWED_KEYS = {
    "zero_optimization",
    "bf16",
    "fp16",
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
    "steps_per_print",
    "wall_clock_breakdown",
    "communication_data_type",
    "prescale_gradients",
    "gradient_predivide_factor",
    "zero_allow_untested_optimizer",
    "activation_checkpointing",
    "flops_profiler",
    "comms_logger",
    "data_types",
    "seq_parallel_communication_data_type",
    # DeepSpeed's own monitors, beside wandb: TensorBoard event files and CSV files (rank 0).
    "tensorboard",
    "csv_monitor",
}


def resolve_zero_path(path: str) -> Path:
    """Find the policy file: as given, else relative to the installed package."""
    candidates = [Path(path).expanduser(), PACKAGE_ROOT / path, PACKAGE_ROOT / "zero_configs" / Path(path).name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    available = ", ".join(sorted(p.name for p in (PACKAGE_ROOT / "zero_configs").glob("*.json")))
    raise ConfigError(
        f"ZeRO config file not found: {path}. Pass --zero with one of zero_configs/{{{available}}} "
        "or a path to your own JSON."
    )


def load_policy(path: str) -> tuple[Path, dict[str, Any]]:
    """Read and check the shape of a policy file."""
    resolved = resolve_zero_path(path)
    try:
        policy = json.loads(resolved.read_text())
    except json.JSONDecodeError as error:
        raise ConfigError(
            f"{resolved} is not valid JSON: {error}. Fix the file or pick one from zero_configs/."
        ) from None
    if not isinstance(policy, dict):
        raise ConfigError(f"{resolved} must hold a JSON object (a ZeRO policy), found {type(policy).__name__}")
    for key in policy:
        if key not in ALLOWED_KEYS:
            raise ConfigError(
                f"{resolved}: unknown top-level key '{key}'{closest(key, sorted(ALLOWED_KEYS))}. A ZeRO policy "
                'holds only zero_optimization, precision and "auto" trainer fields.'
            )
    stage = policy.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"{resolved}: zero_optimization.stage must be 0, 1, 2 or 3, found {stage!r}")
    return resolved, policy


def _fill(policy: dict, dotted: str, value: Any, source: str, origin: Path) -> None:
    """Set ``dotted`` to ``value`` where the policy says "auto" (or nothing); refuse a mismatch."""
    *parents, leaf = dotted.split(".")
    node = policy
    for name in parents:
        node = node.setdefault(name, {})
    current = node.get(leaf, "auto")
    if current == "auto":
        node[leaf] = value
        return
    same = list(current) == list(value) if isinstance(value, (list, tuple)) else current == value
    if not same:
        raise ConfigError(
            f"{origin} sets {dotted}={current!r} but the training config gives {value!r} ({source}). "
            f'Set it to "auto" in the JSON (the trainer fills it) or change {source}.'
        )


def micro_batches_per_step(cfg: TrainConfig, world_size: int) -> int:
    """How many micro-batches each rank encodes per optimizer step (GradCache when > 1)."""
    global_batch = cfg.data.batch_size
    if global_batch % world_size:
        raise ConfigError(
            f"data.batch_size={global_batch} is not divisible by world size {world_size}; "
            f"choose a multiple of {world_size}"
        )
    per_rank = global_batch // world_size
    micro = cfg.train.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(
            f"train.micro_batch_size={micro} does not divide the per-rank batch {per_rank} "
            f"(data.batch_size={global_batch} over {world_size} ranks)"
        )
    return per_rank // micro


def build_ds_config(cfg: TrainConfig, world_size: int, device_type: str = "cuda") -> dict[str, Any]:
    """The complete DeepSpeed config for this run, world size and device type."""
    origin, policy = load_policy(cfg.deepspeed.zero)
    policy = copy.deepcopy(policy)
    global_batch = cfg.data.batch_size
    micro_batches = micro_batches_per_step(cfg, world_size)
    opt = cfg.optim
    if cfg.train.steps < opt.warmup_steps:
        raise ConfigError(f"train.steps={cfg.train.steps} is shorter than optim.warmup_steps={opt.warmup_steps}")
    fills = [
        ("train_batch_size", global_batch, "data.batch_size"),
        (
            "train_micro_batch_size_per_gpu",
            global_batch // (world_size * micro_batches),
            "train.micro_batch_size (or data.batch_size / world size)",
        ),
        ("gradient_accumulation_steps", micro_batches, "data.batch_size / (world size x train.micro_batch_size)"),
        ("gradient_clipping", float(opt.grad_clip), "optim.grad_clip"),
        ("optimizer.params.lr", opt.lr, "optim.lr"),
        ("optimizer.params.betas", [opt.beta1, opt.beta2], "optim.beta1/beta2"),
        ("optimizer.params.eps", opt.eps, "optim.eps"),
        ("optimizer.params.weight_decay", opt.weight_decay, "optim.weight_decay"),
        ("bf16.enabled", cfg.deepspeed.precision == "bf16", "deepspeed.precision"),
        ("fp16.enabled", cfg.deepspeed.precision == "fp16", "deepspeed.precision"),
    ]
    policy.setdefault("optimizer", {"type": "AdamW"})
    _check_scheduler(policy.pop("scheduler", None), cfg, origin)
    if policy["optimizer"].get("type", "AdamW") not in ("AdamW", "Adam"):
        raise ConfigError(
            f"{origin}: optimizer.type must be AdamW (the trainer's optimizer), found {policy['optimizer']['type']!r}"
        )
    for dotted, value, source in fills:
        _fill(policy, dotted, value, source, origin)
    offloaded = policy.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") != "none"
    if opt.name != "adamw":
        return _other_optimizer_or_schedule(policy, opt, device_type, offloaded, origin)
    if device_type != "cuda" and not offloaded:
        # Off CUDA, DeepSpeed's FusedAdam is a C++ op JIT-compiled on first use (60-90 s on 2 cores,
        # serialised across processes by a file lock); torch's AdamW is the same update, ready now.
        policy["optimizer"].setdefault("params", {})["torch_adam"] = True
    # The optimizer's weight decay applies to the "decay" parameter group only; biases, norms and
    # the temperature sit in a group whose weight_decay is 0 (see trainer parameter groups).
    return policy


def _check_scheduler(block: dict | None, cfg: TrainConfig, origin: Path) -> None:
    """The schedule is ``optim.*`` (one implementation, ``launch/optim/optimizers.py``), never the
    policy's. A policy that still carries DeepSpeed's ``WarmupCosineLR`` block (as older copies of
    ``zero_configs/`` do) is accepted where it agrees with ``optim.*`` ("auto" or equal values);
    anything else is refused, naming the field to change."""
    if block is None:
        return
    if block.get("type") != "WarmupCosineLR" or block.get("params", {}).get("warmup_type", "log") != "linear":
        raise ConfigError(
            f"{origin} sets a DeepSpeed scheduler ({block.get('type')!r}); the schedule is set by --optim.schedule, "
            '--optim.warmup_steps, --optim.min_lr_ratio and --optim.cooldown_steps: remove "scheduler" from the JSON'
        )
    holder = {"scheduler": copy.deepcopy(block)}
    for dotted, value, source in [
        ("scheduler.params.total_num_steps", cfg.train.steps, "train.steps"),
        ("scheduler.params.warmup_num_steps", cfg.optim.warmup_steps, "optim.warmup_steps"),
        ("scheduler.params.cos_min_ratio", cfg.optim.min_lr_ratio, "optim.min_lr_ratio"),
        ("scheduler.params.warmup_min_ratio", 0.0, "the warm-up's start (0)"),
    ]:
        _fill(holder, dotted, value, source, origin)


def _other_optimizer_or_schedule(
    policy: dict[str, Any], opt: OptimConfig, device_type: str, offloaded: bool, origin: Path
) -> dict[str, Any]:
    """The policy for an optimizer other than AdamW (``launch/optim/optimizers.py``): DeepSpeed's
    Lamb on CUDA; a client optimizer (Adafactor; Lamb elsewhere), passed to ``deepspeed.initialize``
    by ``launch/engine/engine.py``."""
    if offloaded and opt.name != "adamw":
        raise ConfigError(
            f"{origin} offloads the optimizer to the CPU, which runs DeepSpeed's CPU Adam only; "
            f"optim.name={opt.name!r} needs a policy without offload_optimizer (z1/z2/z3.json)"
        )
    if opt.name == "lamb" and not client_optimizer_needed(opt, device_type):
        params = policy["optimizer"].setdefault("params", {})
        params.pop("torch_adam", None)
        policy["optimizer"]["type"] = "Lamb"
        policy["zero_allow_untested_optimizer"] = True
    elif client_optimizer_needed(opt, device_type):
        policy.pop("optimizer", None)
        policy["zero_allow_untested_optimizer"] = True
    elif device_type != "cuda" and not offloaded:
        policy["optimizer"].setdefault("params", {})["torch_adam"] = True
    return policy


def check_zero_policy(ds_config: dict, path: str) -> None:
    """DeepSpeed validates ``zero_optimization`` only inside ``deepspeed.initialize``, after the
    towers are built, with a pydantic traceback per rank: validate it now, naming the key."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**ds_config.get("zero_optimization", {}))
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in error.errors())
        raise ConfigError(
            f"{path}: zero_optimization is not valid for DeepSpeed ({problems}); fix the key (see DeepSpeed's "
            "ZeRO config docs)"
        ) from None
