"""DeepSpeed lives here (with launch/checkpoint/checkpointer.py): process group and engine construction.

``model/``, ``losses/``, ``data/`` and ``evaluation/`` never import DeepSpeed; this module hands
them an engine that behaves like the model (``engine(...)``, ``engine.module.encode_image``).
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os

import deepspeed
import torch
from torch import nn

from tritower.launch.config import ConfigError, TrainConfig
from tritower.launch.engine.ds_config import build_ds_config
from tritower.launch.engine.fused import describe_optimizer, use_fused_layer_norm
from tritower.launch.lifecycle import dist_env
from tritower.launch.metrics.monitors import add_monitors
from tritower.launch.optim.optimizers import (
    build_client_optimizer,
    client_optimizer_needed,
    client_scheduler,
)
from tritower.launch.optim.optimizers import describe as describe_schedule


def init_distributed() -> None:
    """Start the process group: NCCL on GPUs, gloo on the CPU (DeepSpeed picks by accelerator)."""
    dist_env.ensure_single_process_defaults()
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(verbose=False)
        atexit.register(_remove_cpu_allreduce_buffer)


def meet_all_ranks() -> None:
    """A barrier at the end of a run that finished or stopped by agreement (every rank reaches this
    line; a rank that failed cannot, so error paths skip it): no rank leaves while another still
    works. The process group itself is destroyed by ``preemption.exit_rank``, on every exit.
    """
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _remove_cpu_allreduce_buffer() -> None:
    """Unlink this rank's /dev/shm buffer of DeepSpeed's CPU shared-memory all-reduce.

    DeepSpeed never unlinks it: every CPU run would leave ~66 MB per rank in /dev/shm (RAM).
    Every rank maps the buffer during initialisation, so removing the name at exit is safe.
    """
    rank = os.environ.get("LOCAL_RANK", "0")
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    pattern = f"/dev/shm/deepspeed_allreduce_buffer_*_{address}_{port}_{rank}"
    for path in glob.glob(pattern):
        with contextlib.suppress(OSError):
            os.unlink(path)


def build_engine(
    model: nn.Module, cfg: TrainConfig, world_size: int, groups: list[dict] | None = None
) -> tuple[deepspeed.DeepSpeedEngine, list[str]]:
    """Wrap ``model`` in a DeepSpeed engine; returns (engine, lines saying which kernels are used).

    ``groups`` are the optimizer's parameter groups (``tritower.model.parameter_groups``: the
    trainable parameters only, each group with its own ``lr``); None = every parameter that
    requires grad, with weight decay on matrices only.
    """
    from deepspeed.accelerator import get_accelerator

    device = torch.device(get_accelerator().device_name(int(os.environ.get("LOCAL_RANK", "0"))))
    ds_config = _prefer_fused_adamw(build_ds_config(cfg, world_size, device.type), device)
    add_monitors(ds_config, cfg)
    if cfg.deepspeed.precision == "fp16" and device.type != "cuda":
        raise ConfigError("deepspeed.precision=fp16 needs a GPU; use fp32 or bf16 on the CPU")
    report = [use_fused_layer_norm(model, device, cfg.deepspeed.use_apex)]
    groups = groups if groups is not None else _default_groups(model, cfg)
    # Adafactor, and LAMB off CUDA, are built here; any schedule but the default a LambdaLR.
    client = build_client_optimizer(groups, cfg.optim) if client_optimizer_needed(cfg.optim, device.type) else None
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        optimizer=client,
        lr_scheduler=client_scheduler(cfg.optim, cfg.train.steps),
        config=ds_config,
    )
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    fused = getattr(getattr(optimizer, "optimizer", optimizer), "defaults", {}).get("fused")
    engine.coalesce_micro_batches, coalescing = _coalescing(engine, cfg.train.coalesce_grad_reduction)
    report += [
        describe_optimizer(optimizer) + (" with fused=True" if fused else ""),
        describe_schedule(cfg.optim, device.type),
        f"ZeRO stage {stage}, precision {cfg.deepspeed.precision}, device {engine.device}",
        coalescing,
    ]
    return engine, report


def _prefer_fused_adamw(ds_config: dict, device: torch.device) -> dict:
    """On CUDA, torch's fused AdamW (``fused=True``: one kernel over all tensors, built into torch)
    unless the policy file chooses ``optimizer.params.torch_adam`` itself.

    DeepSpeed's own default there, ``FusedAdam``, is the same update but a C++/CUDA op that is
    JIT-compiled on first use: it needs nvcc and a CUDA toolkit matching torch (a pip-installed
    torch brings neither) and minutes of compilation on a fresh machine. Under ZeRO the update
    runs over a few flat fp32 partitions, where both fused kernels do the same work.
    """
    zero = ds_config.get("zero_optimization", {})
    offloaded = zero.get("offload_optimizer", {}).get("device", "none") != "none"
    if ds_config.get("optimizer", {}).get("type") not in ("AdamW", "Adam"):
        return ds_config  # LAMB, or a client optimizer (Adafactor): launch/optim/optimizers.py
    params = ds_config["optimizer"].setdefault("params", {})
    if device.type == "cuda" and not offloaded and "torch_adam" not in params:
        params.update(torch_adam=True, fused=True)
    return ds_config


def _coalescing(engine: deepspeed.DeepSpeedEngine, requested: bool) -> tuple[bool, str]:
    """(whether GradCache reduces gradients once per step here, the line saying so).

    ``engine.coalesce_grad_reduction()`` (DeepSpeed 0.19.1+) supports ZeRO-1/2/3 with DeepSpeed's
    ZeRO optimizers only: not ZeRO-0 (which all-reduces once, at the accumulation boundary,
    anyway) nor the BF16_Optimizer/FP16_Optimizer wrappers, which lack the flag it sets.
    """
    if not requested:
        return False, "GradCache gradient reduction: at every micro-batch's backward (ZeRO-2/3)"
    stage = engine.zero_optimization_stage()
    reason = ""
    if not hasattr(engine, "coalesce_grad_reduction"):
        reason = f"DeepSpeed {deepspeed.__version__} has no engine.coalesce_grad_reduction (0.19.1+)"
    elif stage == 0:
        reason = "ZeRO-0 reduces once per step already"
    elif not hasattr(engine.optimizer, "_coalesce_grad_reduction"):
        reason = f"not supported with optimizer wrapper {type(engine.optimizer).__name__}"
    if reason:
        return False, f"GradCache gradient reduction: train.coalesce_grad_reduction ignored ({reason})"
    return True, "GradCache gradient reduction: once per optimizer step (engine.coalesce_grad_reduction)"


def _default_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Every trainable parameter at the base lr, under the rules of ``model.parameter_groups``."""
    from tritower.model import parameter_groups

    trainable = {name: param.requires_grad for name, param in model.named_parameters()}
    return parameter_groups(model, trainable, cfg.model, cfg.optim.weight_decay, cfg.optim.lr)
