"""Checkpoints through the DeepSpeed engine, written so that nothing saved is ever lost: the
``Checkpointer`` (save, load, resume resolution, the locked-tower identity checks), used by the
trainer, and ``locate`` (a checkpoint path -> folder and tag), used by the trainer and by export.

Layout of ``<run>/checkpoints/``::

    step00000400/        one DeepSpeed tag (every rank's shards + the trainer's client state)
    step00000400/keep    marker: never pruned
    step00000400/manifest.json   every file of the tag and its size, written last
    step00000400/suspect marker: its weights gave a non-finite loss; ``--resume auto`` skips it
    latest               names the newest complete tag
    ../resharded/<tag>/  a universal copy of a tag resumed on another world size (removed once loaded)

A save writes a temporary tag (``step00000600.partial``) on every rank, waits until every rank
has finished, lists the tag's files and sizes in its manifest (written last), renames it (one
atomic rename by rank 0) and only then rewrites ``latest`` atomically. A process killed at any
moment therefore leaves ``latest`` pointing at a complete checkpoint, and a tag whose files
were lost or cut later fails its manifest: ``--resume auto`` then falls back to the newest tag
that passes (``pick_resume``). Old tags beyond the last ``keep_last`` are removed, except those
marked ``keep``, the one ``latest`` names, the one just written and any the caller protects
(the trainer protects the newest checkpoint from before a non-finite streak).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from tritower.data.atomic import write_text_atomic
from tritower.data.elastic import data_rank_states
from tritower.launch.checkpoint.disk import disk_full, full_disk_error
from tritower.launch.checkpoint.manifest import (
    MANIFEST,
    PARTIAL_SUFFIX,
    RESHARDABLE_STAGES,
    SUSPECT,
    architecture,
    check_locked,
    complete_tags,
    data_identity,
    nested,
    not_reshardable,
    tag_for,
    training_identity,
    write_manifest,
)

if TYPE_CHECKING:
    from deepspeed import DeepSpeedEngine

    from tritower.data.embeddings import EmbeddingsMeta
    from tritower.launch.checkpoint.config import CheckpointConfig
    from tritower.model.locked import LockedTowers


def _saved_world_size(tag_folder: Path) -> int | None:
    """The world size the tag's manifest records (None: no manifest or none recorded)."""
    try:
        return json.loads((tag_folder / MANIFEST).read_text()).get("world_size")
    except (OSError, ValueError):
        return None


def rng_state(device: torch.device) -> dict:
    """This rank's random generators, so a resumed run draws the same numbers."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_per_rank(value: object) -> list:
    """Every rank's ``value`` in rank order (a collective: all ranks call it)."""
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def save(
    engine: DeepSpeedEngine,
    folder: Path,
    step: int,
    client_state: dict,
    *,
    keep_last: int,
    keep: bool = False,
    manifest: dict | None = None,
    protect: tuple[str, ...] = (),
) -> str:
    """Write tag ``step`` from every rank; returns the tag once ``latest`` points at it.
    ``manifest``: what the manifest records besides the files; ``protect``: tags never pruned."""
    tag = tag_for(step)
    partial = tag + PARTIAL_SUFFIX
    is_main = dist.get_rank() == 0
    if is_main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(folder / partial, ignore_errors=True)  # a leftover of a killed save
    dist.barrier()
    failed = None
    try:
        engine.save_checkpoint(str(folder), tag=partial, client_state=client_state, save_latest=False)
    except (OSError, RuntimeError) as error:  # a full disk: torch raises RuntimeError without an errno
        if not disk_full(error, folder):
            raise
        failed = error
    # Every rank's shards are on disk before the tag becomes visible; a rank whose disk is full says
    # so in the same collective, so all ranks stop together instead of waiting on it.
    if _any_rank(failed is not None):
        if is_main:
            shutil.rmtree(folder / partial, ignore_errors=True)  # the space it took; latest is untouched
        raise full_disk_error(folder, f"checkpoint {tag} (on this or another rank)")
    if is_main:
        try:
            write_manifest(folder / partial, {"tag": tag, "step": step, **(manifest or {})})
        except OSError as error:
            if not disk_full(error, folder):
                raise
            failed = error
    if _any_rank(failed is not None):  # the manifest, last before the tag becomes visible
        if is_main:
            shutil.rmtree(folder / partial, ignore_errors=True)
        raise full_disk_error(folder, f"the manifest of checkpoint {tag}")
    if is_main:
        if (folder / tag).exists():  # saving the same step twice (e.g. end right after a periodic save)
            shutil.rmtree(folder / tag)
        os.replace(folder / partial, folder / tag)
        if keep:
            (folder / tag / "keep").touch()
        write_text_atomic(folder / "latest", tag)
        prune(folder, keep_last, protect=(tag, *protect))
    dist.barrier()
    return tag


def _any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (a collective: one all-reduce of one number)."""
    value = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def prune(folder: Path, keep_last: int, protect: tuple[str, ...] = ()) -> list[str]:
    """Remove complete tags older than the newest ``keep_last``, sparing those marked ``keep``,
    the one ``latest`` names and ``protect``."""
    if keep_last <= 0:
        return []
    latest = folder / "latest"
    spared = set(protect) | ({latest.read_text().strip()} if latest.is_file() else set())
    tags = complete_tags(folder)
    removed = []
    for tag in tags[:-keep_last]:
        if tag not in spared and not (folder / tag / "keep").exists():
            shutil.rmtree(folder / tag, ignore_errors=True)
            removed.append(tag)
    return removed


def load(engine: DeepSpeedEngine, folder: Path, tag: str) -> dict:
    """Load model, optimizer and scheduler state on every rank; returns the trainer's client state."""
    load_path, client_state = engine.load_checkpoint(str(folder), tag=tag)
    if load_path is None:
        raise FileNotFoundError(f"DeepSpeed could not load tag {tag} from {folder}")
    if engine.lr_scheduler is not None:  # the next update's rate is the schedule's, not the one saved
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr(), strict=True):
            group["lr"] = lr
    return client_state or {}


class Checkpointer:
    """Save, load and resume resolution for one run's ``checkpoints/`` folder (every rank holds
    one; every method is a collective unless it says otherwise)."""

    def __init__(self, folder: Path, engine: DeepSpeedEngine, *, keep_last: int, keep_every_steps: int = 0) -> None:
        self.folder = folder
        self.engine = engine
        self.keep_last = keep_last
        self.keep_every_steps = keep_every_steps

    @classmethod
    def from_config(cls, folder: Path, engine: DeepSpeedEngine, cfg: CheckpointConfig) -> Checkpointer:
        """A checkpointer with the ``checkpoint`` section's retention (``keep_last``, ``keep_every_steps``)."""
        return cls(folder, engine, keep_last=cfg.keep_last, keep_every_steps=cfg.keep_every_steps)

    def save(self, step: int, client_state: dict, protect: tuple[str, ...] = ()) -> Path:
        """Write tag ``step`` (kept for good if ``keep_every_steps`` divides it); returns its
        folder. Its manifest records the world size and the model architecture; ``protect``:
        tags pruning must spare."""
        keep = bool(self.keep_every_steps and step % self.keep_every_steps == 0)
        model = client_state.get("config", {}).get("model", {})
        manifest = {"world_size": client_state.get("world_size"), "data_ranks": client_state.get("data_ranks")}
        manifest["model"] = nested(architecture(model))
        if "config" in client_state:
            manifest["data"] = data_identity(client_state["config"])
            manifest["training"] = training_identity(client_state["config"], self.engine.zero_optimization_stage())
        self.check_space(tag_for(step))
        tag = save(
            self.engine, self.folder, step, client_state, keep_last=self.keep_last, keep=keep, manifest=manifest,
            protect=protect,
        )  # fmt: skip
        return self.folder / tag

    def check_space(self, tag: str) -> None:
        """Refuse a save the disk cannot hold, on every rank together, before anything is written:
        a rank that met a full disk inside DeepSpeed's save would leave the others waiting in its
        collectives. Needed: the newest tag's size (its manifest), else 20 bytes a parameter
        (weights, fp32 master copy, two Adam moments). OSError ENOSPC naming the space."""
        tags = complete_tags(self.folder)
        try:
            needed = sum(json.loads((self.folder / tags[-1] / MANIFEST).read_text())["files"].values())
        except (IndexError, OSError, ValueError, KeyError):
            needed = 20 * sum(getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters())
        free = shutil.disk_usage(self.folder if self.folder.exists() else self.folder.parent).free
        if _any_rank(free < needed * 1.1):
            raise full_disk_error(self.folder, f"checkpoint {tag} (about {needed / 2**20:.1f} MiB needed)")

    def mark_suspect(self, tag: str, reason: str, good: Path | None) -> None:
        """Mark ``tag`` as holding bad weights (a ``suspect`` file saying why: ``--resume auto``
        skips it) and point ``latest`` at ``good`` (rank 0 only; no collective)."""
        write_text_atomic(self.folder / tag / SUSPECT, reason + "\n")
        if good is not None:
            write_text_atomic(self.folder / "latest", good.name)

    def load(self, folder: Path, tag: str, *, world_size: int, locked: dict[str, dict[str, str]]) -> dict:
        """Load tag ``folder/tag`` into the engine after checking it fits this run: the same locked-
        tower files, and a world size the saved data stream can be shared by (``check_manifest``).
        A tag written by another number of ranks is resharded first (``reshard``). Returns the
        trainer's client state; ValueError naming the mismatch and the fix."""
        saved_world = _saved_world_size(folder / tag) or world_size
        load_folder, universal = folder, False
        if saved_world != world_size:
            load_folder, universal = self.reshard(folder, tag, saved_world, world_size), True
        config = self.engine._config  # DeepSpeed reads its load_universal setting from here at load time
        before = config.load_universal_checkpoint
        config.load_universal_checkpoint = universal
        try:
            state = load(self.engine, load_folder, tag)
        except (AssertionError, KeyError, RuntimeError) as error:  # a tag without a manifest's training fields
            detail = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            raise ValueError(
                f"DeepSpeed could not load {folder / tag} into this run ({detail}): it was most likely written "
                "with another ZeRO stage, optimizer or precision; resume with its settings (its config.yaml), or "
                "export its weights and start a new run from them (docs/export.md)"
            ) from None
        finally:
            config.load_universal_checkpoint = before
        if universal:  # loaded on every rank: the converted copy is no longer needed
            dist.barrier()
            if dist.get_rank() == 0:
                shutil.rmtree(load_folder, ignore_errors=True)  # the tag and DeepSpeed's latest_universal
        check_locked(state.get("locked", {}), locked, str(folder / tag))
        return state

    def reshard(self, folder: Path, tag: str, saved_world: int, world_size: int) -> Path:
        """Convert tag ``folder/tag``, written by ``saved_world`` ranks, into a DeepSpeed universal
        checkpoint (``deepspeed.checkpoint.ds_to_universal``, run by rank 0 into this run's
        ``resharded/<tag>``) that loads at any data-parallel degree; returns its parent folder.
        ValueError with DeepSpeed's own error where the conversion fails (every rank together)."""
        stage = self.engine.zero_optimization_stage()
        if stage not in RESHARDABLE_STAGES:  # check_manifest refuses it earlier; a tag without a manifest
            raise ValueError(not_reshardable(str(folder / tag), saved_world, world_size, stage))
        out = self.folder.parent / "resharded"
        error = None
        if dist.get_rank() == 0:
            shutil.rmtree(out / tag, ignore_errors=True)
            command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                       str(folder / tag), "--output_folder", str(out / tag), "--num_extract_workers", "1",
                       "--num_merge_workers", "1", "--inject_missing_state"]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                lines = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
                error = lines[-1][:300] if lines else f"exit code {done.returncode}"
        if _any_rank(error is not None):
            raise ValueError(
                f"{folder / tag} was written by {saved_world} ranks, this run has {world_size}, and DeepSpeed's "
                f"ds_to_universal could not reshard it ({error or 'on rank 0'}); resume on {saved_world} ranks"
            )
        return out

    def resume(self, folder: Path, tag: str, loader: object, device: torch.device, env: object, *,
               locked: dict[str, dict[str, str]]) -> dict:  # fmt: skip
        """``load`` a tag, then put ``loader`` on its data position and this rank's RNG streams on
        their saved state (``env``: the rank environment); returns the trainer's client state."""
        state = self.load(folder, tag, world_size=env.world_size, locked=locked)
        self.restore_data_position(loader, state, folder / tag)
        if "rng" in state:  # another world size: rank r takes saved rank r's streams (dropout is not exact)
            set_rng_state(state["rng"][env.rank % len(state["rng"])], device)
        return state

    def restore_data_position(self, loader: object, state: dict, where: Path) -> None:
        """Put ``loader`` (``TrainLoader``) on the saved data position (no collective). The
        manifest check caught changed settings before the engine was built; what only the loader
        can see (a pattern that now matches other shards, a changed ``sizes.json``) is refused
        here: ValueError naming the checkpoint and the fix."""
        if "data" not in state:
            return
        try:
            loader.load_state_dict(state["data"])
        except ValueError as error:
            detail = str(error).split("; ")[0]
            raise ValueError(
                f"{where} cannot continue this run's data exactly: the training shards or their "
                f"settings changed ({detail}); resume with the shards it was trained on, or start a "
                "new run (a new --train.run_name, without --resume)"
            ) from None


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


def trainer_state(
    step: int, config: dict, world_size: int, counters: dict, loader: object, device: torch.device, *,
    wandb_id: str | None, locked: dict[str, dict[str, str]],
) -> dict:  # fmt: skip
    """The trainer's client state of a checkpoint (a collective: every rank's data position and RNG
    streams are gathered): the step, the samples seen, the run's config (``TrainConfig.to_dict()``),
    the world size, the trainer's counters, per-rank data positions and RNG state, the wandb run id
    and the locked towers' identities (what ``Checkpointer.resume`` reads back)."""
    per_rank = gather_per_rank({"data": loader.state_dict(), "rng": rng_state(device)})
    data = data_rank_states([rank["data"] for rank in per_rank])  # world-size free (data/elastic.py)
    state = {"step": step, "samples_seen": step * config["data"]["batch_size"], "config": config}
    state |= {"world_size": world_size, "data_ranks": len(data), **counters}
    state |= {"data": data, "rng": [rank["rng"] for rank in per_rank]}
    return state | {"wandb_id": wandb_id, "locked": locked}
