"""Training-step throughput of a big CLIP under DeepSpeed: samples/s, MFU and peak memory.

The real trainer path (``build_clip`` + ``build_engine`` with a ZeRO policy, the contrastive loss
module, activation checkpointing from the config) on synthetic 224 px images and full-length
captions, so only the towers, the loss and DeepSpeed are timed (no data loading).

    python benchmarks/train_step_gpu.py --experiment clip_vitg14_bert_large \
        --zero zero_configs/z3.json --batches 64 128 256 --out train_step_gpu.json

FLOPs are counted once with ``torch.utils.flop_counter`` on a forward pass of the model, so the
figure follows the configured towers exactly. MFU = 3 x forward FLOPs (forward + backward) per
second over the GPU's dense bf16 peak; HFU adds the recomputed forward of activation checkpointing.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from tritower.launch.cli import load_config
from tritower.launch.engine import build_engine, init_distributed
from tritower.losses import build_objective
from tritower.model import build_clip, image_tower_spec, text_tower_spec
from tritower.model.precision import dtype_of

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


CUDA = torch.cuda.is_available()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def peak_tflops() -> float:
    name = torch.cuda.get_device_name() if CUDA else "cpu"
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), float("nan"))


def synthetic(
    batch: int, image_size: int, context: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randn(batch, 3, image_size, image_size, generator=g).to(device, dtype)
    input_ids = torch.randint(1000, 30000, (batch, context), generator=g).to(device)
    attention_mask = torch.ones(batch, context, dtype=torch.long, device=device)
    return images, input_ids, attention_mask


def forward_flops(model: torch.nn.Module, inputs: tuple) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops()


def run(experiment: str, zero: str, batch: int, steps: int, warmup: int, impl: str, checkpointing: bool) -> dict:
    overrides = [
        "--experiment",
        experiment,
        "--zero",
        zero,
        f"--data.batch_size={batch}",
        f"--loss.impl={impl}",
        f"--model.image_grad_checkpointing={checkpointing}",
        f"--model.text_grad_checkpointing={checkpointing}",
        f"--train.steps={steps + warmup}",
        "--optim.warmup_steps=1",
    ]
    cfg = load_config(overrides)
    torch.manual_seed(0)
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    model = build_clip(cfg.model, vocab_size=30522)
    params = sum(p.numel() for p in model.parameters())
    image_spec, text_spec = image_tower_spec(cfg.model.image_tower), text_tower_spec(cfg.model.text_tower)
    engine, report = build_engine(model, cfg, world_size=1)
    objective = build_objective(cfg.loss)
    inputs = synthetic(
        batch, image_spec.image_size, text_spec.context_length, engine.device, dtype_of(cfg.deepspeed.precision)
    )
    flops_per_batch = forward_flops(engine, inputs)
    times = []
    for step in range(steps + warmup):
        sync()
        start = time.perf_counter()
        out = engine(*inputs)
        loss = objective({key: value.float() for key, value in out.items()})["loss"]
        engine.backward(loss)
        engine.step()
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    step_time = sorted(times)[len(times) // 2]
    model_flops = 3 * flops_per_batch / step_time
    recompute = 1 if checkpointing else 0
    result = {
        "experiment": experiment,
        "zero": zero,
        "batch": batch,
        "loss_impl": impl,
        "checkpointing": checkpointing,
        "params_M": round(params / 1e6, 1),
        "step_s_median": round(step_time, 4),
        "samples_per_s": round(batch / step_time, 1),
        "fwd_TFLOP_per_sample": round(flops_per_batch / batch / 1e12, 4),
        "MFU": round(model_flops / (peak_tflops() * 1e12), 4),
        "HFU": round((3 + recompute) / 3 * model_flops / (peak_tflops() * 1e12), 4),
        "peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if CUDA else float("nan"),
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "kernels": report,
        "final_loss": round(loss.item(), 4),
    }
    del engine, model, out, loss
    if CUDA:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="clip_vitg14_bert_large")
    parser.add_argument("--zero", default="zero_configs/z3.json")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--impl", default="naive")
    parser.add_argument("--no-checkpointing", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    options = parser.parse_args()
    init_distributed()
    results = []
    print(f"{'batch':>6} {'step s':>8} {'samples/s':>10} {'MFU':>6} {'HFU':>6} {'peak GiB':>9}")
    for batch in options.batches:
        try:
            result = run(
                options.experiment,
                options.zero,
                batch,
                options.steps,
                options.warmup,
                options.impl,
                not options.no_checkpointing,
            )
        except torch.cuda.OutOfMemoryError as error:
            result = {"batch": batch, "error": f"out of memory: {str(error)[:200]}"}
            torch.cuda.empty_cache()
            print(f"{batch:>6} out of memory")
        else:
            print(
                f"{batch:>6} {result['step_s_median']:>8.3f} {result['samples_per_s']:>10.1f} "
                f"{result['MFU']:>6.3f} {result['HFU']:>6.3f} {result['peak_mem_GiB']:>9.2f}",
                flush=True,
            )
        results.append(result)
        with open(options.out, "w") as out:
            json.dump(results, out, indent=2)


if __name__ == "__main__":
    main()
