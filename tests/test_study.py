"""The LiT / 3T study (``benchmarks/study.py``): its aggregation and the papers'
expectations against hand-computed numbers, its plan, and (launch) the quick code path end to end
at toy size through the real trainer: the code path, not its numbers.

Run: ``pytest -q tests/test_study.py`` (~1 s without ``-m launch``; the launch test ~1-2 min).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch  # noqa: F401  (at collection: torch's first import runs ldconfig, a process start in a test)
from launching import REPO

from tritower.benchmarks.study_report import aggregate, check_expectations, format_expectations, mean_spread, verdict


def _study_module():
    spec = importlib.util.spec_from_file_location("study_benchmark", REPO / "benchmarks" / "study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def _result(setting: str, tower: str, seed: int, top1: float, step_s: float = 0.1, alphas: list[float] | None = None):
    metrics = {"zeroshot_top1": top1, "image_to_text_R@1": top1 / 2}
    for alpha, value in zip((0, 0.25, 0.5, 0.75, 1), alphas or []):
        metrics[f"zeroshot_top1@alpha={alpha:g}"] = value
    return {"setting": setting, "tower": tower, "seed": seed, "metrics": metrics, "step_s": step_s}


def test_mean_and_sample_spread() -> None:
    # mean 0.4; deviations -0.2, 0, 0.2: sample variance (0.04 + 0 + 0.04) / 2 = 0.04, spread 0.2.
    stat = mean_spread([0.2, 0.4, 0.6])
    assert stat["n"] == 3 and math.isclose(stat["mean"], 0.4) and math.isclose(stat["std"], 0.2)
    assert mean_spread([0.7]) == {"mean": 0.7, "std": 0.0, "n": 1}
    assert mean_spread([math.nan])["n"] == 0  # a metric a run did not report is no zero


def test_aggregate_over_seeds_with_shared_settings_and_alphas() -> None:
    results = [
        _result("uu", "none", 0, 0.30, 0.20),
        _result("uu", "none", 1, 0.50, 0.40),
        _result("Lu", "matched", 0, 0.80),
        _result("3T", "mismatched", 0, 0.40, alphas=[0.1, 0.2, 0.3, 0.4, 0.5]),
        _result("3T", "mismatched", 1, 0.60, alphas=[0.3, 0.2, 0.5, 0.4, 0.7]),
    ]
    rows = aggregate(results, ["matched", "mismatched"])
    assert [(r["setting"], r["tower"]) for r in rows] == [("uu", "none"), ("Lu", "matched"), ("3T", "mismatched")]
    uu = rows[0]
    assert uu["seeds"] == [0, 1] and math.isclose(uu["metrics"]["zeroshot_top1"]["mean"], 0.4)
    assert math.isclose(uu["metrics"]["zeroshot_top1"]["std"], math.sqrt(0.02))  # (0.1^2 + 0.1^2) / 1
    assert math.isclose(uu["metrics"]["image_to_text_R@1"]["mean"], 0.2)
    assert math.isclose(uu["step_s"]["mean"], 0.3)
    assert uu["metrics"]["text_to_image_R@5"]["n"] == 0  # not in these records
    sweep = rows[2]["alphas"]
    assert math.isclose(sweep["0"]["mean"], 0.2) and math.isclose(sweep["0.5"]["mean"], 0.4)
    assert math.isclose(sweep["1"]["std"], math.sqrt(0.02))


def _rows(values: dict[tuple[str, str], float], spread: float = 0.0) -> list[dict]:
    results = []
    for (setting, tower), value in values.items():
        results.append(_result(setting, tower, 0, value - spread, alphas=[0.4, 0.5, 0.6, 0.55, 0.45]))
        if spread:
            results.append(_result(setting, tower, 1, value + spread, alphas=[0.4, 0.5, 0.6, 0.55, 0.45]))
    return aggregate(results, ["matched", "mismatched", "real"])


def test_expectations_margins_by_hand() -> None:
    rows = _rows(
        {
            ("uu", "none"): 0.30, ("uL", "none"): 0.10,
            ("Lu", "matched"): 0.70, ("LU", "matched"): 0.80, ("Uu", "matched"): 0.50, ("UU", "matched"): 0.75,
            ("UL", "matched"): 0.20, ("LL", "matched"): 0.25,
            ("3T", "matched"): 0.45, ("Lu", "mismatched"): 0.20, ("3T", "mismatched"): 0.40,
        }
    )  # fmt: skip
    checks = {(c["expectation"].split(" (")[0], c["tower"]): c for c in check_expectations(rows)}
    # Pairs with the same text tower: Lu - Uu = 0.20, LU - UU = 0.05, so 0.05; it holds although
    # Lu (0.70) is below UU (0.75), whose text tower is another.
    locked = checks[("LiT: locked image towers above unlocked ones, same text tower", "matched")]
    assert locked["holds"] and math.isclose(locked["margin"], 0.80 - 0.75)
    assert locked["detail"] == "Lu 0.700 vs Uu 0.500, LU 0.800 vs UU 0.750"
    unlocked = checks[("LiT: a pretrained unlocked image tower above from scratch", "matched")]
    assert unlocked["holds"] and math.isclose(unlocked["margin"], 0.50 - 0.30)
    scratch = checks[("LiT: a locked pretrained image tower above CLIP from scratch", "matched")]
    assert scratch["holds"] and math.isclose(scratch["margin"], 0.70 - 0.30)
    mismatched = checks[("LiT: a locked pretrained image tower above CLIP from scratch", "mismatched")]
    assert mismatched["holds"] is False and math.isclose(mismatched["margin"], 0.20 - 0.30)
    assert checks[("LiT: a locked pretrained image tower above CLIP from scratch", "real")]["holds"] is None
    # Pairs with the same image tower: UU - UL = 0.55, LU - LL = 0.55, uu - uL = 0.20.
    text_locked = checks[("LiT: locking the pretrained text tower does poorly, same image tower", "matched")]
    assert text_locked["holds"] and math.isclose(text_locked["margin"], 0.30 - 0.10)
    assert math.isclose(checks[("3T above uu", "matched")]["margin"], 0.45 - 0.30)
    assert checks[("3T above uu", "real")]["holds"] is None  # no real-tower run here
    assert math.isclose(checks[("3T above LiT", "mismatched")]["margin"], 0.40 - 0.20)
    robust = checks[("3T more robust than LiT to a mismatched tower", "matched -> mismatched")]
    # drops: Lu 0.70 - 0.20 = 0.50, 3T 0.45 - 0.40 = 0.05
    assert robust["holds"] and math.isclose(robust["margin"], 0.50 - 0.05)
    mixture = checks[("3T alpha mixture beats both ends", "matched")]
    assert mixture["holds"] and math.isclose(mixture["margin"], 0.60 - 0.45)  # alpha 0.5 vs alpha 1
    assert "holds" in format_expectations(list(checks.values()))


def test_expectation_that_fails_and_one_within_spread() -> None:
    rows = _rows({("uu", "none"): 0.50, ("3T", "matched"): 0.45, ("3T", "mismatched"): 0.52}, spread=0.05)
    checks = {(c["expectation"], c["tower"]): c for c in check_expectations(rows)}
    below = checks[("3T above uu (CLIP)", "matched")]
    assert below["holds"] is False and math.isclose(below["margin"], -0.05)
    assert verdict(below) == "does not hold (within seed spread)"  # spread 0.05 * sqrt(2)
    above = checks[("3T above uu (CLIP)", "mismatched")]
    assert above["holds"] and verdict(above) == "holds (within seed spread)"
    assert verdict(checks[("3T above uu (CLIP)", "real")]) == "not measured"


def test_plan_counts_and_bad_names() -> None:
    study = _study_module()
    runs = study.plan(list(study.SETTINGS), list(study.TOWERS), [0, 1, 2])
    # per seed: uu and uL once; 7 settings x 2 scene towers; EfficientNet-Lite0 in Lu, LU and 3T.
    assert len(runs) == 3 * (2 + 7 * 2 + 3)
    assert len({r.key for r in runs}) == len(runs)
    assert study.Run("uL", "none", 0) in runs and study.Run("Uu", "real", 0) not in runs
    assert study.Run("LU", "real", 2) in runs and study.Run("LL", "real", 2) not in runs
    assert len(study.plan(["Uu"], ["real"], [0], real_all=True)) == 1
    with pytest.raises(SystemExit, match="unknown setting Ul; known: uu"):
        study.main(["--settings", "Ul"])


def test_train_argv_of_each_kind_of_run(tmp_path: Path) -> None:
    study = _study_module()
    towers = {"real": {"arch": "efficientnet_lite0", "weights": "/w/effnet.safetensors", "embeddings": "/w/emb"}}
    towers["matched"] = {"arch": "vit_scene_tiny", "weights": "/w/matched.safetensors"}
    lu = study.train_argv(study.Run("LU", "real", 1), towers, study.FULL, tmp_path, tmp_path)
    assert "--model.text.tower=minilm_l6" in lu and "--model.image.tower=efficientnet_lite0" in lu
    assert "--model.image.pretrained=/w/effnet.safetensors" in lu and "--train.seed=1" in lu
    # The real tower's precomputed embeddings serve where it is the locked image tower only (3T's
    # third tower takes the 64 px inputs of the image tower, not the embeddings' 224 px).
    assert "--data.embeddings=/w/emb" in lu
    for setting in ("3T", "Uu"):
        argv = study.train_argv(study.Run(setting, "real", 0), towers, study.FULL, tmp_path, tmp_path)
        assert not any(a.startswith("--data.embeddings") for a in argv), setting
    three = study.train_argv(study.Run("3T", "matched", 0), towers, study.FULL, tmp_path, tmp_path)
    assert "--model.third.pretrained=/w/matched.safetensors" in three and "--model.image.tower=vit_scene_tiny" in three
    assert "--eval.alphas=0,0.25,0.5,0.75,1" in three and "--model.text.tower=bert_scene_tiny" in three
    uu = study.train_argv(study.Run("uu", "none", 0), towers, study.FULL, tmp_path, tmp_path)
    assert not any("pretrained" in a for a in uu)


@pytest.mark.launch
def test_quick_study_code_path_at_toy_size(tmp_path: Path) -> None:
    """The quick mode's code path (tower pretraining on shape labels, EfficientNet conversion,
    MiniLM text tower, a shared setting, 3T with its alpha sweep, table, JSON, figure), then a
    second call that resumes: every run's result exists, nothing trains again."""
    out = tmp_path / "study"
    command = [sys.executable, str(REPO / "benchmarks" / "study.py"), "--toy", "--quick", f"--out={out}"]
    command += ["--towers=mismatched,real", "--settings=uu,LU,3T"]
    env_run = dict(__import__("os").environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    first = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env_run, cwd=tmp_path)
    assert first.returncode == 0, (first.stdout + first.stderr)[-5000:]
    report = json.loads((out / "study.json").read_text())
    keys = sorted(p.stem for p in (out / "results").glob("*.json"))
    assert keys == ["3T-mismatched-s0", "3T-real-s0", "LU-mismatched-s0", "LU-real-s0", "uu-none-s0"]
    for key in keys:  # each result is what the real trainer wrote for that run
        result = json.loads((out / "results" / f"{key}.json").read_text())
        assert result["metrics"] == json.loads((out / "runs" / key / "metrics.json").read_text())
        assert (out / "runs" / key / "config.yaml").is_file() and result["step_s"] > 0
    three = next(r for r in report["rows"] if r["setting"] == "3T" and r["tower"] == "real")
    assert set(three["alphas"]) == {"0", "0.25", "0.5", "0.75", "1"}
    assert report["towers"]["mismatched"]["labels"] == "shape" and report["towers"]["real"]["own_accuracy"] is None
    embeddings = Path(report["towers"]["real"]["embeddings"])  # precomputed once, used by its locked runs
    assert (embeddings / "meta.json").is_file() and str(embeddings) in (out / "runs/LU-real-s0/config.yaml").read_text()
    assert 0 <= report["towers"]["mismatched"]["own_accuracy"] <= 1
    assert (out / "study_bars.png").stat().st_size > 1000
    assert "3T above uu" in first.stdout and "zero-shot" in first.stdout

    again = subprocess.run(command, capture_output=True, text=True, timeout=200, env=env_run, cwd=tmp_path)
    assert again.returncode == 0 and "study: run " not in again.stdout, again.stdout[-3000:]


def test_report_only_aggregates_existing_results(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    study = _study_module()
    tower = {"arch": "vit_scene_tiny", "labels": "colour_shape", "own_accuracy": 0.5, "probe_top1": 0.6}
    (tmp_path / "towers" / "matched").mkdir(parents=True)
    (tmp_path / "towers" / "matched" / "tower.json").write_text(json.dumps(tower))
    (tmp_path / "results").mkdir()
    for setting, tower_kind, seed, value in [("uu", "none", 0, 0.2), ("uu", "none", 1, 0.4), ("Lu", "matched", 0, 0.7)]:
        record = _result(setting, tower_kind, seed, value)
        (tmp_path / "results" / f"{setting}-{tower_kind}-s{seed}.json").write_text(json.dumps(record))
    argv = ["--report-only", f"--out={tmp_path}", "--towers=matched", "--settings=uu,Lu,3T", "--seeds=0,1"]
    assert study.main(argv) == 0
    report = json.loads((tmp_path / "study.json").read_text())
    assert report["meta"]["runs"] == 3  # Lu-matched-s1 and the 3T runs have no result: left out
    uu = next(r for r in report["rows"] if r["setting"] == "uu")["metrics"]["zeroshot_top1"]
    assert math.isclose(uu["mean"], 0.3) and math.isclose(uu["std"], math.sqrt(0.02))
    assert "uu | none | 2 | 0.300±0.141" in capsys.readouterr().out
    assert (tmp_path / "study_bars.png").stat().st_size > 1000


def test_third_tower_built_for_other_inputs_is_named_in_a_warning() -> None:
    """Found by the study: EfficientNet-Lite0 (224 px) as 3T's third tower behind the 64 px scene
    tower ran silently on 64 px images, the image tower's inputs."""
    from tritower.model import ModelConfig, TowerConfig

    common = dict(image=TowerConfig(tower="vit_scene_tiny"), text=TowerConfig(tower="bert_scene_tiny"), setting="3T")
    (warning,) = ModelConfig(third=TowerConfig("efficientnet_lite0", "/w.st"), **common).parsed.warnings
    assert "model.third.tower=efficientnet_lite0 was trained on 224 px images" in warning
    assert "3T feeds it the image tower's inputs (64 px" in warning
    assert (
        ModelConfig(third=TowerConfig(pretrained="/w.st"), **common).parsed.warnings == ()
    )  # the scene tower as its own third tower: same inputs
