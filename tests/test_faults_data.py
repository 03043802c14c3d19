"""Truncated shards are counted as ``truncated`` with the samples they lost.

Shards are written with webdataset's ``ShardWriter`` (as img2dataset does) and cut: at a member
boundary without the end-of-archive blocks (tarfile ends such a stream silently), inside a
header, inside a member. With a ``sizes.json`` the loss is known exactly; without one each
truncated shard counts 1. Every split mode reads through the same reader.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image

from tritower.data.config import DataConfig
from tritower.data.samples import BadDataStats, read_shard
from tritower.data.tokenizer import build_tokenizer, write_vocab
from tritower.data.webdataset import build_train_loader

PER_SHARD = 10


def _png(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (index * 20 % 256, 40, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_shards(folder: Path, shards: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=PER_SHARD, verbose=0) as sink:
        for i in range(shards * PER_SHARD):
            sink.write({"__key__": f"s{i:05d}", "png": _png(i), "txt": f"sample {i}".encode()})
    paths = sorted(folder.glob("*.tar"))
    (folder / "sizes.json").write_text(json.dumps({p.name: PER_SHARD for p in paths}))
    return paths


def _member_offsets(path: Path) -> list[tuple[str, int, int]]:
    """(name, header offset, data offset) of each member."""
    with tarfile.open(path) as tar:
        return [(m.name, m.offset, m.offset_data) for m in tar]


def _cut(path: Path, where: str) -> int:
    """Truncate ``path``; returns how many samples a reader can still keep (complete, followed by
    the start of the next one)."""
    members = _member_offsets(path)  # two members per sample: png, txt
    data = path.read_bytes()
    if where == "sample_boundary":  # 4 samples' members, then the stream just stops
        path.write_bytes(data[: members[8][1]])
        return 3  # the 4th is dropped: nothing shows it was complete
    if where == "mid_sample_boundary":  # between the png and the txt of sample 4
        path.write_bytes(data[: members[7][1]])
        return 3
    if where == "inside_header":
        path.write_bytes(data[: members[8][1] + 100])
        return 3
    if where == "inside_member":
        path.write_bytes(data[: members[8][2] + 10])
        return 3
    if where == "no_end_blocks":  # every member there, the 1024 zero bytes missing
        end = len(data)
        while data[end - 512 : end] == bytes(512):
            end -= 512
        path.write_bytes(data[:end])
        return PER_SHARD - 1
    raise ValueError(where)


CUTS = ["sample_boundary", "mid_sample_boundary", "inside_header", "inside_member", "no_end_blocks"]


@pytest.mark.parametrize("where", CUTS)
@pytest.mark.parametrize("with_sizes", [True, False])
def test_a_cut_shard_is_counted_truncated_with_the_samples_it_lost(
    tmp_path: Path, where: str, with_sizes: bool
) -> None:
    (path,) = _write_shards(tmp_path, 1)
    kept = _cut(path, where)
    stats = BadDataStats()
    samples = list(read_shard(str(path), stats, expected=PER_SHARD if with_sizes else None))
    assert len(samples) == kept and all({"png", "txt"} <= set(s) for s in samples)
    assert dict(stats.bad) == {"truncated": PER_SHARD - kept if with_sizes else 1}


def test_an_intact_shard_counts_nothing(tmp_path: Path) -> None:
    (path,) = _write_shards(tmp_path, 1)
    stats = BadDataStats()
    assert len(list(read_shard(str(path), stats, expected=PER_SHARD))) == PER_SHARD
    assert not stats.bad


@pytest.mark.parametrize(
    "mode", [{"resampled": False}, {"resampled": True}, {"resampled": True, "samples_per_epoch": 40}]
)
def test_every_split_mode_counts_the_truncated_shard(tmp_path: Path, mode: dict) -> None:
    paths = _write_shards(tmp_path / "shards", 4)
    kept = _cut(paths[1], "sample_boundary")
    vocab = tmp_path / "vocab.txt"
    write_vocab(vocab, ["sample"])
    config = DataConfig(shuffle_buffer=8, num_workers=0, shard_retries=0, max_bad_fraction=0.9, **mode)
    loader = build_train_loader(
        config, shards=[str(p) for p in paths], tokenizer=build_tokenizer(vocab), image_size=8,
        mean=(0.5,) * 3, std=(0.5,) * 3, context_length=8, rank=0, world_size=1, per_rank_batch=4, seed=0,
    )  # fmt: skip
    batches = iter(loader)
    for _ in range(40):  # several epochs: every mode reads the cut shard at least once
        next(batches)
    bad = loader.stats().bad
    assert set(bad) == {"truncated"}, dict(bad)
    lost = PER_SHARD - kept
    assert bad["truncated"] >= lost and bad["truncated"] % lost == 0, dict(bad)
    assert loader.stats().bad_by_shard == {str(paths[1]): bad["truncated"]}
