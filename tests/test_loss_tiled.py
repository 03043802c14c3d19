"""Tiled losses (``impl="tiled"``) against the float64 reference of ``test_loss_reference.py``.

Sizes are chosen off the tile grid (tile 16; batches 1, 3, 17, 33, 50) so partial tiles and
tiles that hold part of the diagonal are covered. Run: ``pytest tests/test_loss_tiled.py``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from tritower.losses import clip_loss, sigmoid_loss


def _load_reference():
    # By path, so this works whatever pytest's import mode and whether tests/ is a package.
    path = Path(__file__).with_name("test_loss_reference.py")
    spec = importlib.util.spec_from_file_location("_loss_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ref = _load_reference()


@pytest.mark.parametrize("batch", [1, 3, 17, 33, 50])
@pytest.mark.parametrize("dim", [5, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_tiled_matches_float64_reference(batch: int, dim: int, dtype, kind: str) -> None:
    inputs = ref.random_inputs(batch, dim, seed=batch * 31 + dim, dtype=dtype)
    want = ref.reference_with_grads(kind, *inputs)
    got = ref.loss_with_grads(kind, "tiled", *inputs, tile_size=16)
    ref.assert_close_all(got, want, *ref.TOLERANCES[dtype])


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("tile_size", [1, 7, 64])
def test_tiled_large_scale_and_tile_shapes(kind: str, tile_size: int) -> None:
    # scale 100 (CLIP's clamp) spreads logits over [-100, 100]: a tile whose max sits far
    # above a row's own values must not underflow that row's log-sum-exp.
    inputs = ref.random_inputs(23, 8, seed=7, dtype=torch.float64, scale=100.0)
    want = ref.reference_with_grads(kind, *inputs)
    got = ref.loss_with_grads(kind, "tiled", *inputs, tile_size=tile_size)
    ref.assert_close_all(got, want, *ref.TOLERANCES[torch.float64])


def test_tiled_softmax_logits_far_apart_in_one_tile() -> None:
    """float32 at scale 100 with logits ~110 apart inside a tile: an exp with one shift per tile
    (or per row, for the column sums) would flush the lower ones to zero although they carry
    much of their columns' sums; the conditions are checked here from the float64 logits."""
    gen = torch.Generator().manual_seed(11)
    u, w, z = torch.eye(8, dtype=torch.float64)[:3]
    t = -0.1 * u - 0.1 * w + 0.98**0.5 * z  # u.t = w.t = -0.1
    noise = 0.01 * torch.randn(2, 20, 8, generator=gen, dtype=torch.float64)
    normalize = torch.nn.functional.normalize
    # Images 0-9 and texts 0-9 along u (logits ~ +100 among them); images 10-19 along w and
    # texts 10-19 along t: every logit of columns 10-19 is ~ -10, from both image groups.
    image = normalize(torch.cat([u.expand(10, 8), w.expand(10, 8)]) + noise[0], dim=1)
    text = normalize(torch.cat([u.expand(10, 8), t.expand(10, 8)]) + noise[1], dim=1)
    scale = torch.tensor([100.0], dtype=torch.float64)
    logits = scale * image @ text.T
    tile = 8
    # Tile (rows 0-7, columns 8-15): its top row sits at ~100, columns 10-15 at ~ -10, and
    # exp(-110) is zero in float32 although those entries carry 8/20 of their columns' sums.
    assert logits[:tile, 8:16].amax() - logits[:tile, 10:16].amax() > 104
    row_lse = torch.logsumexp(logits, 1)
    assert row_lse.max() - row_lse.min() > 90  # rows' LSEs ~100 apart: no shared shift
    bias = torch.tensor([-5.0], dtype=torch.float64)
    # Reference on the float32-rounded features; float32 logits of ~100 carry ~1e-5 absolute
    # error, which the naive loss shows too, hence the looser tolerance. A flushed group would
    # be off by O(0.1-1), not 1e-5.
    want = ref.reference_with_grads("softmax", image.float().double(), text.float().double(), scale, bias)
    for impl in ("naive", "tiled"):
        got = ref.loss_with_grads("softmax", impl, image.float(), text.float(), scale.float(), tile_size=tile)
        ref.assert_close_all(got, want, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_tiled_bfloat16_features_are_computed_in_float32(kind: str) -> None:
    image, text, scale, bias = ref.random_inputs(40, 24, seed=3)
    image, text = image.bfloat16(), text.bfloat16()
    # Reference on the bf16-rounded features: only the float32 arithmetic should differ.
    want = ref.reference_with_grads(kind, image, text, scale, bias)
    got = ref.loss_with_grads(kind, "tiled", image, text, scale, bias, tile_size=16)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-6)
    for g, w in zip(got[1:], want[1:], strict=True):  # gradients are rounded to bf16 on the way out
        torch.testing.assert_close(g.double().reshape(w.shape), w, rtol=1e-2, atol=1e-4)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("locked", [0, 1])
def test_tiled_locked_tower_gets_no_gradient(kind: str, locked: int) -> None:
    # LiT: one tower's features carry no gradient; the others must still be exact.
    inputs = ref.random_inputs(37, 10, seed=11, dtype=torch.float64)
    want = ref.reference_with_grads(kind, *inputs)
    leaves = [t.clone().requires_grad_(k != locked) for k, t in enumerate(inputs)]
    fn = sigmoid_loss if kind == "sigmoid" else clip_loss
    value = fn(*leaves[: 4 if kind == "sigmoid" else 3], impl="tiled", tile_size=16)
    trainable = [t for t in leaves[: 4 if kind == "sigmoid" else 3] if t.requires_grad]
    grads = torch.autograd.grad(value, trainable)
    expected = [w for k, w in enumerate(want[1:]) if k != locked]
    for g, w in zip(grads, expected, strict=True):
        torch.testing.assert_close(g.reshape(w.shape), w, rtol=1e-10, atol=1e-12)
