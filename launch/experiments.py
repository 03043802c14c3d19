"""Named experiments: each is a function returning a complete ``TrainConfig``.

Pick one with ``--experiment NAME`` and adjust it with ``--section.field=value``::

    deepspeed launch/train.py --zero zero_configs/z3.json --experiment clip_tiny --optim.lr=5e-4
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable

from tritower.launch.config import ConfigError, TrainConfig

DEFAULT_EXPERIMENT = "clip_tiny"


def clip_tiny() -> TrainConfig:
    """The default: CLIP from scratch ("uu") on the built-in scenes, under 5 minutes on 2 CPU cores.

    A 64 px ViT (patch 8, width 128, depth 4) and a 2-layer BERT of width 128 with masked mean
    pooling (CLS pooling collapses at this size), AdamW 5e-4 with 50 warm-up steps.

    Measured on 2 cores (docs/default_run.md): with a fixed budget of samples, more and smaller
    steps win here: batch 128 x 500 steps reached 82% zero-shot top-1 where batch 256 x 250 steps
    reached 36% (the shapes, beyond the colours, are learnt from about step 300 on). The initial
    temperature is 1/50 instead of CLIP's 1/14.3: the short run leaves the learnable temperature
    no time to sharpen, and the sharper start separates same-colour shapes sooner.
    """
    cfg = TrainConfig(experiment="clip_tiny")
    cfg.model.image_tower = "vit_scene_tiny"
    cfg.model.text_tower = "bert_scene_tiny"
    cfg.model.embed_dim = 128
    cfg.model.init_logit_scale = math.log(50.0)
    cfg.data.batch_size = 128
    cfg.optim.lr = 5e-4
    cfg.optim.warmup_steps = 50
    cfg.train.steps = 450
    cfg.eval.every_steps = 150
    return cfg


def clip_test() -> TrainConfig:
    """A seconds-long CLIP for tests: 32 px scenes, 2-layer towers of width 32."""
    cfg = TrainConfig(experiment="clip_test")
    cfg.model.image_tower = "vit_test"
    cfg.model.text_tower = "bert_test"
    cfg.model.embed_dim = 32
    cfg.data.builtin_train_samples = 2000
    cfg.data.builtin_eval_samples = 300
    cfg.data.builtin_image_size = 32
    cfg.data.batch_size = 32
    cfg.data.num_workers = 0
    cfg.train.steps = 12
    cfg.train.log_every = 4
    cfg.optim.warmup_steps = 3
    cfg.optim.lr = 1e-3
    cfg.eval.every_steps = 0
    cfg.wandb.mode = "disabled"
    return cfg


def clip_vit_b16_bert_base() -> TrainConfig:
    """CLIP ViT-B/16 + BERT-base from scratch on user shards (set --data.train_shards)."""
    cfg = TrainConfig(experiment="clip_vit_b16_bert_base")
    cfg.model.image_tower = "vit_base_patch16_224"
    cfg.model.text_tower = "bert_base"
    cfg.model.embed_dim = 512
    cfg.data.batch_size = 16384
    cfg.data.num_workers = 8
    cfg.optim.lr = 1e-3
    cfg.optim.weight_decay = 0.2
    cfg.optim.warmup_steps = 2000
    cfg.train.steps = 30000
    cfg.train.log_every = 50
    cfg.eval.every_steps = 2000
    cfg.deepspeed.precision = "bf16"
    cfg.model.image_grad_checkpointing = True
    cfg.model.text_grad_checkpointing = True
    return cfg


def clip_vitg14_bert_large() -> TrainConfig:
    """The cluster-scale target: ViT-g/14 + BERT-large, 32k global batch, bf16, ZeRO-3."""
    cfg = clip_vit_b16_bert_base()
    cfg.experiment = "clip_vitg14_bert_large"
    cfg.model.image_tower = "vit_giant_patch14_224"
    cfg.model.text_tower = "bert_large"
    cfg.model.embed_dim = 1024
    cfg.data.batch_size = 32768
    cfg.optim.lr = 5e-4
    cfg.optim.beta2 = 0.95
    cfg.optim.warmup_steps = 5000
    cfg.train.steps = 60000
    return cfg


EXPERIMENTS: dict[str, Callable[[], TrainConfig]] = {
    fn.__name__: fn for fn in (clip_tiny, clip_test, clip_vit_b16_bert_base, clip_vitg14_bert_large)
}


def get_experiment(name: str) -> TrainConfig:
    """A fresh config for the named experiment; unknown names fail naming the closest one."""
    if name not in EXPERIMENTS:
        close = difflib.get_close_matches(name, list(EXPERIMENTS), n=1, cutoff=0.0)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown experiment '{name}'{hint}; known: {', '.join(EXPERIMENTS)}")
    return EXPERIMENTS[name]()
