"""The GPU suite (``benchmarks/gpu_suite.py``) cannot rot: its dry run (every part, tiny towers, fp32,
gloo, the Triton interpreter, on the CPU) writes a JSON with every part and sane values; the
arithmetic of its comparisons and targets, and the CUDA optimizer choice, are checked without a GPU.

Timings are never asserted, only that they were measured.

Run: ``pytest tests/test_gpu_suite.py`` (the dry run: about 75 s on 2 cores, a minute more the
first time in a checkout, which JIT-compiles DeepSpeed's CPU communication op).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch
from launching import REPO

SUITE = REPO / "benchmarks" / "gpu_suite.py"


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look the module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("gpu_suite")
    out = folder / "dry.json"
    command = [sys.executable, str(SUITE), "--dry-run", "--out", str(out), "--work-dir", str(folder / "work")]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1000)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "DRY RUN" in done.stdout
    return json.loads(out.read_text())


@pytest.mark.launch
def test_dry_run_records_every_part(dry_run: dict) -> None:
    parts = dry_run["parts"]
    assert dry_run["meta"]["dry_run"] is True
    assert {"torch", "deepspeed", "triton"} <= {k for k, v in dry_run["environment"]["versions"].items() if v}
    for name in ("uu", "lu", "loss", "accum"):
        assert parts[name]["status"] == "ok", (name, parts[name].get("error"), parts[name].get("log_tail"))
        assert 0 < parts[name]["wall_s"] <= parts[name]["budget_s"] + 15

    uu = parts["uu"]
    plan = dry_run["meta"]["plan"]
    assert [row["batch"] for row in uu["rows"]] == [*plan["batches"], plan["search_cap"]]
    assert [row["probe"] for row in uu["rows"]] == [False] * len(plan["batches"]) + [True]
    for row in uu["rows"]:
        assert row["samples_per_s"] > 0 and row["step_s_median"] > 0 and math.isfinite(row["loss"])
        assert row["MFU"] is None and row["peak_mem_GiB"] is None and "cpu" in row["reason"]
    flops = uu["forward_FLOP_per_sample"]
    assert flops["image"] > 0 and flops["text"] > 0 and flops["model"] >= flops["image"] + flops["text"]
    assert uu["attention"] == {"image_timm_fused_attn": [True], "text_attn_implementation": "sdpa"}
    assert any("ZeRO stage 3" in line for line in uu["kernels"])
    profile = uu["profile"]
    assert profile["top"] and profile["total_ms"] > 0
    assert 0 <= profile["communication_share"] <= 1 and 0 < profile["matmul_share"] <= 1

    lu = {row["setting"]: row for row in parts["lu"]["rows"]}
    assert set(lu) == {"Lu", "Lu_precomputed"}
    assert lu["Lu"]["forward_FLOP_per_sample"]["image_locked"] > 0
    assert "image_locked" not in lu["Lu_precomputed"]["forward_FLOP_per_sample"]
    assert all(row["samples_per_s"] > 0 for row in lu.values())
    compared = {row["setting"]: row for row in dry_run["comparisons"]}
    assert set(compared) == {"Lu", "Lu_precomputed"}
    assert 1 < compared["Lu"]["flop_model"] < compared["Lu_precomputed"]["flop_model"]

    loss = {row["B"]: row for row in parts["loss"]["rows"]}
    assert set(loss) == set(plan["loss_sizes"])
    for row in loss.values():
        assert row["triton"]["ms"] > 0 and row["naive"]["ms"] > 0 and row["speedup_vs_naive"] > 0
    errors = loss[plan["loss_check"]]["triton_rel_err"]
    assert errors["value"] < 1e-5 and max(errors["d_image"], errors["d_text"], errors["d_scale"]) < 1e-4

    accum = parts["accum"]
    assert accum["setup"]["M"] == plan["accum_global"] // plan["accum_micro"] > 1
    assert accum["steps"][0]["first"] and accum["steps"][0]["samples_per_s"] > 0
    assert math.isfinite(accum["steps"][0]["loss"])
    assert any("GradCache gradient reduction" in line for line in accum["kernels"])

    assert len(dry_run["targets"]) == 5
    assert all(target["pass"] is None and "dry run" in target["note"] for target in dry_run["targets"])


def test_comparisons_and_targets_arithmetic() -> None:
    """The FLOP model's Lu ratios and the pass/fail of each target, on made-up measurements."""
    suite = _suite()
    parts = {
        "uu": {
            "rows": [{"batch": 128, "samples_per_s": 90.0}, {"batch": 256, "samples_per_s": 120.0}],
            "forward_FLOP_per_sample": {"model": 5.0, "image": 4.0, "text": 1.0},
        },
        "lu": {
            "rows": [
                {"setting": "Lu", "batch": 256, "samples_per_s": 360.0},
                {"setting": "Lu_precomputed", "batch": 256, "samples_per_s": 1080.0},
            ]
        },
        "loss": {"rows": [{"B": 32768, "speedup_vs_naive": 3.7, "memory_fraction_of_naive": 0.026}]},
    }
    compared = {row["setting"]: row for row in suite.comparisons(parts)}
    assert compared["Lu"]["speedup_over_Uu"] == pytest.approx(3.0)
    assert compared["Lu"]["flop_model"] == pytest.approx(15 / 7)  # (3*4 + 3*1) / (4 + 3*1)
    assert compared["Lu"]["flop_model_with_recompute"] == pytest.approx(20 / 8)
    assert compared["Lu_precomputed"]["flop_model"] == pytest.approx(5.0)  # 15 / 3
    verdicts = [target["pass"] for target in suite.targets(parts, list(compared.values()), dry=False)]
    assert verdicts == [True, True, False, True, True]  # Uu 120 >= 117, Lu 3x, precomputed 9x < 10x
    assert all(target["pass"] is None for target in suite.targets(parts, list(compared.values()), dry=True))
    assert [target["value"] for target in suite.targets({}, [], dry=False)] == [None] * 5


def test_cuda_gets_torch_fused_adamw_unless_the_policy_chooses() -> None:
    from tritower.launch.engine.engine import _prefer_fused_adamw

    def policy(**params: object) -> dict:
        return {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, **params}}, "zero_optimization": {"stage": 3}}

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert _prefer_fused_adamw(policy(), cuda)["optimizer"]["params"] == {"lr": 1e-3, "torch_adam": True, "fused": True}
    assert _prefer_fused_adamw(policy(), cpu)["optimizer"]["params"] == {"lr": 1e-3}
    chosen = policy(torch_adam=False)  # DeepSpeed's FusedAdam, asked for by the policy file
    assert _prefer_fused_adamw(chosen, cuda)["optimizer"]["params"] == {"lr": 1e-3, "torch_adam": False}
    offloaded = policy() | {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    assert "fused" not in _prefer_fused_adamw(offloaded, cuda)["optimizer"]["params"]  # DeepSpeedCPUAdam
