"""``impl="triton"`` on CPU tensors under ``TRITON_INTERPRET=1``, against the float64 reference.

The interpreter must be chosen before any kernel is decorated, and other tests in the same
pytest process may already have imported triton or ``tritower.losses.triton_kernels``; so the
test reruns this file as a script in a fresh interpreter process with the variable set. Sizes
are small (the interpreter runs every program in numpy) and off the 64-wide block grid.
The compiled GPU path is checked by ``benchmarks/loss_triton_gpu.py``.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _load_reference():
    path = Path(__file__).with_name("test_loss_reference.py")
    spec = importlib.util.spec_from_file_location("_loss_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.launch
def test_triton_kernels_under_interpreter() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "all triton checks passed" in done.stdout


# ---- what the subprocess runs -------------------------------------------------------------


def check_single_process(ref) -> None:
    # (batch, dim, tile, dtype, scale): 70 x 40 with tile 48 gives 2 x 2 uneven tiles whose
    # diagonal crosses tile edges; scale 100 is CLIP's clamp.
    cases = [
        (70, 40, 48, torch.float32, 14.3),
        (70, 40, 48, torch.float64, 100.0),
        (1, 5, 16, torch.float32, 14.3),
        (3, 5, 16, torch.float64, 14.3),
        (33, 64, 16, torch.float32, 100.0),
    ]
    for batch, dim, tile, dtype, scale in cases:
        inputs = ref.random_inputs(batch, dim, seed=batch + dim, dtype=dtype, scale=scale)
        want = ref.reference_with_grads("softmax", *inputs)
        got = ref.loss_with_grads("softmax", "triton", *inputs, tile_size=tile)
        ref.assert_close_all(got, want, *ref.TOLERANCES[dtype])
    # bf16 features: reference on the same rounded features; G and the products are bf16.
    image, text, scale, _ = ref.random_inputs(70, 40, seed=5, scale=30.0)
    image, text = image.bfloat16(), text.bfloat16()
    want = ref.reference_with_grads("softmax", image, text, scale)
    got = ref.loss_with_grads("softmax", "triton", image, text, scale, tile_size=48)
    torch.testing.assert_close(got[0].double(), want[0], rtol=1e-5, atol=1e-6)
    for g, w in zip(got[1:], want[1:], strict=True):
        torch.testing.assert_close(g.double().reshape(w.shape), w, rtol=2e-2, atol=2e-3)


def rank_worker(rank: int, world: int, port: int) -> None:
    ref = _load_reference()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        # (kind, impl, scope, local batch, dim, tile): global 70, tiles of 16.
        for case in [("softmax", "triton", "global", 35, 40, 16), ("softmax", "triton", "local", 35, 40, 16)]:
            ref.check_rank_against_reference(rank, world, *case)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run via pytest or set TRITON_INTERPRET=1"
    reference = _load_reference()
    check_single_process(reference)
    mp.spawn(rank_worker, args=(2, reference.free_port()), nprocs=2, join=True)
    print("all triton checks passed")
