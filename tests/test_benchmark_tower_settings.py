"""The tower-settings benchmark (``benchmarks/tower_settings.py``) runs end to end on the
smallest towers and writes every setting with sane fields. Timings are never asserted; FLOP
counts, parameter counts and the FLOP model's arithmetic are deterministic and are checked.

Run: ``pytest tests/test_benchmark_tower_settings.py`` (CPU, seconds).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

from launching import REPO

from tritower.model import count_parameters

SETTINGS = ["Uu", "Lu", "Lu_precomputed", "3T", "3T_precomputed"]


def _benchmark():
    # benchmarks/ is not a package: load the script by path, as `python benchmarks/...` would.
    spec = importlib.util.spec_from_file_location("tower_settings_benchmark", REPO / "benchmarks" / "tower_settings.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    return module


def test_benchmark_writes_every_setting(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    returned = _benchmark().main(
        [
            "--image-tower",
            "vit_test",
            "--text-tower",
            "bert_test",
            "--batch",
            "4",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--threads",
            "1",
            "--vocab-size",
            "64",
            "--out",
            str(out),
        ]
    )
    results = json.loads(out.read_text())
    assert results == json.loads(json.dumps(returned))
    rows = {row["name"]: row for row in results["settings"]}
    assert list(rows) == SETTINGS
    assert isinstance(results["all_pass"], bool)

    forward, flops = results["forward_seconds"], results["forward_flops"]
    assert set(forward) == set(flops) == {"image", "text", "third"}
    assert all(value > 0 for value in [*forward.values(), *flops.values()])
    vit = count_parameters("vit_test")
    expected_locked = {"Uu": 0, "Lu": vit, "Lu_precomputed": 0, "3T": vit, "3T_precomputed": 0}
    for name, row in rows.items():
        assert len(row["step_seconds_all"]) == 2
        assert row["step_seconds"] > 0 and all(t > 0 for t in row["step_seconds_all"])
        assert set(row["phase_seconds"]) == {"locked", "forward", "backward", "optimizer"}
        assert all(t >= 0 for t in row["phase_seconds"].values())
        assert row["locked_parameters"] == expected_locked[name]
        assert row["trainable_parameters"] > 0
        assert row["state_bytes"] > 0 and row["step_extra_bytes"] >= 0
        assert row["peak_bytes"] == row["state_bytes"] + row["step_extra_bytes"]
        assert math.isfinite(row["loss"])
        assert isinstance(row["pass"], bool)
        # The FLOP model: 3 forwards per trained tower, 1 per locked one, 0 per precomputed one.
        model = 3 * sum(forward[t] for t in row["trained_towers"]) + sum(forward[t] for t in row["locked_towers"])
        assert math.isclose(row["model_seconds"], model)
        assert math.isclose(row["model_ratio"], model / rows["Uu"]["model_seconds"])
        assert math.isclose(row["ratio"], row["step_seconds"] / rows["Uu"]["step_seconds"])
    assert rows["Uu"]["ratio"] == 1.0 and rows["Uu"]["pass"]
    assert rows["Lu"]["trained_towers"] == ["text"] and rows["Lu"]["locked_towers"] == ["image"]
    assert rows["3T"]["locked_towers"] == ["third"]
    assert rows["3T_precomputed"]["locked_towers"] == []
    # Taking a tower out or precomputing it removes its FLOPs from the step, never adds any.
    step_flops = {name: row["step_flops"] for name, row in rows.items()}
    assert step_flops["Lu_precomputed"] < step_flops["Lu"] < step_flops["Uu"] < step_flops["3T"]
    assert step_flops["3T_precomputed"] < step_flops["3T"]
    # A locked tower is one forward: Lu's step counts exactly the image forward more than
    # Lu_precomputed's, 3T's the third tower's forward more than 3T_precomputed's.
    assert step_flops["Lu"] - step_flops["Lu_precomputed"] == flops["image"]
    assert step_flops["3T"] - step_flops["3T_precomputed"] == flops["third"]
