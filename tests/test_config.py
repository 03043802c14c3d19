"""Config parsing, overrides, experiments and the filling of ZeRO policy files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tritower.launch.cli import load_config
from tritower.launch.config import ConfigError
from tritower.launch.config_file import write_config_file
from tritower.launch.engine.ds_config import build_ds_config
from tritower.launch.experiments import EXPERIMENTS

REPO = Path(__file__).resolve().parent.parent
ZERO_FILES = sorted((REPO / "zero_configs").glob("*.json"))


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_every_experiment_parses_and_fills_every_policy(name: str) -> None:
    cfg = load_config(["--experiment", name])
    assert cfg.experiment == name
    for path in ZERO_FILES:
        cfg.deepspeed.zero = str(path)
        if "offload" in path.name and cfg.optim.name != "adamw":
            with pytest.raises(ConfigError, match="offloads the optimizer"):
                build_ds_config(cfg, world_size=2)
            continue
        ds = build_ds_config(cfg, world_size=2)
        assert ds["train_batch_size"] == cfg.data.batch_size
        assert ds["train_micro_batch_size_per_gpu"] * 2 == cfg.data.batch_size
        # Adafactor (a client optimizer) and LambdaLR schedules are not in the DeepSpeed config.
        assert ds.get("optimizer", {"params": {"lr": cfg.optim.lr}})["params"]["lr"] == cfg.optim.lr
        if "scheduler" in ds:
            assert ds["scheduler"]["params"]["total_num_steps"] == cfg.train.steps
        assert ds["bf16"]["enabled"] == (cfg.deepspeed.precision == "bf16")
        assert "auto" not in json.dumps(ds), f"{path.name} left an 'auto' unfilled"


def test_overrides_both_forms_and_launcher_local_rank() -> None:
    cfg = load_config(
        [
            "--local_rank=1",
            "--experiment",
            "clip_tiny",
            "--optim.lr=2e-4",
            "--data.batch_size",
            "128",
            "--model.text.grad_checkpointing=True",
            "--zero",
            "zero_configs/z1.json",
        ]
    )
    assert cfg.optim.lr == 2e-4 and cfg.data.batch_size == 128
    assert cfg.model.text.grad_checkpointing is True
    assert cfg.deepspeed.zero == "zero_configs/z1.json"


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--optm.lr=1e-3"], "unknown option --optm.lr (did you mean '--optim.lr'?)"),
        (["--optim.lrr=1e-3"], "unknown option --optim.lrr (did you mean '--optim.lr'?)"),
        (["--steps=3"], "unknown option --steps (did you mean '--train.steps'?)"),
        (["--experiment", "clip_tinyy"], "unknown experiment 'clip_tinyy' (did you mean 'clip_tiny'?)"),
    ],
)
def test_unknown_names_fail_naming_the_closest(argv: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(argv)
    assert expected in str(error.value)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--data.batch_size=abc"], "Error parsing --data.batch_size: invalid literal for int() with base 10: 'abc'"),
        (["--loss.impl=fast"], "loss.impl"),
        (["--model.image.tower=vit_scene_tinyy"], "(did you mean 'vit_scene_tiny'?)"),
        (["--deepspeed.precision=fp8"], "Expected one of ('fp32', 'bf16', 'fp16')"),
        (["--optim.lr"], "Missing value for argument '--optim.lr'"),
    ],
)
def test_bad_values_fail_naming_the_fix(argv: list[str], expected: str, usage_error) -> None:
    assert expected in usage_error(load_config, argv)


def test_later_values_win_and_old_flat_keys_still_read() -> None:
    cfg = load_config(
        ["--optim.lr=1e-3", "--experiment=clip_test", "--optim.lr", "2e-3", "--model.image_tower=vit_test"]
    )
    assert cfg.optim.lr == 2e-3 and cfg.experiment == "clip_test" and cfg.model.image.tower == "vit_test"
    assert load_config(["--model.image.mean=0.5,0.25,0.125"]).model.image.mean == (0.5, 0.25, 0.125)
    assert load_config(["--log.csv"]).log.csv is True and load_config(["--log.csv", "false"]).log.csv is False


def _policy(tmp_path: Path, **changes) -> str:
    policy = json.loads((REPO / "zero_configs" / "z3.json").read_text())
    policy.update(changes)
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(policy))
    return str(path)


def test_policy_value_that_disagrees_with_training_config_names_both(tmp_path: Path) -> None:
    cfg = load_config(["--zero", _policy(tmp_path, train_batch_size=1024), "--data.batch_size=256"])
    with pytest.raises(ConfigError) as error:
        build_ds_config(cfg, world_size=1)
    message = str(error.value)
    assert "train_batch_size=1024" in message and "256" in message and "data.batch_size" in message


def test_policy_value_that_agrees_is_accepted(tmp_path: Path) -> None:
    cfg = load_config(
        ["--zero", _policy(tmp_path, train_batch_size=256, gradient_clipping=1.0), "--data.batch_size=256"]
    )
    assert build_ds_config(cfg, world_size=1)["train_batch_size"] == 256


def test_policy_errors_unknown_key_missing_file_bad_json_bad_stage(tmp_path: Path) -> None:
    cases = {
        _policy(
            tmp_path, zero_optimisation={"stage": 3}
        ): "unknown top-level key 'zero_optimisation' (did you mean 'zero_optimization'?)",
        str(tmp_path / "nope.json"): "ZeRO config file not found",
        _policy(tmp_path, zero_optimization={"stage": 4}): "stage must be 0, 1, 2 or 3",
    }
    for path, expected in cases.items():
        cfg = load_config(["--zero", path])
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
            build_ds_config(cfg, world_size=1)
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 3},}')
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_ds_config(load_config(["--zero", str(broken)]), world_size=1)


def test_batch_not_divisible_by_world_size() -> None:
    cfg = load_config(["--data.batch_size=10"])
    with pytest.raises(ConfigError, match="not divisible by world size 4"):
        build_ds_config(cfg, world_size=4)


@pytest.mark.launch
def test_train_script_rejects_typo_before_starting() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "launch" / "train.py"), "--zero", "zero_configs/z3.json", "--optim.lrr=1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2
    assert "did you mean '--optim.lr'?" in result.stderr
    assert "Traceback" not in result.stderr


# ---- config files (--config FILE.yaml) ------------------------------------------------------


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_resolved_config_file_reads_back_exactly(name: str, tmp_path: Path) -> None:
    cfg = load_config(["--experiment", name, "--optim.lr=1.2345678901234567e-4"])
    path = write_config_file(cfg, tmp_path)
    assert path == tmp_path / "config.yaml"
    again = load_config(["--config", str(path)])
    assert again.to_dict() == cfg.to_dict()
    assert again.experiment == name


def test_config_file_then_overrides_on_top(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text("experiment: clip_test\noptim:\n  lr: 3.0e-4\n  warmup_steps: 2\ndata:\n  batch_size: 64\n")
    cfg = load_config(["--config", str(path), "--data.batch_size=16"])
    assert cfg.experiment == "clip_test" and cfg.model.image.tower == "vit_test"  # the rest: clip_test
    assert cfg.optim.lr == 3e-4 and cfg.optim.warmup_steps == 2 and cfg.data.batch_size == 16


@pytest.mark.parametrize(
    "text, expected",
    [
        ("optm:\n  lr: 1.0\n", "unknown key 'optm' (did you mean 'optim'?)"),
        ("optim:\n  lrr: 1.0\n", "unknown key 'optim.lrr' (did you mean 'lr'?)"),
        ("- a\n- b\n", "must hold a mapping"),
    ],
)
def test_bad_config_file_fails_naming_the_fix(text: str, expected: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(["--config", str(path)])
    assert expected in str(error.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("data:\n  batch_size: 1.5\n", "Error parsing --data.batch_size"),
        (
            "model:\n  image:\n    grad_checkpointing: 3\n",
            "invalid choice '3' for argument '--model.image.grad_checkpointing'",
        ),
    ],
)
def test_bad_config_file_values_are_checked_as_the_command_line_is(text, expected, tmp_path, usage_error) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert expected in usage_error(load_config, ["--config", str(path)])


@pytest.mark.launch
def test_config_file_of_a_run_reproduces_it_exactly(train, tmp_path: Path) -> None:
    first = train("--train.run_name=first", "--eval.at_end=False", "--train.log_every=1")
    written = first.run_dir / "config.yaml"
    assert written.is_file()
    again = train(f"--config={written}", "--train.run_name=again")  # the file alone sets the rest
    timing = ("train_wall_s", "samples_per_s")

    def untimed(metrics: dict) -> dict:  # also inside the labelled scopes ("this_start", "run")
        return {k: untimed(v) if isinstance(v, dict) else v for k, v in metrics.items() if k not in timing}

    assert untimed(again.metrics) == untimed(first.metrics)
    assert again.losses() == first.losses() and len(first.losses()) >= 3
    resolved = yaml.safe_load((again.run_dir / "config.yaml").read_text())
    assert resolved["train"].pop("run_name") == "again"
    original = yaml.safe_load(written.read_text())
    assert original["train"].pop("run_name") == "first" and resolved == original
