"""Features of an eval set, encoded batch by batch on every rank and gathered (features only).

Each rank encodes its own share of the set (``tritower.data.iter_eval_batches``); the ranks step
in lockstep, one image forward and (for retrieval) one text forward per step, because under
ZeRO-3 every forward all-gathers parameters and a rank that stopped early would hang the others:
a rank whose share ran out encodes a one-sample placeholder and drops it. At the end the feature
rows (never images) are gathered to every rank and put in the set's reading order, so the
metrics are the same on any number of ranks. The rows travel as tensors (padded to the longest
share), not pickled objects: pickling made about ten transient copies of them.

Progress: the per-step collective that tells the ranks whether any has a batch left also sums
the images encoded so far, so a ``ProgressReporter`` (passed on the rank that prints) sees the
whole set's count at no extra collective and reports every ``every_s`` seconds: a large set is
not minutes of silence. The reporter takes a callback (the launch layer prints its line).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from tritower.data.eval_set import EvalBatch
from tritower.data.samples import BadDataStats

EncodeImages = Callable[[torch.Tensor], torch.Tensor]
EncodeTexts = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

PROGRESS_EVERY_S = 10.0
"""Seconds between progress lines of a set's encoding (sets shorter than this print none)."""


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


@dataclass(frozen=True)
class EncodeProgress:
    """Where the encoding of one eval set stands (images counted over all ranks)."""

    name: str
    """The set's name as the console shows it."""
    encoded: int
    """Images encoded so far, summed over ranks (unreadable samples are not encoded)."""
    total: int | None
    """Samples the set will read, when known without reading it (``expected_samples``); else None."""
    elapsed_s: float
    """Seconds since the encoding started."""
    done: bool = False
    """True for the last report, after every rank's share is encoded."""

    @property
    def rate(self) -> float:
        """Images per second so far (0 before the first second's worth)."""
        return self.encoded / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def remaining_s(self) -> float | None:
        """Time left at the rate so far, when the set size is known and a rate exists."""
        if self.total is None or self.rate <= 0 or self.done:
            return None
        return max(self.total - self.encoded, 0) / self.rate

    def line(self) -> str:
        """``eval set NAME: 12,288 of 50,000 images encoded (25%), 121 images/s, about 5 min 43 s left``."""
        rate = f"{self.rate:.0f}" if self.rate >= 10 else f"{self.rate:.1f}"
        if self.done:
            return (
                f"eval set {self.name}: {self.encoded:,} images encoded in {_duration(self.elapsed_s)} "
                f"({rate} images/s)"
            )
        count = f"{self.encoded:,}"
        if self.total:
            count += f" of {self.total:,}"
        line = f"eval set {self.name}: {count} images encoded"
        if self.total:
            line += f" ({100 * self.encoded / self.total:.0f}%)"
        line += f", {rate} images/s"
        left = self.remaining_s
        return line + (f", about {_duration(left)} left" if left is not None else "")


class ProgressReporter:
    """Calls ``report`` with an ``EncodeProgress`` at most every ``every_s`` seconds while a set is
    encoded, and once at the end if it reported before (a set done within ``every_s`` stays quiet).

    ``every_s`` 0 reports after every step (tests); ``clock`` is the time source (seconds).
    """

    def __init__(
        self,
        report: Callable[[EncodeProgress], None],
        *,
        name: str,
        total: int | None = None,
        every_s: float = PROGRESS_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.report, self.name, self.total, self.every_s, self.clock = report, name, total, every_s, clock
        self.started = self.last = clock()
        self.reported = 0

    def _emit(self, encoded: int, now: float, done: bool) -> None:
        self.report(EncodeProgress(self.name, encoded, self.total, now - self.started, done))
        self.last, self.reported = now, self.reported + 1

    def update(self, encoded: int) -> None:
        """``encoded`` images (all ranks) are done: report when ``every_s`` has passed since the last."""
        now = self.clock()
        if encoded and now - self.last >= self.every_s:
            self._emit(encoded, now, done=False)

    def finish(self, encoded: int) -> None:
        """Every rank's share is encoded: a closing report when there were reports before."""
        if self.reported:
            self._emit(encoded, self.clock(), done=True)


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


def _any_rank(flag: bool, encoded: int, device: torch.device, distributed: bool) -> tuple[bool, int]:
    """(any rank has a batch left, images encoded so far summed over ranks): one collective."""
    if not distributed:
        return flag, encoded
    # NCCL reduces only CUDA tensors; gloo takes CPU ones: the engine's device fits both. float64
    # counts exactly up to 2^53 images; the flag is a sum too (> 0: some rank has a batch).
    value = torch.tensor([1.0 if flag else 0.0, float(encoded)], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return bool(value[0].item() > 0), int(value[1].item())


def _gather(obj: object, distributed: bool) -> list[object]:
    if not distributed:
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _gather_rows(local: torch.Tensor, device: torch.device, distributed: bool) -> torch.Tensor:
    """Every rank's rows of ``local`` ([n_rank, ...], one trailing shape on all ranks) in rank order.

    Plain tensor collectives: ``all_gather_object`` pickled the features about ten times over
    (88 MB at the end of a 50,000-image set of 64-d features on each rank; 1.4 GB for 1024-d).
    """
    if not distributed:
        return local
    world = dist.get_world_size()
    rows = torch.tensor([local.shape[0]], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(rows) for _ in range(world)]
    dist.all_gather(counts, rows)
    sizes = [int(count.item()) for count in counts]
    if max(sizes) == 0:
        return local
    # all_gather wants one shape from every rank: pad to the longest share, cut after.
    padded = torch.zeros(max(sizes), *local.shape[1:], dtype=local.dtype, device=device)
    padded[: local.shape[0]] = local.to(device)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    padded = None
    return torch.cat([part[:size].cpu() for part, size in zip(parts, sizes)])


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
    progress: ProgressReporter | None = None,
) -> SetFeatures:
    """Encodes this rank's ``batches`` and gathers every rank's features (see the module).

    ``encode_texts`` None skips captions (a set evaluated without retrieval). ``image_shape`` and
    ``context_length`` shape the placeholder of a rank with nothing left. ``stats``: the bad-data
    counters the batches were read with (summed over ranks into ``SetFeatures.bad``).
    ``collective=False``: this process alone, whatever the distributed state (an in-memory set).
    ``progress``: told the images encoded over all ranks after every step (see the module).
    """
    distributed = collective and _distributed()
    iterator = iter(batches)
    indices, images, labels, texts, owners = [], [], [], [], []
    encoded = 0  # this rank's real images so far
    while True:
        batch = next(iterator, None)
        more, everyone = _any_rank(batch is not None, encoded, device, distributed)
        if not more:
            if progress is not None:
                progress.finish(everyone)
            break
        if progress is not None:
            progress.update(everyone)
        real = batch is not None
        pixels = batch.images if real else torch.zeros(1, *image_shape)
        features = encode_images(pixels.to(device=device, dtype=dtype)).float().cpu()
        if real:
            encoded += len(batch.indices)
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
    if distributed:  # a rank that had no image has no width of its own
        agreed = torch.tensor([width], dtype=torch.int64, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        width = int(agreed.item())

    def gather(rows: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
        return _gather_rows(torch.cat(rows) if rows else empty, device, distributed)

    sample_index = gather(indices, torch.zeros(0, dtype=torch.int64))
    image = gather(images, torch.zeros(0, width))
    label = gather(labels, torch.zeros(0, dtype=torch.int64))
    text = gather(texts, torch.zeros(0, width))
    owner = gather(owners, torch.zeros(0, dtype=torch.int64))
    # The counters are a few numbers: pickled.
    parts = _gather({"good": stats.good, "bad": dict(stats.bad)} if stats is not None else {}, distributed)
    order = torch.argsort(sample_index)
    sorted_index = sample_index[order]
    text_order = torch.argsort(owner, stable=True)
    bad: Counter = Counter()
    for part in parts:
        bad.update(part.get("bad", {}))
    return SetFeatures(
        image=image[order],
        labels=label[order],
        text=text[text_order] if width else torch.zeros(0, 0),
        caption_to_image=torch.searchsorted(sorted_index, owner[text_order]),
        good=sum(int(part.get("good", 0)) for part in parts),
        bad={kind: count for kind, count in bad.items() if count},
    )
