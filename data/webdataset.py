"""The training data loader: tar shards -> shuffled, augmented, tokenised batches, resumable.

Each rank runs a torch ``DataLoader`` whose workers each run a ``webdataset.DataPipeline``:
shards of this worker's *slot* (``rank * workers + worker``) -> samples -> seeded shuffle
buffer -> decode + random resized crop -> batches of ``per_rank_batch`` tokenised in the worker.

Epochs are per worker and the stream is infinite: a worker goes on to epoch ``e + 1`` when its
share of epoch ``e`` is exhausted, so no rank ever runs dry and ranks stay in step.

* ``resampled=False``: in epoch ``e`` the full shard list is permuted with ``(seed, e)`` and
  slot ``s`` reads ``shards[s::ranks*workers]``: every shard once per epoch, no overlap between
  ranks or workers. With equal shard sizes and a shard count divisible by ranks x workers the
  workers' epochs line up and every sample is seen exactly once per epoch.
* ``resampled=True``: in epoch ``e`` slot ``s`` draws shards with replacement, seeded by
  ``(seed, e, s)``, and mixes the ``::`` sources per sample by weight (``epochs.py``):
  ``ceil(shards / (ranks * workers))`` draws, or as many as it takes to read
  ``ceil(samples_per_epoch / (ranks * workers))`` samples when ``samples_per_epoch`` is set.

Exact resume: every batch carries the position ``(epoch, index in the shuffled stream)`` of
its worker after it; ``TrainLoader.state_dict()`` records the positions of the batches the
trainer actually consumed. A resumed worker re-reads (without decoding) its current epoch up
to that index, and batch ``k`` always comes from logical worker ``k % workers``, so a resumed
run sees exactly the samples, crops and order the uninterrupted run would have seen.

Precomputed embeddings (``data.embeddings``, see ``embeddings.py``): each shard is read side by
side with its companion shard, so the embedding travels with its undecoded sample through the
shuffle buffer and the fast-forward; the batch gets the embedding of the fixed view its image
was (or, with ``needs_images=False``, would have been) cropped as.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import random
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from transformers import PreTrainedTokenizerBase

from .config import DataConfig
from .embeddings import (
    EmbeddingsMeta,
    decode_embedding,
    join_embeddings,
    load_meta,
    probe_companion,
)
from .epochs import epoch_shards, mixed_samples, shuffled
from .eval_set import EvalSet, load_eval_set  # noqa: F401  (re-exported for the trainer)
from .samples import BadDataStats, DataQualityError, decode_sample, probe_shards, read_shard
from .shards import ShardSource, check_local_shards, load_shard_sizes, resolve_sources
from .tokenizer import tokenize
from .transforms import TrainTransform, epoch_view, view_rng
from .workers import outlive_sigterm, worker_deaths_at_the_next_batch

STATE_VERSION = 1


class TrainStream(torch.utils.data.IterableDataset):
    """One rank's infinite stream of batches; runs inside each DataLoader worker."""

    def __init__(
        self,
        sources: list[ShardSource],
        cfg: DataConfig,
        *,
        tokenizer: PreTrainedTokenizerBase,
        transform: TrainTransform,
        context_length: int,
        rank: int,
        world_size: int,
        per_rank_batch: int,
        seed: int,
        needs_images: bool = True,
        embeddings: EmbeddingsMeta | None = None,
        companions: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        self.sources = sources
        self.urls = [url for source in sources for url in source.urls]
        self.counts = load_shard_sizes(self.urls)
        """Samples per shard (from ``sizes.json``), or None: what a truncated shard lost."""
        self.sizes = None if cfg.resampled else self.counts
        """The same, to balance non-resampled epochs (None when resampled)."""
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.transform = transform
        self.context_length = context_length
        self.rank, self.world_size = rank, world_size
        self.workers = max(1, cfg.num_workers)  # num_workers=0 runs one logical worker inline
        self.per_rank_batch = per_rank_batch
        self.seed = seed
        self.needs_images = needs_images
        """False: images are checked for presence but never decoded nor cropped."""
        self.embeddings = embeddings
        self.companions = companions
        """Source shard URL -> its companion shard (with ``embeddings``), else None."""
        self.views, self.view_seed = (
            (embeddings.views, embeddings.view_seed) if embeddings else (cfg.views, cfg.view_seed)
        )
        """Fixed views per sample (0: a fresh crop per position) and their crop seed."""
        self.start: dict[int, tuple[int, int]] = {}
        """Logical worker -> (epoch, index) to start from; set by ``TrainLoader``."""
        self.start_stats: dict[int, dict[str, Any]] = {}
        """Logical worker -> bad-data counters to continue from (``BadDataStats.as_dict``)."""
        self.rotation = 0
        """DataLoader worker ``i`` plays logical worker ``(i + rotation) % workers``."""

    def shards_digest(self) -> str:
        """Fingerprint of the shard list, weights and sizes: a position is only valid for them."""
        sizes = self.sizes or {}
        text = "\n".join(f"{s.weight}:{sizes.get(u)}:{u}" for s in self.sources for u in s.urls)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def epoch_shards(self, epoch: int, slot: int) -> list[str]:
        """Non-resampled mode: the shards slot ``slot`` reads in ``epoch``."""
        slots = self.world_size * self.workers
        return epoch_shards(self.urls, self.seed, epoch, slot, slots, self.sizes)

    def _raw(self, slot: int, epoch: int) -> Iterator[dict[str, Any]]:
        """Undecoded samples of one worker-epoch in shuffled order."""
        slots = self.world_size * self.workers
        if not self.cfg.resampled:
            shards = self.epoch_shards(epoch, slot)
            samples = (sample for url in shards for sample in self._read(url))
        elif self.cfg.samples_per_epoch:
            # An epoch is a sample count: draw shards until this worker's share is read.
            samples = itertools.islice(
                mixed_samples(self.sources, self.seed, epoch, slot, None, self._read),
                math.ceil(self.cfg.samples_per_epoch / slots),
            )
        else:
            draws = math.ceil(len(self.urls) / slots)
            samples = mixed_samples(self.sources, self.seed, epoch, slot, draws, self._read)
        rng = random.Random(f"{self.seed}/shuffle/{epoch}/{slot}")
        return shuffled(samples, max(1, self.cfg.shuffle_buffer), rng)

    def _read(self, url: str) -> Iterator[dict[str, Any]]:
        expected = self.counts.get(url) if self.counts else None
        samples = read_shard(url, self.stats, self.cfg.shard_retries, expected=expected)
        if self.companions is not None:
            samples = join_embeddings(samples, url, self.companions[url])
        return samples

    def _item(self, sample: dict[str, Any], epoch: int, slot: int, index: int) -> tuple | None:
        """(pixels | None, caption, label, key, view, embedding | None), or None after counting
        why the sample is bad."""
        url, key = sample["__url__"], sample["__key__"]
        skip = sample.get("__skip__")  # precompute could not embed it: its image is bad
        decoded = decode_sample(sample, self.cfg.caption_key, self.stats,
                                decode=self.needs_images and skip is None, label_key=self.cfg.label_key)  # fmt: skip
        if decoded is None:
            return None
        if skip is not None:
            self.stats.add_bad(skip, url)  # what decoding the image would have found
            return None
        image, caption, label = decoded
        # A fixed view depends on the key only, so it is the view that was precomputed.
        view = epoch_view(self.seed, epoch, key, self.views) if self.views else -1
        pixels = None
        if image is not None:
            if self.views:
                rng = view_rng(self.view_seed, key, view)
            else:  # the crop depends only on (seed, epoch, slot, index): resume-exact
                rng = random.Random(f"{self.seed}/crop/{epoch}/{slot}/{index}")
            try:
                pixels = self.transform(image, rng)
            except Exception:  # noqa: BLE001 - e.g. a degenerate image size
                self.stats.add_bad("image", url)
                return None
        embedding = None
        if self.embeddings is not None:
            embedding = decode_embedding(sample, view, self.views, self.embeddings.width)
            if not np.isfinite(embedding).all():  # counted as the bad image it stands for, and skipped
                self.stats.add_bad("image", url)
                return None
        self.stats.good += 1
        return pixels, caption, label, key, view, embedding

    def _decoded(self, slot: int, logical: int) -> Iterator[tuple[Any, ...]]:
        """Infinite (image, caption, label, key, view, embedding, epoch, next index) from this
        worker's epochs."""
        epoch, start = self.start.get(logical, (0, 0))
        where = f"rank {self.rank} worker {logical}"
        while True:
            stream, index = self._raw(slot, epoch), -1
            while True:
                # Shard errors met while producing positions before ``start`` were counted
                # before the checkpoint: mute the counters until the position is reached.
                self.stats.muted = index + 1 < start
                sample = next(stream, None)
                if sample is None:
                    break
                index += 1
                if index < start:
                    continue  # fast-forward of a resumed run: read, but do not decode
                item = self._item(sample, epoch, slot, index)
                if item is not None:
                    yield *item, epoch, index + 1
                self.stats.check(self.cfg.max_bad_fraction, self.cfg.bad_check_min_samples, where)
            if start == 0 and self.stats.good == 0:
                # Without this an all-bad data set would loop forever without a batch. Only a
                # worker that never saw a good sample stops: in resampled mode one epoch may
                # draw only bad shards by chance, which max_bad_fraction judges instead.
                raise DataQualityError(
                    f"{where}: no readable sample in epoch {epoch} ({index + 1} read); bad by kind "
                    f"{dict(self.stats.bad)}; worst shards {self.stats.worst_shards()}"
                )
            epoch, start = epoch + 1, 0

    def _batches(self, items: Iterator[tuple[Any, ...]], logical: int) -> Iterator[dict]:
        """Fixed-size batches, tokenised here in the worker; never a partial batch."""
        chunk: list[tuple[Any, ...]] = []
        for item in items:
            chunk.append(item)
            if len(chunk) < self.per_rank_batch:
                continue
            images, captions, labels, keys, views, embeddings, epochs, indices = zip(*chunk)
            chunk = []
            input_ids, attention_mask = tokenize(self.tokenizer, captions, self.context_length)
            batch: dict[str, Any] = {}
            if self.needs_images:
                # np.stack, not torch.stack: torch's intra-op threads made stacking a 224 px
                # batch take ~1 s in a busy main process (num_workers=0); numpy uses one core.
                pixels = np.stack([image.numpy() for image in images])  # [B, 3, H, W]
                batch["image"] = torch.from_numpy(pixels)
            if self.embeddings is not None:
                batch["embedding"] = torch.from_numpy(np.stack(embeddings))  # [B, width] float32
            if self.views:
                batch["view"] = torch.tensor(views, dtype=torch.int64)  # [B]
            yield batch | {
                "input_ids": input_ids,  # [B, L]
                "attention_mask": attention_mask,  # [B, L]
                "label": torch.tensor(labels, dtype=torch.int64),  # [B]
                "key": list(keys),
                "__state__": (logical, epochs[-1], indices[-1]),
                "__stats__": self.stats.as_dict(),
            }

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        logical = (worker + self.rotation) % self.workers
        slot = self.rank * self.workers + logical
        restored = self.start_stats.get(logical)
        self.stats = BadDataStats.merged([restored] if restored else [])
        pipeline = wds.DataPipeline(
            lambda: self._decoded(slot, logical),
            lambda items: self._batches(items, logical),
        )
        return iter(pipeline)


class TrainLoader:
    """Iterable over training batches of one rank, with ``state_dict``/``load_state_dict``.

    Batches: ``image`` float32 [B,3,H,W] (absent with ``needs_images=False``),
    ``input_ids``/``attention_mask`` int64 [B,L], ``label`` int64 [B] (-1 when the sample has
    none), ``key`` list[str]; with ``data.embeddings``: ``embedding`` float32 [B,width]; with
    fixed views (``data.views`` or embeddings): ``view`` int64 [B], the view of each sample.
    """

    def __init__(self, stream: TrainStream, num_workers: int) -> None:
        self.stream = stream
        self.num_workers = num_workers
        self.batches = 0
        """Batches handed to the trainer so far (over all resumes)."""
        self.positions: dict[int, tuple[int, int]] = {}
        """Logical worker -> (epoch, index) after its last batch handed to the trainer."""
        self.worker_stats: dict[int, dict[str, Any]] = {}
        """Logical worker -> its counters as of that batch."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        # (Re)starting continues after the last consumed batch, with or without a checkpoint.
        self.stream.start = dict(self.positions)
        self.stream.start_stats = dict(self.worker_stats)
        self.stream.rotation = self.batches % self.stream.workers
        loader = torch.utils.data.DataLoader(
            self.stream,
            batch_size=None,  # batches are built (and tokenised) in the workers
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=2 if self.num_workers > 0 else None,
            worker_init_fn=outlive_sigterm,
        )
        batches = iter(loader)
        worker_deaths_at_the_next_batch()
        for batch in batches:
            logical, epoch, index = batch.pop("__state__")
            self.positions[logical] = (epoch, index)
            self.worker_stats[logical] = batch.pop("__stats__")
            self.batches += 1
            yield batch

    def stats(self) -> BadDataStats:
        """Good and bad samples of this rank so far (by kind and by shard), for logging."""
        return BadDataStats.merged(list(self.worker_stats.values()))

    def epoch(self) -> float:
        """Mean epoch of the workers' positions (a progress number for logs)."""
        if not self.positions:
            return float(self.stream.start.get(0, (0, 0))[0])
        return sum(epoch for epoch, _ in self.positions.values()) / len(self.positions)

    def state_dict(self) -> dict[str, Any]:
        """This rank's data position. DeepSpeed saves ``client_state`` from one rank only:
        gather every rank's dict (``all_gather_object``) and store the list."""
        return {
            "version": STATE_VERSION,
            "rank": self.stream.rank,
            "world_size": self.stream.world_size,
            "workers": self.stream.workers,
            "seed": self.stream.seed,
            "resampled": self.stream.cfg.resampled,
            "shards": self.stream.shards_digest(),
            "views": [self.stream.views, self.stream.view_seed],
            "batches": self.batches,
            "positions": {str(k): list(v) for k, v in self.positions.items()},
            "worker_stats": {str(k): v for k, v in self.worker_stats.items()},
            "stats": self.stats().as_dict(),  # for reading; not used to resume
        }

    def load_state_dict(self, state: dict[str, Any] | list[dict[str, Any]]) -> None:
        """Continues exactly after ``state``: this rank's dict, or the list of all ranks'."""
        if isinstance(state, list):
            state = next(s for s in state if s["rank"] == self.stream.rank)
        mine = (self.stream.world_size, self.stream.workers, self.stream.seed,
                self.stream.cfg.resampled, self.stream.shards_digest(),
                [self.stream.views, self.stream.view_seed])  # fmt: skip
        saved = (state["world_size"], state["workers"], state["seed"], state["resampled"],
                 state["shards"], list(state.get("views", [0, 0])))  # fmt: skip
        if mine != saved:
            raise ValueError(
                "data position saved with (world_size, workers, seed, resampled, shard list "
                f"digest, [views, view_seed])={saved} "
                f"cannot resume exactly with {mine}; resume with the same settings, or start "
                "the data afresh (skip load_state_dict) at a new epoch"
            )
        self.batches = state["batches"]
        self.positions = {int(k): (v[0], v[1]) for k, v in state["positions"].items()}
        self.worker_stats = {int(k): v for k, v in state["worker_stats"].items()}


def build_train_loader(
    cfg: DataConfig,
    *,
    shards: list[str] | str,
    tokenizer: PreTrainedTokenizerBase,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    context_length: int,
    rank: int,
    world_size: int,
    per_rank_batch: int,
    seed: int,
    epoch: int = 0,
    needs_images: bool = True,
) -> TrainLoader:
    """An infinite, resumable loader of this rank's training batches (see the module docstring).

    ``shards``: a list of URLs/paths/patterns (one source) or a specification string (sources
    separated by ``::``, weighted by ``cfg.train_weights``; see ``tritower.data.shards``).
    ``epoch``: the epoch every worker starts in (ignored after ``load_state_dict``).
    ``needs_images``: False when no tower reads pixels (a locked image tower replaced by
    ``cfg.embeddings``): images are neither decoded nor cropped and batches have no ``image``.
    With ``cfg.embeddings``, the views and view seed are the folder's, and a source shard
    without a companion, another view count or crop scale is an error here; the caller checks
    the tower itself with ``load_meta(cfg.embeddings).check(tower, sha256, width, ...)``.
    """
    sources = resolve_sources(shards, cfg.train_weights if isinstance(shards, str) else "")
    check_local_shards(sources)
    urls = [url for source in sources for url in source.urls]
    probe_shards(urls, cfg.caption_key, cfg.shard_retries)
    meta, companions = None, None
    if cfg.embeddings:
        meta = load_meta(cfg.embeddings)
        meta.check_views(cfg.views, cfg.view_seed, cfg.crop_scale_min)
        companions = meta.companions(urls)
        probe_companion(companions[urls[0]], meta.views, meta.width)
    elif not needs_images:
        raise ValueError(
            "needs_images=False without data.embeddings: batches would hold no image and no "
            "embedding; set data.embeddings to a folder written by launch/tools/precompute.py"
        )
    num_shards = sum(len(source.urls) for source in sources)
    workers = max(1, cfg.num_workers)
    slots = world_size * workers
    if num_shards < slots and not cfg.resampled:
        raise ValueError(
            f"{num_shards} shards for {world_size} ranks x {workers} workers: without "
            "resampling every worker needs at least one shard per epoch; use more (smaller) "
            "shards, fewer workers, or data.resampled=True"
        )
    # HF fast tokenizers warn (and can deadlock) when used in forked workers after the
    # parent used their thread pool; the workers tokenise single-threaded anyway.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    stream = TrainStream(
        sources,
        cfg,
        tokenizer=tokenizer,
        transform=TrainTransform(image_size, mean, std, cfg.crop_scale_min),
        context_length=context_length,
        rank=rank,
        world_size=world_size,
        per_rank_batch=per_rank_batch,
        seed=seed,
        needs_images=needs_images,
        embeddings=meta,
        companions=companions,
    )
    if num_shards < slots:
        warnings.warn(
            f"{num_shards} shards for {world_size} ranks x {workers} workers: workers read the "
            "same shards at the same time, so global batches will hold duplicate samples",
            stacklevel=2,
        )
    elif num_shards % slots and not cfg.resampled and stream.sizes is None:
        warnings.warn(
            f"{num_shards} shards do not divide over {world_size} ranks x {workers} workers: "
            "workers get unequal shares and their epochs drift apart (each still reads each "
            "of its shards once per epoch)",
            stacklevel=2,
        )
    loader = TrainLoader(stream, cfg.num_workers)
    loader.positions = {w: (epoch, 0) for w in range(stream.workers)}
    return loader
