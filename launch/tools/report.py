"""Run curves: one panel per quantity against step, read from runs' ``train_log.jsonl``, several
runs overlaid (``launch/metrics/curves.py`` draws them; the trainer draws ``<run>/curves.png``).

    python -m tritower.launch.tools.report --runs=runs/clip_tiny --out=curves.png
    python -m tritower.launch.tools.report --runs=runs/a,runs/b --labels=Lu,uu --out=lu_vs_uu.png
    python -m tritower.launch.tools.report --runs=runs/a --metrics=loss,zeroshot_top1,*R@10 --out=a.png
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tritower.launch.cli import parse_options
from tritower.launch.config import ConfigError
from tritower.launch.metrics.curves import ReportError, draw_curves


@dataclass
class ReportOptions:
    """Options of the run-curves command (``--field=value`` or ``--field value``)."""

    runs: str
    """Comma-separated run folders, each holding the ``train_log.jsonl`` a training run wrote
    (``<train.output_dir>/<train.run_name>``, e.g. ``runs/clip_tiny``); several are overlaid."""
    out: str = "curves.png"
    """Figure file to write; its suffix picks the format (``.png``, ``.pdf``, ``.svg``)."""
    labels: str = ""
    """Comma-separated legend labels, one per run (default: each run folder's name)."""
    metrics: str = ""
    """Comma-separated quantities to draw, one panel each, in this order; shell-style patterns
    match several (``*R@10``, ``imagenet/*``). Names: ``loss``, ``lr``, ``logit_scale``,
    ``samples_per_s``, ``loss_<term>`` (3T), and the eval metrics (``zeroshot_top1``,
    ``image_to_text_R@5``, ``<set>/<metric>``, ``zeroshot_top1@alpha=0.5``). Default: loss, learning
    rate, logit scale, the 3T terms and every eval metric logged, not the sample counts nor 3T's
    alpha sweep."""
    title: str = ""
    """Title above the panels (default: none)."""
    dpi: int = 120
    """Resolution of a raster figure (``.png``), in dots per inch."""


def _items(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 drawn, 2 a usage error or runs that cannot be drawn (one line on stderr)."""
    try:
        options = parse_options(
            ReportOptions,
            argv,
            command="python -m tritower.launch.tools.report",
            example="--runs=runs/a,runs/b --labels=a,b --out=curves.png",
        )
        runs = [Path(run) for run in _items(options.runs)]
        labels, metrics = _items(options.labels), _items(options.metrics)
        out = draw_curves(runs, Path(options.out), labels, metrics, options.title, options.dpi)
    except (ConfigError, ReportError) as error:
        print(f"tritower report: error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
