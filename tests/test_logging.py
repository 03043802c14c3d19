"""Logging users expect: TensorBoard and CSV through DeepSpeed's monitors, a quiet console (library
noise filtered, the first-run op compile announced) and the machine's speed at start."""

from __future__ import annotations

import logging
import warnings

import pytest
from PIL import Image

from tritower.launch.cli import load_config
from tritower.launch.metrics.console import matmul_gflops, quiet_libraries, speed_line
from tritower.launch.metrics.monitors import add_monitors


def test_noise_is_filtered_and_other_warnings_are_not() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_libraries()
        message = "`torch.distributed.reduce_scatter_tensor` is deprecated. Please use `reduce_scatter_single`"
        warnings.warn(message, FutureWarning, stacklevel=1)
        warnings.warn(message.replace("reduce_scatter_tensor", "all_gather_into_tensor"), FutureWarning, stacklevel=1)
        warnings.warn("something a user should read", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something a user should read"]

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    deepspeed_logger = logging.getLogger("DeepSpeed")
    deepspeed_logger.addHandler(handler)
    try:
        deepspeed_logger.warning("Attempting to get learning rate from scheduler before it has started")
        deepspeed_logger.warning("a real DeepSpeed warning")
    finally:
        deepspeed_logger.removeHandler(handler)
    assert records == ["a real DeepSpeed warning"]


def test_speed_line_states_the_rate_and_the_default_runs_reference() -> None:
    assert matmul_gflops(size=128, repeats=1) > 0
    default = load_config([])  # what launch/train.py passes: the default experiment as the README runs it
    line = speed_line(load_config([]), gflops=50.0, threads="2 thread(s): OMP_NUM_THREADS", default=default)
    assert "50 GFLOP/s (2 thread(s): OMP_NUM_THREADS)" in line
    assert "at 100 GFLOP/s on the 2-core reference machine: about 20 min here" in line
    assert "reference" not in speed_line(load_config(["--experiment", "clip_test"]), 50.0, "2 thread(s)", default)
    # Another job on the default experiment (fewer steps, another setting, the user's shards): no estimate.
    for change in ("--train.steps=300", "--model.embed_dim=64", "--data.train_shards=/data/mine/{0..9}.tar"):
        assert "reference" not in speed_line(load_config([change]), 50.0, "2 thread(s)", default), change
    assert "about 20 min here" in speed_line(load_config(["--train.log_every=5"]), 50.0, "2 thread(s)", default)
    assert "reference" not in speed_line(default, 50.0, "2 thread(s)")  # no default given: no estimate
    from tritower.launch.experiments import DEFAULT_EXPERIMENT, get_experiment

    assert "about 20 min" in speed_line(default, 50.0, "2 thread(s)", get_experiment(DEFAULT_EXPERIMENT))


def test_monitor_sections_point_into_the_run_folder(tmp_path) -> None:
    cfg = load_config(["--log.tensorboard=True", "--log.csv=True", f"--train.output_dir={tmp_path}"])
    ds = add_monitors({}, cfg)
    assert ds["tensorboard"] == {"enabled": True, "output_path": str(tmp_path / "clip_tiny"), "job_name": "tensorboard"}
    assert ds["csv_monitor"]["job_name"] == "csv"
    assert add_monitors({}, load_config([])) == {}


@pytest.mark.launch
def test_tensorboard_event_file_is_written_and_read_by_tensorboard(train) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(
        "--log.tensorboard=True",
        "--log.csv=True",
        "--log.curves=True",
        "--eval.at_end=False",
        "--train.log_every=2",
        ranks=2,
    )
    folder = run.run_dir / "tensorboard"
    assert list(folder.glob("events.out.tfevents.*")), sorted(run.run_dir.rglob("*"))
    events = EventAccumulator(str(folder))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and "Train/Samples/lr" in tags
    losses = {event.step: event.value for event in events.Scalars("train/loss")}
    logged = {record["step"]: record["loss"] for record in run.steps()}
    assert losses.keys() == logged.keys()
    assert all(losses[step] == pytest.approx(logged[step], rel=1e-6) for step in logged)
    rows = (run.run_dir / "csv" / "train_loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss" and len(rows) == 1 + len(logged)
    # The console: the project's own lines, not the filtered library noise.
    assert "reduce_scatter_tensor" not in run.output and "all_gather_into_tensor" not in run.output
    assert "Attempting to get learning rate" not in run.output
    assert "GFLOP/s" in run.output
    with Image.open(run.run_dir / "curves.png") as curves:  # log.curves: the run's own figure at the end
        assert curves.format == "PNG" and curves.width > 300 and curves.height > 200, run.output[-2000:]
