"""A world-size-free global sample order: the stream laid out for ``data_ranks`` data ranks,
read by any number of ranks that divides it.

The training stream of ``TrainLoader`` is a pure function of ``(seed, epoch, slot)`` with
``slot = rank * workers + worker``. Fixing the number of *data ranks* (the ranks the stream is laid
out for) therefore fixes the global batch of every step: global step ``s`` holds the ``s``-th
batch of every data rank, data rank 0 first. A run on ``world_size`` ranks, with ``world_size``
dividing ``data_ranks``, gives rank ``r`` the data ranks ``r*k .. r*k+k-1`` (``k = data_ranks /
world_size``) and concatenates their batches in that order: gathered in rank order, the global
batch is the same samples in the same order whatever the world size. The data position is the
list of the data ranks' positions, which no world size enters.

Hand-written because no loader library here keeps its order over a change of world size with
in-worker shuffle buffers (webdataset's order is per rank and per worker).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from .samples import BadDataStats
from .webdataset import TrainLoader


class ElasticLoader:
    """One rank's batches as the concatenation of several data ranks' ``TrainLoader`` batches;
    the same interface as ``TrainLoader`` (iteration, ``stats``, ``epoch``, ``state_dict``,
    ``load_state_dict``)."""

    def __init__(self, loaders: list[TrainLoader]) -> None:
        self.loaders = loaders

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for parts in zip(*(iter(loader) for loader in self.loaders)):
            batch: dict[str, Any] = {}
            for name, first in parts[0].items():
                if isinstance(first, torch.Tensor):
                    batch[name] = torch.cat([part[name] for part in parts])  # [k * b, ...]
                else:
                    batch[name] = [value for part in parts for value in part[name]]
            yield batch

    def stats(self) -> BadDataStats:
        return BadDataStats.merged([loader.stats().as_dict() for loader in self.loaders])

    def epoch(self) -> float:
        return sum(loader.epoch() for loader in self.loaders) / len(self.loaders)

    def state_dict(self) -> list[dict[str, Any]]:
        """The data positions of this rank's data ranks (each dict names its data rank)."""
        return [loader.state_dict() for loader in self.loaders]

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        """Continues exactly after ``state``: the list of all data ranks' positions."""
        for loader in self.loaders:
            loader.load_state_dict(state)


def data_rank_states(per_rank: list[dict | list[dict]]) -> list[dict]:
    """Every data rank's position, data rank order, from what each rank's loader saved (a dict
    for a ``TrainLoader``, a list for an ``ElasticLoader``)."""
    flat = [state for item in per_rank for state in (item if isinstance(item, list) else [item])]
    return sorted(flat, key=lambda state: state["rank"])


def check_data_ranks(data_ranks: int, world_size: int, batch_size: int) -> None:
    """ValueError naming the fix unless ``world_size`` ranks can read a stream laid out for
    ``data_ranks`` data ranks with global batch ``batch_size``."""
    if data_ranks % world_size:
        raise ValueError(
            f"the data stream is laid out for {data_ranks} data ranks, which {world_size} ranks cannot share "
            f"evenly: resume on a world size that divides {data_ranks}, or start runs meant to change size "
            "with --data.data_ranks set to a multiple of every world size they may get (e.g. 12 for 1, 2, 3, 4, 6)"
        )
    if batch_size % data_ranks:
        raise ValueError(f"data.batch_size={batch_size} is not divisible by {data_ranks} data ranks")


def build_rank_loader(*, data_ranks: int, rank: int, world_size: int, per_rank_batch: int,
                      **kwargs: Any) -> TrainLoader | ElasticLoader:  # fmt: skip
    """This rank's loader over a stream laid out for ``data_ranks`` data ranks: today's
    ``TrainLoader`` when they are the world size, else an ``ElasticLoader`` over this rank's
    ``data_ranks / world_size`` data ranks (``kwargs``: those of ``build_train_loader``)."""
    from .webdataset import build_train_loader

    if data_ranks == world_size:
        return build_train_loader(rank=rank, world_size=world_size, per_rank_batch=per_rank_batch, **kwargs)
    share = data_ranks // world_size
    return ElasticLoader(
        [
            build_train_loader(
                rank=rank * share + i, world_size=data_ranks, per_rank_batch=per_rank_batch // share, **kwargs
            )  # fmt: skip
            for i in range(share)
        ]
    )
