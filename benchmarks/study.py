"""The LiT / Three Towers study at toy scale: every tower setting at one fixed budget,
over seeds, through the real trainer, against three kinds of pretrained image tower.

    nice -n 5 python benchmarks/study.py --out runs/study                  # full: 3 seeds (docs/study.md)
    nice -n 5 python benchmarks/study.py --quick --out runs/study_quick    # 1 seed, fewer settings, scene towers
    python benchmarks/study.py --out runs/study --seeds 0,1 --towers matched,mismatched --settings uu,Lu,3T
    python benchmarks/study.py --claims --out runs/claims                  # the papers' claims, paired over 5 seeds

``--claims`` runs only what the papers' central claims need, towers pretrained on the broad scene
distribution and tuned on the narrow one, evaluated in and out of distribution, with a verdict per
claim (``benchmarks/study_claims.py``).

Image towers (made once per study, cached in ``<out>/towers/``, reused by every setting and seed):
``matched`` = ``launch/tools/pretrain_image.py`` on the 30 colour x shape labels the captions
describe; ``mismatched`` = the same on the 5 shape labels (no colour: the deficient tower of the
3T paper); ``real`` = the ImageNet-trained EfficientNet-Lite0 (``convert_efficientnet``; by default only
in ``Lu``, ``LU`` and ``3T``: at 224 px it is the costliest tower). The
pretrained text tower of ``LU``/``UU``/``UL``/``uL``/``LL`` is MiniLM-L6 (``minilm_l6``).
``uu`` and ``uL`` use no pretrained image tower: they run once per seed and stand in every
tower's column. ``3T`` is one run per tower and seed; its alpha sweep comes from that run's
evaluation (``eval.alphas``), alpha = 1 being 3T's own main towers and 0 the LiT-like end.

Each run is the real trainer (``launch/train.py: main`` with its DeepSpeed engine, one CPU rank,
in this process: no launcher start-up per run) writing ``<out>/runs/<key>/``; its result is
``<out>/results/<key>.json``. The study is resumable: a run whose result exists is skipped.
The aggregate (mean and spread over seeds, step time, the towers' own accuracies, the papers'
expectations checked) is printed as a table and written to ``<out>/study.json`` with the bar
chart ``<out>/study_bars.png`` (``--json``/``--figure`` put them elsewhere).
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tritower.benchmarks.cli import parse_benchmark
from tritower.benchmarks.study_claims import (
    CLAIM_RUNS,
    CLAIM_TOWERS,
    CURVE_SETTINGS,
    OOD_STYLES,
    TOWER_STYLES,
    claim_verdicts,
    draw_claims,
    format_claims,
)
from tritower.benchmarks.study_report import (
    ALPHAS,
    SHARED_SETTINGS,
    aggregate,
    check_expectations,
    draw_bars,
    format_expectations,
    format_table,
)
from tritower.benchmarks.study_runs import prepare_towers, run_all, set_threads
from tritower.benchmarks.study_towers import data_args

SETTINGS = ("uu", "Lu", "LU", "3T", "Uu", "UU", "UL", "uL", "LL")
TOWERS = ("matched", "mismatched", "real")
QUICK_SETTINGS = ("uu", "Lu", "3T", "Uu", "uL")
# Quick leaves EfficientNet-Lite0 out unless --towers names it: precomputing its embeddings of the
# 20,000 training scenes alone takes about 15 minutes on 2 cores.
QUICK_TOWERS = ("matched", "mismatched")
# EfficientNet-Lite0 runs at 224 px (its weights' size): a locked forward alone costs more than a
# scene tower's whole step, unlocked ones several times that. By default it takes the settings the
# expectations need (LiT and 3T); --real-all runs the rest.
REAL_SETTINGS = ("Lu", "LU", "3T")
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Budget:
    """The fixed budget of every run and of the tower pretraining."""

    steps: int = 100
    """Optimizer steps of every study run (6,400 scenes at batch 64: a third of an epoch)."""
    batch: int = 64
    """Global batch of every study run."""
    warmup: int = 10
    """Warm-up steps of every study run."""
    lr: float = 5e-4
    """Peak AdamW learning rate of every study run (clip_tiny's)."""
    image_tower: str = "vit_scene_tiny"
    """Scene image tower: from scratch (u), and the architecture of the pretrained matched and mismatched towers."""
    text_tower: str = "bert_scene_tiny"
    """Text tower from scratch (u)."""
    embed_dim: int = 128
    """Joint embedding width."""
    pretrain_steps: int = 400
    """Steps of ``pretrain_image`` for the matched and mismatched towers (400: the matched tower
    learns shape in the first half, colour in the second; docs/study.md "The matched tower")."""
    pretrain_batch: int = 128
    """Batch of ``pretrain_image``."""
    eval_samples: int = 500
    """Held-out images of each run's evaluation (0 = all 1,500)."""
    data: dict[str, str] = field(default_factory=dict)
    """``--data.*`` overrides shared by the pretraining and every run (the toy size sets them)."""


FULL = Budget()
CLAIMS = Budget(steps=300, warmup=30, pretrain_steps=800)
"""The claims' budget: runs long enough that uu is well above its 100-step level; towers pretrained
twice as long, as the broad scenes need (docs/study.md "Claims mode")."""
CLAIM_SEEDS = 5
# The test's size: the quick code path, seconds per run, not for its numbers.
TOY = Budget(
    steps=3,
    batch=8,
    warmup=1,
    image_tower="vit_test",
    text_tower="bert_test",
    embed_dim=32,
    pretrain_steps=3,
    pretrain_batch=16,
    eval_samples=24,
    data={
        "builtin_train_samples": "200",
        "builtin_eval_samples": "40",
        "builtin_image_size": "32",
        "builtin_shard_size": "100",
        "shuffle_buffer": "50",
        "num_workers": "0",
    },
)


@dataclass
class StudyOptions:
    """Options of the study (``--field value`` or ``--field=value``)."""

    out: str = "runs/study"
    """Study folder: the towers, the runs, their results and the aggregate."""
    quick: bool = False
    """One seed, settings uu,Lu,3T,Uu,uL, towers matched,mismatched (about 10 min on 2 cores)."""
    seeds: str = ""
    """Comma-separated seeds (default 0,1,2; with ``--quick`` 0)."""
    settings: str = ""
    """Comma-separated subset of uu,Lu,LU,3T,Uu,UU,UL,uL,LL (default: all; ``--quick``: its five)."""
    towers: str = ""
    """Comma-separated subset of matched,mismatched,real (default: all; ``--quick``: the scene towers)."""
    real_all: bool = False
    """EfficientNet-Lite0 in every setting, not only Lu,LU,3T (at 224 px it is the costliest tower)."""
    claims: bool = False
    """Claims mode (``benchmarks/study_claims.py``): uu, Lu, Uu, 3T (matched tower) and Lu, 3T
    (mismatched) per seed, towers pretrained on all scene styles, tuned on plain scenes, evaluated
    in and out of distribution; verdicts with paired-seed standard errors (default seeds 0-4)."""
    toy: bool = False
    """Tiny towers and data: the code path in seconds per run, for tests; not for its numbers."""
    steps: int = 0
    """Override the per-run steps, warm-up a tenth of them (0 = the budget's)."""
    pretrain_steps: int = 0
    """Override the pretraining steps of the matched and mismatched towers (0 = the budget's)."""
    eval_samples: int = -1
    """Held-out images of each run's evaluation (-1 = the budget's, 0 = all)."""
    threads: int = 0
    """Torch threads per run (0 = torch's default, the cores, or 1 with ``--jobs`` over 1; 1 avoids
    stalls on a machine shared with other jobs)."""
    jobs: int = 1
    """Runs trained at once, each in its own process (2 on 2 idle cores: about half the wall time)."""
    report_only: bool = False
    """Train nothing: the table, checks and figure from the runs that have results."""
    json: str = ""
    """Aggregate JSON (default ``<out>/study.json``)."""
    figure: str = ""
    """Bar chart PNG (default ``<out>/study_bars.png``)."""


@dataclass(frozen=True)
class Run:
    """One training run of the study."""

    setting: str
    tower: str
    """``matched`` / ``mismatched`` / ``real``, or ``none`` for the settings without a pretrained image tower."""
    seed: int

    @property
    def key(self) -> str:
        return f"{self.setting}-{self.tower}-s{self.seed}"


def plan(settings: list[str], towers: list[str], seeds: list[int], real_all: bool = False) -> list[Run]:
    """The runs of the study, settings without a pretrained image tower once per seed."""
    runs = []
    for seed in seeds:
        for setting in settings:
            if setting in SHARED_SETTINGS:
                runs.append(Run(setting, "none", seed))
                continue
            for tower in towers:
                if tower == "real" and setting not in REAL_SETTINGS and not real_all:
                    continue
                runs.append(Run(setting, tower, seed))
    return runs


def train_argv(run: Run, towers: dict[str, dict], budget: Budget, out: Path, cache: Path) -> list[str]:
    """The trainer's command line of one run (what ``deepspeed launch/train.py`` would take)."""
    image, text = run.setting[0], run.setting[1]
    argv = ["--experiment", "clip_tiny", "--zero", str(REPO / "zero_configs" / "z1.json")]
    argv += [
        f"--model.setting={run.setting}",
        f"--model.embed_dim={budget.embed_dim}",
        f"--model.text.tower={'minilm_l6' if text in 'LU' else budget.text_tower}",
        f"--model.image.tower={budget.image_tower}",
        f"--train.seed={run.seed}",
        f"--train.steps={budget.steps}",
        "--train.log_every=10",
        f"--train.output_dir={out / 'runs'}",
        f"--train.run_name={run.key}",
        f"--data.batch_size={budget.batch}",
        f"--optim.warmup_steps={budget.warmup}",
        f"--optim.lr={budget.lr}",
        "--eval.every_steps=0",
        f"--eval.max_samples={budget.eval_samples}",
        "--checkpoint.save_at_end=false",
        "--wandb.mode=disabled",
        *data_args(budget, cache),
    ]
    if run.setting == "3T":
        tower = towers[run.tower]
        argv += [f"--model.third.tower={tower['arch']}", f"--model.third.pretrained={tower['weights']}"]
        argv += ["--eval.alphas=" + ",".join(f"{a:g}" for a in ALPHAS)]
    elif image in "LU":
        tower = towers[run.tower]
        argv += [f"--model.image.tower={tower['arch']}", f"--model.image.pretrained={tower['weights']}"]
    if towers.get(run.tower, {}).get("embeddings") and image == "L":
        # The locked image tower's, precomputed at its own 224 px. Not for 3T: its third tower
        # takes the image tower's inputs (64 px scenes), as at run time, where it is cheap.
        argv.append(f"--data.embeddings={towers[run.tower]['embeddings']}")
    return argv


def claim_argv(run: Run, towers: dict[str, dict], budget: Budget, out: Path, cache: Path) -> list[str]:
    """A claims run: the study's run, also evaluated out of distribution (and during training for
    the settings of the curve figure)."""
    every = max(1, budget.steps // 5) if run.setting in CURVE_SETTINGS else 0
    argv = [a for a in train_argv(run, towers, budget, out, cache) if not a.startswith("--eval.every_steps=")]
    return argv + [f"--eval.every_steps={every}", f"--eval.sets=ood=builtin:{OOD_STYLES}"]


def claim_run(run: Run, towers: dict[str, dict], budget: Budget, out: Path, cache: Path) -> dict:
    """Trains one claims run (``claim_argv``) and writes its result JSON."""
    return run_one(run, towers, budget, out, cache, claim_argv(run, towers, budget, out, cache))


def run_claims(options: StudyOptions, budget: Budget, seeds: list[int], out: Path, cache: Path, argv: list[str]) -> int:
    """Claims mode: towers pretrained on every style, the claim runs per seed, verdicts and figure."""
    gflops_start = _gflops()
    print(f"study claims: seeds {','.join(map(str, seeds))}, {budget.steps} steps of {budget.batch}; "
          f"machine {gflops_start:.0f} GFLOP/s ({torch_threads()} thread(s))", flush=True)  # fmt: skip
    started = time.time()
    jobs, threads = options.jobs, options.threads or (1 if options.jobs > 1 else torch_threads())
    towers = prepare_towers(list(CLAIM_TOWERS), out, budget, cache, TOWER_STYLES, jobs, threads)
    runs = [Run(setting, tower, seed) for seed in seeds for setting, tower in CLAIM_RUNS]
    train = functools.partial(claim_run, towers=towers, budget=budget, out=out, cache=cache)
    results = run_all(runs, out, started, "study claims", train, jobs, threads)
    claims = claim_verdicts(results)
    print(format_claims(claims))
    report = {
        "meta": {
            "command": "python benchmarks/study.py " + " ".join(argv),
            "budget": asdict(budget),
            "seeds": seeds,
            "ood_styles": OOD_STYLES,
            "tower_styles": TOWER_STYLES,
            "wall_s": round(time.time() - started, 1),
            "threads": threads,
            "jobs": options.jobs,
            "gflops_start": round(gflops_start, 1),
            "gflops_end": round(_gflops(), 1),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "towers": towers,
        "claims": claims,
        "runs": {r["key"]: {k: v for k, v in r["metrics"].items() if "zeroshot_top1" in k} for r in results},
    }
    json_path = Path(options.json) if options.json else out / "claims.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    figure = Path(options.figure) if options.figure else out / "claims.png"
    draw_claims(results, out / "runs", figure)
    print(f"study claims: wrote {json_path} and {figure} in {time.time() - started:.0f} s", flush=True)
    return 0


def _step_seconds(run_dir: Path, batch: int) -> float:
    """Median step time over the logged windows after the first (which holds start-up costs)."""
    rates = []
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "samples_per_s" in record and "event" not in record:
            rates.append(record["samples_per_s"])
    rates = rates[1:] or rates
    return batch / statistics.median(rates) if rates else float("nan")


def train_in_process(argv: list[str]) -> dict:
    """``launch/train.py: main`` for one rank in this process, without its master-port probe: the
    process group of the study's first run lives on (DeepSpeed keeps its groups for the
    process's life) and holds that port. Returns the trainer's final metrics."""
    from tritower.launch.cli import load_config
    from tritower.launch.engine.ds_config import build_ds_config, check_zero_policy
    from tritower.launch.lifecycle.dist_env import from_environ
    from tritower.launch.loop.trainer import run
    from tritower.launch.metrics.console import setup_console

    cfg = load_config(argv)
    setup_console(cfg)
    check_zero_policy(build_ds_config(cfg, from_environ().world_size), cfg.deepspeed.zero)
    return run(cfg)


def run_one(
    run: Run, towers: dict[str, dict], budget: Budget, out: Path, cache: Path, argv: list[str] | None = None
) -> dict:
    """Trains one run through the real trainer (``argv``: default ``train_argv``) and writes its result JSON."""
    run_dir = out / "runs" / run.key
    if run_dir.exists():  # an interrupted run: its folder is this study's own, start it afresh
        shutil.rmtree(run_dir)
    argv = argv or train_argv(run, towers, budget, out, cache)
    started, gflops = time.time(), _gflops()
    train_in_process(argv)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    result = asdict(run) | {
        "key": run.key,
        "metrics": metrics,
        "step_s": _step_seconds(run_dir, budget.batch),
        "run_s": round(time.time() - started, 1),
        "gflops_before": round(gflops, 1),
        "argv": argv,
    }
    path = out / "results" / f"{run.key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    return result


def _gflops() -> float:
    """The machine's reference rate now (1024x1024 float32 matmul, this process's threads)."""
    from tritower.launch.metrics.console import matmul_gflops

    return matmul_gflops(repeats=5)


def torch_threads() -> int:
    """Threads this process's matrix products (and the matmul rate reported) run on."""
    import torch

    return torch.get_num_threads()


def _names(text: str, known: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"study: unknown {what} {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def main(argv: list[str] | None = None) -> int:
    options = parse_benchmark(StudyOptions, argv, command="python benchmarks/study.py", example="--quick --out runs/q")
    argv = sys.argv[1:] if argv is None else argv
    budget = TOY if options.toy else CLAIMS if options.claims else FULL
    if options.steps:
        budget = replace(budget, steps=options.steps, warmup=max(1, options.steps // 10))
    if options.eval_samples >= 0:
        budget = replace(budget, eval_samples=options.eval_samples)
    if options.pretrain_steps:
        budget = replace(budget, pretrain_steps=options.pretrain_steps)
    if options.threads:
        set_threads(options.threads)
    default_seeds = [0] if options.quick else list(range(CLAIM_SEEDS)) if options.claims else [0, 1, 2]
    seeds = [int(s) for s in options.seeds.split(",")] if options.seeds else default_seeds
    settings = _names(options.settings, SETTINGS, "setting") or list(QUICK_SETTINGS if options.quick else SETTINGS)
    towers = _names(options.towers, TOWERS, "tower") or list(QUICK_TOWERS if options.quick else TOWERS)
    out = Path(options.out).resolve()
    cache = out / "cache" if options.toy else Path("~/.cache/tritower").expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if options.claims:
        return run_claims(options, budget, seeds, out, cache, argv)

    gflops_start = math.nan if options.report_only else _gflops()
    rate = f"{gflops_start:.0f} GFLOP/s (1024x1024 float32 matmul, {torch_threads()} thread(s))"
    rate = "(report only: the rates measured before each run are in its result)" if options.report_only else rate
    print(f"study: {len(seeds)} seed(s), settings {','.join(settings)}, towers {','.join(towers)}; machine {rate}")
    started = time.time()
    threads = options.threads or (1 if options.jobs > 1 else torch_threads())
    runs = plan(settings, towers, seeds, options.real_all)
    if options.report_only:  # the runs of the plan that have a result; towers as they were made
        runs = [r for r in runs if (out / "results" / f"{r.key}.json").exists()]
        tower_info = {k: json.loads((out / "towers" / k / "tower.json").read_text()) for k in towers}
    else:
        tower_info = prepare_towers(towers, out, budget, cache, "", options.jobs, threads)
    train = functools.partial(run_one, towers=tower_info, budget=budget, out=out, cache=cache)
    results = run_all(runs, out, started, "study", train, options.jobs, threads)
    rows = aggregate(results, towers)
    expectations = check_expectations(rows)
    gflops_end = math.nan if options.report_only else _gflops()
    report = {
        "meta": {
            "command": "python benchmarks/study.py " + " ".join(argv),
            "budget": asdict(budget),
            "seeds": seeds,
            "settings": settings,
            "towers": towers,
            "runs": len(runs),
            "wall_s": round(time.time() - started, 1),
            "threads": threads,
            "jobs": options.jobs,
            "gflops_start": round(gflops_start, 1),
            "gflops_end": round(gflops_end, 1),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "towers": tower_info,
        "rows": rows,
        "expectations": expectations,
    }
    print(format_table(rows, tower_info))
    print(format_expectations(expectations))
    json_path = Path(options.json) if options.json else out / "study.json"
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    figure = Path(options.figure) if options.figure else out / "study_bars.png"
    draw_bars(rows, towers, figure)
    print(f"study: wrote {json_path} and {figure}", flush=True)
    if not options.report_only:
        print(f"study: machine {gflops_start:.0f} -> {gflops_end:.0f} GFLOP/s over the study", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
