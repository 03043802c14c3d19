"""The benchmarks' command lines (``benchmarks/cli.py`` over ``launch/cli.py: parse_options``):
the invocations docs/ and the scripts write parse to what they say, list options take several
words or commas alike, and a typo or a wrong choice exits 2 with one line naming it.

Run: ``pytest -q tests/test_benchmark_cli.py`` (seconds: the options are parsed, nothing runs).
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import pytest
import torch  # noqa: F401  (at collection: torch's first import runs ldconfig, a process start in a test)
from launching import REPO


def _benchmark(name: str) -> ModuleType:
    # benchmarks/ is not a package: load the script by path, as `python benchmarks/...` would.
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    return module


def _options(name: str, argv: list[str]) -> object:
    module = _benchmark(name)
    options = next(cls for cls_name, cls in vars(module).items() if cls_name.endswith("Options"))
    return module.parse_benchmark(options, argv, command=name)


def test_documented_invocations_parse_as_they_read() -> None:
    loader = _options("data_loader", "--samples 4000 --batches 40 --workers 0 1 2 4 8 --out r.json".split())
    assert (loader.samples, loader.batches, loader.workers, loader.out) == (4000, 40, (0, 1, 2, 4, 8), "r.json")
    assert _options("data_loader", ["--per-shard", "100"]).per_shard == 100
    assert _options("data_loader", []).workers == (0, 1, 2)  # a list option's default, not appended to

    # docs/loss.md: a list flag alone is the empty list, whatever follows it.
    loss = _options("loss_memory", "--threads 2 --mem-budget-gib 24 --ranked --worlds --out s.json".split())
    assert (loss.threads, loss.mem_budget_gib, loss.ranked, loss.worlds, loss.out) == (2, 24.0, (), (), "s.json")
    loss = _options("loss_memory", "--threads 1 --single --mem-budget-gib 24 --out r.json".split())
    assert loss.single == () and loss.ranked == ("16384x512", "32768x512") and loss.mem_budget_gib == 24.0
    loss = _options("loss_memory", "--impls tiled --single 4096x512 8192x1024 --repeats 2".split())
    assert (loss.impls, loss.single, loss.repeats) == (("tiled",), ("4096x512", "8192x1024"), 2)
    child = _options("loss_memory", "--child tiled 64 16 32 1 1".split()).child
    assert child == ("tiled", "64", "16", "32", "1", "1")

    streaming = _options("eval_streaming", ["--sizes", "", "--retrieval-sizes", "20000", "--batch_size", "64"])
    assert (streaming.sizes, streaming.retrieval_sizes, streaming.batch_size) == ((), (20000,), 64)
    assert _options("eval_streaming", ["--sizes", "5000,20000,50000"]).sizes == (5000, 20000, 50000)

    triton = _options("loss_triton_gpu", "--sizes 16384x512 32768x1024 --out g.json --tf32".split())
    assert (triton.sizes, triton.out, triton.tf32) == (("16384x512", "32768x1024"), "g.json", True)
    dropout = _options("patch_dropout", "--device cuda --tower vit_base_patch16_224 --batch 256".split())
    assert (dropout.device, dropout.tower, dropout.batch, dropout.keep) == (
        "cuda",
        "vit_base_patch16_224",
        256,
        "1.0,0.75,0.5,0.25",
    )

    suite = _options("gpu_suite", "--dry-run --parts uu lu --out dry.json --peak-tflops 790".split())
    assert (suite.dry_run, suite.parts, suite.out, suite.peak_tflops) == (True, ("uu", "lu"), "dry.json", 790.0)
    assert _options("gpu_suite", ["--out", "x.json"]).parts == ("uu", "lu", "loss", "accum")

    study = _options("study", "--quick --out /tmp/s --towers matched,mismatched --steps 100 --eval-samples 500".split())
    assert (study.quick, study.towers, study.steps, study.eval_samples) == (True, "matched,mismatched", 100, 500)
    assert _options("study", ["--report-only", "--json", "a.json", "--figure", "b.png"]).report_only


def test_tower_settings_options_add_the_reference_and_the_third_tower() -> None:
    module = _benchmark("tower_settings")
    argv = "--device cuda --precision bf16 --image-tower vit_base_patch16_224 --settings 3T Lu --no-flops".split()
    options = module.options_from(argv)
    assert options.settings == ("Uu", "Lu", "3T")  # the suite's order, Uu first: ratios are to it
    assert (options.precision, options.third_tower, options.no_flops) == ("bf16", "vit_base_patch16_224", True)
    assert module.options_from(["--settings=Lu,3T_precomputed"]).settings == ("Uu", "Lu", "3T_precomputed")


@pytest.mark.parametrize(
    ("name", "argv", "named"),
    [
        ("data_loader", ["--worker", "2"], "--workers"),  # a typo names the closest option
        ("gpu_suite", ["--out", "x.json", "--parts", "uu", "lux"], "'lux' is not one of uu, lu, loss, accum"),
        ("tower_settings", ["--settings", "LU"], "'LU' is not one of Uu, Lu"),
        ("tower_settings", ["--precision", "fp16"], "fp16"),
        ("loss_memory", ["--worlds", "two"], "two"),
        ("gpu_suite", [], "--out"),  # required
    ],
)
def test_bad_options_exit_2_naming_the_problem(name: str, argv: list[str], named: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        _options(name, argv)
    assert exited.value.code == 2
    captured = capsys.readouterr()
    assert named in " ".join((captured.err + captured.out).split()), captured.err + captured.out
