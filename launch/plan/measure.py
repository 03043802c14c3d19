"""Measure the activation memory of one CLIP forward+backward on the CPU, to check the planner.

    python -m tritower.launch.plan.measure --image vit_scene_tiny --text bert_scene_tiny \\
        --batch 256 --checkpointing off,on

prints one JSON line per mode: the measured extra peak memory of a training step (bytes) and the
planner's prediction for the same step. ``--deepspeed-stage N --vocab 200000`` instead measures a
whole fp32 step through a 1-rank DeepSpeed engine, from before the model is built (model states
included). ``start_measurement``/``finish`` run either in a fresh process.

How CPU memory is measured: a fresh process, with glibc told to serve every allocation above
64 KiB by ``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so a freed tensor goes back to the kernel at once
and the resident set tracks live tensors instead of the allocator's high-water mark. After a
warm-up step (parameter gradients, kernel caches and thread pools now exist and stay), the
kernel's peak-RSS counter is reset (``/proc/self/clear_refs`` = 5), one step runs, and the
extra memory is VmHWM minus the VmRSS just before it. Linux only.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

from tritower.launch.cli import parse_options
from tritower.launch.config import ConfigError

MMAP_THRESHOLD = "65536"


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise RuntimeError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # 5 = reset the peak resident set (VmHWM) to the current one


def predicted_step_bytes(
    image: str, text: str, batch: int, checkpointing: bool, embed_dim: int, elem: int = 4
) -> dict[str, float]:
    """The planner's figures for one plain (no GradCache) fp32 step of both towers + naive loss."""
    from tritower.launch.plan.activations import naive_loss_bytes, tower_shape, train_activations

    towers = [train_activations(tower_shape(name), elem, checkpointing) for name in (image, text)]
    stored = batch * sum(t.stored for t in towers)
    working = batch * max(t.working for t in towers)
    loss = naive_loss_bytes(batch, batch, embed_dim)
    # The loss runs backward first, while every tower activation is still stored; its
    # buffers are gone before the towers' own backward starts.
    return {"stored": stored, "working": working, "loss": loss, "total": stored + max(working, loss)}


def measure(
    image: str, text: str, batch: int, checkpointing: list[bool], embed_dim: int, device: str = "cpu"
) -> list[dict]:
    """One warm-up and one measured step per checkpointing mode, in this process.

    Measured steps repeat to within 0.1% here, so one is enough; the warm-up of each mode
    allocates what then stays (parameter gradients, zeroed and not freed; kernel caches).
    ``device="cuda"`` runs the model in bf16 (as DeepSpeed's bf16 mode does) and reads the
    caching allocator's exact peak instead of the resident set.
    """
    import torch

    from tritower.losses import clip_loss
    from tritower.model import ModelConfig, TowerConfig, build_clip, image_tower_spec, text_tower_spec

    torch.manual_seed(0)
    vocab = 1000
    model = build_clip(
        ModelConfig(image=TowerConfig(tower=image), text=TowerConfig(tower=text), embed_dim=embed_dim), vocab_size=vocab
    ).train()  # transformers checkpoints in train mode only
    cuda = device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    model = model.to(device, dtype)
    side = image_tower_spec(image).image_size
    length = text_tower_spec(text).context_length
    # The batch exists before the step (the data loader made it): it is not activation memory.
    images = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
    input_ids = torch.randint(0, vocab, (batch, length), device=device)
    attention_mask = torch.ones_like(input_ids)

    def step() -> None:
        out = model(images, input_ids, attention_mask)
        loss = clip_loss(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()

    results = []
    for mode in checkpointing:
        model.set_grad_checkpointing(image=mode, text=mode)
        step()
        model.zero_grad(set_to_none=False)
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            measured = torch.cuda.max_memory_allocated() - before
        else:
            _reset_peak()
            before = _status_bytes("VmRSS")
            step()
            measured = _status_bytes("VmHWM") - before
        model.zero_grad(set_to_none=False)
        predicted = predicted_step_bytes(image, text, batch, mode, embed_dim, 2 if cuda else 4)
        results.append(
            {
                "image": image,
                "text": text,
                "batch": batch,
                "checkpointing": mode,
                "measured": measured,
                "predicted": predicted["total"],
                "predicted_parts": predicted,
            }
        )
    return results


def predicted_deepspeed_bytes(
    image: str, text: str, batch: int, stage: int, vocab: int, embed_dim: int, bucket: int
) -> dict[str, float]:
    """The planner's total for a 1-rank fp32 DeepSpeed step: engine states + buckets,
    activations and loss, and the input batch."""
    from tritower.launch.plan.activations import input_bytes, tower_shape
    from tritower.launch.plan.states import (
        POLICIES,
        largest_layer_parameters,
        model_states,
        tower_parameters,
    )

    shapes = [tower_shape(image), tower_shape(text)]
    trained = (
        tower_parameters(image, "image")
        + tower_parameters(text, "text", vocab)
        + sum(shape.width * embed_dim for shape in shapes)
        + 1
    )
    largest = max(largest_layer_parameters(image), largest_layer_parameters(text, vocab))
    policy = next(p for p in POLICIES if p.stage == stage and not p.offload_optimizer)
    states = model_states(trained, 0, largest, 1, policy, "fp32", bucket)
    step = predicted_step_bytes(image, text, batch, False, embed_dim)
    inputs = batch * sum(input_bytes(shape, 4) for shape in shapes)
    return {
        "states": states.total,
        "activations": step["total"],
        "inputs": inputs,
        "total": states.total + step["total"] + inputs,
    }


def measure_deepspeed(
    image: str, text: str, batch: int, stage: int, vocab: int, embed_dim: int, bucket: int = 500_000
) -> dict:
    """Peak memory of a whole fp32 training step through a 1-rank DeepSpeed engine (gloo, CPU),
    from before the model is built: parameters, gradients, AdamW states, buckets, activations.
    A large ``vocab`` makes the model states a real share of the total."""
    import socket

    import torch

    with socket.socket() as probe:  # a free port: two launches on one port can collide
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed

    from tritower.losses import clip_loss
    from tritower.model import ModelConfig, TowerConfig, build_clip, image_tower_spec, text_tower_spec

    torch.manual_seed(0)
    gc.collect()
    base = _status_bytes("VmRSS")
    model = build_clip(
        ModelConfig(image=TowerConfig(tower=image), text=TowerConfig(tower=text), embed_dim=embed_dim), vocab_size=vocab
    ).train()
    zero = {
        "stage": stage,
        "reduce_bucket_size": bucket,
        "allgather_bucket_size": bucket,
        "stage3_prefetch_bucket_size": bucket,
        "overlap_comm": True,
        "contiguous_gradients": True,
    }
    config = {
        "zero_optimization": zero,
        "train_batch_size": batch,
        "train_micro_batch_size_per_gpu": batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=config)
    side = image_tower_spec(image).image_size
    images = torch.randn(batch, 3, side, side)
    input_ids = torch.randint(0, vocab, (batch, text_tower_spec(text).context_length))
    attention_mask = torch.ones_like(input_ids)

    def step() -> None:
        out = engine(images, input_ids, attention_mask)
        engine.backward(clip_loss(out["image_features"], out["text_features"], out["logit_scale"]))
        engine.step()

    step()  # optimizer states are created at the first step
    gc.collect()
    _reset_peak()
    step()
    measured = _status_bytes("VmHWM") - base
    predicted = predicted_deepspeed_bytes(image, text, batch, stage, vocab, embed_dim, bucket)
    return {
        "image": image,
        "text": text,
        "batch": batch,
        "zero_stage": stage,
        "vocab": vocab,
        "measured": measured,
        "predicted": predicted["total"],
        "predicted_parts": predicted,
    }


def start_measurement(
    image: str,
    text: str,
    batch: int,
    checkpointing: str = "off,on",
    deepspeed_stage: int = 0,
    vocab: int = 1000,
    embed_dim: int = 128,
    threads: int = 1,
) -> subprocess.Popen:
    """Start ``main`` in a fresh interpreter with the mmap threshold fixed (module docstring).
    Several can run side by side, one thread each; ``finish`` collects one."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD, OMP_NUM_THREADS=str(threads))
    command = [
        sys.executable,
        "-m",
        "tritower.launch.plan.measure",
        "--image",
        image,
        "--text",
        text,
        "--batch",
        str(batch),
        "--embed-dim",
        str(embed_dim),
        "--checkpointing",
        checkpointing,
        "--deepspeed-stage",
        str(deepspeed_stage),
        "--vocab",
        str(vocab),
    ]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: float = 600) -> list[dict]:
    """The JSON results of a started measurement; RuntimeError with its stderr if it failed."""
    out, err = process.communicate(timeout=timeout)
    if process.returncode:
        raise RuntimeError(f"measurement failed ({process.returncode}):\n{err[-3000:]}")
    return [json.loads(line) for line in out.splitlines() if line.startswith('{"')]


@dataclass
class MeasureOptions:
    """Options of the activation-memory measurement."""

    image: str = "vit_scene_tiny"
    """Image tower registry name."""
    text: str = "bert_scene_tiny"
    """Text tower registry name."""
    batch: int = 256
    """Samples in the measured step."""
    embed_dim: int = 128
    """Width of the shared embedding space."""
    deepspeed_stage: int = 0
    """Measure a whole fp32 step through a 1-rank DeepSpeed engine with this ZeRO stage instead
    (1, 2 or 3); 0: the forward+backward activations only."""
    vocab: int = 1000
    """Token table rows."""
    device: Literal["cpu", "cuda"] = "cpu"
    """cuda: bf16 model, peak from ``torch.cuda.max_memory_allocated``."""
    checkpointing: str = "off,on"
    """Comma-separated activation-checkpointing modes to measure, in order: off, on."""


def main(argv: list[str] | None = None) -> int:
    """Prints one JSON line per measured mode; exit 2 with one line on a usage error."""
    try:
        options = parse_options(
            MeasureOptions,
            argv,
            command="python -m tritower.launch.plan.measure",
            example="--image vit_scene_tiny --text bert_scene_tiny --batch 256 --checkpointing off,on",
        )
    except ConfigError as error:
        print(f"tritower.plan.measure: error: {error}", file=sys.stderr)
        return 2
    if options.device == "cpu" and os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        print(
            "warning: MALLOC_MMAP_THRESHOLD_ is not set; freed memory may stay resident and "
            "the figure will be too high (use start_measurement)",
            file=sys.stderr,
        )
    if options.deepspeed_stage:
        print(
            json.dumps(
                measure_deepspeed(
                    options.image,
                    options.text,
                    options.batch,
                    options.deepspeed_stage,
                    options.vocab,
                    options.embed_dim,
                )
            )
        )
        return 0
    modes = [mode.strip() == "on" for mode in options.checkpointing.split(",")]
    for result in measure(options.image, options.text, options.batch, modes, options.embed_dim, options.device):
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
