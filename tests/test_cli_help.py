"""``--help``/``-h``: every command prints its config's sections, fields, types, values and the
field docstrings (read from the dataclasses' source), and exits 0."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
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
        (["launch/tools/precompute.py", "--help"], "Fixed crops per sample"),
        (["-m", "tritower.launch.plan", "-h"], "Memory per GPU, GiB."),  # through launch/plan/__main__.py
    ],
)
def test_every_command_answers_help(command: list[str], expected: str) -> None:
    result = subprocess.run(
        [sys.executable, *command], capture_output=True, text=True, cwd=REPO, timeout=180, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert expected in result.stdout
    assert "Traceback" not in result.stderr


# ---- the tools: one options dataclass each, parsed by launch/cli.py's parse_options ----------

# (module, its options dataclass): every command that used to be an argparse command.
TOOLS = [
    ("tritower.launch.tools.export", "ExportOptions"),
    ("tritower.launch.tools.export_open_clip", "RelocateOptions"),
    ("tritower.launch.tools.evaluate", "EvaluateOptions"),
    ("tritower.launch.tools.precompute", "PrecomputeConfig"),
    ("tritower.launch.tools.convert_efficientnet", "ConvertOptions"),
    ("tritower.launch.tools.emoji_shards", "EmojiShardsOptions"),
    ("tritower.launch.plan.command", "PlanOptions"),
    ("tritower.launch.plan.measure", "MeasureOptions"),
]


def _fields_in_source(cls: type) -> dict[str, tuple[str, str]]:
    """{field: (annotation, docstring with whitespace collapsed)} of dataclass ``cls`` and its
    dataclass bases, read here with ``ast`` from their modules' files, independently of
    launch/cli.py's reader."""
    found = {}
    for base in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):
        source = Path(inspect.getfile(base)).read_text()
        (node_cls,) = [n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == base.__name__]
        for node, after in zip(node_cls.body, node_cls.body[1:]):
            literal = isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
            if isinstance(node, ast.AnnAssign) and literal:
                found[node.target.id] = (ast.unparse(node.annotation), " ".join(after.value.value.split()))
    return found


def _run_main(module: str, argv: list[str]) -> int:
    """``module.main(argv)``: its return value, or the code it exits with (``--help`` exits 0)."""
    try:
        return importlib.import_module(module).main(argv)
    except SystemExit as leaving:
        return leaving.code


@pytest.mark.parametrize("module, options", TOOLS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_every_tool_prints_its_fields_types_defaults_and_docstrings(
    module: str, options: str, flag: str, capsys: pytest.CaptureFixture
) -> None:
    assert _run_main(module, [flag]) == 0
    text = capsys.readouterr().out
    flat = " ".join(text.split())  # the help wraps docstrings at 92 columns
    cls = getattr(importlib.import_module(module), options)
    documented = _fields_in_source(cls)
    # Every option has a docstring, and the help shows each under its --field line.
    sections = {"data_overrides"}  # precompute's --data.FIELD=VALUE pairs
    assert set(documented) == {f.name for f in dataclasses.fields(cls)}
    for field in dataclasses.fields(cls):
        annotation, doc = documented[field.name]
        assert doc and doc in flat, (field.name, doc)
        if field.name in sections:
            continue
        if field.default is not dataclasses.MISSING:
            assert f"--{field.name}: {annotation} = {field.default!r}" in text
        elif field.default_factory is dataclasses.MISSING:
            assert f"--{field.name}: {annotation} (required)" in text
    assert text.startswith(f"usage: python -m {module.removesuffix('.command')}")


def test_help_shows_the_values_given_and_required_fields(capsys: pytest.CaptureFixture) -> None:
    assert _run_main("tritower.launch.plan.command", ["--gpus", "16", "--gpu-memory=40", "-h"]) == 0
    text = capsys.readouterr().out
    assert "--gpus: int = 16" in text and "--gpu_memory: float = 40.0" in text
    assert "--image: str (required)" in text and "--setting: str = 'uu', one of LU, Lu, UU, Uu, uu, UL" in text
    assert "--json: bool = False" in text and "Print JSON instead of tables." in text


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
    from tritower.launch.cli import parse_options
    from tritower.launch.plan.command import PlanOptions

    def parse(argv: list[str]) -> PlanOptions:
        return parse_options(PlanOptions, argv, command="plan")

    documented = "--image vit_giant_patch14_224 --text bert_large --setting Uu --global-batch 32768 --gpus 256"
    first = parse([*documented.split(), "--gpu-memory", "80", "--precomputed-locked", "--json"])
    second = parse(
        ["--image=vit_giant_patch14_224", "--text=bert_large", "--setting=Uu", "--global_batch=32768"]
        + ["--gpus=256", "--gpu_memory=80", "--precomputed_locked=1", "--json=true"]
    )
    assert (
        first
        == second
        == PlanOptions(
            "vit_giant_patch14_224", "bert_large", 32768, 256, 80.0, setting="Uu", precomputed_locked=True, json=True
        )
    )
    assert parse(documented.split() + ["--gpu-memory", "80"]).json is False


def test_precompute_data_overrides_and_dashed_flags() -> None:
    from tritower.launch.tools.precompute import PrecomputeConfig, parse_args

    needed = ["--tower", "vit_test", "--checkpoint", "c.safetensors", "--shards", "builtin", "--out", "emb"]
    cfg = parse_args(
        [
            *needed,
            "--view-seed",
            "7",
            "--num-workers=0",
            "--data.cache_dir=/tmp/c",
            "--data.builtin_train_samples",
            "24",
        ]
        + ["--overwrite", "--experiment", "clip_test", "--store-dtype", "fp32"]
    )
    assert cfg == PrecomputeConfig(
        tower="vit_test", checkpoint="c.safetensors", shards="builtin", out="emb", view_seed=7, num_workers=0,
        overwrite=True, experiment="clip_test", store_dtype="fp32", device=cfg.device,
        data_overrides=[("data.cache_dir", "/tmp/c"), ("data.builtin_train_samples", "24")],
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"data.cache_dirr.*did you mean 'data.cache_dir'"):
        parse_args([*needed, "--data.cache_dirr=/tmp"])
    with pytest.raises(ConfigError, match=r"unknown experiment 'clip_tst'.*did you mean 'clip_test'"):
        parse_args([*needed, "--experiment=clip_tst"])


def test_export_repeatable_pretrained_and_positional_folder() -> None:
    from tritower.launch.cli import parse_options
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
    with pytest.raises(ConfigError, match="unexpected argument 'again'"):
        parse_options(RelocateOptions, ["moved", "again"], command="x", positional="folder")


@pytest.mark.parametrize(
    "module, argv, message",
    [
        # Unknown options name the closest, in the form they were written.
        ("tritower.launch.tools.evaluate", ["--export", "e", "--out-dri", "d"], "did you mean 'out-dir'?"),
        ("tritower.launch.tools.export", ["--checkpoint", "c", "--out", "o", "--tga=x"], "did you mean 'tag'?"),
        ("tritower.launch.plan.measure", ["--embed_dimm=3"], "did you mean 'embed_dim'?"),
        # Required options: one line naming them and an example.
        ("tritower.launch.tools.export", ["--out", "o"], "missing --checkpoint: e.g. python -m tritower.launch"),
        (
            "tritower.launch.plan.command",
            ["--image", "a", "--text", "b"],
            "missing --global_batch, --gpus, --gpu_memory",
        ),
        ("tritower.launch.tools.convert_efficientnet", [], "missing --out: e.g."),
        ("tritower.launch.tools.export_open_clip", [], "missing FOLDER (or --folder)"),
        ("tritower.launch.tools.precompute", ["--tower", "t"], "missing --checkpoint, --shards, --out"),
        ("tritower.launch.tools.evaluate", [], "missing --export FOLDER (or --checkpoint FOLDER): e.g."),
        # Mutually exclusive, choices, values.
        ("tritower.launch.tools.evaluate", ["--export", "e", "--checkpoint", "c"], "not both"),
        ("tritower.launch.tools.export", ["--checkpoint=c", "--out=o", "--format=onnx"], "one of native, open_clip"),
        ("tritower.launch.plan.command", ["--gpus=x"], "--gpus='x': expected a int"),
        ("tritower.launch.tools.precompute", ["--views"], "--views needs a value: write --views=VALUE"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    module: str, argv: list[str], message: str, capsys: pytest.CaptureFixture
) -> None:
    assert _run_main(module, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
