"""Gradient bytes on the wire and peak memory of one GradCache step, per micro-batch vs coalesced.

Under ZeRO-2/3, GradCache's second pass reduce-scatters each micro-batch's gradients at its
backward; ``train.coalesce_grad_reduction`` (DeepSpeed's ``engine.coalesce_grad_reduction()``)
keeps them on the rank and reduces once per optimizer step. This measures both on real ranks:

    deepspeed --num_gpus 2 benchmarks/gradcache_comm.py --out docs/results/gradcache_comm_devbox.json

Each case (ZeRO policy x coalesced or not) builds the trainer's towers (``build_towers`` +
``build_engine``, the same seed), runs one untimed step (optimizer state is created there), then
one measured optimizer step: ``gradcache_backward`` over M micro-batches per rank, then
``engine.step()``. Counted on rank 0:

* collectives: every call that reaches DeepSpeed's communication backend (``deepspeed.comm``'s
  ``cdb``, beneath every ZeRO stage), by kind, with its payload: the full tensor for a
  reduce(-scatter) or all-reduce, the gathered output for an all-gather (what a ring moves
  (W-1)/W of per rank);
* ``grad held``: the largest sum of ``param.grad`` bytes left on the rank after one micro-batch's
  backward (the unreduced gradients that coalescing keeps);
* ``step extra``: growth of the process's peak RSS over the measured step (``VmHWM`` reset after
  ``malloc_trim``, as in ``tower_settings.py``); CPU only, nan on CUDA, where
  ``max_memory_allocated`` growth is given instead.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch

from tritower.benchmarks.cli import Words, parse_benchmark
from tritower.benchmarks.tower_settings_runner import release_heap, status_kb
from tritower.launch.cli import load_config
from tritower.launch.engine.engine import build_engine, init_distributed
from tritower.launch.engine.gradcache import gradcache_backward, split_batch
from tritower.launch.lifecycle.dist_env import from_environ
from tritower.launch.towers.model_setup import TowerInputs, build_towers
from tritower.losses import build_objective
from tritower.model import image_tower_spec, text_tower_spec

MIB = 2**20


@dataclass
class GradCacheCommOptions:
    """Options of the GradCache communication benchmark (``--field value`` or ``--field=value``)."""

    zero: Words = ("zero_configs/z1.json", "zero_configs/z2.json", "zero_configs/z3.json")
    """ZeRO policy files measured, each per micro-batch and coalesced (``--zero a.json b.json``)."""
    image_tower: str = "vit_test"
    """Registry image tower, trained (setting Uu)."""
    text_tower: str = "minilm_l6"
    """Registry text tower: one with enough parameters for its gradients to show in memory."""
    vocab_size: int = 30522
    """Text token table rows (MiniLM's vocabulary)."""
    global_batch: int = 32
    """Samples per optimizer step over all ranks."""
    micro_batches: int = 4
    """GradCache micro-batches per rank (M): the reductions coalescing saves grow with it."""
    out: str = ""
    """Write the results as JSON here (default: the printed rows and table only)."""
    local_rank: int = 0
    """Set by the ``deepspeed`` launcher; the rank is read from the environment."""


# cdb method -> (kind, name and position of the argument whose bytes are the payload). The
# backend's methods sit behind a (*args, **kwargs) decorator: no signature to bind against.
COLLECTIVES = {
    "all_reduce": ("all-reduce", "tensor", 0),
    "inference_all_reduce": ("all-reduce", "tensor", 0),
    "all_reduce_coalesced": ("all-reduce", "tensors", 0),
    "reduce": ("reduce", "tensor", 0),
    "reduce_scatter_tensor": ("reduce-scatter", "input_tensor", 1),
    "reduce_scatter": ("reduce-scatter", "input_list", 1),
    "all_gather_into_tensor": ("all-gather", "output_tensor", 0),
    "all_gather_base": ("all-gather", "output_tensor", 0),
    "all_gather": ("all-gather", "tensor_list", 0),
    "all_gather_coalesced": ("all-gather", "output_tensors", 0),
    "broadcast": ("broadcast", "tensor", 0),
}


def _bytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_bytes(item) for item in value)
    return 0


class CommCounter:
    """Wraps the methods of DeepSpeed's communication backend object to count calls and bytes."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.bytes: dict[str, int] = defaultdict(int)
        self.active = False
        backend = deepspeed.comm.comm.cdb
        for method, (kind, name, position) in COLLECTIVES.items():
            original = getattr(backend, method, None)
            if original is not None:
                setattr(backend, method, self._wrap(original, kind, name, position))

    def _wrap(self, original: Callable, kind: str, name: str, position: int) -> Callable:
        def counted(*args: object, **kwargs: object) -> object:
            if self.active:
                self.calls[kind] += 1
                self.bytes[kind] += _bytes(kwargs[name] if name in kwargs else args[position])
            return original(*args, **kwargs)

        return counted

    def reset(self) -> None:
        self.calls.clear()
        self.bytes.clear()


def grad_bytes(module: torch.nn.Module) -> int:
    return sum(_bytes(p.grad) for p in module.parameters() if p.grad is not None)


def run_case(options: GradCacheCommOptions, zero: str, coalesce: bool, counter: CommCounter) -> dict:
    env = from_environ()
    per_rank = options.global_batch // env.world_size
    cfg = load_config(
        [
            "--experiment",
            "clip_test",
            "--zero",
            zero,
            f"--model.image.tower={options.image_tower}",
            f"--model.text.tower={options.text_tower}",
            f"--data.batch_size={options.global_batch}",
            f"--train.micro_batch_size={per_rank // options.micro_batches}",
            f"--train.coalesce_grad_reduction={coalesce}",
        ]
    )
    torch.manual_seed(0)
    towers = build_towers(cfg, vocab_size=options.vocab_size)
    engine, report = build_engine(towers.model, cfg, env.world_size, towers.groups)
    inputs = TowerInputs(cfg, towers, engine.module, engine.device, torch.float32)
    objective = build_objective(cfg.loss)
    image_spec, text_spec = image_tower_spec(options.image_tower), text_tower_spec(options.text_tower)
    generator = torch.Generator().manual_seed(1 + env.rank)
    size, context = image_spec.image_size, text_spec.context_length
    batch = {
        "image": torch.randn(per_rank, 3, size, size, generator=generator),
        "input_ids": torch.randint(5, options.vocab_size, (per_rank, context), generator=generator),
        "attention_mask": torch.ones(per_rank, context, dtype=torch.long),
    }
    held = [0]
    backward = engine.backward

    def backward_and_measure(*args: object, **kwargs: object) -> object:
        result = backward(*args, **kwargs)
        held[0] = max(held[0], grad_bytes(engine.module))
        return result

    engine.backward = backward_and_measure

    def step() -> float:
        micro = [inputs(part, 0) for part in split_batch(batch, options.micro_batches)]
        result, _ = gradcache_backward(engine, micro, objective, engine.device)
        engine.step()
        return float(result["loss"])

    step()  # untimed: optimizer state, ZeRO buffers
    cuda = engine.device.type == "cuda"
    release_heap()
    if cuda:
        torch.cuda.reset_peak_memory_stats(engine.device)
        before = torch.cuda.memory_allocated(engine.device)
    else:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # VmHWM := current RSS
        before = status_kb("VmRSS") * 1024
    held[0] = 0
    counter.reset()
    counter.active = True
    started = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - started
    counter.active = False
    extra = torch.cuda.max_memory_allocated(engine.device) - before if cuda else status_kb("VmHWM") * 1024 - before
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    row = {
        "zero": Path(zero).stem,
        "stage": engine.zero_optimization_stage(),
        "coalesce_requested": coalesce,
        "coalesced": engine.coalesce_micro_batches,
        "micro_batches": options.micro_batches,
        "parameters": params,
        "device": str(engine.device),
        "comm_calls": dict(counter.calls),
        "comm_MiB": {kind: value / MIB for kind, value in counter.bytes.items()},
        "comm_total_MiB": sum(counter.bytes.values()) / MIB,
        "grad_held_MiB": held[0] / MIB,
        "step_extra_MiB": extra / MIB,
        "memory_method": "cuda max_memory_allocated growth" if cuda else "peak RSS (VmHWM) growth",
        "step_s": seconds,
        "loss": loss,
        "kernels": report,
    }
    return row


def print_table(rows: list[dict]) -> None:
    """MiB per collective kind (calls in brackets), then the totals and memory, one row per case."""
    kinds = sorted({kind for row in rows for kind in row["comm_MiB"]})
    print(f"\n{'policy':<7}{'coalesced':>10}" + "".join(f"{kind:>22}" for kind in kinds), end="")
    print(f"{'total MiB':>11}{'grad held MiB':>15}{'step extra MiB':>16}{'step s':>8}")
    for row in rows:
        cells = "".join(f"{row['comm_MiB'].get(k, 0.0):>14.1f} MiB ({row['comm_calls'].get(k, 0):>2})" for k in kinds)
        print(
            f"{row['zero']:<7}{str(row['coalesced']):>10}{cells}{row['comm_total_MiB']:>11.1f}"
            f"{row['grad_held_MiB']:>15.1f}{row['step_extra_MiB']:>16.1f}{row['step_s']:>8.2f}"
        )


def main(argv: list[str] | None = None) -> None:
    options = parse_benchmark(GradCacheCommOptions, argv, command="deepspeed benchmarks/gradcache_comm.py")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    init_distributed()
    env = from_environ()
    counter = CommCounter()
    rows = []
    for zero in options.zero:
        for coalesce in (False, True):
            rows.append(run_case(options, zero, coalesce, counter))
            gc.collect()  # the case's engine, before the next one is measured
            if env.is_main:
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "kernels"}), flush=True)
    if not env.is_main:
        return
    print_table(rows)
    meta = {
        "command": " ".join(
            ["deepspeed", "--num_gpus", str(env.world_size), *[a for a in sys.argv if "local_rank" not in a]]
        ),
        "world_size": env.world_size,
        "device": rows[0]["device"] if rows else "",
        "towers": [options.image_tower, options.text_tower],
        "global_batch": options.global_batch,
        "deepspeed": deepspeed.__version__,
        "torch": torch.__version__,
        "payload": "bytes of the full tensor per reduce(-scatter)/all-reduce call, of the gathered output "
        "per all-gather call, counted on rank 0 at DeepSpeed's comm backend over one optimizer step",
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if options.out:
        Path(options.out).parent.mkdir(parents=True, exist_ok=True)
        Path(options.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
