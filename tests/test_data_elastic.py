"""The world-size-free global sample order (``data/elastic.py``): a stream laid out for 4 data
ranks gives the same global batches, and resumes onto the same next ones, on 4, 2 or 1 ranks.

The reference is the stream as 4 ranks read it (4 plain ``TrainLoader`` s, the global batch their
batches in rank order); every split mode, with and without worker processes and shuffle buffers.
Run: ``pytest tests/test_data_elastic.py -q``
"""

from __future__ import annotations

import json

import pytest
import torch
from test_data_loader import MEAN, STD, make_loader, take, write_dataset

from tritower.data.config import DataConfig
from tritower.data.elastic import build_rank_loader, check_data_ranks, data_rank_states
from tritower.data.tokenizer import build_tokenizer, write_vocab

DATA_RANKS, GLOBAL_BATCH = 4, 8
MODES = [
    dict(resampled=False, num_workers=0),
    dict(resampled=False, num_workers=2),
    dict(resampled=True, num_workers=2),
    dict(resampled=True, num_workers=0, samples_per_epoch=24),
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    write_vocab(vocab, ["sample", "json"])
    return build_tokenizer(vocab)


def rank_loader(shards, tokenizer, mode, rank: int, world: int):
    config = DataConfig(shuffle_buffer=16, shard_retries=0, **mode)
    return build_rank_loader(
        cfg=config, data_ranks=DATA_RANKS, rank=rank, world_size=world, per_rank_batch=GLOBAL_BATCH // world,
        shards=shards, tokenizer=tokenizer, image_size=8, mean=MEAN, std=STD, context_length=8, seed=0,
    )  # fmt: skip


def global_batches(per_rank: list[list[dict]]) -> list[dict]:
    """Step -> the global batch: every rank's batch of that step, rank order."""
    return [
        {"key": [key for batch in step for key in batch["key"]], "image": torch.cat([batch["image"] for batch in step])}
        for step in zip(*per_rank)
    ]


@pytest.mark.parametrize("mode", MODES)
def test_the_global_batch_is_the_same_on_4_2_and_1_ranks(tmp_path, tokenizer, mode) -> None:
    shards = write_dataset(tmp_path, "d", shards=8, per_shard=6)
    steps = 10  # past the first epoch (48 samples, 8 a step)
    reference = global_batches([
        take(make_loader(shards, tokenizer, rank=r, world=DATA_RANKS, batch=GLOBAL_BATCH // DATA_RANKS,
                         shuffle_buffer=16, **mode), steps)  # fmt: skip
        for r in range(DATA_RANKS)
    ])  # fmt: skip
    for world in (2, 1):
        got = global_batches([take(rank_loader(shards, tokenizer, mode, r, world), steps) for r in range(world)])
        for step, (a, b) in enumerate(zip(got, reference, strict=True)):
            assert a["key"] == b["key"], (world, step)
            assert torch.equal(a["image"], b["image"]), (world, step)


@pytest.mark.parametrize("mode", MODES)
def test_a_position_saved_on_2_ranks_resumes_on_1_and_4(tmp_path, tokenizer, mode) -> None:
    shards = write_dataset(tmp_path, "d", shards=8, per_shard=6)
    k, more = 5, 6
    reference = global_batches(
        [take(rank_loader(shards, tokenizer, mode, r, 2), k + more) for r in range(2)]  # the uninterrupted run
    )
    first = [rank_loader(shards, tokenizer, mode, r, 2) for r in range(2)]
    for loader in first:
        take(loader, k)
    saved = json.loads(json.dumps(data_rank_states([loader.state_dict() for loader in first])))
    assert [state["rank"] for state in saved] == list(range(DATA_RANKS))  # world-size free: per data rank
    for world in (1, 4):
        resumed = [rank_loader(shards, tokenizer, mode, r, world) for r in range(world)]
        for loader in resumed:
            loader.load_state_dict(saved)
        got = global_batches([take(loader, more) for loader in resumed])
        assert [batch["key"] for batch in got] == [batch["key"] for batch in reference[k:]], world
        for a, b in zip(got, reference[k:]):
            assert torch.equal(a["image"], b["image"])


def test_a_world_size_that_cannot_share_the_data_ranks_is_refused() -> None:
    check_data_ranks(4, 2, 8)
    with pytest.raises(ValueError, match="laid out for 4 data ranks, which 3 ranks cannot share"):
        check_data_ranks(4, 3, 12)
    with pytest.raises(ValueError, match="data.batch_size=6 is not divisible by 4 data ranks"):
        check_data_ranks(4, 2, 6)
