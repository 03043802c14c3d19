"""tritower against open_clip's own trainer (``open_clip_train``) on the identical job, side by side.

    python benchmarks/peer_open_clip.py --out peer.json              # CPU: 1 and 2 ranks, uu and Lu
    python benchmarks/peer_open_clip.py --ranks 1 --settings uu --pairs 5 --steps 60
    python benchmarks/peer_open_clip.py --tiny --out tiny.json       # seconds-long check (tests)

The initial model of the experiment (default ``clip_tiny``) is built as the trainer builds it
(``torch.manual_seed(train.seed)``, ``build_clip``) and exported with this project's
``--format open_clip`` writer (``write_open_clip``, which checks that open_clip's features equal the
model's); its image tower is also saved as a plain timm state dict, the "pretrained" file of Lu.
Then, for each rank count and setting, ``--pairs`` interleaved pairs run: tritower
(``deepspeed --num_gpus N launch/train.py``, its default ZeRO policy), then open_clip
(``open_clip_train.main`` through ``benchmarks/open_clip_main.py``, which fixes its reading of
webdataset 1.0 shards and its DDP wrapping on the CPU and changes nothing else; under
``torchrun --nproc_per_node N`` for several ranks, with ``--local-loss --gather-with-grad``: the
same global loss), both on the built-in scene shards
(open_clip as ``--dataset-type webdataset``), the same global batch, AdamW lr/betas/eps/weight
decay, warm-up steps, fp32, loader workers. Lu is tritower ``--model.setting=Lu`` against open_clip
``--lock-image``, both from the same image weights. Neither sets a thread count unless the user's
environment does (each trainer's own default is what is measured).

Both trainers log every step; the benchmark timestamps each step line as it arrives on the
pipe, so both are timed by the same clock and method:
``steady samples/s`` = global batch x steps / seconds between the step ``--skip`` line and the last
step line; ``first step`` = seconds from the launch to the first step line (imports, data, model,
engine, the first step). ``peak RSS``: the process tree is sampled every 0.2 s; each process's own
peak, and the peak of their sum. The machine's 1024x1024 float32 matmul GFLOP/s and the load
average are recorded before and after. Zero-shot accuracy is not measured here (docs/peer.md).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tritower.benchmarks.cli import Ints, listed, parse_benchmark
from tritower.benchmarks.process_runs import OPEN_CLIP_STEP, TRITOWER_STEP, RunResult, run_one, summarise_run

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "launch" / "train.py"
OPEN_CLIP_MAIN = Path(__file__).resolve().parent / "open_clip_main.py"  # open_clip's main, one webdataset fix
SETTINGS = ("uu", "Lu")
TRAINERS = ("tritower", "open_clip")
Settings = listed(str, SETTINGS)
"""Settings, several: ``--settings uu Lu``."""


@dataclass
class PeerOptions:
    """Options of the open_clip comparison (``--field value`` or ``--field=value``)."""

    experiment: str = "clip_tiny"
    """tritower experiment whose model, data, batch and optimizer both trainers run."""
    ranks: Ints = (1, 2)
    """Rank counts to measure, e.g. ``--ranks 1 2``."""
    settings: Settings = SETTINGS
    """``uu`` (CLIP from scratch) and/or ``Lu`` (locked image tower; open_clip ``--lock-image``)."""
    pairs: int = 3
    """Interleaved tritower/open_clip pairs per rank count and setting."""
    steps: int = 40
    """Training steps per run."""
    skip: int = 10
    """Steps excluded from the steady rate (start-up, caches, the loader filling)."""
    workers: int = 1
    """Data loader workers per rank, both trainers."""
    zero: str = ""
    """tritower's ZeRO policy (its ``--zero``); default: the trainer's own (zero_configs/z3.json)."""
    tiny: bool = False
    """A seconds-long check: experiment clip_test, 6 steps (skip 2), 1 pair, 1 rank, uu."""
    work_dir: str = ""
    """Where exports, runs and logs go (default: a temporary folder, removed at the end)."""
    timeout_s: float = 1800.0
    """Longest one run may take before it is killed (and recorded as failed)."""
    out: str = ""
    """Write the results as JSON here (default: the table only)."""


# -- machine ------------------------------------------------------------------------------------
def machine_state() -> dict:
    """The 1024x1024 float32 matmul rate (this process's threads) and the load average now."""
    import torch

    from tritower.launch.metrics.console import matmul_gflops

    return {
        "matmul_gflops_1024_fp32": round(matmul_gflops(), 1),
        "torch_threads": torch.get_num_threads(),
        "loadavg": list(os.getloadavg()),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# -- the job both trainers run --------------------------------------------------------------------
def prepare(opts: PeerOptions, work: Path) -> dict:
    """Builds the data, exports the initial model for open_clip, writes Lu's image weights; returns
    the job: the config's numbers both command lines use and the paths they read."""
    import torch
    from safetensors.torch import save_file

    from tritower.data import build_text_tokenizer, ensure_builtin_data
    from tritower.launch.experiments import get_experiment
    from tritower.launch.tools.export_open_clip import write_open_clip
    from tritower.model import build_clip

    cfg = get_experiment(opts.experiment)
    data = ensure_builtin_data(cfg.data)
    tokenizer = build_text_tokenizer(data.vocab_path)
    torch.manual_seed(cfg.train.seed)  # as launch/loop/run.py does before build_towers
    model = build_clip(cfg.model, vocab_size=cfg.model.vocab_size or len(tokenizer))
    export = work / "open_clip_init"
    write_open_clip(model, cfg.model, export, data.vocab_path)
    image_weights = work / "image_init.safetensors"
    save_file({k: v.contiguous() for k, v in model.image_tower.model.state_dict().items()}, str(image_weights))
    names = sorted(Path(p).name for p in data.train_shards)
    first, last = names[0][len("train-") : -len(".tar")], names[-1][len("train-") : -len(".tar")]
    return {
        "experiment": opts.experiment,
        "parameters": sum(p.numel() for p in model.parameters()),
        "global_batch": cfg.data.batch_size,
        "lr": cfg.optim.lr,
        "betas": [cfg.optim.beta1, cfg.optim.beta2],
        "eps": cfg.optim.eps,
        "weight_decay": cfg.optim.weight_decay,
        "warmup_steps": min(cfg.optim.warmup_steps, max(opts.steps - 1, 0)),
        "precision": "fp32",
        "cache_dir": cfg.data.cache_dir,
        "train_shards": f"{data.root}/train-{{{first}..{last}}}.tar",
        "open_clip_export": str(export),
        "image_weights": str(image_weights),
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tritower_command(job: dict, opts: PeerOptions, ranks: int, setting: str, run_dir: Path) -> list[str]:
    deepspeed = Path(sys.executable).parent / "deepspeed"
    command = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(free_port()), str(TRAIN)]
    command += [
        f"--experiment={job['experiment']}",
        f"--train.steps={opts.steps}",
        "--train.log_every=1",
        f"--train.output_dir={run_dir.parent}",
        f"--train.run_name={run_dir.name}",
        f"--optim.warmup_steps={job['warmup_steps']}",
        f"--data.num_workers={opts.workers}",
        f"--data.cache_dir={job['cache_dir']}",
        "--eval.every_steps=0",
        "--checkpoint.save_at_end=False",
        "--wandb.mode=disabled",
        "--log.curves=False",
    ]
    if setting == "Lu":
        command += ["--model.setting=Lu", f"--model.image.pretrained={job['image_weights']}"]
    if opts.zero:
        command += ["--zero", opts.zero]
    return command


def open_clip_command(job: dict, opts: PeerOptions, ranks: int, setting: str, run_dir: Path) -> list[str]:
    if ranks == 1:
        command = [sys.executable, "-u", str(OPEN_CLIP_MAIN)]
    else:
        torchrun = Path(sys.executable).parent / "torchrun"
        command = [str(torchrun), f"--nproc_per_node={ranks}", f"--master_port={free_port()}"]
        command += [str(OPEN_CLIP_MAIN), "--dist-backend", "gloo", "--local-loss", "--gather-with-grad"]
    batch = job["global_batch"]
    command += [
        "--model",
        f"local-dir:{job['open_clip_export']}",
        "--train-data",
        job["train_shards"],
        "--dataset-type",
        "webdataset",
        "--dataset-resampled",  # unresampled webdataset needs shards >= workers x ranks
        "--train-num-samples",
        str(opts.steps * batch),
        "--batch-size",
        str(batch // ranks),
        "--epochs",
        "1",
        "--lr",
        str(job["lr"]),
        "--beta1",
        str(job["betas"][0]),
        "--beta2",
        str(job["betas"][1]),
        "--eps",
        str(job["eps"]),
        "--wd",
        str(job["weight_decay"]),
        "--warmup",
        str(job["warmup_steps"]),
        "--precision",
        "fp32",
        "--device",
        "cpu",
        "--workers",
        str(opts.workers),
        "--log-every-n-steps",
        "1",
        "--save-frequency",
        "0",
        "--name",
        run_dir.name,
        "--seed",
        "0",
    ]
    if setting == "Lu":
        command += ["--lock-image"]
    return command


# -- one timed run --------------------------------------------------------------------------------
def environment() -> dict:
    return dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")


# -- the comparison ------------------------------------------------------------------------------
def median(values: list[float]) -> float:
    finite = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return round(statistics.median(finite), 2) if finite else math.nan


def summary_rows(runs: list[RunResult]) -> list[dict]:
    rows = []
    for ranks, setting in dict.fromkeys((r.ranks, r.setting) for r in runs):
        cell = {t: [r for r in runs if (r.ranks, r.setting, r.trainer) == (ranks, setting, t)] for t in TRAINERS}
        row = {"ranks": ranks, "setting": setting}
        for trainer, group in cell.items():
            row[trainer] = {
                "steady_samples_per_s": median([r.steady_samples_per_s for r in group]),
                "first_step_s": median([r.first_step_s for r in group]),
                "peak_total_rss_mib": max((r.peak_total_rss_mib for r in group), default=0.0),
                "launcher_rss_mib": max((r.launcher_rss_mib for r in group), default=0.0),
                "threads_per_rank": group[0].threads_per_rank if group else None,
                "runs_ok": sum(r.returncode == 0 and r.steps > 0 for r in group),
            }
        pairs = zip(cell["tritower"], cell["open_clip"])
        row["speed_ratio"] = median([a.steady_samples_per_s / b.steady_samples_per_s for a, b in pairs])
        pairs = zip(cell["tritower"], cell["open_clip"])
        row["first_step_ratio"] = median([a.first_step_s / b.first_step_s for a, b in pairs])
        rows.append(row)
    return rows


def table(rows: list[dict], before: dict, after: dict) -> str:
    head = (
        "| ranks | setting | tritower samples/s | open_clip samples/s | ratio | tritower first step s "
        "| open_clip first step s | ratio | tritower peak RSS MiB (launchers) | open_clip peak RSS MiB (launchers) |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    body = "".join(
        f"| {r['ranks']} | {r['setting']} | {r['tritower']['steady_samples_per_s']} "
        f"| {r['open_clip']['steady_samples_per_s']} | {r['speed_ratio']}x | {r['tritower']['first_step_s']} "
        f"| {r['open_clip']['first_step_s']} | {r['first_step_ratio']}x "
        f"| {r['tritower']['peak_total_rss_mib']} ({r['tritower']['launcher_rss_mib']}) "
        f"| {r['open_clip']['peak_total_rss_mib']} ({r['open_clip']['launcher_rss_mib']}) |\n"
        for r in rows
    )
    machine = (
        f"matmul 1024x1024 fp32: {before['matmul_gflops_1024_fp32']} GFLOP/s before, "
        f"{after['matmul_gflops_1024_fp32']} after ({before['torch_threads']} threads); "
        f"load average {before['loadavg'][0]:.2f} before, {after['loadavg'][0]:.2f} after"
    )
    return head + body + machine


def options_from(argv: list[str] | None) -> PeerOptions:
    opts = parse_benchmark(PeerOptions, argv, command="python benchmarks/peer_open_clip.py")
    if opts.tiny:
        opts.experiment, opts.steps, opts.skip, opts.pairs = "clip_test", 6, 2, 1
        opts.ranks, opts.settings, opts.workers = (1,), ("uu",), 0
    if opts.skip >= opts.steps - 1:
        raise SystemExit(f"peer_open_clip: --skip {opts.skip} leaves no steady steps of --steps {opts.steps}")
    return opts


def main(argv: list[str] | None = None) -> dict:
    opts = options_from(argv)
    work = Path(opts.work_dir or tempfile.mkdtemp(prefix="peer_open_clip_"))
    work.mkdir(parents=True, exist_ok=True)
    before = machine_state()
    job = prepare(opts, work)
    env = environment()
    runs: list[RunResult] = []
    for ranks in opts.ranks:
        for setting in opts.settings:
            for pair in range(opts.pairs):
                for trainer in TRAINERS:  # interleaved A/B: drifts in machine load hit both alike
                    run_dir = work / "runs" / f"{trainer}_{ranks}r_{setting}_{pair}"
                    shutil.rmtree(run_dir, ignore_errors=True)  # neither trainer may resume an old run
                    run_dir.parent.mkdir(parents=True, exist_ok=True)
                    build = tritower_command if trainer == "tritower" else open_clip_command
                    pattern = TRITOWER_STEP if trainer == "tritower" else OPEN_CLIP_STEP
                    command = build(job, opts, ranks, setting, run_dir)
                    # open_clip writes to ./logs/<name>: its --logs flag is an ambiguous prefix of
                    # torchrun's own --logs-specs, which torchrun refuses even after the script.
                    cwd = REPO if trainer == "tritower" else run_dir
                    cwd.mkdir(exist_ok=True)
                    raw = run_one(command, env, opts.timeout_s, pattern, job["global_batch"], cwd)
                    result = summarise_run(raw, trainer, ranks, setting, pair, opts.skip, job["global_batch"])
                    result.processes.insert(0, {"command_line": " ".join(command)})
                    runs.append(result)
                    print(
                        f"{trainer} {ranks} rank(s) {setting} pair {pair}: rc {result.returncode}, "
                        f"{result.steps} steps, {result.steady_samples_per_s} samples/s, first step "
                        f"{result.first_step_s} s, peak RSS {result.peak_total_rss_mib} MiB",
                        flush=True,
                    )
                    if result.tail:
                        print(result.tail, file=sys.stderr)
    after = machine_state()
    rows = summary_rows(runs)
    results = {
        "options": asdict(opts),
        "job": job,
        "machine": {"cpus": len(os.sched_getaffinity(0)), "before": before, "after": after},
        "summary": rows,
        "runs": [asdict(r) for r in runs],
        "zero_shot": "not measured by this script",
    }
    print(table(rows, before, after))
    if opts.out:
        Path(opts.out).write_text(json.dumps(results, indent=1))
    if not opts.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return results


if __name__ == "__main__":
    main()
