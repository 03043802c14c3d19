"""Step time and peak memory of the locked-tower fast path: Uu, Lu, Lu with precomputed image
embeddings, 3T and 3T with precomputed third-tower embeddings, next to the FLOP model.

    python benchmarks/tower_settings.py --out tower_settings.json     # CPU, ~3 min on 2 cores
    python benchmarks/tower_settings.py --device cuda --precision bf16 --image-tower \\
        vit_base_patch16_224 --text-tower bert_base --vocab-size 30522 --batch 128 --out gpu.json

Every setting is built as the trainer builds it (``launch/towers/model_setup.py``: ``build_towers`` with the
regex lock rules, ``split_locked`` and the per-tower parameter groups) from the same towers and
one fixed batch, and stepped with ``torch.optim.AdamW`` over its groups, single process, no
DeepSpeed. A step: the locked towers encode under inference mode (``TowerInputs``, as in the
trainer), the trainable forward, the objective (``build_objective``: CLIP, or 3T,
in fp32), backward, optimizer step. A precomputed tower is not built: its output is a fixed
random tensor of its width in the batch's ``embedding``, which is what reading it from a
companion shard amounts to.

FLOP model: a trained tower costs 3 forward passes per step (forward + backward ~ 2 forwards),
a locked one 1, a precomputed one 0; heads, loss and optimizer are left out. F (one forward of a
tower) is *measured*: the median time of that tower alone encoding the batch under inference
mode, interleaved with the steps. (Counted FLOPs would mix in how well the CPU runs each
tower's shapes; the multipliers are what this checks. The FLOPs that ``FlopCounterMode`` counts
in one step of each setting are reported beside, as an analytic reference.) Check: each
setting's measured step-time ratio to Uu within ``--tolerance`` (15%) of the model's ratio.

Timing: ``--warmup`` rounds, then the median of ``--steps`` rounds; each round runs the forward
probes and one step of every setting, in an order rotated every round, so drifts in machine load
hit all settings alike. Memory, in one extra step per setting after the timed ones:
``state`` = bytes of parameters, buffers and optimizer state (model plus locked towers, counted);
``step extra`` = on CUDA ``max_memory_allocated`` minus the allocation before the step; on CPU
the growth of the process's peak RSS over the step (``/proc/self/clear_refs`` resets VmHWM, after
``malloc_trim`` hands freed heap back, so reused heap pages do not hide the step's memory; that
re-faults pages, hence not in the timed steps). ``peak`` = state + step extra. Docs:
docs/tower_settings_benchmark.md.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from tritower.benchmarks.cli import listed, parse_benchmark
from tritower.benchmarks.tower_settings_runner import REFERENCE, SETTINGS, Runner, clock, step_extra_bytes
from tritower.model import LockedTower, build_image_tower, build_text_tower, image_tower_spec, text_tower_spec

MIB = 2**20
Settings = listed(str, tuple(SETTINGS))
"""Names of settings, several: ``--settings Lu 3T_precomputed``."""


@dataclass
class TowerSettingsOptions:
    """Options of the tower-settings benchmark (``--field value`` or ``--field=value``)."""

    image_tower: str = "vit_scene_tiny"
    """Registry image tower; Lu and 3T lock a freshly initialised copy saved as its weights."""
    text_tower: str = "bert_scene_tiny"
    """Registry text tower, trained from scratch in every setting."""
    third_tower: str = ""
    """3T's third tower, an image tower from the registry (default: the image tower)."""
    batch: int = 256
    """Samples per step (at least 2: the contrastive loss needs negatives)."""
    steps: int = 40
    """Timed rounds; each setting's median step is reported."""
    warmup: int = 3
    """Untimed rounds first (allocator and kernel caches settle)."""
    threads: int = len(os.sched_getaffinity(0))
    """Torch intra-op threads (default: the CPUs this process may use)."""
    device: str = "cpu"
    """``cpu`` or ``cuda[:N]``."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """``bf16``: autocast on the trainable forward and the locked towers; the loss stays fp32."""
    vocab_size: int = 1024
    """Text token table rows."""
    embed_dim: int = 128
    """``model.embed_dim``: width of the joint embedding."""
    settings: Settings = tuple(SETTINGS)
    """Settings to run, e.g. ``--settings Lu 3T`` (Uu always runs: the ratios are to it)."""
    tolerance: float = 0.15
    """Allowed relative error of each setting's step-time ratio to Uu against the FLOP model's."""
    no_flops: bool = False
    """Skip the FLOP count (FlopCounterMode runs one more step of every setting)."""
    seed: int = 0
    """Seed of the towers' initialisation and of the batch."""
    out: str = ""
    """Write the results as JSON here (default: the tables only)."""


# -- the benchmark -----------------------------------------------------------------------------
def save_image_weights(name: str, folder: Path) -> str:
    """A freshly initialised tower's weights as a local 'pretrained' file (plain timm keys)."""
    path = folder / f"{name}.safetensors"
    save_file(build_image_tower(name).model.state_dict(), str(path))
    return str(path)


def forward_probes(
    opts: TowerSettingsOptions, batch: dict[str, torch.Tensor], device: torch.device
) -> dict[str, tuple[LockedTower, tuple[torch.Tensor, ...]]]:
    """{tower role: (tower, inputs)}: each tower alone, run as a locked tower (F of the model)."""
    autocast = torch.bfloat16 if opts.precision == "bf16" else None
    image_inputs = (batch["image"],)
    probes = {
        "image": (
            LockedTower(build_image_tower(opts.image_tower), opts.image_tower, autocast_dtype=autocast),
            image_inputs,
        ),
        "text": (
            LockedTower(build_text_tower(opts.text_tower, opts.vocab_size), opts.text_tower, autocast_dtype=autocast),
            (batch["input_ids"], batch["attention_mask"]),
        ),
    }
    if opts.third_tower != opts.image_tower:
        probes["third"] = (
            LockedTower(build_image_tower(opts.third_tower), opts.third_tower, autocast_dtype=autocast),
            image_inputs,
        )
    for tower, _ in probes.values():
        tower.to(device)
    return probes


def time_forward(tower: LockedTower, inputs: tuple[torch.Tensor, ...], device: torch.device) -> float:
    start = clock(device)
    tower.encode(*inputs)
    return clock(device) - start


def count_flops(run: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        run()
    return int(counter.get_total_flops())


def options_from(argv: list[str] | None) -> TowerSettingsOptions:
    """The options of ``argv``: the third tower filled in, the reference setting added."""
    opts = parse_benchmark(TowerSettingsOptions, argv, command="python benchmarks/tower_settings.py")
    opts.third_tower = opts.third_tower or opts.image_tower
    opts.settings = tuple(name for name in SETTINGS if name == REFERENCE or name in opts.settings)
    if opts.steps < 1 or opts.warmup < 0 or opts.batch < 2:
        print("tower_settings: error: need --steps >= 1, --warmup >= 0 and --batch >= 2", file=sys.stderr)
        raise SystemExit(2)
    return opts


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark, prints the tables, writes ``--out``; returns the results."""
    opts = options_from(argv)
    torch.set_num_threads(opts.threads)
    device = torch.device(opts.device)
    load_before = os.getloadavg()[0]

    image_spec, text_spec = image_tower_spec(opts.image_tower), text_tower_spec(opts.text_tower)
    generator = torch.Generator().manual_seed(opts.seed)
    size, context = image_spec.image_size, text_spec.context_length
    ids = torch.randint(1, opts.vocab_size, (opts.batch, context), generator=generator)
    batch = {
        "image": torch.randn(opts.batch, 3, size, size, generator=generator).to(device),
        "input_ids": ids.to(device),
        "attention_mask": torch.ones_like(ids).to(device),
    }

    with tempfile.TemporaryDirectory() as folder:
        weights = {name: save_image_weights(name, Path(folder)) for name in {opts.image_tower, opts.third_tower}}
        runners = {name: Runner(SETTINGS[name], opts, weights, batch, device) for name in opts.settings}
    probes = forward_probes(opts, batch, device)

    # Round robin, the order rotated every round: load drifts hit every setting alike.
    jobs = [
        (f"forward:{role}", lambda t=tower, x=inputs: time_forward(t, x, device))
        for role, (tower, inputs) in probes.items()
    ]
    jobs += [(name, runner.step) for name, runner in runners.items()]
    samples: dict[str, list] = {name: [] for name, _ in jobs}
    started = time.perf_counter()
    for round_index in range(opts.warmup + opts.steps):
        shift = round_index % len(jobs)
        for name, job in jobs[shift:] + jobs[:shift]:
            result = job()
            if round_index >= opts.warmup:
                samples[name].append(result)
    timed_seconds = time.perf_counter() - started

    forward = {role: statistics.median(samples[f"forward:{role}"]) for role in probes}
    forward.setdefault("third", forward["image"])
    flops: dict[str, int] = {}
    if not opts.no_flops:
        flops = {role: count_flops(lambda t=tower, x=inputs: t.encode(*x)) for role, (tower, inputs) in probes.items()}
        flops.setdefault("third", flops["image"])

    rows = []
    for name, runner in runners.items():
        setting = runner.setting
        steps = samples[name]
        total = statistics.median(s["total"] for s in steps)
        trainable, locked = runner.parameter_counts()
        row = {
            "name": name,
            "setting": setting.setting,
            "precomputed": setting.precomputed,
            "trained_towers": list(setting.trained),
            "locked_towers": list(setting.locked),
            "trainable_parameters": trainable,
            "locked_parameters": locked,
            "step_seconds": total,
            "step_seconds_all": [s["total"] for s in steps],
            "phase_seconds": {
                phase: statistics.median(s[phase] for s in steps)
                for phase in ("locked", "forward", "backward", "optimizer")
            },
            "model_seconds": setting.model_cost(forward),
        }
        if flops:
            row["step_flops"] = count_flops(runner.step)
            row["model_flops"] = setting.model_cost(flops)
        row["state_bytes"] = runner.state_bytes()
        row["step_extra_bytes"] = step_extra_bytes(runner)
        row["peak_bytes"] = row["state_bytes"] + row["step_extra_bytes"]
        row["loss"] = runner.loss
        rows.append(row)
    reference = rows[0]
    for row in rows:
        row["ratio"] = row["step_seconds"] / reference["step_seconds"]
        row["model_ratio"] = row["model_seconds"] / reference["model_seconds"]
        row["relative_error"] = row["ratio"] / row["model_ratio"] - 1
        # Above 1: backward costs more than 2 forwards, or heads, loss and optimizer show.
        row["step_over_model"] = row["step_seconds"] / row["model_seconds"]
        row["pass"] = abs(row["relative_error"]) <= opts.tolerance
        if flops:
            row["flop_ratio"] = row["step_flops"] / reference["step_flops"]

    meta = {
        "command": " ".join([Path(sys.argv[0]).name] + (sys.argv[1:] if argv is None else argv)),
        "image_tower": opts.image_tower,
        "text_tower": opts.text_tower,
        "third_tower": opts.third_tower,
        "batch": opts.batch,
        "steps": opts.steps,
        "warmup": opts.warmup,
        "threads": opts.threads,
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPUs"),
        "precision": opts.precision,
        "vocab_size": opts.vocab_size,
        "embed_dim": opts.embed_dim,
        "tolerance": opts.tolerance,
        "torch": torch.__version__,
        "load_avg_1min": [load_before, os.getloadavg()[0]],
        "timed_seconds": timed_seconds,
        "flop_model": "3 x F per trained tower + 1 x F per locked tower + 0 per precomputed; "
        "F = measured median forward time of the tower alone (inference mode)",
        "memory_method": (
            "torch.cuda.max_memory_allocated growth over one step"
            if device.type == "cuda"
            else "peak RSS (VmHWM) growth over one step after malloc_trim"
        ),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    results = {
        "meta": meta,
        "forward_seconds": forward,
        "forward_flops": flops,
        "settings": rows,
        "all_pass": all(row["pass"] for row in rows),
    }
    print_tables(results)
    if opts.out:
        Path(opts.out).write_text(json.dumps(results, indent=1))
    return results


def print_tables(results: dict) -> None:
    meta, forward, flops = results["meta"], results["forward_seconds"], results["forward_flops"]
    print(
        f"\n{meta['image_tower']} / {meta['text_tower']} (third: {meta['third_tower']}), batch "
        f"{meta['batch']}, {meta['device_name']}, {meta['threads']} threads, "
        f"{meta['precision']}; "
        f"median of {meta['steps']} steps after {meta['warmup']}; load "
        f"{meta['load_avg_1min'][0]:.1f} -> {meta['load_avg_1min'][1]:.1f}"
    )
    for role in ("image", "text", "third"):
        counted = f", {flops[role] / 1e9:.2f} GFLOP" if flops else ""
        print(f"  F_{role:<6}{forward[role] * 1e3:>10.1f} ms{counted}")
    tolerance = f"{meta['tolerance']:.0%}"
    print(
        f"\n{'setting':<16}{'step ms':>9}{'model ms':>10}{'step/model':>12}{'ratio':>8}"
        f"{'model':>8}{'error':>8}{'  ' + tolerance:>7}{'FLOP ratio':>12}"
    )
    for index, row in enumerate(results["settings"]):
        flop_ratio = f"{row['flop_ratio']:>12.3f}" if "flop_ratio" in row else f"{'-':>12}"
        check = (
            f"{'ref':>8}{'':>7}"
            if index == 0
            else f"{row['relative_error']:>+8.1%}{'PASS' if row['pass'] else 'FAIL':>7}"
        )
        print(
            f"{row['name']:<16}{row['step_seconds'] * 1e3:>9.1f}"
            f"{row['model_seconds'] * 1e3:>10.1f}{row['step_over_model']:>12.3f}"
            f"{row['ratio']:>8.3f}{row['model_ratio']:>8.3f}{check}{flop_ratio}"
        )
    print(
        f"\n{'setting':<16}{'locked ms':>10}{'fwd ms':>9}{'bwd ms':>9}{'opt ms':>9}"
        f"{'trainable':>12}{'locked':>12}{'state MiB':>11}{'extra MiB':>11}{'peak MiB':>10}"
    )
    for row in results["settings"]:
        phases = row["phase_seconds"]
        print(
            f"{row['name']:<16}{phases['locked'] * 1e3:>10.1f}{phases['forward'] * 1e3:>9.1f}"
            f"{phases['backward'] * 1e3:>9.1f}{phases['optimizer'] * 1e3:>9.1f}"
            f"{row['trainable_parameters']:>12,}{row['locked_parameters']:>12,}"
            f"{row['state_bytes'] / MIB:>11.1f}{row['step_extra_bytes'] / MIB:>11.1f}"
            f"{row['peak_bytes'] / MIB:>10.1f}"
        )
    print(f"\nall ratios within {tolerance} of the FLOP model: {results['all_pass']}")


if __name__ == "__main__":
    main()
