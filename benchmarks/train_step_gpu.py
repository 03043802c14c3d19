"""Training-step measurements of ``benchmarks/gpu_suite.py``: Uu, Lu, Lu with precomputed embeddings
and a GradCache global-batch step, each through the trainer's own path.

Run them through the suite (one part per process, each under its time budget)::

    python benchmarks/gpu_suite.py --parts uu lu accum --out train_steps.json     # on a GPU
    python benchmarks/gpu_suite.py --dry-run --parts uu --out dry.json             # tiny, on the CPU

The path: ``build_towers`` (regex lock rules, a locked tower outside the engine) and
``build_engine`` (the ZeRO policy, bf16, the optimizer) from a ``TrainConfig``, ``TowerInputs``
(the locked tower under inference mode) and ``build_objective``; synthetic 224 px images and
full-length captions drawn on the device, so only towers, loss and DeepSpeed are timed. One engine
serves every batch size (DeepSpeed's micro-batch setting only feeds its throughput timer).

FLOPs are counted with ``torch.utils.flop_counter`` on one forward pass (per tower too), not
assumed. Model TFLOP/s = 3 x forward FLOPs (forward + backward) per second; MFU divides it by the
dense bf16 peak; HFU adds the recomputed forward of activation checkpointing. A locked tower's
forward is left out of the model FLOPs (it is not trained), as the recompute is.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from tritower.launch.cli import load_config
from tritower.launch.engine.gradcache import gradcache_backward, split_batch
from tritower.model import build_image_tower, image_tower_spec, text_tower_spec
from tritower.model.precision import dtype_of

# Dense (no sparsity) bf16 tensor-core peaks from the datasheets, TFLOP/s, first match of the device
# name wins. The H200 (SXM) is the H100's chip with more and faster memory: the same 989.4; the
# NVL and PCIe boards run it at a lower clock and power.
PEAK_BF16_TFLOPS = {
    "H100 NVL": 835.5,
    "H100 PCIe": 756.5,
    "H200 NVL": 835.5,
    "H100": 989.4,
    "H200": 989.4,
    "A100": 312.0,
}
# What the workplace measured its lent H200 to sustain (dense bf16 matmuls); MFU uses the datasheet.
MEASURED_H200_TFLOPS = 790.0
PRECOMPUTED_SOURCE = "benchmark: fixed random tensor"  # build_towers only needs data.embeddings non-empty
COMM_WORDS = ("nccl", "gloo", "all_gather", "allgather", "reduce_scatter", "all_reduce", "allreduce", "c10d")
MATMUL_WORDS = ("gemm", "matmul", "aten::mm", "addmm", "bmm", "cutlass", "xmma")


# -- measuring ---------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_tflops(device_name: str, override: float = 0.0) -> tuple[float, str]:
    """(dense bf16 peak TFLOP/s behind MFU, where the figure comes from); nan where unknown."""
    if override:
        return override, "--peak-tflops"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), math.nan)
    if math.isnan(peak):
        return peak, f"no dense bf16 peak known for {device_name!r}: MFU not computed"
    return peak, f"datasheet dense bf16 ({device_name}); the workplace measured ~{MEASURED_H200_TFLOPS:.0f} on its H200"


def synthetic(
    batch: int, image_size: int, context: int, device: torch.device, dtype: torch.dtype, vocab: int
) -> dict[str, torch.Tensor]:
    """A batch as the loader delivers it (``image``, ``input_ids``, ``attention_mask``), drawn on
    ``device``: drawing 32k images on the host would take longer than the step."""
    g = torch.Generator(device=device).manual_seed(0)
    return {
        "image": torch.randn(batch, 3, image_size, image_size, generator=g, device=device).to(dtype),
        "input_ids": torch.randint(min(1000, vocab // 2), vocab, (batch, context), generator=g, device=device),
        "attention_mask": torch.ones(batch, context, dtype=torch.long, device=device),
    }


def forward_flops(forward: Callable[[], object], batch: int) -> dict[str, float]:
    """FLOPs per sample of ``forward()``: ``model`` (all of it) and per tower that ran in it."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        forward()
    flops = {"model": counter.get_total_flops() / batch}
    for module, counts in counter.get_flop_counts().items():
        for role in ("image", "text"):
            if module.endswith(f".{role}_tower") and role not in flops:
                flops[role] = sum(counts.values()) / batch
    return flops


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def train_step(engine: torch.nn.Module, objective: Callable, kwargs: dict[str, torch.Tensor]) -> float:
    """One optimizer step as the trainer takes it: forward, fp32 objective, backward, step."""
    out = engine(**kwargs)
    loss = objective({key: value.float() for key, value in out.items()})["loss"]
    engine.backward(loss)
    engine.step()
    return float(loss.detach())


def time_steps(step: Callable[[], float], steps: int, warmup: int, device: torch.device) -> dict:
    """``warmup`` untimed then ``steps`` timed calls of ``step``: median seconds, peak memory."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, loss = [], math.nan
    for index in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        loss = step()
        sync(device)
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return {
        "step_s": [round(t, 4) for t in times],
        "step_s_median": statistics.median(times),
        "peak_mem_GiB": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
        "peak_reserved_GiB": torch.cuda.max_memory_reserved(device) / 2**30 if cuda else None,
        "loss": loss,
    }


def measure(ctx: object, step: Callable[[], float], batch: int, flops: float, steps: int, warmup: int) -> dict:
    """One batch size timed, with samples/s, model TFLOP/s, MFU, HFU; ``{"batch", "error"}`` when
    it does not fit."""
    device = ctx.device
    try:
        timing = time_steps(step, steps, warmup, device)
    except RuntimeError as error:
        if not is_out_of_memory(error):
            raise
        return {"batch": batch, "error": f"out of memory: {str(error)[:160]}"}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops(name, ctx.options.peak_tflops)[0]
    samples = batch / timing["step_s_median"]
    model_tflops = 3 * flops * samples / 1e12
    known = math.isfinite(peak)
    row = {"batch": batch, **timing, "samples_per_s": samples, "model_TFLOP_per_s": model_tflops}
    row |= {"MFU": model_tflops / peak if known else None, "HFU": 4 / 3 * model_tflops / peak if known else None}
    if device.type != "cuda":
        row["reason"] = "cpu: no CUDA memory statistics, no bf16 peak for MFU"
    return row


# -- building as the trainer does ----------------------------------------------------------------
def config(ctx: object, experiment: str, towers: tuple[str, str], *overrides: str) -> object:
    """The experiment's ``TrainConfig`` with these towers, the suite's precision and ZeRO policy,
    activation checkpointing on both towers, and ``overrides``."""
    return load_config(
        [
            *("--experiment", experiment, "--zero", ctx.options.zero, f"--deepspeed.precision={ctx.plan.precision}"),
            *(f"--model.image.tower={towers[0]}", f"--model.text.tower={towers[1]}", "--wandb.mode=disabled"),
            *("--train.steps=100000", "--optim.warmup_steps=10"),
            *("--model.image.grad_checkpointing=true", "--model.text.grad_checkpointing=true"),
            *overrides,
        ]
    )


def build(ctx: object, cfg: object) -> tuple:
    """(engine, towers, TowerInputs, objective, kernel report) as the trainer builds them."""
    from tritower.launch.engine.engine import build_engine, init_distributed
    from tritower.launch.towers.model_setup import TowerInputs, build_towers
    from tritower.losses import build_objective

    init_distributed()
    torch.manual_seed(0)
    with ctx.device:  # initialise the towers where they run: a 1B-parameter init on the host is slow
        towers = build_towers(cfg, vocab_size=ctx.plan.vocab)
    engine, report = build_engine(towers.model, cfg, world_size=1, groups=towers.groups)
    towers.locked.to(engine.device)
    inputs = TowerInputs(cfg, towers, engine.module, engine.device, dtype_of(cfg.deepspeed.precision))
    return engine, towers, inputs, build_objective(cfg.loss), report


def image_weights(ctx: object) -> str:
    """A freshly initialised image tower saved as the local 'pretrained' file U and L need."""
    from safetensors.torch import save_file

    path = Path(ctx.options.work_dir) / f"{ctx.plan.image_tower}.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        with ctx.device:
            state = build_image_tower(ctx.plan.image_tower).model.state_dict()
        dtype = dtype_of(ctx.plan.precision)  # bf16 on the GPU: half the bytes to write and read
        partial = path.with_suffix(".partial")
        save_file({k: v.detach().to("cpu", dtype).contiguous() for k, v in state.items()}, str(partial))
        partial.replace(path)
    return str(path)


def batch_of(ctx: object, towers: tuple[str, str], batch: int, embedding_width: int = 0) -> dict:
    size, context = image_tower_spec(towers[0]).image_size, text_tower_spec(towers[1]).context_length
    data = synthetic(batch, size, context, ctx.device, dtype_of(ctx.plan.precision), ctx.plan.vocab)
    if embedding_width:
        data["embedding"] = torch.randn(batch, embedding_width, device=ctx.device)
    return data


# -- the parts -------------------------------------------------------------------------------------
def part_uu(ctx: object) -> None:
    """Setting Uu at the plan's batches, a profile after the first, then one probe at the batch
    predicted to fill the GPU; with ``options.fit_batch``, only that batch (``uu_fit``)."""
    plan, names, fit = ctx.plan, (ctx.plan.image_tower, ctx.plan.text_tower), ctx.options.fit_batch
    cfg = config(ctx, plan.experiment, names, "--model.setting=Uu", f"--model.image.pretrained={image_weights(ctx)}")
    engine, towers, inputs, objective, report = build(ctx, cfg)
    name = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else "cpu"
    peak, source = peak_tflops(name, ctx.options.peak_tflops)
    ctx.record["device"] = {"name": name, "peak_TFLOPs": peak if math.isfinite(peak) else None, "peak_source": source}
    ctx.record["kernels"] = report
    ctx.record["attention"] = attention_kernels(towers.model)
    todo, flops = [fit] if fit else list(plan.batches), None
    while todo:
        batch = todo.pop(0)
        data = batch_of(ctx, names, batch)
        if flops is None:
            flops = ctx.record["forward_FLOP_per_sample"] = forward_flops(
                lambda data=data: engine(**inputs(data, 0)), batch
            )
        step = lambda data=data: train_step(engine, objective, inputs(data, 0))  # noqa: E731
        fixed = batch in plan.batches
        row = measure(ctx, step, batch, flops["model"], plan.steps if fixed else 1, plan.warmup)
        ctx.record.append("rows", row | {"probe": not fixed})
        if "error" in row:
            return  # the engine may hold gathered parameters now: nothing more in it
        if not fit and batch == plan.batches[0]:
            ctx.record["profile"] = profile_summary(step, ctx.device)
        if not fit and batch == plan.batches[-1]:
            probe = ctx.record["probe"] = largest_batch_probe(ctx, ctx.record.data["rows"])
            seconds = 2.5 * row["step_s_median"] * probe.get("batch", 0) / batch  # warm-up + 1 step, margin
            if probe.get("batch") and seconds < ctx.left():
                todo.append(probe["batch"])


def largest_batch_probe(ctx: object, rows: list[dict]) -> dict:
    """The batch the fixed batches' peak memory predicts to fill 90% of the GPU (peak memory is
    affine in the batch), a multiple of ``search_round``; off CUDA, ``search_cap``."""
    plan, good = ctx.plan, [row for row in rows if "error" not in row]
    if ctx.device.type != "cuda":
        return {"batch": plan.search_cap, "reason": "cpu: no CUDA memory to fit, probes search_cap"}
    if len(good) < 2:
        return {"reason": "needs two measured batches"}
    (b1, m1), (b2, m2) = [(row["batch"], row["peak_mem_GiB"]) for row in good[-2:]]
    slope = (m2 - m1) / (b2 - b1)
    capacity = 0.90 * torch.cuda.get_device_properties(ctx.device).total_memory / 2**30
    predicted = (capacity - (m2 - slope * b2)) / slope if slope > 0 else plan.search_cap
    batch = int(min(predicted, plan.search_cap) // plan.search_round * plan.search_round)
    fit = {"GiB_per_sample": slope, "fixed_GiB": m2 - slope * b2, "capacity_GiB": capacity, "predicted": predicted}
    return fit | ({"batch": batch} if batch > b2 else {"reason": "no batch above the fixed ones is predicted to fit"})


def attention_kernels(model: torch.nn.Module) -> dict:
    """Which attention each tower asks for: timm's fused (SDPA) flag, transformers' implementation."""
    flags = sorted({bool(module.fused_attn) for module in model.modules() if hasattr(module, "fused_attn")})
    config = getattr(getattr(getattr(model, "text_tower", None), "model", None), "config", None)
    return {"image_timm_fused_attn": flags, "text_attn_implementation": getattr(config, "_attn_implementation", None)}


def profile_summary(step: Callable[[], float], device: torch.device, steps: int = 2, top: int = 12) -> dict:
    """torch.profiler over ``steps`` steps: the top kernels (CPU ops on the CPU) by self time, and
    the shares of communication (NCCL/gloo collectives) and of matmuls."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(steps):
            step()
        sync(device)
    events = list(prof.key_averages())
    if cuda:  # kernels only: a CPU op's self device time repeats its kernels'
        events = [e for e in events if str(e.device_type).endswith("CUDA")]
    attribute = "self_device_time_total" if cuda else "self_cpu_time_total"
    timed = sorted(((float(getattr(e, attribute)), e) for e in events), key=lambda pair: -pair[0])
    total = sum(t for t, _ in timed) or 1.0

    def share(words: tuple[str, ...]) -> float:
        return sum(t for t, e in timed if any(word in e.key.lower() for word in words)) / total

    return {
        "clock": "CUDA kernel time" if cuda else "CPU op self time",
        "steps": steps,
        "total_ms": total / 1e3,
        "communication_share": share(COMM_WORDS),
        "compute_share": 1 - share(COMM_WORDS),
        "matmul_share": share(MATMUL_WORDS),
        "top": [
            {"name": e.key[:140], "calls": e.count, "self_ms": t / 1e3, "share": t / total} for t, e in timed[:top]
        ],
    }


def part_lu(ctx: object) -> None:
    """Lu and Lu with precomputed image embeddings at ``lu_batch``, with their FLOPs per tower."""
    weights = image_weights(ctx)
    _lu_setting(ctx, "Lu", weights)
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()  # the first engine and its locked ViT are gone: hand their memory back
    _lu_setting(ctx, "Lu_precomputed", weights, f"--data.embeddings={PRECOMPUTED_SOURCE}")


def _lu_setting(ctx: object, name: str, weights: str, *extra: str) -> None:
    plan, names = ctx.plan, (ctx.plan.image_tower, ctx.plan.text_tower)
    cfg = config(ctx, plan.experiment, names, "--model.setting=Lu", f"--model.image.pretrained={weights}", *extra)
    engine, towers, inputs, objective, _ = build(ctx, cfg)
    data = batch_of(ctx, names, plan.lu_batch, image_tower_spec(plan.image_tower).width if extra else 0)
    flops = forward_flops(lambda: engine(**inputs(data, 0)), plan.lu_batch)
    if towers.locked.image is not None:  # outside the engine: counted on its own
        flops["image_locked"] = forward_flops(lambda: towers.locked.image.encode(data["image"]), plan.lu_batch)["model"]
    step = lambda: train_step(engine, objective, inputs(data, 0))  # noqa: E731
    row = measure(ctx, step, plan.lu_batch, flops["model"], plan.steps, plan.warmup)
    ctx.record.append("rows", {"setting": name, "forward_FLOP_per_sample": flops, **row})


def part_accum(ctx: object) -> None:
    """One global-batch GradCache step on one device (twice: the first carries the warm-up)."""
    plan = ctx.plan
    micro_batches = plan.accum_global // plan.accum_micro
    sizes = (f"--data.batch_size={plan.accum_global}", f"--train.micro_batch_size={plan.accum_micro}")
    cfg = config(ctx, plan.accum_experiment, plan.accum_towers, *sizes, f"--loss.impl={plan.accum_loss}")
    engine, _, inputs, objective, report = build(ctx, cfg)
    ctx.record["setup"] = {"global_batch": plan.accum_global, "micro_batch": plan.accum_micro, "M": micro_batches}
    ctx.record["kernels"] = report
    micro = split_batch(batch_of(ctx, plan.accum_towers, plan.accum_global), micro_batches)
    flops = ctx.record["forward_FLOP_per_sample"] = forward_flops(
        lambda: engine(**inputs(micro[0], 0)), len(micro[0]["image"])
    )

    def step() -> float:
        result, _ = gradcache_backward(engine, [inputs(part, 0) for part in micro], objective, engine.device)
        engine.step()
        return float(result["loss"])

    for index in range(2):
        if index and ctx.left() < 1.5 * ctx.record.data["steps"][0]["step_s_median"]:
            break
        row = measure(ctx, step, plan.accum_global, flops["model"], steps=1, warmup=0)
        ctx.record.append("steps", {"step": index, "first": index == 0, **row})
        if "error" in row:
            return
