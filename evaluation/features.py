"""Features of an eval set, encoded batch by batch on every rank and gathered (features only).

Each rank encodes its own share of the set (``tritower.data.iter_eval_batches``); the ranks step
in lockstep, one image forward and (for retrieval) one text forward per step, because under
ZeRO-3 every forward all-gathers parameters and a rank that stopped early would hang the others:
a rank whose share ran out encodes a one-sample placeholder and drops it. At the end the feature
rows (never images) are gathered to every rank and put in the set's reading order, so the
metrics are the same on any number of ranks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tritower.data.eval_set import EvalBatch
from tritower.data.samples import BadDataStats

EncodeImages = Callable[[torch.Tensor], torch.Tensor]
EncodeTexts = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class SetFeatures:
    """An eval set's features in reading order."""

    image: torch.Tensor
    """float32 [N, D] (whatever width the image encoder returns)."""
    labels: torch.Tensor
    """int64 [N], -1 = unlabelled."""
    text: torch.Tensor
    """float32 [M, D]: every caption (M = 0 without text)."""
    caption_to_image: torch.Tensor
    """int64 [M]: row in ``image`` of each caption's image."""
    good: int = 0
    bad: dict[str, int] = field(default_factory=dict)
    """Unreadable samples by kind, summed over ranks."""


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _any_rank(flag: bool, device: torch.device, distributed: bool) -> bool:
    if not distributed:
        return flag
    # NCCL reduces only CUDA tensors; gloo takes CPU ones: the engine's device fits both.
    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _gather(obj: object, distributed: bool) -> list[object]:
    if not distributed:
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def encode_set(
    batches: Iterable[EvalBatch],
    encode_images: EncodeImages,
    encode_texts: EncodeTexts | None,
    *,
    image_shape: tuple[int, int, int],
    context_length: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    stats: BadDataStats | None = None,
    collective: bool = True,
) -> SetFeatures:
    """Encodes this rank's ``batches`` and gathers every rank's features (see the module).

    ``encode_texts`` None skips captions (a set evaluated without retrieval). ``image_shape`` and
    ``context_length`` shape the placeholder of a rank with nothing left. ``stats``: the bad-data
    counters the batches were read with (summed over ranks into ``SetFeatures.bad``).
    ``collective=False``: this process alone, whatever the distributed state (an in-memory set).
    """
    distributed = collective and _distributed()
    iterator = iter(batches)
    indices, images, labels, texts, owners = [], [], [], [], []
    while True:
        batch = next(iterator, None)
        if not _any_rank(batch is not None, device, distributed):
            break
        real = batch is not None
        pixels = batch.images if real else torch.zeros(1, *image_shape)
        features = encode_images(pixels.to(device=device, dtype=dtype)).float().cpu()
        if real:
            indices.append(batch.indices)
            images.append(features)
            labels.append(batch.labels)
        if encode_texts is None:
            batch = pixels = None
            continue
        if real and len(batch.input_ids):
            ids, mask = batch.input_ids, batch.attention_mask
        else:
            ids = torch.zeros(1, context_length, dtype=torch.int64)
            mask = torch.zeros(1, context_length, dtype=torch.int64)
            mask[:, 0] = 1
        text = encode_texts(ids.to(device), mask.to(device)).float().cpu()
        if real and len(batch.input_ids):
            texts.append(text)
            owners.append(batch.indices[batch.caption_owner])  # global sample index of each caption
        # Drop this batch's images before the next is read: one batch of images held, not two.
        batch = pixels = None
    width = images[0].shape[1] if images else 0
    local = {
        "indices": torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64),
        "image": torch.cat(images) if images else torch.zeros(0, width),
        "labels": torch.cat(labels) if labels else torch.zeros(0, dtype=torch.int64),
        "text": torch.cat(texts) if texts else torch.zeros(0, width),
        "owner": torch.cat(owners) if owners else torch.zeros(0, dtype=torch.int64),
        "good": stats.good if stats is not None else 0,
        "bad": dict(stats.bad) if stats is not None else {},
    }
    parts = _gather(local, distributed)
    widths = {p["image"].shape[1] for p in parts if len(p["image"])}
    width = widths.pop() if widths else 0
    sample_index = torch.cat([p["indices"] for p in parts])
    order = torch.argsort(sample_index)
    sorted_index = sample_index[order]
    owner = torch.cat([p["owner"] for p in parts])
    text = torch.cat([p["text"].reshape(-1, width) for p in parts]) if width else torch.zeros(0, 0)
    text_order = torch.argsort(owner, stable=True)
    bad: Counter = Counter()
    for part in parts:
        bad.update(part["bad"])
    return SetFeatures(
        image=torch.cat([p["image"].reshape(-1, width) for p in parts])[order],
        labels=torch.cat([p["labels"] for p in parts])[order],
        text=text[text_order],
        caption_to_image=torch.searchsorted(sorted_index, owner[text_order]),
        good=sum(int(p["good"]) for p in parts),
        bad={kind: count for kind, count in bad.items() if count},
    )
