"""The held-out set for zero-shot classification and retrieval, loaded whole into memory.

Held-out sets are small (thousands of pairs), so they are read once, in order, in the calling
process: every rank gets the same tensors and evaluation needs no loader state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

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
) -> EvalSet:
    """Loads held-out shards (resize + centre crop, one tokenised caption per image).

    ``classnames``/``templates`` default to ``classnames.txt``/``templates.txt`` next to the
    shards (the built-in generator writes them). ``max_samples`` > 0 keeps the first ones.
    ``shard_retries``: extra tries of a remote shard that fails at once (see ``read_shard``).
    """
    sources = resolve_sources(shards)
    check_local_shards(sources)
    urls = [url for source in sources for url in source.urls]
    transform = EvalTransform(image_size, mean, std)
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
