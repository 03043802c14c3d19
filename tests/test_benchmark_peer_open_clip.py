"""The open_clip comparison (``benchmarks/peer_open_clip.py``) runs end to end in its tiny
configuration: both trainers really train (tritower under DeepSpeed's launcher, open_clip's own
``open_clip_train``), and the JSON holds every field the table is made of. Timings are never
asserted.

Run: ``pytest -m launch tests/test_benchmark_peer_open_clip.py`` (CPU, about a minute).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from launching import REPO


def _benchmark():
    # benchmarks/ is not a package: load the script by path, as `python benchmarks/...` would.
    spec = importlib.util.spec_from_file_location("peer_open_clip_benchmark", REPO / "benchmarks" / "peer_open_clip.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.mark.launch
def test_tiny_comparison_runs_both_trainers(tmp_path: Path) -> None:
    out = tmp_path / "peer.json"
    returned = _benchmark().main(["--tiny", "--out", str(out), "--work-dir", str(tmp_path / "work")])
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    assert results["options"]["steps"] == 6 and results["job"]["experiment"] == "clip_test"
    assert Path(results["job"]["open_clip_export"], "open_clip_config.json").is_file()
    for moment in ("before", "after"):
        machine = results["machine"][moment]
        assert machine["matmul_gflops_1024_fp32"] > 0 and len(machine["loadavg"]) == 3
    runs = {run["trainer"]: run for run in results["runs"]}
    assert sorted(runs) == ["open_clip", "tritower"] and len(results["runs"]) == 2
    for trainer, run in runs.items():
        assert run["returncode"] == 0, (trainer, run["tail"])
        assert run["steps"] == 6, (trainer, run["tail"])  # every step line was seen
        assert run["steady_samples_per_s"] > 0 and run["first_step_s"] > 0
        assert run["peak_total_rss_mib"] > 0
        peaks = [p for p in run["processes"] if "pid" in p]
        assert peaks and all(p["peak_rss_mib"] > 0 for p in peaks)
    assert "launch/train.py" in runs["tritower"]["processes"][0]["command_line"]
    assert "open_clip_main.py" in runs["open_clip"]["processes"][0]["command_line"]
    # DeepSpeed's launcher stands between the user and even one rank; open_clip's 1 rank has none.
    assert runs["tritower"]["launcher_rss_mib"] > 0 and runs["open_clip"]["launcher_rss_mib"] == 0
    # tritower says its thread count in its start-up line; the benchmark read it.
    assert runs["tritower"]["threads_per_rank"] >= 1
    (row,) = results["summary"]
    assert (row["ranks"], row["setting"]) == (1, "uu")
    assert row["tritower"]["runs_ok"] == row["open_clip"]["runs_ok"] == 1
    assert row["speed_ratio"] > 0 and row["first_step_ratio"] > 0
