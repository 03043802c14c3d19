"""``--help``/``-h``: every command prints its config's sections, fields, types, values and the
field docstrings (read from the dataclasses' source), and exits 0."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tritower.launch.cli import field_docs, load_config, parse_overrides
from tritower.launch.config import ConfigError, OptimConfig
from tritower.launch.tools.pretrain_image import PretrainImageConfig

REPO = Path(__file__).resolve().parent.parent


def _help(capsys: pytest.CaptureFixture, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as leaving:
        load_config(argv)
    assert leaving.value.code == 0
    return capsys.readouterr().out


def test_field_docs_are_read_from_the_source() -> None:
    docs = field_docs(OptimConfig)
    assert docs["lr"] == "Peak learning rate, reached at the end of warm-up."
    assert set(docs) == {f for f in OptimConfig.__dataclass_fields__}


def test_train_help_lists_sections_fields_types_values_and_docstrings(capsys: pytest.CaptureFixture) -> None:
    text = _help(capsys, ["--help"])
    for section in ("model", "data", "loss", "optim", "train", "deepspeed", "eval", "checkpoint", "wandb"):
        assert f"\n[{section}] " in text
    assert "--optim.lr: float = 0.0005" in text
    assert "Peak learning rate, reached at the end of warm-up." in text
    assert "--model.setting: str = 'uu'" in text and "LiT setting: image letter then text letter" in text
    assert "clip_test: A seconds-long CLIP for tests" in text
    assert "--zero = --deepspeed.zero" in text and "--config FILE.yaml" in text


def test_help_shows_the_values_of_the_experiment_and_overrides(capsys: pytest.CaptureFixture) -> None:
    text = _help(capsys, ["--experiment", "clip_test", "--optim.lr=0.25", "-h", "optim"])
    assert "--optim.lr: float = 0.25" in text and "--optim.warmup_steps: int = 3" in text
    assert "[model]" not in text


def test_help_of_an_unknown_section_names_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean 'optim'"):
        load_config(["--help", "optm"])


def test_tool_help_from_its_own_dataclass(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as leaving:
        parse_overrides(PretrainImageConfig(), ["--steps=7", "--help"])
    assert leaving.value.code == 0
    text = capsys.readouterr().out
    assert "usage: python launch/tools/pretrain_image.py" in text
    assert "--steps: int = 7" in text and "Optimizer steps." in text
    assert "[data] " in text and "--data.batch_size" in text


@pytest.mark.launch
@pytest.mark.parametrize(
    "command, expected",
    [
        (["launch/train.py", "--help"], "Peak learning rate, reached at the end of warm-up."),
        (["launch/train.py", "-h"], "Optimizer steps in the run."),
        (["launch/tools/pretrain_image.py", "--help"], "Cross-entropy label smoothing."),
        (["launch/tools/pretrain_image.py", "-h"], "Image tower name from the registry."),
        (["launch/tools/precompute.py", "--help"], "fixed crops per sample"),
    ],
)
def test_every_command_answers_help(command: list[str], expected: str) -> None:
    result = subprocess.run(
        [sys.executable, *command], capture_output=True, text=True, cwd=REPO, timeout=180, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout
    assert "Traceback" not in result.stderr
