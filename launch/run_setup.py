"""What a run is set up from before its loop starts: its data sources, its run folder, the check
that precomputed embeddings fit the tower they replace, and the identities of its locked towers."""

from __future__ import annotations

import os
from dataclasses import dataclass

from tritower.data import EvalSet, TrainLoader
from tritower.data.config import DataConfig
from tritower.data.embeddings import EmbeddingsMeta
from tritower.launch.config import ConfigError, TrainConfig
from tritower.launch.dist_env import DistEnv
from tritower.model import LockedTowers, file_sha256, image_tower_spec, text_tower_spec


@dataclass
class DataSources:
    """Resolved shard lists and vocabulary for a run."""

    train_shards: list[str] | str
    eval_shards: list[str]
    vocab: str


def resolve_data(cfg: DataConfig) -> DataSources:
    """Built-in scenes (generated once, then reused) or the user's shards."""
    from tritower.data import ensure_builtin_data, expand_shards

    if cfg.train_shards in ("", "builtin"):
        builtin = ensure_builtin_data(cfg)
        return DataSources(builtin.train_shards, builtin.eval_shards, cfg.vocab or str(builtin.vocab_path))
    if not cfg.vocab:
        raise ConfigError(
            "data.vocab must name a local vocab.txt (or a model folder holding one) when "
            "data.train_shards are your own shards"
        )
    # The spec string goes to the loader as is: weighted mixing ("a.tar::b.tar") needs it whole.
    return DataSources(cfg.train_shards, expand_shards(cfg.eval_shards) if cfg.eval_shards else [], cfg.vocab)


def run_name(cfg: TrainConfig) -> str:
    """The run folder's name: ``train.run_name``, else one per wandb sweep run, else the experiment.

    Under a sweep agent every run gets its own folder (named after ``WANDB_RUN_ID``, which the agent
    sets for each process), so runs never resume from each other's checkpoints.
    """
    if cfg.train.run_name:
        return cfg.train.run_name
    sweep_run = os.environ.get("WANDB_RUN_ID")
    return f"{cfg.experiment}-{sweep_run}" if sweep_run else cfg.experiment


def check_embeddings(cfg: TrainConfig, role: str) -> EmbeddingsMeta:
    """The precomputed embeddings must come from the tower this config locks (name, file, width)."""
    from tritower.data.embeddings import load_meta

    tower = cfg.model.parsed.tower(role)
    meta = load_meta(cfg.data.embeddings)
    spec = image_tower_spec(tower.name)
    try:
        meta.check(
            tower=tower.name,
            sha256=file_sha256(tower.pretrained),
            width=spec.width,
            image_size=spec.image_size,
            mean=spec.mean,
            std=spec.std,
        )
    except ValueError as error:
        raise ConfigError(
            f"data.embeddings={cfg.data.embeddings!r} do not fit the {role} tower "
            f"{tower.name} from {tower.pretrained!r}: {error}"
        ) from None
    return meta


def locked_identities(
    locked: LockedTowers, meta: EmbeddingsMeta | None, role: str, embeddings: str
) -> dict[str, dict[str, str]]:
    """What each locked tower was loaded from (file and sha256), precomputed ones included
    (``role`` is the tower ``meta``'s embeddings replace: ``image`` or ``third``)."""
    identities = locked.identities()
    if meta is not None:
        name = "image_tower" if role == "image" else "third_tower"
        identities[name] = {"tower": meta.tower, "source": meta.source, "sha256": meta.sha256, "embeddings": embeddings}
    return identities


def build_loaders(
    cfg: TrainConfig,
    sources: DataSources,
    tokenizer: object,
    env: DistEnv,
    per_rank_batch: int,
    needs_images: bool,
) -> tuple[TrainLoader, EvalSet | None]:
    """This rank's training loader and the eval set (None without eval shards), preprocessed for
    the image tower and tokenised for the text tower."""
    from tritower.data import build_train_loader, load_eval_set

    image_spec = image_tower_spec(cfg.model.image_tower)
    common = dict(
        tokenizer=tokenizer,
        image_size=image_spec.image_size,
        mean=image_spec.mean,
        std=image_spec.std,
        context_length=text_tower_spec(cfg.model.text_tower).context_length,
    )
    loader = build_train_loader(
        cfg.data,
        shards=sources.train_shards,
        rank=env.rank,
        world_size=env.world_size,
        per_rank_batch=per_rank_batch,
        seed=cfg.train.seed,
        needs_images=needs_images,
        **common,
    )
    if not sources.eval_shards:
        return loader, None
    eval_set = load_eval_set(
        sources.eval_shards, caption_key=cfg.data.caption_key, label_key=cfg.data.label_key, **common
    )
    return loader, eval_set
