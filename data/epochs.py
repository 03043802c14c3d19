"""What one worker reads in one epoch: its shards, the mixing of sources, the shuffle buffer.

Everything here is a pure function of ``(seed, epoch, slot)`` (``slot = rank * workers +
worker``), which is what makes a worker's stream reproducible and a resume exact.

* Without resampling, ``epoch_shards`` permutes the whole shard list with ``(seed, epoch)`` and
  deals it out over the slots (balanced by sample count when ``sizes.json`` gives them):
  disjoint over slots, all of them covered.
* With resampling, ``mixed_samples`` mixes the sources *per sample*: each source is an endless
  stream over its shards drawn with replacement, and every sample comes from source ``i`` with
  probability ``w_i / sum(w)``, whatever the sources' shard sizes.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterator
from typing import Any

from .samples import DataQualityError
from .shards import ShardSource

Sample = dict[str, Any]


def shuffled(items: Iterator[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """Buffer shuffle: emit a random element of a ``bufsize`` buffer per incoming one."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < bufsize:
            buffer.append(item)
            continue
        index = rng.randrange(bufsize)
        buffer[index], item = item, buffer[index]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def epoch_shards(
    urls: list[str],
    seed: int,
    epoch: int,
    slot: int,
    slots: int,
    sizes: dict[str, int] | None = None,
) -> list[str]:
    """Non-resampled mode: the shards slot ``slot`` of ``slots`` reads in ``epoch``.

    Unknown sizes: round robin over the permuted list, ``order[slot::slots]``. Known sizes:
    largest shard first (ties in permuted order) to the slot with the fewest samples so far,
    which keeps the slots' shares within one shard of each other so the workers' epochs stay
    aligned; a slot then reads its shards in permuted order.
    """
    order = list(urls)
    random.Random(f"{seed}/order/{epoch}").shuffle(order)
    if sizes is None:
        return order[slot::slots]
    heap, mine = [(0, s) for s in range(slots)], set()  # (samples so far, slot): a min-heap
    # Positions, not URLs, so that a shard listed twice is dealt twice.
    for position in sorted(range(len(order)), key=lambda i: -sizes[order[i]]):  # stable sort
        load, target = heapq.heappop(heap)
        heapq.heappush(heap, (load + sizes[order[position]], target))
        if target == slot:
            mine.add(position)
    return [url for position, url in enumerate(order) if position in mine]


class ShardBudget:
    """Shard draws left in a worker-epoch, shared by the sources' streams."""

    def __init__(self, draws: int | None) -> None:
        self.left = draws
        """None: unlimited (the epoch is a sample count instead)."""

    def take(self) -> bool:
        if self.left is None:
            return True
        if self.left <= 0:
            return False
        self.left -= 1
        return True


def _source_samples(
    source: ShardSource,
    rng: random.Random,
    budget: ShardBudget,
    read: Callable[[str], Iterator[Sample]],
    where: str,
) -> Iterator[Sample]:
    """Samples of shards drawn uniformly with replacement from one source, while budget lasts.

    Raises instead of drawing forever when nothing but unreadable shards comes out.
    """
    empty_streak = 0
    while budget.take():
        empty_streak += 1
        for sample in read(rng.choice(source.urls)):
            empty_streak = 0
            yield sample
        if empty_streak > 3 * len(source.urls) + 10:  # never by chance unless most are bad
            raise DataQualityError(
                f"{where}: {empty_streak} shard draws in a row from a source of "
                f"{len(source.urls)} shards (e.g. {source.urls[0]}) yielded no sample"
            )


def mixed_samples(
    sources: list[ShardSource],
    seed: int,
    epoch: int,
    slot: int,
    shard_draws: int | None,
    read: Callable[[str], Iterator[Sample]],
) -> Iterator[Sample]:
    """Resampled mode: one worker-epoch of samples, mixed over sources by weight per sample.

    ``shard_draws`` bounds the shards opened in the epoch (None: no bound, the caller cuts the
    stream at a sample count). A source whose stream ends (budget spent) drops out of the mix;
    the epoch ends when all have.
    """
    budget = ShardBudget(shard_draws)
    where = f"slot {slot} epoch {epoch}"
    streams = [
        _source_samples(source, random.Random(f"{seed}/draw/{epoch}/{slot}/{i}"), budget, read, where)  # fmt: skip
        for i, source in enumerate(sources)
    ]
    weights = [source.weight for source in sources]
    rng = random.Random(f"{seed}/mix/{epoch}/{slot}")
    while streams:
        pick = rng.choices(range(len(streams)), weights=weights)[0] if len(streams) > 1 else 0
        sample = next(streams[pick], None)
        if sample is None:
            del streams[pick], weights[pick]
            continue
        yield sample
