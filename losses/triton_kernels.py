"""Triton kernels for the tiled softmax (CLIP) loss: ``impl="triton"``.

Forward: ``_lse_kernel`` streams S = s * A B^T block by block (``tl.dot``, float32
accumulation; float64 for float64 inputs) and keeps a running log-sum-exp per row, flash-
attention style, so no logits block ever reaches memory. It runs twice: rows (image -> text)
and, with A and B swapped, columns (text -> image).

Backward: for each [tile, tile] block, ``_grad_tile_kernel`` recomputes S with ``tl.dot``,
fuses the softmax gradient G = c * (exp(S - lse_row) + exp(S - lse_col) - 2 * positives) and
the logit-scale partial sum(G * A B^T), and writes G once; ``torch.matmul`` (cuBLAS) then does
dA += G B and dB += G^T A. Keeping the two gradient products out of the kernel is what lets any
embedding size D work: a fused kernel would hold a [block, D] accumulator in registers, which
for D=1024 spills or forces D-splitting with repeated S recomputation. Extra memory is one G
block, tile_size^2 elements: on a GPU prefer tile_size 4096-8192 (64-256 MB in fp32) to keep
launches few. Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
The cross-rank conventions are those of ``tiled.py``.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import FunctionCtx

from .tiled import LseCombine, tile_bounds

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32


# The three kernels' untyped parameters stay unannotated: Triton reads a parameter's annotation as its
# kernel type (and hashes it into the cache key), so a Python hint would change compilation.
@triton.jit
def _dots_block(
    a_ptr,
    b_ptr,
    offs_m,
    offs_n,
    M,
    N,
    D,
    stride_a,
    stride_b,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """[BLOCK_M, BLOCK_N] block of A B^T; masked loads pad D and the edges with zeros."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_a + offs_k[None, :],
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < D),
            other=0.0,
        )
        b_t = tl.load(
            b_ptr + offs_n[None, :] * stride_b + offs_k[:, None],  # [BLOCK_K, BLOCK_N]
            mask=(offs_n[None, :] < N) & (offs_k[:, None] < D),
            other=0.0,
        )
        if UPCAST:  # only under TRITON_INTERPRET with bf16, see _kernel_options
            a, b_t = a.to(tl.float32), b_t.to(tl.float32)
        acc = tl.dot(a, b_t, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _lse_kernel(
    a_ptr,
    b_ptr,
    scale_ptr,
    out_ptr,
    M,
    N,
    D,
    stride_a,
    stride_b,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """out[i] = logsumexp_j scale * A_i . B_j for one block of BLOCK_M rows."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    scale = tl.load(scale_ptr)  # a pointer, not a Python float: no host sync per call
    running_max = tl.full((BLOCK_M,), float("-inf"), dtype=ACC)
    running_sum = tl.zeros((BLOCK_M,), dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        logits = scale * _dots_block(
            a_ptr, b_ptr, offs_m, offs_n, M, N, D, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_K, ACC, PRECISION, UPCAST
        )
        logits = tl.where(offs_n[None, :] < N, logits, float("-inf"))
        # The first block always holds column 0, so new_max is finite from the start and
        # exp(-inf - new_max) = 0 rescales the empty sum without NaNs.
        new_max = tl.maximum(running_max, tl.max(logits, axis=1))
        running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(logits - new_max[:, None]), axis=1)
        running_max = new_max
    tl.store(out_ptr + offs_m, running_max + tl.log(running_sum), mask=offs_m < M)


@triton.jit(do_not_specialize=["diag_shift"])
def _grad_tile_kernel(
    a_ptr,
    b_ptr,
    row_lse_ptr,
    col_lse_ptr,
    scale_ptr,
    coef_ptr,
    g_ptr,
    d_scale_ptr,
    M,
    N,
    D,
    diag_shift,
    stride_a,
    stride_b,
    stride_g,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ACC: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """G block = coef * (P_row + P_col - 2 * [row + diag_shift == col]); sum(G * A B^T)."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dots = _dots_block(
        a_ptr, b_ptr, offs_m, offs_n, M, N, D, stride_a, stride_b, BLOCK_M, BLOCK_N, BLOCK_K, ACC, PRECISION, UPCAST
    )
    logits = tl.load(scale_ptr) * dots
    row_lse = tl.load(row_lse_ptr + offs_m, mask=offs_m < M, other=0.0)
    col_lse = tl.load(col_lse_ptr + offs_n, mask=offs_n < N, other=0.0)
    grad = tl.exp(logits - row_lse[:, None]) + tl.exp(logits - col_lse[None, :])
    grad = tl.where(offs_m[:, None] + diag_shift == offs_n[None, :], grad - 2.0, grad)
    valid = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    grad = tl.where(valid, grad * tl.load(coef_ptr), 0.0)
    tl.store(g_ptr + offs_m[:, None] * stride_g + offs_n[None, :], grad.to(g_ptr.dtype.element_ty), mask=valid)
    # One partial per program, summed by torch afterwards: deterministic, unlike atomics.
    tl.store(d_scale_ptr + pid_m * tl.num_programs(1) + pid_n, tl.sum(grad * dots))


def interpreting() -> bool:
    """Whether kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``)."""
    knobs = getattr(triton, "knobs", None)  # triton >= 3.3; older ones read the variable
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernel_options(features: Tensor) -> dict:
    # triton 3.8's interpreter multiplies bf16 operands of tl.dot as their raw uint16 bits;
    # there (CPU tests only) the operands are upcast first. Compiled kernels never upcast.
    upcast = features.dtype == torch.bfloat16 and interpreting()
    if features.dtype == torch.float64:
        return dict(ACC=tl.float64, PRECISION="ieee", UPCAST=False)
    # Follow torch's own float32 matmul policy: TF32 only where the user allowed it.
    tf32 = features.dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest"
    return dict(ACC=tl.float32, PRECISION="tf32" if tf32 else "ieee", UPCAST=upcast)


def row_lse(rows: Tensor, cols: Tensor, scale: Tensor) -> Tensor:
    """logsumexp_j scale * rows_i . cols_j for every row, no logits in memory."""
    acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
    out = torch.empty(rows.shape[0], dtype=acc, device=rows.device)
    grid = (triton.cdiv(rows.shape[0], BLOCK_M),)
    _lse_kernel[grid](
        rows,
        cols,
        scale,
        out,
        rows.shape[0],
        cols.shape[0],
        rows.shape[1],
        rows.stride(0),
        cols.stride(0),
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
        BLOCK_K=BLOCK_K,
        **_kernel_options(rows),
    )
    return out


class _TritonSoftmax(torch.autograd.Function):
    """Same maths and conventions as ``tiled._TiledSoftmax``; tiles computed by Triton."""

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        image: Tensor,
        text_all: Tensor,
        logit_scale: Tensor,
        row_offset: int,
        tile: int,
        combine: LseCombine | None,
    ) -> Tensor:  # type: ignore[override]
        if image.dtype != text_all.dtype or image.dtype not in (
            torch.float64,
            torch.float32,
            torch.bfloat16,
            torch.float16,
        ):
            raise TypeError(f"impl='triton' needs one float dtype, got {image.dtype}/{text_all.dtype}")
        if not image.is_cuda and not interpreting():
            raise ValueError(
                "impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1, for tests); use impl='tiled' on the CPU"
            )
        rows, cols = image.contiguous(), text_all.contiguous()
        acc = torch.float64 if rows.dtype == torch.float64 else torch.float32
        scale = logit_scale.detach().reshape(1).to(acc)
        lse_rows = row_lse(rows, cols, scale)
        lse_cols = row_lse(cols, rows, scale)  # partial over this rank's rows
        if combine is not None:
            lse_cols = combine(lse_cols)
        b = rows.shape[0]
        positives = scale * (rows.to(acc) * cols[row_offset : row_offset + b].to(acc)).sum(dim=1)
        ctx.save_for_backward(rows, cols, logit_scale, lse_rows, lse_cols)
        ctx.row_offset, ctx.tile = row_offset, tile
        return 0.5 * (lse_rows + lse_cols[row_offset : row_offset + b] - 2.0 * positives).sum() / b

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        rows, cols, logit_scale, lse_rows, lse_cols = ctx.saved_tensors
        acc = lse_rows.dtype
        scale = logit_scale.detach().reshape(1).to(acc)
        b, offset, tile = rows.shape[0], ctx.row_offset, ctx.tile
        coef = (grad_out.to(acc) * 0.5 / b).reshape(1)  # W x dL/dS convention, as in tiled.py
        d_rows = torch.zeros(rows.shape, dtype=acc, device=rows.device)
        d_cols = torch.zeros(cols.shape, dtype=acc, device=rows.device)
        d_scale_parts = []
        for r0, r1 in tile_bounds(b, tile):
            for c0, c1 in tile_bounds(cols.shape[0], tile):
                grid = (triton.cdiv(r1 - r0, BLOCK_M), triton.cdiv(c1 - c0, BLOCK_N))
                # G in the feature dtype so the two products below run on tensor cores.
                grad = torch.empty((r1 - r0, c1 - c0), dtype=rows.dtype, device=rows.device)
                parts = torch.empty(grid[0] * grid[1], dtype=acc, device=rows.device)
                _grad_tile_kernel[grid](
                    rows[r0:r1],
                    cols[c0:c1],
                    lse_rows[r0:r1],
                    lse_cols[c0:c1],
                    scale,
                    coef,
                    grad,
                    parts,
                    r1 - r0,
                    c1 - c0,
                    rows.shape[1],
                    offset + r0 - c0,
                    rows.stride(0),
                    cols.stride(0),
                    grad.stride(0),
                    BLOCK_M=BLOCK_M,
                    BLOCK_N=BLOCK_N,
                    BLOCK_K=BLOCK_K,
                    **_kernel_options(rows),
                )
                if ctx.needs_input_grad[0]:  # LiT's locked tower needs no product
                    d_rows[r0:r1] += grad @ cols[c0:c1]
                if ctx.needs_input_grad[1]:
                    d_cols[c0:c1] += grad.T @ rows[r0:r1]
                d_scale_parts.append(parts.sum())
        d_scale = torch.stack(d_scale_parts).sum()
        return (
            d_rows.mul_(scale).to(rows.dtype) if ctx.needs_input_grad[0] else None,
            d_cols.mul_(scale).to(cols.dtype) if ctx.needs_input_grad[1] else None,
            d_scale.reshape(logit_scale.shape).to(logit_scale.dtype),
            None,
            None,
            None,
        )


def softmax_triton(
    image: Tensor,
    text_all: Tensor,
    logit_scale: Tensor,
    row_offset: int,
    tile_size: int,
    combine: LseCombine | None = None,
) -> Tensor:
    """Triton version of ``tiled.softmax_tiled`` (same arguments, value and gradients)."""
    return _TritonSoftmax.apply(image, text_all, logit_scale, row_offset, tile_size, combine)
