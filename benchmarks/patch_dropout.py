"""Patch dropout (FLIP) against step time: image-tower training samples/s at each fraction of
patch tokens kept.

    python benchmarks/patch_dropout.py --out docs/results/patch_dropout_cpu.json     # ~1 min, 2 cores
    python benchmarks/patch_dropout.py --device cuda --tower vit_base_patch16_224 --batch 256

A step is the image tower's forward, a mean-square loss on its pooled features, backward and an
AdamW step, single process, no DeepSpeed (the tower is built and regularised exactly as the trainer
does it: ``ImageTower.set_regularisation``). The keep fractions are timed interleaved, round by
round in a rotated order, so drifts in machine load hit them alike; the median of ``--steps``
rounds is reported, and the ratio to keeping every patch is the number to compare across machines.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass

import torch

from tritower.benchmarks.cli import parse_benchmark
from tritower.model import build_image_tower


@dataclass
class PatchDropoutOptions:
    """Options of the patch-dropout benchmark (``--field value`` or ``--field=value``)."""

    tower: str = "vit_scene_tiny"
    """Image tower from the registry (a ViT: patch dropout drops its patch tokens)."""
    batch: int = 128
    """Images per step."""
    keep: str = "1.0,0.75,0.5,0.25"
    """Comma-separated fractions of patch tokens kept; the first is the base of the speed-ups."""
    steps: int = 6
    """Timed rounds; each fraction's median step is reported."""
    warmup: int = 2
    """Untimed rounds first (allocator and kernel caches settle)."""
    device: str = "cpu"
    """``cpu`` or ``cuda[:N]``."""
    out: str = ""
    """Write the results as JSON here (default: the table only)."""


def step_time(tower: torch.nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = tower(images).pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if images.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    options = parse_benchmark(PatchDropoutOptions, argv, command="python benchmarks/patch_dropout.py")

    keeps = [float(k) for k in options.keep.split(",")]
    torch.manual_seed(0)
    tower = build_image_tower(options.tower).to(options.device).train()
    spec = tower.spec
    images = torch.randn(options.batch, 3, spec.image_size, spec.image_size, device=options.device)
    optimizer = torch.optim.AdamW(tower.parameters(), lr=1e-4)
    tokens = (spec.image_size // spec.patch_size) ** 2
    times: dict[float, list[float]] = {keep: [] for keep in keeps}
    for round_index in range(options.warmup + options.steps):
        order = keeps[round_index % len(keeps) :] + keeps[: round_index % len(keeps)]
        for keep in order:
            tower.set_regularisation(patch_dropout=1.0 - keep)
            elapsed = step_time(tower, optimizer, images)
            if round_index >= options.warmup:
                times[keep].append(elapsed)
    base = statistics.median(times[keeps[0]])
    rows = []
    threads = torch.get_num_threads()
    print(f"{spec.name}, {tokens} patch tokens, batch {options.batch}, {options.device}, {threads} threads")
    print(f"{'kept':>6} {'tokens':>7} {'step s':>8} {'samples/s':>10} {'speed-up':>9}")
    for keep in keeps:
        median = statistics.median(times[keep])
        kept_tokens = max(1, int(tokens * keep))
        row = {"keep": keep, "tokens": kept_tokens, "step_s": round(median, 4)}
        row |= {"samples_per_s": round(options.batch / median, 1), "speedup": round(base / median, 2)}
        rows.append(row)
        print(f"{keep:>6.2f} {kept_tokens:>7} {median:>8.3f} {row['samples_per_s']:>10.1f} {row['speedup']:>8.2f}x")
    if options.out:
        result = {"tower": spec.name, "patch_tokens": tokens, "batch": options.batch, "device": options.device}
        result |= {"threads": torch.get_num_threads(), "rows": rows}
        with open(options.out, "w") as out:
            json.dump(result, out, indent=2)


if __name__ == "__main__":
    main()
