"""The emoji experiment: LiT on real emoji, ``Lu``, ``LU`` and ``uu`` side by side over seeds.

    python benchmarks/emoji.py --out runs/emoji                       # everything (docs/emoji.md)
    python benchmarks/emoji.py --out runs/emoji --report-only         # table and figure again

One command prepares what ``--experiment lit_emoji`` reads, each step skipped where its output
exists (so an interrupted experiment resumes): the shards (``launch/tools/emoji_shards.py``),
EfficientNet-Lite0's ImageNet weights (``convert_efficientnet``), its embeddings of two fixed crops
of every training emoji (``precompute``); then trains every setting and seed through the real
trainer in this process (``benchmarks/study.py: train_in_process``, one CPU rank, ZeRO-1) and
writes ``<out>/results/<run>.json``. The aggregate (mean and sample spread over seeds of held-out
retrieval R@1 and zero-shot top-1, step time) is printed as a table and written as JSON; the
figure shows held-out emoji with the five names each setting's seed-0 model retrieves for them
(through an export and ``tritower.inference``, as a user would).

``uu`` trains EfficientNet-Lite0 from scratch at ``UU_IMAGE_SIZE`` px: at 224 px its steps cost
more than the whole experiment's budget on 2 cores (docs/emoji.md gives the measured times).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tritower.benchmarks.cli import parse_benchmark
from tritower.benchmarks.study import _step_seconds, train_in_process
from tritower.benchmarks.study_runs import set_threads

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("Lu", "LU", "uu")
UU_IMAGE_SIZE = 64
METRICS = ("image_to_text_R@1", "text_to_image_R@1", "zeroshot_top1", "image_to_text_R@5", "text_to_image_R@5")
FIGURE_EMOJI = 8


def prepare(out: Path) -> None:
    """Shards, EfficientNet-Lite0 weights and their embeddings, each made once."""
    from tritower.launch.tools import convert_efficientnet, emoji_shards, precompute

    if not (out / "data" / "manifest.json").exists():
        if emoji_shards.main(["--out", str(out / "data"), "--overwrite"]) != 0:
            raise RuntimeError("emoji_shards failed (see its message above)")
    weights = out / "efficientnet_lite0.safetensors"
    if not weights.exists():
        if convert_efficientnet.main(["--out", str(weights)]) != 0:
            raise RuntimeError("convert_efficientnet failed (see its message above)")
    if not (out / "embeddings" / "meta.json").exists():
        argv = ["--tower=efficientnet_lite0", f"--checkpoint={weights}", f"--shards={out / 'data' / 'train.txt'}"]
        argv += [f"--out={out / 'embeddings'}", "--views=2", "--overwrite", "--num_workers=1", "--batch_size=64"]
        if precompute.main(argv) != 0:
            raise RuntimeError("precompute failed (see its message above)")


def train_argv(setting: str, seed: int, out: Path, keep: bool) -> list[str]:
    """The trainer's command line of one run (``deepspeed launch/train.py`` takes the same)."""
    argv = ["--experiment=lit_emoji", "--zero", str(REPO / "zero_configs" / "z1.json")]
    argv += [
        f"--model.setting={setting}",
        f"--train.seed={seed}",
        f"--train.output_dir={out / 'runs'}",
        f"--train.run_name={setting}-s{seed}",
        f"--data.train_shards={out / 'data' / 'train.txt'}",
        f"--data.eval_shards={out / 'data' / 'heldout' / '00000.tar'}",
        f"--model.image.pretrained={out / 'efficientnet_lite0.safetensors'}",
        f"--data.embeddings={out / 'embeddings'}",
        f"--checkpoint.save_at_end={'true' if keep else 'false'}",
        "--wandb.mode=disabled",
    ]
    if setting[0] == "u":  # the image tower trains from scratch: no weights, no embeddings
        argv += ["--model.image.pretrained=", "--data.embeddings="]
        argv.append(f"--model.image.image_size={UU_IMAGE_SIZE}")
    return argv


def run_one(setting: str, seed: int, out: Path) -> dict:
    """Train one run (seed 0 keeps its checkpoint for the figure) and write its result JSON."""
    from tritower.launch.metrics.console import matmul_gflops

    key = f"{setting}-s{seed}"
    run_dir = out / "runs" / key
    if run_dir.exists():  # an interrupted run: start it afresh
        shutil.rmtree(run_dir)
    argv = train_argv(setting, seed, out, keep=seed == 0)
    started, gflops = time.time(), matmul_gflops(repeats=5)
    train_in_process(argv)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = {"setting": setting, "seed": seed, "key": key, "metrics": metrics, "argv": argv}
    result |= {"step_s": _step_seconds(run_dir, 64), "run_s": round(time.time() - started, 1)}
    result["gflops_before"] = round(gflops, 1)
    (out / "results").mkdir(parents=True, exist_ok=True)
    (out / "results" / f"{key}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def aggregate(results: list[dict]) -> dict[str, dict]:
    """Per setting: each metric's mean and sample standard deviation over seeds, the median step
    time, and the seeds."""
    rows = {}
    for setting in SETTINGS:
        mine = [r for r in results if r["setting"] == setting]
        if not mine:
            continue
        row = {"seeds": sorted(r["seed"] for r in mine), "step_s": statistics.median(r["step_s"] for r in mine)}
        for metric in METRICS:
            values = [r["metrics"][metric] for r in mine]
            spread = statistics.stdev(values) if len(values) > 1 else math.nan
            row[metric] = {"mean": statistics.fmean(values), "spread": spread, "values": values}
        rows[setting] = row
    return rows


def beats(rows: dict[str, dict], better: str, worse: str, metric: str) -> bool | None:
    """True when ``better``'s mean exceeds ``worse``'s by more than the sum of both spreads."""
    if better not in rows or worse not in rows:
        return None
    high, low = rows[better][metric], rows[worse][metric]
    return bool(high["mean"] - low["mean"] > (high["spread"] or 0.0) + (low["spread"] or 0.0))


def format_table(rows: dict[str, dict]) -> str:
    lines = ["setting | seeds | i2t R@1 | t2i R@1 | zero-shot top-1 | i2t R@5 | t2i R@5 | step s", "---" + " | ---" * 7]
    for setting, row in rows.items():
        cells = [f"{row[m]['mean']:.3f}±{row[m]['spread']:.3f}" for m in METRICS]
        lines.append(" | ".join([setting, str(len(row["seeds"])), *cells, f"{row['step_s']:.3f}"]))
    return "\n".join(lines)


def draw_retrievals(out: Path, figure: Path, settings: list[str]) -> dict:
    """Held-out emoji (the first ``FIGURE_EMOJI`` of a seeded draw) beside the 5 held-out names each
    setting's seed-0 model ranks first for them (export + ``tritower.inference``); returns them."""
    import random

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tritower.data.samples import BadDataStats, decode_sample, read_shard
    from tritower.inference import load_export
    from tritower.launch.tools.export import export

    stats = BadDataStats()
    samples = [decode_sample(s, "txt", stats) for s in read_shard(str(out / "data" / "heldout" / "00000.tar"), stats)]
    images, names = [s[0] for s in samples], [s[1] for s in samples]
    chosen = sorted(random.Random(0).sample(range(len(images)), min(FIGURE_EMOJI, len(images))))
    picks: dict[str, list[list[str]]] = {}
    for setting in settings:
        folder = out / "exports" / f"{setting}-s0"
        if not (folder / "config.json").exists():
            export(out / "runs" / f"{setting}-s0" / "checkpoints", folder)
        model = load_export(folder)
        scores = model.encode_image([images[i] for i in chosen]) @ model.encode_text(names).T  # [8, names]
        picks[setting] = [[names[j] for j in row.tolist()] for row in scores.topk(5, dim=1).indices]
    columns = 1 + len(settings)
    fig, axes = plt.subplots(len(chosen), columns, figsize=(3.2 * columns, 1.25 * len(chosen)), squeeze=False)
    for r, index in enumerate(chosen):
        axes[r][0].imshow(images[index])
        axes[r][0].set_title(names[index], fontsize=7)
        for c, setting in enumerate(settings, start=1):
            top = picks[setting][r]
            for rank, name in enumerate(top):
                colour = "green" if name == names[index] else "black"
                axes[r][c].text(0, 0.85 - 0.19 * rank, f"{rank + 1}. {name}"[:44], fontsize=6.5, color=colour)
            if r == 0:
                axes[r][c].set_title(f"{setting} (seed 0) top 5", fontsize=8)
        for ax in axes[r]:
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(figure, dpi=110)
    plt.close(fig)
    return {"emoji": [names[i] for i in chosen], "top5": picks}


@dataclass
class EmojiOptions:
    """Options of the emoji experiment (``--field value`` or ``--field=value``)."""

    out: str = "runs/emoji"
    """Experiment folder: the shards, weights, embeddings and every run."""
    seeds: str = "0,1,2"
    """Comma-separated seeds, one run of each setting per seed."""
    settings: str = ",".join(SETTINGS)
    """Comma-separated subset of the settings (``Lu``, ``LU``, ``uu``)."""
    report_only: bool = False
    """Train nothing: report the runs that have results (the table and figure again)."""
    threads: int = 0
    """Torch threads (0: torch's default, the cores)."""
    json: str = ""
    """Aggregate JSON (default ``<out>/emoji.json``)."""
    figure: str = ""
    """Retrieval figure PNG (default ``<out>/emoji_retrievals.png``)."""


def main(argv: list[str]) -> int:
    options = parse_benchmark(EmojiOptions, argv, command="python benchmarks/emoji.py", example="--out runs/emoji")
    from tritower.launch.metrics.console import matmul_gflops

    if options.threads:
        set_threads(options.threads)

    out = Path(options.out).resolve()
    seeds = [int(s) for s in options.seeds.split(",")]
    settings = [s for s in options.settings.split(",") if s]
    if any(s not in SETTINGS for s in settings):
        raise SystemExit(f"emoji: settings are {', '.join(SETTINGS)}, got {options.settings}")
    gflops_start = math.nan if options.report_only else matmul_gflops(repeats=5)
    print(
        f"emoji: settings {','.join(settings)}, seeds {options.seeds}; machine {gflops_start:.0f} GFLOP/s", flush=True
    )
    started = time.time()
    if not options.report_only:
        prepare(out)
    for seed in seeds:
        for setting in settings:
            if options.report_only or (out / "results" / f"{setting}-s{seed}.json").exists():
                continue
            print(f"emoji: {setting} seed {seed} ({time.time() - started:.0f} s so far)", flush=True)
            run_one(setting, seed, out)
    keys = [f"{s}-s{seed}" for seed in seeds for s in settings]
    results = [json.loads(p.read_text()) for k in keys if (p := out / "results" / f"{k}.json").exists()]
    rows = aggregate(results)
    checks = {
        f"{better} > uu beyond spread ({metric})": beats(rows, better, "uu", metric)
        for better in ("Lu", "LU")
        for metric in ("image_to_text_R@1", "text_to_image_R@1", "zeroshot_top1")
    }
    figure = Path(options.figure) if options.figure else out / "emoji_retrievals.png"
    shown = draw_retrievals(out, figure, [s for s in settings if (out / "runs" / f"{s}-s0" / "checkpoints").exists()])
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    report = {
        "meta": {
            "command": "python benchmarks/emoji.py " + " ".join(argv),
            "train_emoji": manifest["train_emoji"],
            "heldout_emoji": manifest["heldout_emoji"],
            "classnames": manifest["classnames"],
            "uu_image_size": UU_IMAGE_SIZE,
            "wall_s": round(time.time() - started, 1),
            "gflops_start": round(gflops_start, 1),
            "gflops_end": round(math.nan if options.report_only else matmul_gflops(repeats=5), 1),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "rows": rows,
        "checks": checks,
        "figure": shown,
        "runs": {r["key"]: {k: r[k] for k in ("step_s", "run_s", "gflops_before", "argv")} for r in results},
    }
    print(format_table(rows))
    for name, value in checks.items():
        print(f"  {name}: {value}")
    json_path = Path(options.json) if options.json else out / "emoji.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"emoji: wrote {json_path} and {figure}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
