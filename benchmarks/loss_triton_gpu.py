"""Check ``impl="triton"`` against a float64 reference on a CUDA GPU, and time the impls.

For each (B, D, dtype) it compares the Triton loss (value, feature and logit-scale
gradients) with a float64 reference written out here in row chunks (plain formula and its
analytic gradient, independent of ``tritower.losses``), then times forward+backward of
``naive``, ``tiled`` and ``triton`` with CUDA events and reports peak extra GPU memory.

    PYTHONPATH=<dir holding a tritower -> repo symlink> \
        python benchmarks/loss_triton_gpu.py --out loss_triton_gpu.json

The options are parsed with tyro: a bare GPU machine gets it (and its docstring_parser and
typeguard) with the suite's wheels (``benchmarks/gpu_suite.sh``, ``.gpu/site`` on ``PYTHONPATH``).

``part_loss`` is the loss part of ``benchmarks/gpu_suite.py`` (B = 32k..256k, D = 1024, bf16).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from tritower.benchmarks.cli import Words, parse_benchmark
from tritower.losses import clip_loss

DEFAULT_SIZES = ("70x40", "1000x77", "4096x512", "16384x512", "32768x1024")


@dataclass
class LossTritonOptions:
    """Options of the Triton loss check on a CUDA GPU (``--field value`` or ``--field=value``)."""

    out: str
    """JSON file for the results."""
    sizes: Words = DEFAULT_SIZES
    """``BxD`` entries (global batch x embedding width), e.g. ``--sizes 16384x512 32768x1024``."""
    dtypes: Words = ("float32", "bfloat16")
    """Feature dtypes (``torch`` names), each checked against float64 and timed."""
    tile: int = 4096
    """``tile_size`` of the tiled and Triton losses."""
    repeats: int = 3
    """Timed forward+backward passes per impl; the median is reported."""
    tf32: bool = False
    """Allow TF32 for float32 matmuls (faster naive/tiled fp32, less exact)."""


def reference_float64(
    image: Tensor, text: Tensor, scale: Tensor, chunk: int = 4096
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Loss and gradients in float64, [chunk, B] logits at a time (B x B would not fit)."""
    x, y, s = image.double(), text.double(), float(scale)
    n = x.shape[0]
    row_lse = torch.empty(n, dtype=torch.float64, device=x.device)
    col_lse = torch.full((n,), -math.inf, dtype=torch.float64, device=x.device)
    for r0 in range(0, n, chunk):
        logits = s * x[r0 : r0 + chunk] @ y.T
        row_lse[r0 : r0 + chunk] = torch.logsumexp(logits, dim=1)
        col_lse = torch.logaddexp(col_lse, torch.logsumexp(logits, dim=0))
    positives = s * (x * y).sum(dim=1)
    loss = 0.5 * ((row_lse - positives).mean() + (col_lse - positives).mean())
    d_x, d_y = torch.zeros_like(x), torch.zeros_like(y)
    d_s = 0.0
    for r0 in range(0, n, chunk):
        dots = x[r0 : r0 + chunk] @ y.T
        # dL/dS = 0.5/B * (softmax over the row + softmax over the column - 2 * positives)
        grad = torch.exp(s * dots - row_lse[r0 : r0 + chunk, None]) + torch.exp(s * dots - col_lse)
        grad.diagonal(r0).sub_(2.0)
        grad *= 0.5 / n
        d_x[r0 : r0 + chunk] = s * grad @ y
        d_y += s * grad.T @ x[r0 : r0 + chunk]
        d_s += float((grad * dots).sum())
    return loss, d_x, d_y, torch.tensor(d_s, dtype=torch.float64)


def run_impl(
    impl: str, image: Tensor, text: Tensor, scale: Tensor, tile: int
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    leaves = [t.detach().clone().requires_grad_() for t in (image, text, scale)]
    loss = clip_loss(*leaves, impl=impl, tile_size=tile)
    loss.backward()
    return loss.detach(), leaves[0].grad, leaves[1].grad, leaves[2].grad


def max_rel_error(got: Tensor, want: Tensor) -> float:
    diff = (got.double().reshape(want.shape) - want).abs().max()
    return float(diff / want.abs().max().clamp_min(1e-30))


def time_impl(impl: str, image: Tensor, text: Tensor, scale: Tensor, tile: int, repeats: int) -> dict:
    """Mean forward+backward ms over ``repeats`` after one warm-up, and the warm-up's peak extra
    GPU memory (CUDA events and allocator statistics; on the CPU wall time and no memory figure,
    for the dry run of ``gpu_suite.py``)."""
    if image.device.type != "cuda":
        run_impl(impl, image, text, scale, tile)
        start = time.perf_counter()
        for _ in range(repeats):
            run_impl(impl, image, text, scale, tile)
        return {"ms": (time.perf_counter() - start) * 1e3 / repeats, "peak_extra_mb": None}
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    try:
        run_impl(impl, image, text, scale, tile)  # warm-up (and Triton compilation)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            run_impl(impl, image, text, scale, tile)
        end.record()
        torch.cuda.synchronize()
        return {"ms": start.elapsed_time(end) / repeats, "peak_extra_mb": peak / 2**20}
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"ms": None, "peak_extra_mb": None, "error": "OOM"}


def features(batch: int, dim: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> tuple[Tensor, ...]:
    """Unit-norm image features, text features near them, and the logit scale used at this size."""
    gen = torch.Generator(device=device).manual_seed(seed)
    image = torch.nn.functional.normalize(torch.randn(batch, dim, device=device, generator=gen), dim=1)
    text = torch.nn.functional.normalize(image + torch.randn(batch, dim, device=device, generator=gen), dim=1)
    scale = torch.tensor([100.0 if batch < 5000 else 14.3], device=device)
    return image.to(dtype), text.to(dtype), scale


def triton_errors(image: Tensor, text: Tensor, scale: Tensor, tile: int) -> dict[str, float]:
    """Max relative error of the Triton loss's value and gradients against the float64 reference."""
    want = reference_float64(image, text, scale)
    got = run_impl("triton", image, text, scale, tile)
    names = ["value", "d_image", "d_text", "d_scale"]
    return {name: max_rel_error(g, w) for name, g, w in zip(names, got, want, strict=True)}


def part_loss(ctx: object) -> None:
    """``gpu_suite.py``'s loss part: Triton and naive forward+backward per size of the plan (naive
    until it runs out of memory), one size against float64; stops where the budget would not last."""
    plan, device = ctx.plan, ctx.device
    dtype = getattr(torch, plan.loss_dtype)
    naive_fits, last = True, None
    for batch in plan.loss_sizes:
        if last is not None and ctx.left() < 4 * last + 5:  # time ~ B^2
            ctx.record.append("rows", {"B": batch, "skipped": "the part's budget would not cover it"})
            break
        started = time.monotonic()
        image, text, scale = features(batch, plan.loss_dim, dtype, device)
        row = {"B": batch, "D": plan.loss_dim, "dtype": plan.loss_dtype, "tile": plan.loss_tile}
        if batch == plan.loss_check:
            row["triton_rel_err"] = triton_errors(image, text, scale, plan.loss_tile)
        repeats = 3 if batch <= 65536 else 1
        row["triton"] = time_impl("triton", image, text, scale, plan.loss_tile, repeats)
        row["naive"] = (
            time_impl("naive", image, text, scale, plan.loss_tile, repeats)
            if naive_fits
            else {"ms": None, "peak_extra_mb": None, "skipped": "out of memory at a smaller B"}
        )
        naive_fits = row["naive"]["ms"] is not None
        if naive_fits and row["triton"]["ms"]:
            row["speedup_vs_naive"] = row["naive"]["ms"] / row["triton"]["ms"]
            if row["triton"]["peak_extra_mb"] is not None:
                row["memory_fraction_of_naive"] = row["triton"]["peak_extra_mb"] / max(row["naive"]["peak_extra_mb"], 1)
        ctx.record.append("rows", row)
        last = time.monotonic() - started
        del image, text, scale


def main(argv: list[str] | None = None) -> None:
    opts = parse_benchmark(LossTritonOptions, argv, command="python benchmarks/loss_triton_gpu.py")
    if opts.tf32:
        torch.set_float32_matmul_precision("high")
    rows = []
    for size in opts.sizes:
        batch, dim = (int(v) for v in size.split("x"))
        for dtype_name in opts.dtypes:
            image, text, scale = features(batch, dim, getattr(torch, dtype_name), torch.device("cuda"))
            row = {
                "B": batch,
                "D": dim,
                "dtype": dtype_name,
                "tile": opts.tile,
                "triton_rel_err": triton_errors(image, text, scale, opts.tile),
            }
            for impl in ("naive", "tiled", "triton"):
                row[impl] = time_impl(impl, image, text, scale, opts.tile, opts.repeats)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        f"\n{'B':>6} {'D':>5} {'dtype':>8} | {'err value':>9} {'err dI':>8} {'err ds':>8} | "
        + " | ".join(f"{i:>6} ms {i[:5]:>5} MB" for i in ("naive", "tiled", "triton"))
    )
    for r in rows:
        e = r["triton_rel_err"]
        cells = []
        for impl in ("naive", "tiled", "triton"):
            t = r[impl]
            cells.append(f"{t['ms']:9.1f} {t['peak_extra_mb']:8.0f}" if t["ms"] is not None else f"{'OOM':>9} {'-':>8}")
        print(
            f"{r['B']:>6} {r['D']:>5} {r['dtype']:>8} | {e['value']:9.1e} {e['d_image']:8.1e} "
            f"{e['d_scale']:8.1e} | " + " | ".join(cells)
        )
    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "tf32": opts.tf32,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with open(opts.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
