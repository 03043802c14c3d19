"""Held-out sets for evaluation: streamed in batches (``iter_eval_batches``, what training and
``launch/tools/evaluate.py`` use: a rank holds one batch of images at a time and decodes only its
share), or loaded whole into memory (``load_eval_set``, for small sets and tools that want tensors).

The formats (clip_benchmark webdataset, ImageFolder, the built-in shards) are in ``eval_formats.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from .eval_formats import EvalSource, iter_eval_samples
from .samples import BadDataStats, DataQualityError, decode_sample, read_shard
from .shards import check_local_shards, resolve_sources
from .tokenizer import tokenize
from .transforms import EvalTransform


@dataclass
class EvalSet:
    """Image-caption pairs of the held-out split, in shard order."""

    images: torch.Tensor
    """float32 [N, 3, H, W], normalised."""
    input_ids: torch.Tensor
    """int64 [N, L]: the caption of each image (retrieval)."""
    attention_mask: torch.Tensor
    """int64 [N, L]."""
    labels: torch.Tensor
    """int64 [N]: zero-shot class index, -1 where the sample has none."""
    classnames: list[str]
    """Zero-shot class names, index = label (empty when unknown)."""
    templates: list[str]
    """Zero-shot prompt templates with a ``{c}`` slot (empty when unknown)."""
    keys: list[str] = field(default_factory=list)
    """Sample keys, aligned with the tensors."""
    captions: list[str] = field(default_factory=list)
    """Caption strings, aligned with the tensors."""
    bad: dict[str, int] = field(default_factory=dict)
    """Skipped samples by kind (see ``tritower.data.samples``)."""


def _sidecar_lines(urls: list[str], name: str) -> list[str]:
    """Lines of ``name`` (e.g. ``classnames.txt``) next to the first local shard, if any."""
    for url in urls:
        path = Path(url).parent / name
        if "://" not in url and not url.startswith("pipe:") and path.is_file():
            return [line for line in path.read_text().splitlines() if line.strip()]
    return []


def load_eval_set(
    shards: list[str] | str,
    tokenizer: PreTrainedTokenizerBase,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    context_length: int,
    *,
    caption_key: str = "txt",
    label_key: str = "json:label",
    classnames: list[str] | None = None,
    templates: list[str] | None = None,
    max_samples: int = 0,
    shard_retries: int = 0,
    interpolation: str = "bicubic",
) -> EvalSet:
    """Loads held-out shards (shorter side resized, centre crop, one tokenised caption per image).

    ``classnames``/``templates`` default to ``classnames.txt``/``templates.txt`` next to the
    shards (the built-in generator writes them). ``max_samples`` > 0 keeps the first ones.
    ``shard_retries``: extra tries of a remote shard that fails at once (see ``read_shard``).
    ``interpolation``: the resize's filter (``EvalTransform``; the tower spec's).
    """
    sources = resolve_sources(shards)
    check_local_shards(sources)
    urls = [url for source in sources for url in source.urls]
    transform = EvalTransform(image_size, mean, std, interpolation)
    stats = BadDataStats()
    images, captions, labels, keys = [], [], [], []
    for url in urls:
        for sample in read_shard(url, stats, shard_retries):
            decoded = decode_sample(sample, caption_key, stats, label_key=label_key)
            if decoded is None:
                continue
            image, caption, label = decoded
            images.append(transform(image))
            captions.append(caption)
            labels.append(label)
            keys.append(sample["__key__"])
            if len(images) == max_samples:
                break
        if len(images) == max_samples:
            break
    if not images:
        raise DataQualityError(f"no readable held-out sample in {len(urls)} shards; bad by kind {dict(stats.bad)}")
    input_ids, attention_mask = tokenize(tokenizer, captions, context_length)
    return EvalSet(
        images=torch.from_numpy(np.stack([i.numpy() for i in images])),  # see webdataset.py
        input_ids=input_ids,
        attention_mask=attention_mask,
        labels=torch.tensor(labels, dtype=torch.int64),
        classnames=classnames if classnames is not None else _sidecar_lines(urls, "classnames.txt"),
        templates=templates if templates is not None else _sidecar_lines(urls, "templates.txt"),
        keys=keys,
        captions=captions,
        bad={kind: count for kind, count in stats.bad.items() if count},
    )


@dataclass
class EvalBatch:
    """A batch of an eval set's samples, preprocessed and tokenised (``iter_eval_batches``)."""

    indices: torch.Tensor
    """int64 [B]: each sample's position in the set's reading order."""
    images: torch.Tensor
    """float32 [B, 3, H, W], normalised."""
    labels: torch.Tensor
    """int64 [B], -1 where a sample has none."""
    input_ids: torch.Tensor
    """int64 [T, L]: every caption of the batch (T = 0 for a classification set)."""
    attention_mask: torch.Tensor
    """int64 [T, L]."""
    caption_owner: torch.Tensor
    """int64 [T]: the position in the batch of each caption's image."""


def _stacked(transform: EvalTransform, images: list) -> torch.Tensor:
    """[B, 3, H, W] filled image by image: no second copy of the batch as a list of tensors."""
    out = torch.empty(len(images), 3, transform.image_size, transform.image_size)
    for row, image in enumerate(images):
        out[row] = transform(image)
        images[row] = None  # the decoded PIL image is no longer needed
    return out


def iter_eval_batches(
    source: EvalSource,
    tokenizer: PreTrainedTokenizerBase,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    context_length: int,
    *,
    batch_size: int,
    stats: BadDataStats,
    rank: int = 0,
    world_size: int = 1,
    max_samples: int = 0,
    interpolation: str = "bicubic",
) -> Iterator[EvalBatch]:
    """This rank's share of ``source`` (see ``iter_eval_samples``) in batches of ``batch_size``:
    at most one batch of images is held at a time. Images go through ``EvalTransform`` (shorter
    side resized with ``interpolation``, centre crop)."""
    transform = EvalTransform(image_size, mean, std, interpolation)
    samples = iter_eval_samples(source, stats, rank=rank, world_size=world_size, max_samples=max_samples)
    while True:
        chunk = list(itertools.islice(samples, batch_size))
        if not chunk:
            return
        captions = [caption for _, _, texts, _ in chunk for caption in texts]
        owner = [row for row, (_, _, texts, _) in enumerate(chunk) for _ in texts]
        if captions:
            input_ids, attention_mask = tokenize(tokenizer, captions, context_length)
        else:
            input_ids = attention_mask = torch.zeros(0, context_length, dtype=torch.int64)
        indices = torch.tensor([index for index, *_ in chunk], dtype=torch.int64)
        labels = torch.tensor([label for *_, label in chunk], dtype=torch.int64)
        images = [image for _, image, _, _ in chunk]
        # The chunk holds the decoded PIL images too (a batch of 256 at 224 px: 38 MB): dropped now,
        # so that _stacked frees each as it is converted and none is held while the batch is
        # encoded or beside the next chunk. No local keeps the batch past the yield either: its
        # images (154 MB at 256 x 224 px) would otherwise sit beside the next batch's.
        chunk = None
        yield EvalBatch(
            indices=indices,
            images=_stacked(transform, images),
            labels=labels,
            input_ids=input_ids,
            attention_mask=attention_mask,
            caption_owner=torch.tensor(owner, dtype=torch.int64),
        )


def in_memory_batches(eval_set: EvalSet, batch_size: int, max_samples: int = 0) -> Iterator[EvalBatch]:
    """An ``EvalSet`` (or any object with its tensors) as batches, one caption per image."""
    count = len(eval_set.labels) if max_samples <= 0 else min(max_samples, len(eval_set.labels))
    for start in range(0, count, batch_size):
        stop = min(start + batch_size, count)
        yield EvalBatch(
            indices=torch.arange(start, stop),
            images=eval_set.images[start:stop],
            labels=eval_set.labels[start:stop],
            input_ids=eval_set.input_ids[start:stop],
            attention_mask=eval_set.attention_mask[start:stop],
            caption_owner=torch.arange(stop - start),
        )
