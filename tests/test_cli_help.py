"""``--help``/``-h`` and the command-line forms of every command: tyro prints each field with its
type, default and docstring (read here independently, with ``ast``, from the dataclasses' source)
and exits 0; options parse in every form the commands document; usage errors exit 2 naming the
option."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tritower.launch.cli import load_config, parse_options
from tritower.launch.config import ConfigError
from tritower.launch.experiments import get_experiment
from tritower.launch.loop.config import TrainLoopConfig
from tritower.launch.optim.config import OptimConfig

REPO = Path(__file__).resolve().parent.parent

# (module, its options dataclass): every command with its own options.
TOOLS = [
    ("tritower.launch.tools.export", "ExportOptions"),
    ("tritower.launch.tools.export_open_clip", "RelocateOptions"),
    ("tritower.launch.tools.evaluate", "EvaluateOptions"),
    ("tritower.launch.tools.precompute", "PrecomputeConfig"),
    ("tritower.launch.tools.convert_efficientnet", "ConvertOptions"),
    ("tritower.launch.tools.report", "ReportOptions"),
    ("tritower.launch.tools.emoji_shards", "EmojiShardsOptions"),
    ("tritower.launch.plan.command", "PlanOptions"),
    ("tritower.launch.plan.measure", "MeasureOptions"),
]


def _flat(text: str) -> str:
    """Help text without rich's box drawing and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─|]|\+?-{3,}\+?", " ", text).split())


def _fields_in_source(cls: type) -> dict[str, str]:
    """{field: docstring with whitespace collapsed} of dataclass ``cls`` and its dataclass bases,
    read with ``ast`` from their modules' files."""
    found = {}
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        source = Path(inspect.getfile(base)).read_text()
        (node_cls,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == base.__name__]
        for node, after in zip(node_cls.body, node_cls.body[1:]):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
            ):
                found[node.target.id] = " ".join(after.value.value.split())
    return found


def _run_main(module: str, argv: list[str]) -> int:
    """``module.main(argv)``: its return value, or the code it exits with (``--help`` exits 0)."""
    try:
        return importlib.import_module(module).main(argv)
    except SystemExit as leaving:
        return leaving.code


@pytest.fixture
def one_column(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "100")  # tyro lays groups side by side on a wide terminal


def test_train_help_shows_every_field_with_its_docstring(capsys: pytest.CaptureFixture, one_column) -> None:
    with pytest.raises(SystemExit) as leaving:
        load_config(["--experiment", "clip_test", "-h"])
    assert leaving.value.code == 0
    text = _flat(capsys.readouterr().out)
    for cls, section in ((OptimConfig, "optim"), (TrainLoopConfig, "train")):
        for name, doc in _fields_in_source(cls).items():
            assert f"--{section}.{name}" in text and doc[:60] in text, (name, doc)
    steps = get_experiment("clip_test").train.steps
    assert f"--train.steps INT Optimizer steps in the run. (default: {steps})" in text  # the experiment's value
    # What --resume auto does, as it does it: the newest complete checkpoint, not whatever latest names.
    assert "``--resume auto``: continue from this run's newest complete checkpoint" in text


@pytest.mark.parametrize("module, options", TOOLS)
def test_every_tool_prints_its_fields_and_docstrings(
    module: str, options: str, capsys: pytest.CaptureFixture, one_column
) -> None:
    assert _run_main(module, ["--help"]) == 0
    text = _flat(capsys.readouterr().out)
    cls = getattr(importlib.import_module(module), options)
    documented = _fields_in_source(cls)
    assert set(documented) == {f.name for f in dataclasses.fields(cls)}  # every option has a docstring
    for field in dataclasses.fields(cls):
        if field.name == "data_overrides":  # precompute's --data.FIELD=VALUE pairs
            continue
        assert f"--{field.name}" in text and documented[field.name][:60] in text, field.name
    assert text.startswith(f"usage: python -m {module.removesuffix('.command')}")


@pytest.mark.launch
@pytest.mark.parametrize(
    "command, expected",
    [
        (["launch/train.py", "--help"], "Peak learning rate, reached at the end of warm-up."),
        (["launch/tools/pretrain_image.py", "-h"], "Image tower name from the registry."),
        (["-m", "tritower.launch.tools.precompute", "--help"], "Fixed crops per sample"),
        (["-m", "tritower.launch.plan", "-h"], "Memory per GPU, GiB."),  # through launch/plan/__main__.py
    ],
)
def test_every_command_answers_help(command: list[str], expected: str) -> None:
    result = subprocess.run(
        [sys.executable, *command], capture_output=True, text=True, cwd=REPO, timeout=180, check=False,
        env={**__import__("os").environ, "COLUMNS": "100"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in _flat(result.stdout)
    assert "Traceback" not in result.stderr


def test_dashes_underscores_bare_booleans_and_repeats_parse_alike() -> None:
    from tritower.launch.tools.evaluate import EvaluateOptions, parse_args

    expected = EvaluateOptions(
        export="e", out_dir="d", no_default=True, set=["a=x:zeroshot", "b=y"], batch_size=8, device="cpu"
    )
    dashed = ["--export", "e", "--out-dir", "d", "--no-default", "--set", "a=x:zeroshot", "--set", "b=y"]
    assert parse_args([*dashed, "--batch-size", "8", "--device", "cpu"]) == expected
    underscored = ["--export=e", "--out_dir=d", "--no_default=true", "--set=a=x:zeroshot", "--set=b=y"]
    assert parse_args([*underscored, "--batch_size=8", "--device=cpu"]) == expected
    spaced = ["--export", "e", "--out_dir", "d", "--no_default", "yes", "--set", "a=x:zeroshot", "--set", "b=y"]
    assert parse_args([*spaced, "--batch_size", "8", "--device", "cpu"]) == expected
    assert parse_args(["--export", "e", "--no-default", "false"]).no_default is False
    assert parse_args(["--export", "e"]).set == []


def test_plan_flags_as_documented_and_as_fields() -> None:
    from tritower.launch.plan.command import PlanOptions

    def parse(argv: list[str]) -> PlanOptions:
        return parse_options(PlanOptions, argv, command="plan")

    documented = "--image vit_giant_patch14_224 --text bert_large --setting Uu --global-batch 32768 --gpus 256"
    first = parse([*documented.split(), "--gpu-memory", "80", "--precomputed-locked", "--json"])
    second = parse(
        ["--image=vit_giant_patch14_224", "--text=bert_large", "--setting=Uu", "--global_batch=32768"]
        + ["--gpus=256", "--gpu_memory=80", "--precomputed_locked=1", "--json=true"]
    )
    expected = PlanOptions(
        "vit_giant_patch14_224", "bert_large", 32768, 256, 80.0, setting="Uu", precomputed_locked=True, json=True
    )
    assert first == second == expected
    assert parse(documented.split() + ["--gpu-memory", "80"]).json is False
    assert parse(documented.replace("Uu", "uU").split() + ["--gpu-memory", "80"]).setting == "uU"


def test_precompute_data_overrides_and_dashed_flags() -> None:
    from tritower.launch.tools.precompute import PrecomputeConfig, parse_args

    needed = ["--tower", "vit_test", "--checkpoint", "c.safetensors", "--shards", "builtin", "--out", "emb"]
    cfg = parse_args(
        [*needed, "--view-seed", "7", "--num-workers=0", "--data.cache_dir=/tmp/c", "--data.builtin_train_samples=24"]
        + ["--overwrite", "--experiment", "clip_test", "--store-dtype", "fp32"]
    )
    assert cfg == PrecomputeConfig(
        tower="vit_test", checkpoint="c.safetensors", shards="builtin", out="emb", view_seed=7, num_workers=0,
        overwrite=True, experiment="clip_test", store_dtype="fp32", device=cfg.device,
        data_overrides=[("data.cache_dir", "/tmp/c"), ("data.builtin_train_samples", "24")],
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"unknown option --data.cache_dirr .did you mean '--data.cache_dir'"):
        parse_args([*needed, "--data.cache_dirr=/tmp"])
    with pytest.raises(ConfigError, match=r"unknown experiment 'clip_tst'.*did you mean 'clip_test'"):
        parse_args([*needed, "--experiment=clip_tst"])


def test_export_repeatable_pretrained_and_positional_folder() -> None:
    from tritower.launch.tools.export import ExportOptions
    from tritower.launch.tools.export_open_clip import RelocateOptions

    options = parse_options(
        ExportOptions,
        ["--checkpoint", "c", "--out=o", "--pretrained", "image=a.safetensors", "--pretrained=text=b"],
        command="export",
    )
    assert options.pretrained == ["image=a.safetensors", "text=b"] and options.alpha is None
    assert parse_options(RelocateOptions, ["moved"], command="x", positional="folder") == RelocateOptions("moved")
    assert parse_options(RelocateOptions, ["--folder", "moved"], command="x", positional="folder").folder == "moved"


EXPORT, PLAN = "tritower.launch.tools.export", "tritower.launch.plan.command"


@pytest.mark.parametrize(
    "module, argv, message",
    [
        (EXPORT, ["--out", "o"], "Missing from python -m tritower.launch.tools.export: --checkpoint STR"),
        (PLAN, ["--image", "a", "--text", "b"], "--global_batch INT"),
        ("tritower.launch.tools.export_open_clip", [], "--folder STR"),
        (EXPORT, ["--checkpoint=c", "--out=o", "--format=onnx"], "Expected one of ('native', 'open_clip')"),
        (PLAN, ["--image=a", "--text=b", "--global_batch=8", "--gpu_memory=8", "--gpus=x"], "Error parsing --gpus"),
        ("tritower.launch.tools.precompute", ["--views"], "Missing value for argument '--views'"),
    ],
)
def test_usage_errors_exit_2_naming_the_option(module: str, argv: list[str], message: str, usage_error) -> None:
    assert message in usage_error(importlib.import_module(module).main, argv)


@pytest.mark.parametrize(
    "module, argv, message",
    [
        ("tritower.launch.tools.evaluate", ["--export", "e", "--out-dri", "d"], "did you mean '--out_dir'?"),
        ("tritower.launch.tools.export", ["--checkpoint", "c", "--out", "o", "--tga=x"], "did you mean '--tag'?"),
        ("tritower.launch.plan.measure", ["--embed_dimm=3"], "did you mean '--embed_dim'?"),
        ("tritower.launch.tools.evaluate", ["--export", "e", "--checkpoint", "c"], "not both"),
    ],
)
def test_misspelt_or_conflicting_options_are_one_line(
    module: str, argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert _run_main(module, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
