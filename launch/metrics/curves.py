"""Run curves: one panel per quantity against step (training loss, learning rate, logit scale, the
3T loss terms, each eval metric), read from runs' ``train_log.jsonl``, several runs overlaid.

The command that draws them is ``python -m tritower.launch.tools.report``.

What is drawn comes from the records the trainer appends to ``train_log.jsonl`` (global rank 0):
a step record every ``train.log_every`` steps (``progress.step_record``: ``loss``, ``lr``,
``logit_scale``, ``samples_per_s``, ``loss_<term>``) and an eval record after each evaluation
(``progress.eval_record``: ``{"step", "event": "eval", "metrics": {...}}``, named sets as
``<set>/<metric>``). A step logged twice (a run resumed from a checkpoint re-runs the steps after
it) is drawn with its later value. Matplotlib without pyplot, so without a display and without
touching a global backend; ``draw_curves`` and ``curves_figure`` are importable (the study's
figures, the trainer's own ``<run>/curves.png`` through ``log.curves``).
"""

from __future__ import annotations

import fnmatch
import json
import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from tritower.evaluation import COUNTS

LOG = "train_log.jsonl"
TRAIN_KEYS = ("loss", "lr", "logit_scale")
"""Step-record quantities drawn by default, in this order; then the 3T terms (``loss_<term>``).
The others (``samples_per_s``) and the eval sample counts (``COUNTS``) only when ``--metrics``
names them."""
ALPHA = "@alpha="
"""What names a metric of 3T's alpha sweep (``zeroshot_top1@alpha=0.5``, ``eval.alphas``)."""
TITLES = {
    "loss": "training loss",
    "lr": "learning rate",
    "logit_scale": "logit scale (1 / temperature)",
    "samples_per_s": "throughput (samples/s)",
}
COLUMNS = 3


class ReportError(ValueError):
    """Input the report cannot draw: the message names the problem and the fix."""


@dataclass
class Curves:
    """What one run logged: ``{quantity: (steps, values)}`` of its step records and of its eval
    records, each sorted by step; quantities in the order the log first names them."""

    run: Path
    train: dict[str, tuple[list[int], list[float]]]
    eval: dict[str, tuple[list[int], list[float]]]


def read_records(run: Path) -> list[dict]:
    """The records of ``<run>/train_log.jsonl``; a last line still being written by a live run is
    left out. ReportError for a missing folder or log, a corrupt line, or a log with no step."""
    run = Path(run)
    if not run.is_dir():
        raise ReportError(f"run folder {run} does not exist: pass --runs=<train.output_dir>/<train.run_name>")
    path = run / LOG
    if not path.is_file():
        raise ReportError(
            f"{run} has no {LOG}: it is not a training run folder, or its run has not logged a step "
            "yet (the trainer writes one every train.log_every steps)"
        )
    lines = path.read_text().splitlines()
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number == len(lines):
                break  # the live run is writing it now
            raise ReportError(
                f"{path}:{number} is not a JSON record: {line[:80]!r}; repair or delete that line"
            ) from None
    if not any("loss" in record for record in records):
        raise ReportError(f"{path} holds no step record yet: the first is written at step train.log_every")
    return records


def _sorted(by_step: dict[int, float]) -> tuple[list[int], list[float]]:
    steps = sorted(by_step)
    return steps, [by_step[step] for step in steps]


def read_curves(run: Path) -> Curves:
    """Step -> value of every quantity of one run; a step logged again after a resume: the later
    record wins (as the run's losses went on from there)."""
    train: dict[str, dict[int, float]] = {}
    evaluated: dict[str, dict[int, float]] = {}
    for record in read_records(run):
        if record.get("event") == "eval":
            for key, value in record.get("metrics", {}).items():
                evaluated.setdefault(key, {})[int(record["step"])] = float(value)
        elif "loss" in record:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    train.setdefault(key, {})[int(record["step"])] = float(value)
    return Curves(
        Path(run),
        {key: _sorted(values) for key, values in train.items()},
        {key: _sorted(values) for key, values in evaluated.items()},
    )


def default_quantities(curves: list[Curves]) -> list[str]:
    """Loss, learning rate, logit scale, the 3T terms, then every eval metric, each once, in the
    order the runs logged them; not the sample counts, and not 3T's alpha sweep (a copy of every
    metric per alpha: ``--metrics='zeroshot_top1@alpha=*'`` draws them)."""
    names = [key for key in TRAIN_KEYS if any(key in c.train for c in curves)]
    names += list(dict.fromkeys(k for c in curves for k in c.train if k.startswith("loss_")))
    metrics = dict.fromkeys(k for c in curves for k in c.eval if ALPHA not in k)
    return names + [k for k in metrics if k.rsplit("/", 1)[-1] not in COUNTS]


def pick_quantities(curves: list[Curves], asked: list[str]) -> list[str]:
    """The quantities ``--metrics`` names (patterns expanded), in its order; ReportError naming what
    the runs logged when one matches nothing."""
    logged = list(dict.fromkeys([k for c in curves for k in c.train] + [k for c in curves for k in c.eval]))
    picked: list[str] = []
    for pattern in asked:
        matches = [key for key in logged if fnmatch.fnmatchcase(key, pattern)]
        if not matches:
            raise ReportError(
                f"--metrics: {pattern!r} matches nothing these runs logged; they logged: {', '.join(logged)}"
            )
        picked += [key for key in matches if key not in picked]
    return picked


def _series(curves: Curves, quantity: str) -> tuple[list[int], list[float], bool] | None:
    """(steps, values, is an eval metric) of one quantity of one run; None if it was not logged."""
    if quantity in curves.train:
        return (*curves.train[quantity], False)
    if quantity in curves.eval:
        return (*curves.eval[quantity], True)
    return None


def _title(quantity: str, evaluated: bool) -> str:
    if evaluated:
        return f"eval: {quantity}"
    if quantity.startswith("loss_"):
        return f"3T loss term: {quantity.removeprefix('loss_')}"
    return TITLES.get(quantity, quantity)


def curves_figure(
    runs: list[Path], labels: list[str] | None = None, metrics: list[str] | None = None, title: str = ""
) -> Figure:
    """The figure: one panel (an ``Axes``) per quantity against step, one line per run that logged
    it, colours by run, a legend naming the runs. ReportError on bad input."""
    if not runs:
        raise ReportError("no run given: pass --runs=runs/a[,runs/b,...]")
    labels = list(labels) if labels else [Path(run).name for run in runs]
    if len(labels) != len(runs):
        raise ReportError(f"{len(labels)} label(s) for {len(runs)} run(s): give one label per run, in order")
    curves = [read_curves(Path(run)) for run in runs]
    quantities = pick_quantities(curves, metrics) if metrics else default_quantities(curves)
    columns = 2 if len(quantities) == 4 else min(COLUMNS, len(quantities))  # 2x2 rather than 3+1
    rows = math.ceil(len(quantities) / columns)
    figure = Figure(figsize=(4.6 * columns, 3.2 * rows + 0.6), layout="constrained")
    colours = [f"C{i % 10}" for i in range(len(runs))]
    last_step = max(max(steps[-1] for steps, _ in [*c.train.values(), *c.eval.values()]) for c in curves)
    for index, quantity in enumerate(quantities):
        # The panel's label is its quantity: code that reads the figure finds a panel by name.
        axes = figure.add_subplot(rows, columns, index + 1, label=quantity)
        evaluated = False
        for run_curves, label, colour in zip(curves, labels, colours):
            series = _series(run_curves, quantity)
            if series is None:
                continue
            steps, values, evaluated = series
            # Eval points are few (every eval.every_steps): markers show where they were taken.
            axes.plot(steps, values, color=colour, label=label, marker="o" if evaluated else None, markersize=3)
        axes.set_title(_title(quantity, evaluated), fontsize=10)
        axes.set_xlabel("step")
        axes.grid(alpha=0.3)
        if quantity == "lr":
            axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        # One step axis for all panels: an eval every N steps lines up with the loss under it;
        # 2% beyond the last step, so that its marker is drawn whole.
        axes.set_xlim(0, last_step * 1.02)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = [Line2D([], [], color=colour, label=label) for colour, label in zip(colours, labels)]
    # Below the panels: above them it would collide with the title under constrained layout.
    figure.legend(handles=handles, loc="outside lower center", ncols=min(len(runs), 4), frameon=False)
    if title:
        figure.suptitle(title)
    return figure


def draw_curves(
    runs: list[Path],
    out: Path,
    labels: list[str] | None = None,
    metrics: list[str] | None = None,
    title: str = "",
    dpi: int = 120,
) -> Path:
    """Draw the runs' curves (``curves_figure``) to ``out`` (format from its suffix); returns ``out``."""
    figure = curves_figure(runs, labels, metrics, title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=dpi)
    return out
