"""Run curves (``launch/tools/report.py``): the figure's plotted data is what the run logged.

Logs are written here in the trainer's exact format: lines copied from a real run's
``train_log.jsonl`` (``clip_test``, 1 rank, ``--eval.every_steps=4 --train.log_every=2``), and
records made by the trainer's own record functions and written as ``Trainer.append_log`` writes
them. Expected values are read back with plain ``json`` in this file; each panel's lines
(``Line2D`` x and y data) must equal them. The end-of-run ``curves.png`` of a real launch is
checked in ``tests/test_logging.py``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tritower.launch.metrics.curves import curves_figure, draw_curves
from tritower.launch.metrics.progress import eval_record, step_record, write_curves
from tritower.launch.tools.report import main

# From a real run's train_log.jsonl (steps 2-8; the eval metrics of step 8 shortened to four),
# then a NaN step the trainer skipped, a delayed unlock, and a resume that logged step 8 again.
REAL_LOG = """\
{"step": 2, "loss": 3.535512924194336, "lr": 0.0003333333333333333, "logit_scale": 14.285714149475098, "samples_per_s": 32.15081194630565}
{"step": 4, "loss": 3.5133917331695557, "lr": 0.0009698463103929542, "logit_scale": 14.281004905700684, "samples_per_s": 160.10436185009436}
{"step": 4, "event": "eval", "metrics": {"zeroshot_top1": 0.02, "zeroshot_top5": 0.16666666666666666, "zeroshot_mean_per_class_recall": 0.02222222222222222, "zeroshot_unlabelled": 0.0, "image_to_text_R@1": 0.0033333333333333335, "image_to_text_R@5": 0.013333333333333334, "image_to_text_R@10": 0.03, "text_to_image_R@1": 0.0, "text_to_image_R@5": 0.01, "text_to_image_R@10": 0.02, "eval_samples": 300.0, "eval_bad": 0.0}}
{"step": 6, "loss": 3.486807107925415, "lr": 0.00075, "logit_scale": 14.258223533630371, "samples_per_s": 20.166324357724676}
{"step": 8, "loss": 3.4549560546875, "lr": 0.00041317591116653486, "logit_scale": 14.236334800720215, "samples_per_s": 149.74584836497905}
{"step": 8, "event": "eval", "metrics": {"zeroshot_top1": 0.04666666666666667, "image_to_text_R@10": 0.03666666666666667, "text_to_image_R@10": 0.04, "eval_samples": 300.0}}
{"step": 10, "loss": NaN, "lr": 0.00011697777844051105, "logit_scale": 14.22498607635498, "samples_per_s": 24.8}
{"step": 10, "event": "unlock_image", "lr_factor": 0.0}
{"step": 8, "loss": 3.44, "lr": 0.0004, "logit_scale": 14.2, "samples_per_s": 150.0}
"""  # noqa: E501 (verbatim lines)


def write_log(run: Path, text: str) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "train_log.jsonl").write_text(text)
    return run


def expected(run: Path) -> dict[str, dict[int, float]]:
    """quantity -> {step: value} read plainly: step records and eval records, a later record of a step wins."""
    values: dict[str, dict[int, float]] = {}
    for line in (run / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "eval":
            fields = record["metrics"]
        elif "event" in record:
            continue
        else:
            fields = {k: v for k, v in record.items() if k != "step"}
        for key, value in fields.items():
            values.setdefault(key, {})[record["step"]] = value
    return values


def panels(figure) -> dict[str, object]:
    return {axes.get_label(): axes for axes in figure.axes}


def assert_line_is(line, by_step: dict[int, float]) -> None:
    steps = sorted(by_step)
    np.testing.assert_array_equal(np.asarray(line.get_xdata(), dtype=float), steps)
    np.testing.assert_array_equal(np.asarray(line.get_ydata(), dtype=float), [by_step[s] for s in steps])


def test_each_panel_plots_exactly_the_logged_values(tmp_path: Path) -> None:
    run = write_log(tmp_path / "real", REAL_LOG)
    logged = expected(run)
    assert math.isnan(logged["loss"][10]) and logged["loss"][8] == 3.44  # the resumed value of step 8
    figure = curves_figure([run])
    drawn = panels(figure)
    # Default panels: the training quantities, then every eval metric; not throughput, not sample counts.
    assert list(drawn)[:3] == ["loss", "lr", "logit_scale"]
    assert set(drawn) == {"loss", "lr", "logit_scale"} | expected_metrics(logged)
    for name, axes in drawn.items():
        (line,) = axes.get_lines()
        assert_line_is(line, logged[name])
        assert line.get_label() == "real"
    assert drawn["loss"].get_title() == "training loss" and drawn["zeroshot_top1"].get_title() == "eval: zeroshot_top1"
    assert drawn["loss"].get_xlabel() == "step"
    # Metrics logged at one eval only are single points; a step's eval lines up with the loss under it.
    assert drawn["loss"].get_xlim() == drawn["image_to_text_R@1"].get_xlim() == pytest.approx((0.0, 10.2))
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["real"]


def expected_metrics(logged: dict[str, dict[int, float]]) -> set[str]:
    counts = {"eval_samples", "eval_bad", "zeroshot_unlabelled"}
    steps = {"loss", "lr", "logit_scale", "samples_per_s"}
    return {key for key in logged if key not in counts | steps}


def test_records_made_by_the_trainers_functions_three_towers_terms_and_named_sets(tmp_path: Path) -> None:
    run = tmp_path / "three_towers"
    run.mkdir()
    terms = {"main": 2.5, "image_third": 2.75, "text_third": 3.0}
    with open(run / "train_log.jsonl", "a") as out:  # as Trainer.append_log writes
        for step in (5, 10, 15):
            scaled = {k: v / step for k, v in terms.items()}
            out.write(json.dumps(step_record(step, 9.0 / step, 1e-4 * step, 10.0 + step, 100.0, scaled)) + "\n")
            if step % 10 == 0 or step == 15:
                metrics = {"zeroshot_top1": step / 100, "coco/image_to_text_R@5": step / 50, "coco/eval_samples": 5.0}
                metrics |= {f"zeroshot_top1@alpha={alpha:g}": step / 100 + alpha for alpha in (0, 0.5, 1)}
                out.write(json.dumps(eval_record(step, metrics)) + "\n")
    logged = expected(run)
    drawn = panels(curves_figure([run]))
    assert list(drawn) == [
        "loss", "lr", "logit_scale", "loss_main", "loss_image_third", "loss_text_third",
        "zeroshot_top1", "coco/image_to_text_R@5",
    ]  # fmt: skip
    for name, axes in drawn.items():
        (line,) = axes.get_lines()
        assert_line_is(line, logged[name])
    assert drawn["coco/image_to_text_R@5"].get_title() == "eval: coco/image_to_text_R@5"
    assert drawn["loss_image_third"].get_title() == "3T loss term: image_third"
    # The alpha sweep only when asked for: a copy of every metric per alpha would bury the rest.
    swept = panels(curves_figure([run], metrics=["*@alpha=*"]))
    assert list(swept) == ["zeroshot_top1@alpha=0", "zeroshot_top1@alpha=0.5", "zeroshot_top1@alpha=1"]
    assert_line_is(swept["zeroshot_top1@alpha=0.5"].get_lines()[0], logged["zeroshot_top1@alpha=0.5"])


def test_two_runs_overlaid_two_lines_per_panel_with_their_labels(tmp_path: Path) -> None:
    first = write_log(tmp_path / "a", REAL_LOG)
    # The second run: other values, logged every 3 steps, one eval.
    records = [step_record(s, 4.0 - 0.1 * s, 1e-3, 14.0 + s / 10, 50.0, {}) for s in (3, 6, 9)]
    records.append(eval_record(9, {"zeroshot_top1": 0.3, "image_to_text_R@10": 0.25}))
    second = write_log(tmp_path / "b", "".join(json.dumps(r) + "\n" for r in records))
    figure = curves_figure([first, second], labels=["Lu", "uu"], metrics=["loss", "logit_scale", "zeroshot_top1"])
    drawn = panels(figure)
    assert list(drawn) == ["loss", "logit_scale", "zeroshot_top1"]
    for name, axes in drawn.items():
        lines = axes.get_lines()
        assert [line.get_label() for line in lines] == ["Lu", "uu"]
        assert lines[0].get_color() != lines[1].get_color()
        assert_line_is(lines[0], expected(first)[name])
        assert_line_is(lines[1], expected(second)[name])
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == ["Lu", "uu"]
    # A metric only one run logged is drawn for that run alone.
    (line,) = panels(curves_figure([first, second], metrics=["zeroshot_top5"])).popitem()[1].get_lines()
    assert line.get_label() == "a"


def test_metric_patterns_pick_panels_in_order(tmp_path: Path) -> None:
    run = write_log(tmp_path / "real", REAL_LOG)
    drawn = panels(curves_figure([run], metrics=["*R@10", "samples_per_s", "loss", "eval_samples"]))
    assert list(drawn) == ["image_to_text_R@10", "text_to_image_R@10", "samples_per_s", "loss", "eval_samples"]
    assert_line_is(drawn["eval_samples"].get_lines()[0], {4: 300.0, 8: 300.0})


def test_command_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    first = write_log(tmp_path / "a", REAL_LOG)
    second = write_log(tmp_path / "b", REAL_LOG.replace('"loss": 3.5', '"loss": 3.6'))
    out = tmp_path / "figures" / "curves.png"
    assert main([f"--runs={first},{second}", f"--out={out}", "--labels=first,second", "--dpi=60"]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 300
    assert draw_curves([first], tmp_path / "curves.svg", metrics=["loss"]).read_text().lstrip().startswith("<?xml")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--runs={tmp}/missing"], "run folder {tmp}/missing does not exist: pass --runs="),
        (["--runs={tmp}/nolog"], "{tmp}/nolog has no train_log.jsonl: it is not a training run folder"),
        (["--runs={tmp}/empty"], "{tmp}/empty/train_log.jsonl holds no step record yet"),
        (["--runs={tmp}/corrupt"], "{tmp}/corrupt/train_log.jsonl:2 is not a JSON record"),
        (["--runs={tmp}/good", "--labels=a,b"], "2 label(s) for 1 run(s): give one label per run"),
        (["--runs={tmp}/good", "--metrics=loss,top1"], "'top1' matches nothing these runs logged; they logged: loss,"),
        (["--runs="], "no run given: pass --runs="),
        (["--run={tmp}/good"], "unknown option --run (did you mean '--runs'?)"),
    ],
)  # fmt: skip
def test_bad_input_is_one_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture, argv, message) -> None:
    (tmp_path / "nolog").mkdir()
    write_log(tmp_path / "empty", '{"step": 4, "event": "unlock_image", "lr_factor": 0.0}\n')
    write_log(tmp_path / "corrupt", REAL_LOG.replace('{"step": 4, "loss"', '{"step": 4 "loss"', 1))
    write_log(tmp_path / "good", REAL_LOG)
    assert main([arg.format(tmp=tmp_path) for arg in argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("tritower report: error: ") and error.count("\n") == 1
    assert message.format(tmp=tmp_path) in error


def test_a_last_line_being_written_is_left_out(tmp_path: Path) -> None:
    run = write_log(tmp_path / "live", REAL_LOG + '{"step": 12, "loss": 3.4')
    (line,) = panels(curves_figure([run], metrics=["loss"]))["loss"].get_lines()
    assert list(line.get_xdata()) == [2, 4, 6, 8, 10]


def test_help_prints_the_field_docstrings(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as leaving:
        main(["--help"])
    assert leaving.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "usage: python -m tritower.launch.tools.report" in text
    assert "--runs STR" in text and "(required)" in text and "shell-style patterns" in text


def test_a_missing_required_option_is_named(usage_error) -> None:
    assert "Missing from python -m tritower.launch.tools.report: --runs STR" in usage_error(main, [])


def test_end_of_run_curves_never_fail_the_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_curves(tmp_path, enabled=True)  # no train_log.jsonl: nothing to draw
    error = capsys.readouterr().err
    assert error.startswith("warning: could not draw") and error.count("\n") == 1
    assert not (tmp_path / "curves.png").exists()
    run = write_log(tmp_path / "run", REAL_LOG)
    write_curves(run, enabled=False)
    assert not (run / "curves.png").exists()
    write_curves(run, enabled=True)
    assert f"curves: {run / 'curves.png'}" in capsys.readouterr().out
    with Image.open(run / "curves.png") as image:
        assert image.format == "PNG"
