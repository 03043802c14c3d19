"""One forward/backward of the tiny CLIP through a real DeepSpeed engine; rank 0 saves loss + grads.

Run under ``deepspeed --num_gpus N`` by tests/test_train_distributed.py: the same synthetic global
batch is split across the N ranks, so the saved loss and full (gathered) gradients must not depend
on N. ``--case POLICY[:M]`` may be given several times: one engine per case, in order. With
``:M`` each rank's share is encoded by GradCache in micro-batches of M; the loss and gradients
must equal the whole batch's. Results are saved keyed by the case string.
"""

from __future__ import annotations

import argparse

import torch
from deepspeed.utils import safe_get_full_grad

from tritower.launch.config import load_config
from tritower.launch.engine import build_engine, init_distributed
from tritower.launch.gradcache import gradcache_backward, split_batch
from tritower.launch.dist_env import from_environ
from tritower.losses import ContrastiveLoss
from tritower.model import build_clip

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
    for case in options.case:
        zero, _, micro_size = case.partition(":")
        micro_size = int(micro_size or 0)
        cfg = load_config(["--experiment", "clip_test", "--zero", zero, f"--data.batch_size={options.global_batch}",
                           f"--train.micro_batch_size={micro_size}"])
        torch.manual_seed(0)
        model = build_clip(cfg.model, vocab_size=VOCAB)
        engine, _ = build_engine(model, cfg, env.world_size)
        images, input_ids, attention_mask = synthetic_global_batch(options.global_batch, 32, 16)
        local = slice(env.rank * options.global_batch // env.world_size, (env.rank + 1) * options.global_batch // env.world_size)
        loss_fn = ContrastiveLoss.from_config(cfg.loss)
        batch = {"image": images[local], "input_ids": input_ids[local], "attention_mask": attention_mask[local]}
        if micro_size:
            micro = split_batch(batch, batch["image"].shape[0] // micro_size)
            loss, _ = gradcache_backward(engine, micro, loss_fn, lambda b: (b["image"], b["input_ids"], b["attention_mask"]), engine.device)
        else:
            out = engine(batch["image"], batch["input_ids"], batch["attention_mask"])
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            engine.backward(loss)
        grads = {name: safe_get_full_grad(param).detach().clone() for name, param in engine.module.named_parameters()}
        results[case] = {"loss": loss.item(), "grads": grads}
    if env.is_main:
        torch.save(results, options.out)


if __name__ == "__main__":
    main()
