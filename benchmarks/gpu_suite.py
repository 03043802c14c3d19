"""The headline on one GPU in one call: ViT-g/14 + BERT-large training, Lu, the Triton loss, exact
accumulation and a profile, each part under a hard time budget; prints a table, writes one JSON.

    benchmarks/gpu_suite.sh prepare                           # here: wheels the GPU machine lacks, into .whl/
    benchmarks/gpu_suite.sh --out gpu_suite.json              # on the GPU machine, .whl/ carried along
    python benchmarks/gpu_suite.py --dry-run --out dry.json   # the same code: tiny towers on the CPU

Parts (docs/gpu.md: what each measures, and the targets):

* ``uu`` (``train_step_gpu.part_uu``): setting Uu, ViT-g/14 + BERT-large (64 tokens), bf16, ZeRO-3,
  activation checkpointing, through the trainer's path: samples/s, model TFLOP/s (3 x the forward
  FLOPs counted), MFU and peak memory at per-GPU batch 64, 128, 256, then one probe at the batch
  the measured memory predicts to fill the GPU (``uu_fit`` retries at 85% of it, last, in a fresh
  process, if it did not fit; the dry run probes a fixed batch); a torch.profiler summary of two
  steps.
* ``lu``: Lu (the locked ViT-g/14 outside the engine, bf16 under inference mode) and Lu with
  precomputed image embeddings, at batch 256, next to the FLOP model's prediction.
* ``loss`` (``loss_triton_gpu.part_loss``): ``clip_loss(impl="triton")`` forward+backward at
  B = 32k..256k, D = 1024, bf16, naive where it fits, B = 32k against float64.
* ``accum``: one 32k-global-batch GradCache step of ViT-B/16 + BERT-base on one GPU.

Each part is a process of its own (``--part NAME``), killed at its budget; what it recorded until
then (``Recorder``) is kept, so one slow part cannot eat the others' time. This parent reads its
options with the config tree's parser (``benchmarks/cli.py``, which imports torch, timm and
transformers) and leaves the device to the parts. ``--dry-run``: every part with tiny towers,
fp32, gloo and the Triton interpreter on the CPU; what only a GPU measures (memory, MFU, targets)
is null with why.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from tritower.benchmarks.cli import listed, parse_benchmark

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Plan:
    """Sizes and time budgets of one run of the suite: the GPU's or the dry run's."""

    experiment: str
    image_tower: str
    text_tower: str
    precision: str
    vocab: int
    batches: tuple[int, ...]
    search_round: int
    """The largest-batch probe is a multiple of this."""
    search_cap: int
    steps: int
    warmup: int
    lu_batch: int
    loss_sizes: tuple[int, ...]
    loss_dim: int
    loss_dtype: str
    loss_check: int
    """The loss size checked against float64."""
    loss_tile: int
    accum_experiment: str
    accum_towers: tuple[str, str]
    accum_global: int
    accum_micro: int
    accum_loss: str
    budgets: dict[str, float] = field(default_factory=dict)
    """Seconds per part, start-up included; the parent kills a part at its budget."""
    suite_budget: float = 0.0
    """Seconds for all parts together (``--max-seconds`` overrides)."""


GPU = Plan(
    *("clip_vitg14_bert_large", "vit_giant_patch14_224", "bert_large", "bf16", 30522),
    batches=(64, 128, 256),
    search_round=64,
    search_cap=4096,
    steps=3,
    warmup=1,
    lu_batch=256,
    loss_sizes=(32768, 65536, 131072, 262144),
    loss_dim=1024,
    loss_dtype="bfloat16",
    loss_check=32768,
    loss_tile=4096,
    accum_experiment="clip_vit_b16_bert_base",
    accum_towers=("vit_base_patch16_224", "bert_base"),
    accum_global=32768,
    accum_micro=2048,
    accum_loss="tiled",  # GradCache's loss sees fp32 features, where tiled beats fp32 Triton (docs/gpu.md)
    # The issue's 8 minutes, less gpu_suite.sh's wheel install and this parent's start.
    budgets={"uu": 195, "lu": 75, "loss": 55, "accum": 95, "uu_fit": 70},
    suite_budget=450,
)
DRY = Plan(
    *("clip_test", "vit_test", "bert_test", "fp32", 64),
    batches=(4, 8),
    search_round=4,
    search_cap=12,
    steps=1,
    warmup=1,
    lu_batch=8,
    loss_sizes=(40, 72),  # off the kernels' 64-wide blocks, as in tests/test_loss_triton.py
    loss_dim=16,
    loss_dtype="float32",
    loss_check=40,
    loss_tile=32,
    accum_experiment="clip_test",
    accum_towers=("vit_test", "bert_test"),
    accum_global=8,
    accum_micro=4,
    accum_loss="naive",
    # Generous: on a fresh machine the first part JIT-compiles DeepSpeed's CPU communication op
    # (about a minute on 2 cores); a part killed in the middle would leave its lock file behind.
    budgets={"uu": 300, "lu": 150, "loss": 150, "accum": 150, "uu_fit": 150},
    suite_budget=900,
)
PARTS = ("uu", "lu", "loss", "accum")
Parts = listed(str, PARTS)
"""Names of parts, several: ``--parts uu lu``."""


@dataclass
class SuiteOptions:
    """Options of the GPU suite (``--field value`` or ``--field=value``)."""

    out: str
    """The JSON file to write: every part's record, the comparisons and the targets."""
    dry_run: bool = False
    """Tiny towers, fp32, gloo and the Triton interpreter on the CPU: the suite's code runs, nothing is measured."""
    zero: str = str(REPO / "zero_configs" / "z3.json")
    """The ZeRO policy file of the training parts."""
    peak_tflops: float = 0.0
    """Dense bf16 peak TFLOP/s the MFU is computed against (0 = the datasheet's for the GPU found)."""
    parts: Parts = PARTS
    """Parts to run, in the suite's order, e.g. ``--parts uu lu``."""
    max_seconds: float = 0.0
    """Seconds for all parts together (0 = the plan's budget)."""
    work_dir: str = str(REPO / ".gpu" / "work")
    """Folder of the weights file, each part's JSON and each part's log."""
    part: Literal["", "uu", "lu", "loss", "accum", "uu_fit"] = ""
    """Internal, set by the suite for a part's own process: the part it runs."""
    part_out: str = ""
    """Internal: the part's JSON file (its ``Recorder``)."""
    part_deadline: float = 0.0
    """Internal: ``time.time()`` at which the suite kills the part."""
    fit_batch: int = 0
    """Internal: ``uu_fit``'s batch, 85% of the probe that did not fit."""


class Recorder:
    """A part's results, rewritten atomically to its JSON file at every change: a part killed at
    its budget leaves what it had measured."""

    def __init__(self, path: Path) -> None:
        self.path, self.data = path, {}

    def __setitem__(self, key: str, value: object) -> None:
        self.data[key] = value
        self.save()

    def append(self, key: str, value: object) -> None:
        self.data.setdefault(key, []).append(value)
        self.save()

    def save(self) -> None:
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.data, indent=1, default=str))
        partial.replace(self.path)


@dataclass
class Context:
    """What a part gets: the plan, the options, its recorder and its deadline."""

    plan: Plan
    options: SuiteOptions
    record: Recorder
    deadline: float
    """``time.time()`` at which the parent kills the part."""

    def left(self) -> float:
        return self.deadline - time.time()

    @property
    def device(self) -> object:
        import torch

        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def run_in_this_process(options: SuiteOptions) -> int:
    """The ``--part`` side: run one part, record how it ended."""
    from loss_triton_gpu import part_loss
    from train_step_gpu import part_accum, part_lu, part_uu

    parts = {"uu": part_uu, "uu_fit": part_uu, "lu": part_lu, "loss": part_loss, "accum": part_accum}
    plan = DRY if options.dry_run else GPU
    ctx = Context(plan, options, Recorder(Path(options.part_out)), options.part_deadline)
    # At its budget the parent sends SIGTERM: leave through the finally clauses (torch releases the
    # file lock of a JIT compilation in one) instead of dying on the spot.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        parts[options.part](ctx)
    except Exception:
        ctx.record["status"] = "error"
        ctx.record["error"] = traceback.format_exc()[-4000:]
        print(ctx.record.data["error"], file=sys.stderr, flush=True)
        return 1
    ctx.record["status"] = "ok"
    return 0


def run_part(name: str, plan: Plan, options: SuiteOptions, deadline: float) -> dict:
    """Run part ``name`` as its own process under its budget; its record, status and wall time."""
    budget = min(plan.budgets[name], deadline - time.time())
    if budget < 10:
        return {"status": "skipped", "reason": "the suite's time budget was spent"}
    work = Path(options.work_dir)
    out, log = work / f"{name}.json", work / f"{name}.log"
    out.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--part", name, "--part-out", str(out)]
    command += ["--part-deadline", str(time.time() + budget), "--out", str(out), "--zero", options.zero]
    command += [
        "--work-dir",
        str(work),
        "--peak-tflops",
        str(options.peak_tflops),
        "--fit-batch",
        str(options.fit_batch),
    ]
    command += ["--dry-run"] if options.dry_run else []
    env = dict(os.environ, WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    if options.dry_run:
        env["TRITON_INTERPRET"] = "1"  # read when triton is imported: the part's process is fresh
        # DeepSpeed's CPU communication op is JIT-compiled into torch's extension cache, which is
        # keyed by Python and CUDA version only: a checkout with another venv path sharing it
        # rebuilds it (a minute) whenever the two alternate. The suite keeps its own, per Python
        # (torch adds no version to a directory it is given, and its lock files differ by version).
        python = f"py{sys.version_info.major}{sys.version_info.minor}"
        env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".gpu" / "torch_extensions" / python))
    started = time.time()
    with open(log, "w") as sink:
        # Its own session: at the budget the part and anything it started are killed together.
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            process.wait(timeout=budget)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    result = json.loads(out.read_text()) if out.exists() else {}
    if timed_out:
        result["status"] = "timed out"
    result.setdefault("status", f"died (exit code {process.returncode})")
    if result["status"] != "ok":
        result["log_tail"] = log.read_text(errors="replace")[-3000:]
    return result | {"wall_s": time.time() - started, "budget_s": budget, "log": str(log)}


def environment() -> dict:
    """Versions (package metadata: nothing is imported) and the device as nvidia-smi names it."""
    versions = {"python": platform.python_version()}
    for package in ("torch", "deepspeed", "triton", "timm", "transformers", "pydantic"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    try:
        line = subprocess.run(query, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        name, driver, memory = (item.strip() for item in line.split(","))
        device = {"name": name, "driver": driver, "memory": memory}
    except (OSError, IndexError, ValueError, subprocess.TimeoutExpired) as error:
        device = {"name": "cpu", "driver": None, "cores": os.cpu_count(), "reason": f"no nvidia-smi ({error})"}
    return {"versions": versions, "device": device}


def comparisons(parts: dict) -> list[dict]:
    """Lu and Lu precomputed against Uu at the same batch, measured and as the FLOP model predicts
    from the counted forward FLOPs: 3 per trained tower, 1 per locked, 0 per precomputed (and with
    activation checkpointing's recompute: 4 per trained tower)."""
    uu = {row["batch"]: row for row in parts.get("uu", {}).get("rows", []) if "error" not in row}
    flops = parts.get("uu", {}).get("forward_FLOP_per_sample", {})
    rows = []
    for row in parts.get("lu", {}).get("rows", []):
        base = uu.get(row.get("batch"))
        if "error" in row or base is None or "image" not in flops:
            continue
        image, text = flops["image"], flops["text"]
        locked = image if row["setting"] == "Lu" else 0.0
        rows.append(
            {
                "setting": row["setting"],
                "batch": row["batch"],
                "speedup_over_Uu": row["samples_per_s"] / base["samples_per_s"],
                "flop_model": (3 * image + 3 * text) / (locked + 3 * text),
                "flop_model_with_recompute": (4 * image + 4 * text) / (locked + 4 * text),
            }
        )
    return rows


def targets(parts: dict, compared: list[dict], dry: bool) -> list[dict]:
    """The issue's targets against what was measured; null where not measured (the dry run)."""
    uu = parts.get("uu", {}).get("rows", []) + parts.get("uu_fit", {}).get("rows", [])
    best = max((row["samples_per_s"] for row in uu if "error" not in row), default=None)
    speedups = {row["setting"]: row["speedup_over_Uu"] for row in compared}
    loss = next((row for row in parts.get("loss", {}).get("rows", []) if row.get("B") == 32768), {})
    found = [
        ("Uu samples/s per GPU >= 117 (aim 225)", best, lambda v: v >= 117),
        ("Lu >= 2.5x Uu samples/s (same batch)", speedups.get("Lu"), lambda v: v >= 2.5),
        ("Lu precomputed >= 10x Uu samples/s (same batch)", speedups.get("Lu_precomputed"), lambda v: v >= 10),
        ("Triton loss >= 3x faster than naive (B=32k, bf16)", loss.get("speedup_vs_naive"), lambda v: v >= 3),
        (
            "Triton loss <= 1/30 of naive's memory (B=32k, bf16)",
            loss.get("memory_fraction_of_naive"),
            lambda v: v <= 1 / 30,
        ),
    ]
    note = {"note": "dry run: tiny towers on the CPU, not a measurement"} if dry else {}
    return [
        {"target": what, "value": value, "pass": None if dry or value is None else bool(check(value))} | note
        for what, value, check in found
    ]


def _cell(value: object, spec: str) -> str:
    width = int(spec.split(".")[0] or 0)
    return format(value, spec) if isinstance(value, (int, float)) else f"{'-':>{width}}"


def print_report(report: dict) -> None:
    env, parts = report["environment"], report["parts"]
    device, versions = env["device"], env["versions"]
    dry = " (DRY RUN: tiny towers on the CPU)" if report["meta"]["dry_run"] else ""
    print(
        f"\n== tritower GPU suite{dry}: {device['name']}, driver {device.get('driver')}, "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
    )
    peak = parts.get("uu", {}).get("device", {})
    print(f"MFU against {peak.get('peak_TFLOPs')} TFLOP/s: {peak.get('peak_source')}")
    print(f"\n{'part':<8}{'status':<14}{'wall s':>8}{'budget s':>10}")
    for name, part in parts.items():
        wall, budget = _cell(part.get("wall_s"), "8.1f"), _cell(part.get("budget_s"), "10.0f")
        print(f"{name:<8}{part['status'][:13]:<14}{wall}{budget}")
    print(f"\n{'training':<17}{'batch':>6}{'step s':>9}{'samples/s':>11}{'TFLOP/s':>9}{'MFU':>7}{'peak GiB':>10}")
    rows = [("Uu", r) for r in parts.get("uu", {}).get("rows", []) + parts.get("uu_fit", {}).get("rows", [])]
    rows += [(r["setting"], r) for r in parts.get("lu", {}).get("rows", [])]
    rows += [("GradCache step", r) for r in parts.get("accum", {}).get("steps", [])]
    for label, r in rows:
        if "error" in r:
            print(f"{label:<17}{r['batch']:>6}  {r['error'][:70]}")
            continue
        print(
            f"{label:<17}{r['batch']:>6}{_cell(r['step_s_median'], '9.3f')}{_cell(r['samples_per_s'], '11.1f')}"
            f"{_cell(r['model_TFLOP_per_s'], '9.1f')}{_cell(r['MFU'], '7.3f')}{_cell(r['peak_mem_GiB'], '10.2f')}"
        )
    for row in report["comparisons"]:
        print(
            f"{row['setting']} / Uu at batch {row['batch']}: {row['speedup_over_Uu']:.2f}x measured, "
            f"{row['flop_model']:.2f}x FLOP model ({row['flop_model_with_recompute']:.2f}x with recompute)"
        )
    print(f"\n{'loss B':>8}{'triton ms':>11}{'MiB':>9}{'naive ms':>11}{'MiB':>9}{'speed-up':>10}{'f64 err dI':>12}")
    for r in parts.get("loss", {}).get("rows", []):
        t, n = r.get("triton", {}), r.get("naive", {})
        error = r.get("triton_rel_err", {}).get("d_image")
        print(
            f"{r['B']:>8}{_cell(t.get('ms'), '11.2f')}{_cell(t.get('peak_extra_mb'), '9.0f')}"
            f"{_cell(n.get('ms'), '11.2f')}{_cell(n.get('peak_extra_mb'), '9.0f')}"
            f"{_cell(r.get('speedup_vs_naive'), '10.2f')}{_cell(error, '12.1e')}"
        )
    profile = parts.get("uu", {}).get("profile")
    if profile:
        print(
            f"\nprofile ({profile['clock']}, {profile['steps']} Uu steps): communication "
            f"{profile['communication_share']:.1%}, matmuls {profile['matmul_share']:.1%}"
        )
        for event in profile["top"][:8]:
            print(f"  {event['share']:6.1%} {event['self_ms']:10.1f} ms  {event['name'][:90]}")
    print()
    for target in report["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[target["pass"]]
        print(f"{verdict:<5} {target['target']}: {_cell(target['value'], '.3g')}")


def main(argv: list[str] | None = None) -> dict:
    options = parse_benchmark(SuiteOptions, argv, command="benchmarks/gpu_suite.sh", example="--out gpu_suite.json")
    if options.part:
        sys.exit(run_in_this_process(options))
    plan = DRY if options.dry_run else GPU
    Path(options.work_dir).mkdir(parents=True, exist_ok=True)
    started = time.time()
    deadline = started + (options.max_seconds or plan.suite_budget)
    environ = environment()
    if not options.dry_run and environ["device"]["name"] == "cpu":
        sys.exit("gpu_suite: no GPU here (nvidia-smi found none); --dry-run runs the suite on the CPU")
    parts = {}
    for name in [part for part in PARTS if part in options.parts]:
        parts[name] = run_part(name, plan, options, deadline)
        print(f"[suite] {name}: {parts[name]['status']} in {parts[name]['wall_s']:.1f} s", flush=True)
    rows = parts.get("uu", {}).get("rows", [])
    if rows and rows[-1].get("probe") and "error" in rows[-1]:  # last: the lowest priority
        options.fit_batch = int(0.85 * rows[-1]["batch"]) // plan.search_round * plan.search_round
        if options.fit_batch > max(plan.batches) and deadline - time.time() > 60:  # time to build again
            parts["uu_fit"] = run_part("uu_fit", plan, options, deadline)
    compared = comparisons(parts)
    meta = {"dry_run": options.dry_run, "plan": asdict(plan), "zero": options.zero, "wall_s": time.time() - started}
    meta |= {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
    report = {
        "meta": meta,
        "environment": environ,
        "parts": parts,
        "comparisons": compared,
        "targets": targets(parts, compared, options.dry_run),
    }
    Path(options.out).write_text(json.dumps(report, indent=1, default=str))
    print_report(report)
    return report


if __name__ == "__main__":
    main()
