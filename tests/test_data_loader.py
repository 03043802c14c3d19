"""The shard loader at scale: splitting, exact resume, bad data, shard specs, mixing.

All on tiny synthetic shards (8 px images) so that the whole file runs in seconds on 2 cores.
Run: ``pytest tests/test_data_loader.py -q``
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import signal
import tarfile
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from tritower.data.config import DataConfig
from tritower.data.samples import DataQualityError
from tritower.data.shards import expand_shards, resolve_sources
from tritower.data.tokenizer import build_tokenizer, write_vocab
from tritower.data.webdataset import TrainLoader, build_train_loader, load_eval_set

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def image_bytes(index: int, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (index * 7 % 256, index * 13 % 256, 50)).save(buffer, format=fmt)
    return buffer.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, payload in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return path


def good_sample(key: str, index: int, fmt: str = "jpg") -> tuple[str, dict[str, bytes]]:
    pil_format = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[fmt]
    return key, {
        fmt: image_bytes(index, pil_format),
        "txt": f"sample {key}".encode(),
        "json": json.dumps({"caption": f"json {key}", "label": index % 3}).encode(),
    }


def write_dataset(folder: Path, prefix: str, shards: int, per_shard: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(shards):
        samples = [good_sample(f"{prefix}{s:02d}_{i:03d}", s * per_shard + i) for i in range(per_shard)]
        paths.append(str(write_tar(folder / f"{prefix}-{s:02d}.tar", samples)))
    return paths


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    write_vocab(vocab, ["sample", "json"])
    return build_tokenizer(vocab)


def make_loader(shards, tokenizer, *, rank=0, world=1, batch=4, seed=0, **cfg) -> TrainLoader:
    """A loader over 8 px images and 8-token captions; ``cfg`` overrides DataConfig fields."""
    config = DataConfig(**{"shuffle_buffer": 16, "num_workers": 0, "shard_retries": 0, **cfg})
    return build_train_loader(
        config, shards=shards, tokenizer=tokenizer, image_size=8, mean=MEAN, std=STD,
        context_length=8, rank=rank, world_size=world, per_rank_batch=batch, seed=seed,
    )  # fmt: skip


def take(loader, n: int) -> list[dict]:
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


def keys_of(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


def test_two_ranks_two_workers_see_each_sample_once_per_epoch(tmp_path, tokenizer) -> None:
    shards = write_dataset(tmp_path, "d", shards=8, per_shard=12)  # 96 samples
    # Per rank and epoch: 48 samples = 12 batches of 4 (2 workers x 2 shards x 12 samples).
    per_rank = [keys_of(take(make_loader(shards, tokenizer, rank=r, world=2, num_workers=2,
                                         resampled=False), 24)) for r in range(2)]  # fmt: skip
    epochs = [per_rank[0][:48] + per_rank[1][:48], per_rank[0][48:] + per_rank[1][48:]]
    for keys in epochs:
        assert len(keys) == 96 and len(set(keys)) == 96
    assert epochs[0] != epochs[1]  # reshuffled between epochs


def test_sizes_json_balances_unequal_shards_over_ranks(tmp_path, tokenizer) -> None:
    from tritower.data.epochs import epoch_shards

    shards = write_dataset(tmp_path, "big", shards=1, per_shard=12)
    shards += write_dataset(tmp_path, "small", shards=3, per_shard=4)
    sizes = {Path(p).name: 12 if "big" in p else 4 for p in shards}
    (tmp_path / "sizes.json").write_text(json.dumps(sizes))
    for epoch in range(5):  # every epoch: 12 samples per rank, each shard once
        parts = [epoch_shards(shards, 0, epoch, slot, 2, {p: sizes[Path(p).name] for p in shards})
                 for slot in range(2)]  # fmt: skip
        assert sorted(parts[0] + parts[1]) == sorted(shards)
        assert [sum(sizes[Path(p).name] for p in part) for part in parts] == [12, 12]
    # Through the loader: 2 ranks x 3 batches of 4 = every sample exactly once per epoch.
    keys = [k for r in range(2) for k in keys_of(take(make_loader(
        shards, tokenizer, rank=r, world=2, resampled=False), 3))]  # fmt: skip
    assert len(keys) == 24 and len(set(keys)) == 24


def test_too_few_shards_for_ranks_x_workers(tmp_path, tokenizer) -> None:
    shards = write_dataset(tmp_path, "d", shards=3, per_shard=4)
    with pytest.raises(ValueError, match="3 shards for 2 ranks x 2 workers"):
        make_loader(shards, tokenizer, world=2, num_workers=2, resampled=False)
    with pytest.warns(UserWarning, match="do not divide"):
        make_loader(shards, tokenizer, world=2, num_workers=0, resampled=False)
    with pytest.warns(UserWarning, match="duplicate samples"):
        make_loader(shards, tokenizer, world=2, num_workers=2, resampled=True)


@pytest.mark.parametrize("resampled,workers,k", [(False, 2, 5), (True, 2, 6), (False, 0, 7)])
def test_resume_sees_exactly_the_remaining_batches(tmp_path, tokenizer, resampled, workers, k):
    shards = write_dataset(tmp_path, "d", shards=4, per_shard=10)
    options = dict(resampled=resampled, num_workers=workers, world=2, rank=1)
    uninterrupted = take(make_loader(shards, tokenizer, **options), k + 12)  # crosses epochs
    first = make_loader(shards, tokenizer, **options)
    take(first, k)
    state = json.loads(json.dumps(first.state_dict()))  # must survive serialisation
    resumed = make_loader(shards, tokenizer, **options)
    resumed.load_state_dict([{**state, "rank": 0}, state])  # list of all ranks' states
    rest = take(resumed, 12)
    assert keys_of(rest) == keys_of(uninterrupted[k:])
    for a, b in zip(rest, uninterrupted[k:]):
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["input_ids"], b["input_ids"])
    assert resumed.state_dict()["batches"] == k + 12


def test_resume_refuses_other_settings(tmp_path, tokenizer) -> None:
    shards = write_dataset(tmp_path, "d", shards=4, per_shard=4)
    loader = make_loader(shards, tokenizer)
    take(loader, 1)
    with pytest.raises(ValueError, match="cannot resume exactly"):
        make_loader(shards, tokenizer, num_workers=2).load_state_dict(loader.state_dict())
    with pytest.raises(ValueError, match="cannot resume exactly"):
        make_loader(shards[:3], tokenizer).load_state_dict(loader.state_dict())
    # A second iter() continues after the last consumed batch, without a checkpoint.
    again = make_loader(shards, tokenizer)
    assert keys_of(take(loader, 2)) == keys_of(take(again, 3)[1:])
    # num_workers 0 and 1 both run one logical worker: the position carries over.
    make_loader(shards, tokenizer, num_workers=1).load_state_dict(loader.state_dict())


def faulty_shards(folder: Path) -> tuple[list[str], int]:
    """Shards with one fault of each kind; returns (paths, number of good samples)."""
    folder.mkdir(parents=True, exist_ok=True)
    good = [good_sample(f"g{i:02d}", i) for i in range(10)]
    broken_jpg = ("bad_image", {"jpg": image_bytes(1)[:40], "txt": b"sample x"})
    empty_caption = ("bad_empty", {"jpg": image_bytes(2), "txt": b"  \n"})
    latin1_caption = ("bad_latin1", {"jpg": image_bytes(3), "txt": "caf\xe9".encode("latin-1")})
    no_caption = ("bad_nocap", {"jpg": image_bytes(4), "json": b"{}"})
    no_image = ("bad_noimg", {"txt": b"sample y"})
    mixed = write_tar(folder / "mixed.tar", [broken_jpg, empty_caption, latin1_caption,
                                             no_caption, no_image] + good[:5])  # fmt: skip
    # Truncated: cut inside the image data of the 5th sample (g09). g05-g07 survive; g08 is
    # dropped with the break: a sample counts as complete only once the next one starts.
    whole = write_tar(folder / "whole.tar", good[5:10]).read_bytes()
    with tarfile.open(folder / "whole.tar") as tar:
        cut = tar.getmember("g09.jpg").offset_data + 10
    truncated = folder / "truncated.tar"
    truncated.write_bytes(whole[:cut])
    garbage = folder / "garbage.tar"
    garbage.write_bytes(b"this is not a tar file" * 100)
    missing = folder / "missing.tar"
    failing = f"pipe:cat {folder / 'absent.tar'}"  # the command fails: no such file
    return [str(mixed), str(truncated), str(garbage), str(missing), failing], 5 + 3


@pytest.mark.launch  # faulty_shards has a pipe: shard, a process
@pytest.mark.filterwarnings("ignore:.*local shards do not exist")
def test_faults_are_skipped_and_counted_by_kind(tmp_path, tokenizer) -> None:
    shards, good = faulty_shards(tmp_path)
    with pytest.warns(UserWarning, match="1 of 4 local shards do not exist"):
        make_loader(shards, tokenizer, resampled=False)
    # The last good sample of the epoch must come after every fault, so that the counters
    # are complete when it is handed out: pick a seed whose shard order ends with the two
    # shards holding good samples (mixed.tar has its faults first).
    for seed in range(100):
        loader = make_loader(shards, tokenizer, resampled=False, batch=2, shuffle_buffer=1,
                             seed=seed)  # fmt: skip
        if set(loader.stream.epoch_shards(0, 0)[-2:]) == set(shards[:2]):
            break
    batches = take(loader, good // 2)  # exactly one epoch of good samples
    assert sorted(keys_of(batches)) == [f"g{i:02d}" for i in range(8)]
    stats = loader.stats()
    assert dict(stats.bad) == {"image": 1, "caption": 2, "missing": 2, "shard": 3, "truncated": 1}
    assert stats.good == good and stats.bad_by_shard[shards[0]] == 5
    assert loader.state_dict()["stats"]["bad"]["shard"] == 3


@pytest.mark.launch  # faulty_shards has a pipe: shard, a process
@pytest.mark.filterwarnings("ignore:.*local shards do not exist")
def test_resume_continues_the_bad_data_counts_exactly(tmp_path, tokenizer) -> None:
    shards = faulty_shards(tmp_path / "faulty")[0] + write_dataset(tmp_path, "d", 3, 8)
    options = dict(resampled=False, num_workers=2, batch=2, shuffle_buffer=4)
    uninterrupted_loader = make_loader(shards, tokenizer, **options)
    uninterrupted = take(uninterrupted_loader, 25)  # a bit more than one epoch (16 batches)
    first = make_loader(shards, tokenizer, **options)
    take(first, 7)
    resumed = make_loader(shards, tokenizer, **options)
    resumed.load_state_dict(first.state_dict())
    assert keys_of(take(resumed, 18)) == keys_of(uninterrupted[7:])
    expected = uninterrupted_loader.stats()
    assert expected.bad["shard"] > 2  # the unreadable shards were met again in epoch 1
    assert resumed.stats().as_dict() == expected.as_dict()


@pytest.mark.launch  # faulty_shards has a pipe: shard, a process
@pytest.mark.filterwarnings("ignore:.*local shards do not exist")
def test_too_much_bad_data_stops_naming_the_worst_shard(tmp_path, tokenizer) -> None:
    shards, _ = faulty_shards(tmp_path)
    loader = make_loader(shards, tokenizer, resampled=False, batch=2, max_bad_fraction=0.2,
                         bad_check_min_samples=10)  # fmt: skip
    with pytest.raises(DataQualityError, match="mixed.tar"):
        take(loader, 100)


def test_all_bad_data_is_an_error_at_start_not_a_hang(tmp_path, tokenizer) -> None:
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\0\1" * 5000)
    with pytest.raises(DataQualityError, match="no usable sample among the first"):
        make_loader([str(garbage)], tokenizer)
    with pytest.raises(FileNotFoundError, match="none of the 2 local shards"):
        make_loader([str(tmp_path / "a.tar"), str(tmp_path / "b.tar")], tokenizer)
    good = write_dataset(tmp_path, "d", shards=1, per_shard=4)
    with pytest.raises(DataQualityError, match=r"fields present \['jpg', 'json', 'txt'\]"):
        make_loader(good, tokenizer, caption_key="json:title")


def test_worker_without_any_good_sample_stops(tmp_path, tokenizer) -> None:
    # The start-up probe passes (the first shard is good) but one rank's share is garbage
    # in epoch 0: its worker must raise (through the DataLoader), not loop forever.
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(b"\0\1" * 5000)
    shards = write_dataset(tmp_path, "d", shards=1, per_shard=4) + [str(garbage)]
    errors = []
    for rank in range(2):  # rank 0 in a worker process, rank 1 in-process: both paths raise
        loader = make_loader(shards, tokenizer, rank=rank, world=2, resampled=False,
                             num_workers=1 - rank)  # fmt: skip
        try:
            take(loader, 2)
        except DataQualityError as error:
            errors.append(str(error))
    assert len(errors) == 1 and "no readable sample in epoch 0" in errors[0]


@pytest.mark.launch  # a pipe: shard runs its command
def test_shard_specs_brace_list_and_pipe(tmp_path, tokenizer) -> None:
    shards = write_dataset(tmp_path / "data", "d", shards=4, per_shard=3)
    assert expand_shards(str(tmp_path / "data" / "d-{00..03}.tar")) == shards
    listing = tmp_path / "data" / "list.txt"
    lines = ["# shards", "d-{00..01}.tar", "", shards[2], f"pipe:cat {shards[3]}"]
    listing.write_text("\n".join(lines) + "\n")
    urls = expand_shards(str(listing))
    assert urls == shards[:3] + [f"pipe:cat {shards[3]}"]
    loader = make_loader(str(listing), tokenizer, resampled=False, batch=3)
    assert sorted(keys_of(take(loader, 4))) == sorted(f"d{s:02d}_{i:03d}" for s in range(4) for i in range(3))
    assert loader.stats().total_bad == 0


@pytest.mark.launch  # pipe: shards run their command
def test_remote_shard_is_retried_after_a_transient_failure(tmp_path, tokenizer) -> None:
    shard = write_dataset(tmp_path, "d", shards=1, per_shard=4)[0]
    marker = tmp_path / "failed-once"
    # Fails (no output, exit 1) the first time it runs, then streams the shard.
    flaky = f"pipe:bash -c 'if test -e {marker}; then cat {shard}; else touch {marker}; exit 1; fi'"
    loader = make_loader([flaky], tokenizer, shard_retries=1, resampled=False)  # probe retries
    assert marker.exists() and len(keys_of(take(loader, 2))) == 8
    assert loader.stats().total_bad == 0
    marker.unlink()
    loader = make_loader([shard, flaky], tokenizer, resampled=False, shuffle_buffer=1, batch=2)
    batches = take(loader, 2)  # no retries: the flaky shard counts once, the other is read
    assert len(keys_of(batches)) == 4 and dict(loader.stats().bad) == {"shard": 1}


def test_image_formats_and_json_captions(tmp_path, tokenizer) -> None:
    samples = [good_sample(f"{fmt}{i}", i, fmt) for i, fmt in enumerate(["jpg", "png", "webp"])]
    shard = str(write_tar(tmp_path / "formats.tar", samples))
    batch = take(make_loader([shard], tokenizer, caption_key="json:caption", batch=3), 1)[0]
    assert sorted(batch["key"]) == ["jpg0", "png1", "webp2"]
    assert batch["image"].shape == (3, 3, 8, 8) and batch["label"].tolist() != [-1] * 3
    decoded = [tokenizer.decode(ids, skip_special_tokens=True) for ids in batch["input_ids"]]
    words = {caption.split()[0] for caption in decoded}
    assert words == {"json"}
    evalset = load_eval_set([shard], tokenizer, 8, MEAN, STD, 8, caption_key="json:caption")
    assert evalset.captions == ["json jpg0", "json png1", "json webp2"]
    assert evalset.labels.tolist() == [0, 1, 2] and evalset.classnames == []


def test_class_labels_from_a_cls_field_or_a_json_path(tmp_path, tokenizer) -> None:
    """Companion labels: webdataset's ``cls`` text field, a nested json field, or none."""
    samples = []
    for i, label in enumerate([b"4", b" 17\n", b"not a number"]):
        key, files = good_sample(f"s{i}", i)
        files["cls"] = label
        files["json"] = json.dumps({"meta": {"class": 10 + i}, "label": True}).encode()
        samples.append((key, files))
    samples.append(good_sample("s3", 3))  # no cls field, json label 0, no meta
    shard = str(write_tar(tmp_path / "labels.tar", samples))

    def labels(label_key: str) -> dict[str, int]:
        batch = take(make_loader([shard], tokenizer, batch=4, label_key=label_key), 1)[0]
        return dict(zip(batch["key"], batch["label"].tolist()))

    assert labels("cls") == {"s0": 4, "s1": 17, "s2": -1, "s3": -1}
    assert labels("json:meta.class") == {"s0": 10, "s1": 11, "s2": 12, "s3": -1}
    assert labels("json:label") == {"s0": -1, "s1": -1, "s2": -1, "s3": 0}  # a json true is no class
    assert labels("") == {"s0": -1, "s1": -1, "s2": -1, "s3": -1}
    evalset = load_eval_set([shard], tokenizer, 8, MEAN, STD, 8, label_key="cls")
    assert evalset.labels.tolist() == [4, 17, -1, -1]
    with pytest.raises(ValueError, match="data.label_key"):
        DataConfig(label_key="json:")


def test_weighted_mixing_proportions(tmp_path, tokenizer) -> None:
    # Unequal shard sizes on purpose: weights are per sample, not per shard draw.
    write_dataset(tmp_path / "a", "a", shards=4, per_shard=4)
    write_dataset(tmp_path / "b", "b", shards=2, per_shard=16)
    spec = f"{tmp_path}/a/a-{{00..03}}.tar::{tmp_path}/b/b-{{00..01}}.tar"
    assert [len(s.urls) for s in resolve_sources(spec, "1::3")] == [4, 2]
    for weights, expected in (("1::3", 0.75), ("1::1", 0.5)):
        loader = make_loader(spec, tokenizer, train_weights=weights, batch=20,
                             samples_per_epoch=200, shuffle_buffer=1)  # fmt: skip
        counts = Counter(key[0] for key in keys_of(take(loader, 100)))  # 2000 samples
        assert abs(counts["b"] / 2000 - expected) < 0.04, (weights, counts)
    with pytest.raises(ValueError, match="weights"):
        resolve_sources(spec, "1::2::3")


def test_samples_per_epoch_sets_the_resampled_epoch_length(tmp_path, tokenizer) -> None:
    shards = write_dataset(tmp_path, "d", shards=4, per_shard=7)
    # 2 ranks x 2 workers: each worker reads ceil(40 / 4) = 10 samples per epoch.
    loader = make_loader(shards, tokenizer, world=2, num_workers=2, samples_per_epoch=40,
                         batch=5, shuffle_buffer=4)  # fmt: skip
    take(loader, 6)  # 3 batches per worker: epochs 0, 0, 1 (positions 5, 10, then 1:5)
    assert loader.state_dict()["positions"] == {"0": [1, 5], "1": [1, 5]}
    assert loader.epoch() == 1.0
    with pytest.raises(ValueError, match="samples_per_epoch"):
        DataConfig(samples_per_epoch=10, resampled=False)


def test_a_killed_worker_is_raised_at_the_next_batch_not_anywhere_else(tmp_path, tokenizer) -> None:
    # torch's own SIGCHLD handler raises the worker's death wherever the main thread is; inside a
    # collective's "except RuntimeError" that made one rank run one collective more than the other
    # and every rank waited forever. The error must come from next(), between steps, and only there.
    shards = write_dataset(tmp_path, "d", shards=1, per_shard=8)
    batches = iter(make_loader(shards, tokenizer, resampled=True, num_workers=1))
    next(batches)
    (worker,) = multiprocessing.active_children()
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=30)
    assert worker.exitcode == -signal.SIGKILL
    deadline = time.time() + 1.0
    while time.time() < deadline:  # plain Python code: a SIGCHLD handler would raise here
        sum(range(1000))
    with pytest.raises(RuntimeError, match=r"DataLoader worker \(pid\(s\) \d+\) exited unexpectedly"):
        for _ in range(10):  # the batches it had already sent come first
            next(batches)


def test_sample_estimate_for_progress_lines_without_sizes_json(tmp_path) -> None:
    from tritower.data.shards import estimate_samples

    counts = [40, 40, 80]
    paths = [
        str(write_tar(tmp_path / f"s{i}.tar", [good_sample(f"k{i}_{j:03d}", j) for j in range(n)]))
        for i, n in enumerate(counts)
    ]
    exact = sum(len(tarfile.open(p).getnames()) // 3 for p in paths)  # jpg + txt + json per sample
    assert exact == sum(counts)
    assert abs(estimate_samples(paths) - exact) <= 0.2 * exact
    assert estimate_samples(paths[:1]) == counts[0]  # the first shard itself is counted exactly
    assert estimate_samples(["pipe:cat x.tar"]) is None and estimate_samples([str(tmp_path / "missing.tar")]) is None
