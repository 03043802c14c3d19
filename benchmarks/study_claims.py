"""The study's claims mode: only the runs each of the papers' central claims needs, paired over
seeds, with a verdict per claim and the figures that show it.

    python benchmarks/study.py --claims --out runs/claims                      # 5 seeds (docs/study.md)
    python benchmarks/study.py --claims --seeds 0,1 --steps 200 --out runs/pilot  # a pilot of the budget

The mechanism LiT names for "locked beats unlocked" is built in: the image towers are pretrained
on the **broad** distribution (the built-in scenes in all five drawing styles, ``data/scenes.py``),
contrastive tuning runs on the **narrow** one (plain scenes only), and every run is evaluated in
distribution (the plain held-out scenes) and out of it (the same held-out scenes drawn in the four
other styles: ``eval.sets=ood=builtin:outline+noisy+shades+offgrid``). The runs per seed: ``uu``,
``Lu``, ``Uu`` and ``3T`` with the matched tower (30 colour x shape labels), ``Lu`` and ``3T`` with
the mismatched one (5 shape labels). Seeds pair runs: the same seed is the same data order and the
same initialisation of the towers trained from scratch, so each claim is a per-seed difference.

Pure functions below (``paired``, ``claim_verdicts``) are tested against hand-computed numbers;
``benchmarks/study.py`` trains the runs.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

OOD_STYLES = "outline+noisy+shades+offgrid"
"""The held-out scenes' styles out of the contrastive data's distribution (plain)."""
TOWER_STYLES = "broad"
"""What the claims' image towers are pretrained on: every style."""
CLAIM_TOWERS = ("matched", "mismatched")
CLAIM_RUNS: tuple[tuple[str, str], ...] = (
    ("uu", "none"),
    ("Lu", "matched"),
    ("Uu", "matched"),
    ("3T", "matched"),
    ("Lu", "mismatched"),
    ("3T", "mismatched"),
)
"""(setting, tower) of each seed's runs."""
CURVE_SETTINGS = ("uu", "3T")
"""Settings evaluated during training too (the figure of 3T against uu over steps)."""
IN, OOD = "zeroshot_top1", "ood/zeroshot_top1"
MIXTURE_ALPHA = 0.5
"""The mixture the alpha claim tests, fixed beforehand (the best of several alphas per seed would
favour the mixture by selection)."""
MARGIN_SE = 2.0
"""A difference resolves when it is more than this many standard errors from zero."""


def _metric(result: dict, name: str) -> float:
    value = result["metrics"].get(name)
    return math.nan if value is None else float(value)


def _alpha(name: str, alpha: float) -> str:
    """The 3T alpha-mixture metric of ``name`` (``ood/zeroshot_top1`` -> ``ood/zeroshot_top1@alpha=0.5``)."""
    return f"{name}@alpha={alpha:g}"


def by_seed(results: list[dict], setting: str, tower: str) -> dict[int, dict]:
    """Seed -> result of one (setting, tower)."""
    return {r["seed"]: r for r in results if r["setting"] == setting and r["tower"] == tower}


def paired(differences: dict[int, float], kind: str) -> dict:
    """Mean of the per-seed differences, its standard error (sample sd / sqrt(n)) and the verdict:
    ``kind`` ">" holds when the mean exceeds ``MARGIN_SE`` standard errors, ">=" unless the mean is
    below minus that; "does not hold" when it is beyond the margin the other way, else "within noise"."""
    values = [v for v in differences.values() if not math.isnan(v)]
    n = len(values)
    mean = statistics.fmean(values) if values else math.nan
    se = statistics.stdev(values) / math.sqrt(n) if n > 1 else math.nan
    if n < 2 or math.isnan(se):
        verdict = "too few seeds"
    elif kind == ">":
        verdict = "holds" if mean > MARGIN_SE * se else "does not hold" if mean < -MARGIN_SE * se else "within noise"
    else:
        verdict = "does not hold" if mean < -MARGIN_SE * se else "holds"
    return {"kind": kind, "mean": mean, "se": se, "n": n, "verdict": verdict, "per_seed": differences}


def _difference(a: dict[int, dict], b: dict[int, dict], metric: str) -> dict[int, float]:
    return {seed: _metric(a[seed], metric) - _metric(b[seed], metric) for seed in sorted(a.keys() & b.keys())}


def claim_verdicts(results: list[dict]) -> list[dict]:
    """Each claim's paired difference, standard error, verdict and the numbers that explain it."""
    uu, lu, uu_u = by_seed(results, "uu", "none"), by_seed(results, "Lu", "matched"), by_seed(results, "Uu", "matched")
    three, lu_mis, three_mis = (
        by_seed(results, "3T", "matched"),
        by_seed(results, "Lu", "mismatched"),
        by_seed(results, "3T", "mismatched"),
    )
    claims = []

    def add(name: str, paper: str, difference: dict[int, float], kind: str, context: dict) -> None:
        claims.append({"claim": name, "paper": paper, **paired(difference, kind), "context": context})

    def means(runs: dict[int, dict], metric: str) -> float:
        values = [_metric(r, metric) for r in runs.values()]
        return statistics.fmean(values) if values else math.nan

    add(
        "locked > unlocked out of distribution",
        "LiT, Figure 4",
        _difference(lu, uu_u, OOD),
        ">",
        {"Lu ood": means(lu, OOD), "Uu ood": means(uu_u, OOD), "Lu in": means(lu, IN), "Uu in": means(uu_u, IN)},
    )
    add(
        "locked >= unlocked in distribution",
        "LiT, Table 1 / Figure 4",
        _difference(lu, uu_u, IN),
        ">=",
        {"Lu in": means(lu, IN), "Uu in": means(uu_u, IN)},
    )
    add(
        "3T > uu (CLIP from scratch)",
        "3T, Table 1",
        _difference(three, uu, IN),
        ">",
        {"3T in": means(three, IN), "uu in": means(uu, IN), "3T ood": means(three, OOD), "uu ood": means(uu, OOD)},
    )
    drop_3t = _difference(three_mis, three, IN)
    drop_lit = _difference(lu_mis, lu, IN)
    add(
        "3T more robust than LiT to a mismatched tower",
        "3T, Section 5 (deficient image towers)",
        {seed: drop_3t[seed] - drop_lit[seed] for seed in sorted(drop_3t.keys() & drop_lit.keys())},
        ">",
        {"3T mismatched - matched": statistics.fmean(drop_3t.values()) if drop_3t else math.nan,
         "Lu mismatched - matched": statistics.fmean(drop_lit.values()) if drop_lit else math.nan},
    )  # fmt: skip
    for tower, runs in (("matched", three), ("mismatched", three_mis)):
        ends = {
            seed: _metric(r, _alpha(IN, MIXTURE_ALPHA)) - max(_metric(r, _alpha(IN, 0.0)), _metric(r, _alpha(IN, 1.0)))
            for seed, r in sorted(runs.items())
        }
        add(
            f"the alpha = {MIXTURE_ALPHA:g} mixture beats both ends ({tower} tower)",
            "3T, Figure 5",
            ends,
            ">",
            {f"alpha={a:g}": means(runs, _alpha(IN, a)) for a in (0.0, 0.25, 0.5, 0.75, 1.0)},
        )
    return claims


def format_claims(claims: list[dict]) -> str:
    lines = [f"{'claim':<58} difference        SE   n  verdict"]
    for c in claims:
        lines.append(f"{c['claim']:<58} {c['mean']:+10.3f} {c['se']:9.3f} {c['n']:3d}  {c['verdict']}")
        lines.append("    " + ", ".join(f"{k} {v:.3f}" for k, v in c["context"].items()))
    return "\n".join(lines)


def eval_curve(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """(step, value) of ``metric`` at each evaluation logged in the run's ``train_log.jsonl``."""
    points = []
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("event") == "eval" and metric in record.get("metrics", {}):
            points.append((record["step"], float(record["metrics"][metric])))
    return points


def draw_claims(results: list[dict], runs_dir: Path, path: Path) -> None:
    """Three panels: zero-shot in vs out of distribution for uu/Lu/Uu/3T (LiT's Figure 4 at toy
    scale), 3T against uu over training steps, and the alpha sweep; mean and standard error over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def stat(values: list[float]) -> tuple[float, float]:
        values = [v for v in values if not math.isnan(v)]
        if not values:
            return math.nan, 0.0
        return statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0

    fig, (bars, curves, alphas) = plt.subplots(1, 3, figsize=(15, 4.2))
    groups = [("uu", "none"), ("Lu", "matched"), ("Uu", "matched"), ("3T", "matched")]
    for offset, (metric, label) in enumerate(((IN, "in distribution (plain)"), (OOD, f"out of it ({OOD_STYLES})"))):
        points = [stat([_metric(r, metric) for r in by_seed(results, s, t).values()]) for s, t in groups]
        bars.bar(
            [i + 0.38 * offset for i in range(len(groups))],
            [m for m, _ in points],
            0.38,
            yerr=[e for _, e in points],
            capsize=3,
            label=label,
        )
    bars.set_xticks([i + 0.19 for i in range(len(groups))], [s for s, _ in groups])
    bars.set(ylabel="zero-shot top-1 (30 classes)", title="tuned on plain scenes, towers pretrained broad")
    bars.set_ylim(0, 1)
    bars.legend(fontsize=8, loc="upper left")
    for setting, tower in (("uu", "none"), ("3T", "matched")):
        per_seed = [dict(eval_curve(runs_dir / r["key"], IN)) for r in by_seed(results, setting, tower).values()]
        steps = sorted(set.intersection(*(set(c) for c in per_seed))) if per_seed else []
        points = [stat([c[s] for c in per_seed]) for s in steps]
        means, errors = [m for m, _ in points], [e for _, e in points]
        curves.errorbar(steps, means, yerr=errors, marker="o", capsize=3, label=setting)
    curves.set(xlabel="step", ylabel="zero-shot top-1 (in distribution)", title="3T against CLIP from scratch")
    curves.legend(fontsize=8)
    grid = (0.0, 0.25, 0.5, 0.75, 1.0)
    for tower, metric, label in (
        ("matched", IN, "matched tower, in distribution"),
        ("matched", OOD, "matched tower, out of distribution"),
        ("mismatched", IN, "mismatched tower, in distribution"),
    ):
        runs = by_seed(results, "3T", tower).values()
        points = [stat([_metric(r, _alpha(metric, a)) for r in runs]) for a in grid]
        alphas.errorbar(grid, [m for m, _ in points], yerr=[e for _, e in points], marker="o", capsize=3, label=label)
    alphas.set(xlabel="alpha (0: third tower's end, 1: 3T's main towers)", ylabel="zero-shot top-1")
    alphas.set_title("3T alpha mixture")
    alphas.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
