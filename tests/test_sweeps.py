"""wandb sweep files (``sweeps/*.yaml``): valid, and every command an agent would run is accepted.

A sweep needs a W&B server, so what is tested here is what can be (there are no offline sweeps in wandb 0.31): each YAML
parses and is well formed; its ``command:`` expanded the way ``wandb agent`` expands it (macros
implemented below from wandb's documentation and cross-checked against wandb's own
``create_sweep_command_args``), with values sampled from each parameter's ``values`` /
``min``/``max``/``distribution``, gives argument lists ``load_config`` accepts in-process; and one
expanded command of ``clip_tiny_lr.yaml`` runs for real on 2 CPU ranks with the environment an
agent sets (``WANDB_RUN_ID``, ``WANDB_SWEEP_ID``), where only global rank 0 may start a wandb run.
Every sweep parameter must be a config key (the 3T loss weights included).

Run: ``pytest tests/test_sweeps.py`` (about a minute on 2 CPU cores, one DeepSpeed launch).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from launching import REPO, Run, free_port

from tritower.launch.cli import ALIASES, load_config
from tritower.launch.config import TrainConfig
from tritower.launch.engine.ds_config import build_ds_config

SWEEPS = sorted((REPO / "sweeps").glob("*.yaml"))
COMMAND = ["deepspeed", "launch/train.py", "--zero", "zero_configs/z3.json", "${args}"]
DISTRIBUTIONS = {
    "constant",
    "categorical",
    "int_uniform",
    "uniform",
    "q_uniform",
    "log_uniform",
    "log_uniform_values",
    "q_log_uniform",
    "q_log_uniform_values",
    "normal",
    "q_normal",
    "log_normal",
    "q_log_normal",
    "inv_log_uniform",
    "inv_log_uniform_values",
    "beta",
    "q_beta",
}
SAMPLES_PER_SWEEP = 6


def load_sweep(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def sample_value(spec: dict, rng: random.Random):
    """One value of a parameter, drawn as the sweep controller would (enough for key checks)."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(spec["values"])
    low, high = spec.get("min"), spec.get("max")
    kind = spec.get("distribution") or ("int_uniform" if isinstance(low, int) and isinstance(high, int) else "uniform")
    if kind == "int_uniform":
        return rng.randint(low, high)
    if kind in ("uniform", "q_uniform"):
        value = rng.uniform(low, high)
        return round(value / spec.get("q", 1)) * spec.get("q", 1) if kind == "q_uniform" else value
    if kind == "log_uniform_values":
        return math.exp(rng.uniform(math.log(low), math.log(high)))
    if kind == "log_uniform":  # min/max are natural logs here
        return math.exp(rng.uniform(low, high))
    if kind == "normal":
        return rng.gauss(spec.get("mu", 0.0), spec.get("sigma", 1.0))
    raise AssertionError(f"sampler does not know distribution {kind!r}")


def extremes(spec: dict) -> list:
    """Boundary values worth checking besides random draws."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    low, high = spec["min"], spec["max"]
    if spec.get("distribution") == "log_uniform":
        return [math.exp(low), math.exp(high)]
    return [low, high]


def expand(command: list[str], program: str, params: dict, json_file: Path) -> list[str]:
    """The argument list ``wandb agent`` runs for one set of parameter values.

    Macros (wandb docs, "Sweep configuration: command"): ``${env}`` -> /usr/bin/env,
    ``${interpreter}`` -> python, ``${program}`` -> the program, ``${args}`` -> ``--key=value``
    (Python ``str`` of the value, so booleans are ``--flag=True``), ``${args_no_hyphens}`` ->
    ``key=value``, ``${args_no_boolean_flags}`` -> ``--flag`` for True, nothing for False,
    ``${args_json}`` -> one JSON string, ``${args_json_file}`` -> path of a file holding it.
    An item that is not a macro is passed through unchanged.
    """
    json_file.write_text(json.dumps(params))
    macros = {
        "env": ["/usr/bin/env"],
        "interpreter": ["python"],
        "program": [program],
        "args": [f"--{k}={v}" for k, v in params.items()],
        "args_no_hyphens": [f"{k}={v}" for k, v in params.items()],
        "args_no_boolean_flags": [f"--{k}" if v is True else f"--{k}={v}" for k, v in params.items() if v is not False],
        "args_json": [json.dumps(params)],
        "args_json_file": [str(json_file)],
    }
    expanded = []
    for item in command:
        item = str(item)
        if item.startswith("${") and item.endswith("}"):
            assert item[2:-1] in macros, f"unknown macro {item}"
            expanded += macros[item[2:-1]]
        else:
            expanded.append(item)
    return expanded


def config_keys(section: object = None, prefix: str = "") -> set[str]:
    """Every dotted field of TrainConfig (the per-tower ``model.image.pretrained`` too), plus
    ``experiment`` and the aliases."""
    section = TrainConfig() if section is None else section
    keys = {"experiment", *ALIASES} if not prefix else set()
    for item in dataclasses.fields(section):
        value = getattr(section, item.name)
        if dataclasses.is_dataclass(value):
            keys |= config_keys(value, f"{prefix}{item.name}.")
        else:
            keys.add(f"{prefix}{item.name}")
    return keys


def parameter_sets(sweep: dict, rng: random.Random) -> list[dict]:
    """Random draws plus every boundary/choice of each parameter (others at a random draw)."""
    params = sweep["parameters"]
    sets = [{k: sample_value(v, rng) for k, v in params.items()} for _ in range(SAMPLES_PER_SWEEP)]
    for key, spec in params.items():
        for value in extremes(spec):
            sets.append({**{k: sample_value(v, rng) for k, v in params.items()}, key: value})
    return sets


def train_argv(command: list[str]) -> list[str]:
    """What ``launch/train.py`` receives: everything after the program."""
    return command[command.index("launch/train.py") + 1 :]


def test_sweep_files_exist() -> None:
    assert {p.name for p in SWEEPS} >= {"clip_tiny_lr.yaml", "lit_lr_wd.yaml", "three_towers.yaml"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_is_well_formed(path: Path) -> None:
    sweep = load_sweep(path)
    assert sweep["program"] == "launch/train.py" and (REPO / sweep["program"]).is_file()
    assert sweep["command"] == COMMAND, (
        "multi-process sweeps name deepspeed literally (the agent's ${interpreter} is always python)"
    )
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"]["goal"] in ("minimize", "maximize") and sweep["metric"]["name"]
    assert (REPO / "zero_configs" / "z3.json").is_file()
    for key, spec in sweep["parameters"].items():
        kinds = [k for k in ("value", "values", "min") if k in spec]
        assert len(kinds) == 1, f"{key}: give exactly one of value, values, min/max"
        if "min" in spec:
            assert sweep["method"] != "grid", f"{key}: grid search needs value/values"
            low, high = spec["min"], spec["max"]
            # YAML 1.1 reads 1e-4 (no dot) as a string: numbers must really be numbers.
            assert all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (low, high)), key
            assert low < high, key
            assert spec.get("distribution", "uniform") in DISTRIBUTIONS, key
            if spec.get("distribution") == "log_uniform_values":
                assert low > 0, key
        if "values" in spec:
            assert isinstance(spec["values"], list) and spec["values"], key
        assert re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+){0,2}", key), f"{key}: expected section.field or model.tower.option"


def test_expansion_matches_wandb_agent(tmp_path: Path) -> None:
    """Our expansion of ``${args}`` etc. equals wandb's own, for floats, ints, strings, booleans."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command_args

    params = {
        "optim.lr": 0.00031,
        "optim.warmup_steps": 30,
        "data.caption_key": "json:caption",
        "eval.at_end": True,
        "checkpoint.save_at_end": False,
    }
    ours = expand(
        ["${args}", "${args_no_hyphens}", "${args_no_boolean_flags}", "${args_json}"],
        "launch/train.py",
        params,
        tmp_path / "args.json",
    )
    theirs = create_sweep_command_args({"args": {k: {"value": v} for k, v in params.items()}})
    assert ours == theirs["args"] + theirs["args_no_hyphens"] + theirs["args_no_boolean_flags"] + theirs["args_json"]
    assert "--eval.at_end=True" in ours
    assert load_config(train_argv(expand(COMMAND, "launch/train.py", params, tmp_path / "a.json"))).eval.at_end is True


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_expanded_command_is_accepted(path: Path, tmp_path: Path) -> None:
    sweep = load_sweep(path)
    unknown = sorted(set(sweep["parameters"]) - config_keys())
    assert not unknown, f"{path.name}: unknown config keys {unknown}"
    rng = random.Random(path.name)
    for params in parameter_sets(sweep, rng):
        command = expand(sweep["command"], sweep["program"], params, tmp_path / "args.json")
        cfg = load_config(train_argv(command))
        # The ZeRO policy filling (batch split, warm-up vs steps) is the launch's next check.
        build_ds_config(cfg, world_size=2)
        for key, value in params.items():
            if "." in key:
                *path, name = key.split(".")
                owner = cfg
                for part in path:
                    owner = getattr(owner, part)
                got = getattr(owner, name)
                assert got == value or math.isclose(got, value, rel_tol=1e-12), (key, got, value)


@pytest.mark.launch
def test_one_expanded_command_runs_with_agent_environment(tmp_path: Path, data_cache: Path) -> None:
    """One agent-expanded clip_tiny_lr command, clip_test-sized, on 2 CPU ranks; one wandb run."""
    sweep = load_sweep(REPO / "sweeps" / "clip_tiny_lr.yaml")
    params = {k: sample_value(v, random.Random(0)) for k, v in sweep["parameters"].items()}
    command = expand(sweep["command"], sweep["program"], params, tmp_path / "args.json")
    # Test-sized overrides after ${args} (later overrides win); warm-up must fit the 2 steps.
    command += [
        "--experiment=clip_test",
        "--train.steps=2",
        "--optim.warmup_steps=1",
        "--eval.at_end=false",
        "--checkpoint.save_at_end=false",
        "--wandb.mode=offline",
        f"--data.cache_dir={data_cache}",
        f"--train.output_dir={tmp_path / 'runs'}",
        "--train.run_name=sweep-run",
    ]
    # On a CPU machine the launcher starts one rank unless told; on a GPU node it takes them all.
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    launched = [deepspeed, "--num_gpus", "2", "--master_port", str(free_port()), *command[1:]]
    env = dict(
        os.environ,
        WANDB_RUN_ID="sweeprun01",
        WANDB_SWEEP_ID="sweep0001",
        WANDB_SILENT="true",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",
    )
    run = Run.before(tmp_path / "runs" / "sweep-run")
    result = subprocess.run(launched, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    final = run.finished(output).metrics
    assert final["step"] == 2 and final["world_size"] == 2 and math.isfinite(final["loss"])
    assert f"'--optim.lr={params['optim.lr']}'" in output  # the sampled value reached both ranks
    runs = list((tmp_path / "runs" / "sweep-run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith("-sweeprun01"), runs
