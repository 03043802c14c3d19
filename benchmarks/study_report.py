"""The LiT / 3T study's aggregation, the papers' expectations checked, its table and bar chart.

Pure functions over the per-run result records that ``benchmarks/study.py`` writes
(``{"setting", "tower", "seed", "metrics": <the run's metrics.json>, "step_s"}``): no training here,
so the logic is tested against hand-computed numbers (tests/test_study.py).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""3T mixing weights evaluated from each 3T run: 1 = 3T's main towers, 0 = the LiT-like end
(the third tower through its heads)."""
SHARED_SETTINGS = ("uu", "uL")
"""Settings without a pretrained image tower: one run per seed stands in every tower's column."""
METRICS = (
    "zeroshot_top1",
    "image_to_text_R@1",
    "image_to_text_R@5",
    "text_to_image_R@1",
    "text_to_image_R@5",
)
PRIMARY = "zeroshot_top1"
"""The metric the expectations compare (zero-shot top-1 over the 30 colour x shape classes)."""


def mean_spread(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value) of the seeds' values."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": math.nan, "std": math.nan, "n": 0}
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": spread, "n": len(values)}


def alpha_key(metric: str, alpha: float) -> str:
    """``evaluation/three_towers.py``'s metric name at one alpha (``zeroshot_top1@alpha=0.5``)."""
    return f"{metric}@alpha={alpha:g}"


def aggregate(results: list[dict], towers: list[str]) -> list[dict]:
    """One row per (setting, tower) over seeds: each metric's mean and spread, step time, and
    for 3T the primary metric at every alpha. Rows follow the order the runs first appear in."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for result in results:
        groups.setdefault((result["setting"], result["tower"]), []).append(result)
    rows = []
    for (setting, tower), members in groups.items():
        row = {"setting": setting, "tower": tower, "seeds": sorted(r["seed"] for r in members)}
        row["metrics"] = {m: mean_spread([r["metrics"].get(m, math.nan) for r in members]) for m in METRICS}
        row["step_s"] = mean_spread([r["step_s"] for r in members])
        if setting == "3T":
            row["alphas"] = {
                f"{a:g}": mean_spread([r["metrics"].get(alpha_key(PRIMARY, a), math.nan) for r in members])
                for a in ALPHAS
            }
        rows.append(row)
    order = {t: i for i, t in enumerate(["none", *towers])}
    return sorted(rows, key=lambda r: order.get(r["tower"], len(order)))


def _find(rows: list[dict], setting: str, tower: str) -> dict | None:
    """The row of a setting against a tower; settings without a pretrained image tower match any."""
    wanted = "none" if setting in SHARED_SETTINGS else tower
    return next((r for r in rows if r["setting"] == setting and r["tower"] == wanted), None)


def _value(rows: list[dict], setting: str, tower: str) -> tuple[float, float] | None:
    row = _find(rows, setting, tower)
    if row is None or row["metrics"][PRIMARY]["n"] == 0:
        return None
    return row["metrics"][PRIMARY]["mean"], row["metrics"][PRIMARY]["std"]


def _compare_pairs(name: str, tower: str, pairs: list[tuple[str, str]], rows: list[dict]) -> dict:
    """The smallest ``high - low`` over pairs of settings that differ in one tower only (the
    papers compare ``Lu`` with ``Uu``, not with ``UU``, whose text tower is another): > 0 means
    each high setting is above its partner. Pairs not measured are left out; none left = not measured."""
    measured = [
        (high, low, h, lo)
        for high, low in pairs
        if (h := _value(rows, high, tower)) is not None and (lo := _value(rows, low, tower)) is not None
    ]
    record = {"expectation": name, "tower": tower, "high": [p[0] for p in pairs], "low": [p[1] for p in pairs]}
    if not measured:
        return record | {"holds": None, "margin": None, "spread": None, "detail": "not measured"}
    margin = min(h[0] - lo[0] for _, _, h, lo in measured)
    spread = max(max(h[1], lo[1]) for _, _, h, lo in measured)
    detail = ", ".join(f"{high} {h[0]:.3f} vs {low} {lo[0]:.3f}" for high, low, h, lo in measured)
    return record | {"holds": margin > 0, "margin": margin, "spread": spread, "detail": detail}


def check_expectations(rows: list[dict]) -> list[dict]:
    """The papers' expectations, each marked holds / does not hold (None: not measured here) with
    its margin on zero-shot top-1 and the largest seed spread of the rows it compares."""
    checks = [
        _compare_pairs("LiT: a locked pretrained image tower above CLIP from scratch (Lu > uu)", tower,
                       [("Lu", "uu")], rows)
        for tower in ("matched", "mismatched", "real")
    ]  # fmt: skip
    checks += [
        _compare_pairs("LiT: locked image towers above unlocked ones, same text tower (Lu > Uu, LU > UU)", "matched",
                       [("Lu", "Uu"), ("LU", "UU")], rows),
        _compare_pairs("LiT: a pretrained unlocked image tower above from scratch (Uu > uu)", "matched",
                       [("Uu", "uu")], rows),
        _compare_pairs("LiT: locking the pretrained text tower does poorly, same image tower "
                       "(UU > UL, LU > LL, uu > uL)", "matched", [("UU", "UL"), ("LU", "LL"), ("uu", "uL")], rows),
    ]  # fmt: skip
    for tower in ("matched", "mismatched", "real"):
        checks.append(_compare_pairs("3T above uu (CLIP)", tower, [("3T", "uu")], rows))
    checks.append(_compare_pairs("3T above LiT (Lu) with a mismatched tower", "mismatched", [("3T", "Lu")], rows))
    checks.append(_robustness(rows))
    for tower in ("matched", "mismatched", "real"):
        checks.append(_alpha_check(rows, tower))
    return checks


def _robustness(rows: list[dict]) -> dict:
    """3T loses less than LiT (Lu) going from the matched to the mismatched tower."""
    name = "3T more robust than LiT to a mismatched tower (smaller drop from matched)"
    values = {(s, t): _value(rows, s, t) for s in ("3T", "Lu") for t in ("matched", "mismatched")}
    record = {"expectation": name, "tower": "matched -> mismatched", "high": ["3T"], "low": ["Lu"]}
    if any(v is None for v in values.values()):
        return record | {"holds": None, "margin": None, "spread": None, "detail": "not measured"}
    drop_3t = values[("3T", "matched")][0] - values[("3T", "mismatched")][0]
    drop_lu = values[("Lu", "matched")][0] - values[("Lu", "mismatched")][0]
    spread = max(v[1] for v in values.values())
    detail = f"drop 3T {drop_3t:.3f}, drop Lu {drop_lu:.3f}"
    return record | {"holds": drop_lu - drop_3t > 0, "margin": drop_lu - drop_3t, "spread": spread, "detail": detail}


def _alpha_check(rows: list[dict], tower: str) -> dict:
    """The best intermediate alpha (0 < alpha < 1) against the better end (alpha 0 or 1)."""
    name = "3T alpha mixture beats both ends (best 0 < alpha < 1 above alpha 0 and 1)"
    row = _find(rows, "3T", tower)
    record = {"expectation": name, "tower": tower, "high": ["3T@0<alpha<1"], "low": ["3T@alpha=0", "3T@alpha=1"]}
    if row is None or any(math.isnan(row["alphas"][f"{a:g}"]["mean"]) for a in ALPHAS):
        return record | {"holds": None, "margin": None, "spread": None, "detail": "not measured"}
    means = {a: row["alphas"][f"{a:g}"]["mean"] for a in ALPHAS}
    inner = max((a for a in ALPHAS if 0 < a < 1), key=lambda a: means[a])
    margin = means[inner] - max(means[0.0], means[1.0])
    spread = max(v["std"] for v in row["alphas"].values())
    detail = ", ".join(f"a={a:g} {means[a]:.3f}" for a in ALPHAS)
    return record | {"holds": margin > 0, "margin": margin, "spread": spread, "detail": detail}


def _cell(stat: dict[str, float]) -> str:
    if stat["n"] == 0:
        return "-"
    return f"{stat['mean']:.3f}±{stat['std']:.3f}" if stat["n"] > 1 else f"{stat['mean']:.3f}"


def format_table(rows: list[dict], towers: dict[str, dict]) -> str:
    """The study's table: metrics (mean±spread over seeds), step time; then the towers."""
    header = ["setting", "tower", "seeds", "zero-shot", "i2t R@1", "i2t R@5", "t2i R@1", "t2i R@5", "step s"]
    lines = [" | ".join(header), " | ".join("---" for _ in header)]
    for row in rows:
        cells = [row["setting"], row["tower"], str(len(row["seeds"]))]
        cells += [_cell(row["metrics"][m]) for m in METRICS]
        cells.append(f"{row['step_s']['mean']:.3f}")
        lines.append(" | ".join(cells))
    lines += [
        "",
        "tower | architecture | labels | own held-out top-1 | probe top-1 (30 classes)",
        "--- | --- | --- | --- | ---",
    ]
    for name, info in towers.items():
        own = "n/a" if info.get("own_accuracy") is None else f"{info['own_accuracy']:.3f}"
        lines.append(f"{name} | {info['arch']} | {info['labels']} | {own} | {info['probe_top1']:.3f}")
    alpha_rows = [r for r in rows if "alphas" in r]
    if alpha_rows:
        lines += ["", "3T zero-shot by alpha | " + " | ".join(f"{a:g}" for a in ALPHAS), "---" + " | ---" * len(ALPHAS)]
        for row in alpha_rows:
            lines.append(f"{row['tower']} | " + " | ".join(_cell(row["alphas"][f"{a:g}"]) for a in ALPHAS))
    return "\n".join(lines)


def verdict(check: dict) -> str:
    """``holds`` / ``does not hold`` / ``not measured``, flagged when the margin is within seed spread."""
    if check["holds"] is None:
        return "not measured"
    word = "holds" if check["holds"] else "does not hold"
    if check["spread"] and abs(check["margin"]) <= check["spread"]:
        word += " (within seed spread)"
    return word


def format_expectations(checks: list[dict]) -> str:
    """The expectations as a table: verdict, margin on zero-shot top-1, the numbers compared."""
    lines = ["expectation | tower | verdict | margin | numbers", "--- | --- | --- | --- | ---"]
    for c in checks:
        margin = "-" if c["margin"] is None else f"{c['margin']:+.3f}"
        lines.append(f"{c['expectation']} | {c['tower']} | {verdict(c)} | {margin} | {c['detail']}")
    return "\n".join(lines)


def draw_bars(rows: list[dict], towers: list[str], path: Path) -> None:
    """Bar chart: zero-shot top-1 per setting (bars per tower, error bars = seed spread), and
    the 3T alpha sweep per tower beside it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    colours = {"none": "0.6", "matched": "tab:blue", "mismatched": "tab:orange", "real": "tab:green"}
    figure, (bars, sweep) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 1]})
    width = 0.8 / max(1, len(towers))
    drawn: set[str] = set()
    for x, setting in enumerate(settings):
        members = [r for r in rows if r["setting"] == setting]
        for i, row in enumerate(members):
            offset = 0.0 if row["tower"] == "none" else (i - (len(members) - 1) / 2) * width
            stat = row["metrics"][PRIMARY]
            label = (
                None
                if row["tower"] in drawn
                else ("no pretrained image tower" if row["tower"] == "none" else row["tower"])
            )
            drawn.add(row["tower"])
            bars.bar(x + offset, stat["mean"], width if row["tower"] != "none" else 0.5, yerr=stat["std"],
                     color=colours.get(row["tower"], "0.3"), label=label, capsize=3)  # fmt: skip
    bars.set_xticks(range(len(settings)), settings)
    bars.set_ylabel("zero-shot top-1 (30 colour x shape classes)")
    bars.set_title("Settings x image towers at one budget (mean ± spread over seeds)")
    bars.axhline(1 / 30, color="k", linewidth=0.7, linestyle=":", label="chance")
    bars.legend(fontsize=8)
    for row in (r for r in rows if "alphas" in r):
        means = [row["alphas"][f"{a:g}"]["mean"] for a in ALPHAS]
        spreads = [row["alphas"][f"{a:g}"]["std"] for a in ALPHAS]
        sweep.errorbar(
            ALPHAS, means, yerr=spreads, marker="o", capsize=3, color=colours.get(row["tower"]), label=row["tower"]
        )
    sweep.set_xlabel("alpha (1 = 3T main towers, 0 = LiT-like end)")
    sweep.set_title("3T alpha mixture")
    if any("alphas" in r for r in rows):
        sweep.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
