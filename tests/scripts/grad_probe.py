"""One forward/backward of the tiny CLIP through a real DeepSpeed engine; rank 0 saves loss + grads.

Run under ``deepspeed --num_gpus N`` by tests/test_train_distributed.py: the same synthetic global
batch is split across the N ranks, so the saved loss and full (gathered) gradients must not depend
on N. ``--case POLICY[:M]`` may be given several times: one engine per case, in order. With
``:M`` each rank's share is encoded by GradCache in micro-batches of M; the loss and gradients
must equal the whole batch's. ``--case POLICY:M:SETTING`` trains a tower setting instead of
``uu`` (``Lu``: a locked image tower outside the engine; ``3T``: the third tower and the Three
Towers loss), with towers loaded from a checkpoint this script writes. ``POLICY:M:SETTING:coalesce``
reduces the micro-batches' gradients once per step (``train.coalesce_grad_reduction``). Results are
saved keyed by the case string.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from deepspeed.utils import safe_get_full_grad
from safetensors.torch import save_file

from tritower.launch.cli import load_config
from tritower.launch.engine.engine import build_engine, init_distributed
from tritower.launch.engine.gradcache import gradcache_backward, split_batch
from tritower.launch.lifecycle.dist_env import from_environ
from tritower.launch.towers.model_setup import TowerInputs, build_towers
from tritower.losses import build_objective
from tritower.model import build_image_tower

VOCAB = 50


def synthetic_global_batch(size: int, image_size: int, context: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1234)
    images = torch.randn(size, 3, image_size, image_size, generator=g)
    input_ids = torch.randint(5, VOCAB, (size, context), generator=g)
    lengths = torch.randint(3, context + 1, (size,), generator=g)
    attention_mask = (torch.arange(context)[None, :] < lengths[:, None]).long()
    return images, input_ids * attention_mask, attention_mask


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--case", action="append", required=True)
    parser.add_argument("--global-batch", type=int, default=16)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    options = parser.parse_args()
    init_distributed()
    env = from_environ()
    results = {}
    checkpoint = Path(options.out).with_suffix(".vit_test.safetensors")
    if env.is_main:
        torch.manual_seed(11)
        save_file(build_image_tower("vit_test").vit.state_dict(), str(checkpoint))
    torch.distributed.barrier()
    for case in options.case:
        zero, _, rest = case.partition(":")
        micro_size, _, rest = rest.partition(":")
        setting, _, flag = rest.partition(":")
        micro_size = int(micro_size or 0)
        towers_args = {
            "": [],
            "Lu": ["--model.setting=Lu", f"--model.image.pretrained={checkpoint}"],
            "3T": ["--model.setting=3T", f"--model.third.pretrained={checkpoint}"],
        }[setting]
        cfg = load_config(
            [
                "--experiment",
                "clip_test",
                "--zero",
                zero,
                f"--data.batch_size={options.global_batch}",
                f"--train.micro_batch_size={micro_size}",
                *towers_args,
                f"--train.coalesce_grad_reduction={flag == 'coalesce'}",
            ]
        )
        torch.manual_seed(0)
        towers = build_towers(cfg, vocab_size=VOCAB)
        engine, _ = build_engine(towers.model, cfg, env.world_size, towers.groups)
        towers.locked.to(engine.device)
        inputs = TowerInputs(cfg, towers, engine.module, engine.device, torch.float32)
        images, input_ids, attention_mask = synthetic_global_batch(options.global_batch, 32, 16)
        local = slice(
            env.rank * options.global_batch // env.world_size, (env.rank + 1) * options.global_batch // env.world_size
        )
        batch = {"image": images[local], "input_ids": input_ids[local], "attention_mask": attention_mask[local]}
        objective = build_objective(cfg.loss, three_towers=cfg.model.parsed.three_towers)
        if micro_size:
            micro = [inputs(part, 0) for part in split_batch(batch, batch["image"].shape[0] // micro_size)]
            loss = gradcache_backward(engine, micro, objective, engine.device)[0]["loss"]
        else:
            loss = objective(engine(**inputs(batch, 0)))["loss"]
            engine.backward(loss)
        grads = {name: safe_get_full_grad(param).detach().clone() for name, param in engine.module.named_parameters()}
        results[case] = {"loss": loss.item(), "grads": grads, "coalesced": engine.coalesce_micro_batches}
    if env.is_main:
        torch.save(results, options.out)


if __name__ == "__main__":
    main()
    from tritower.launch.lifecycle.preemption import exit_rank

    exit_rank(0)  # skip the teardown where gloo threads can abort a finished rank (see there)
