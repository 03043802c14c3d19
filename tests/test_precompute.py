"""Precomputed locked-tower embeddings: ``launch/tools/precompute.py`` writes companion shards, the
loader joins them by key (``data.embeddings``), and every mismatch is a clear error.

Real tar shards of 40x36 px noise JPEGs, the real ``vit_test`` tower from a checkpoint file, and
an independent float64 recomputation of every embedding (crop with the documented rng, plain
tower, no LockedTower). No DeepSpeed. Run: ``pytest tests/test_precompute.py -q``
"""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from tritower.data.config import DataConfig
from tritower.data.embeddings import EmbeddingsError, load_meta
from tritower.data.tokenizer import build_tokenizer, write_vocab
from tritower.data.transforms import TrainTransform
from tritower.data.webdataset import build_train_loader
from tritower.launch.tools.precompute import main as precompute_main
from tritower.model import build_image_tower, file_sha256, image_tower_spec, load_image_tower

TOWER = "vit_test"
SPEC = image_tower_spec(TOWER)  # 32 px, width 32, mean = std = 0.5
BAD_KEY = "s00_002"  # a corrupt JPEG in shard 0


def jpeg(index: int) -> bytes:
    pixels = np.random.default_rng(index).integers(0, 256, size=(36, 40, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def write_tar(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> str:
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, payload in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return str(path)


def sample(key: str, index: int) -> tuple[str, dict[str, bytes]]:
    image = jpeg(index)[:60] if key == BAD_KEY else jpeg(index)
    return key, {"jpg": image, "txt": f"sample {key}".encode(), "json": json.dumps({"label": index % 3}).encode()}


def write_source(folder: Path, shards: int = 3, per_shard: int = 6, prefix: str = "s") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    return [write_tar(folder / f"{prefix}-{s:02d}.tar",
                      [sample(f"{prefix}{s:02d}_{i:03d}", s * per_shard + i)
                       for i in range(per_shard)])
            for s in range(shards)]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    vocab = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    write_vocab(vocab, ["sample"])
    return build_tokenizer(vocab)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    tower = build_image_tower(TOWER)
    path = tmp_path_factory.mktemp("ckpt") / "tower.safetensors"
    save_file({k: v.contiguous() for k, v in tower.model.state_dict().items()}, str(path))
    return str(path)


@pytest.fixture(scope="module")
def reference(checkpoint: str):
    """Independent recomputation: view ``v`` of ``key`` cropped with the documented rng, the
    plain tower in float64."""
    tower = load_image_tower(TOWER, checkpoint).double().eval()
    transform = TrainTransform(SPEC.image_size, SPEC.mean, SPEC.std, 0.8)

    def embed(shards: list[str], key: str, view: int, view_seed: int = 0) -> torch.Tensor:
        shard = next(s for s in shards if Path(s).name.startswith(f"{key[0]}-{key[1:3]}"))
        with tarfile.open(shard) as tar:
            image = Image.open(io.BytesIO(tar.extractfile(f"{key}.jpg").read()))
            image.load()
        pixels = transform(image, random.Random(f"{view_seed}/view/{key}/{view}"))
        with torch.no_grad():
            return tower(pixels[None].double())[0]

    return embed


def precompute(shards: list[str], out: Path, checkpoint: str, *options: str) -> None:
    spec = shards if isinstance(shards, str) else "::".join(shards)
    precompute_main(["--tower", TOWER, "--checkpoint", checkpoint, "--shards", spec,
                     "--out", str(out), "--device", "cpu", "--num-workers", "0",
                     "--store-dtype", "fp32", "--batch-size", "8", *options])  # fmt: skip


def make_loader(shards, tokenizer, *, batch=4, needs_images=True, seed=0, **cfg):
    config = DataConfig(**{"shuffle_buffer": 8, "num_workers": 0, "shard_retries": 0,
                           "resampled": False, **cfg})  # fmt: skip
    return build_train_loader(
        config, shards=shards, tokenizer=tokenizer, image_size=SPEC.image_size, mean=SPEC.mean,
        std=SPEC.std, context_length=8, rank=0, world_size=1, per_rank_batch=batch, seed=seed,
        needs_images=needs_images,
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


def test_embeddings_equal_an_independent_recomputation(tmp_path, tokenizer, checkpoint, reference) -> None:
    shards = write_source(tmp_path / "src")  # 18 samples, one corrupt: 17 good
    out = tmp_path / "emb"
    precompute(shards, out, checkpoint, "--num-workers", "2")  # companions from 2 processes
    meta = load_meta(out)
    assert (meta.tower, meta.width, meta.views, meta.dtype) == (TOWER, 32, 1, "float32")
    assert meta.sha256 == file_sha256(checkpoint) and meta.image_size == 32
    assert meta.samples == 17 and meta.skipped == {"image": 1}
    assert [s["source"] for s in meta.shards] == shards
    assert meta.shards[0]["skipped"] == {"image": 1}
    meta.check(TOWER, file_sha256(checkpoint), 32, image_size=32, mean=SPEC.mean, std=SPEC.std)

    loader = make_loader(shards, tokenizer, batch=1, embeddings=str(out))
    batches = take(loader, 17)  # one epoch
    assert sorted(keys_of(batches)) == sorted(
        f"s{s:02d}_{i:03d}" for s in range(3) for i in range(6) if (s, i) != (0, 2)
    )
    assert dict(loader.stats().bad) == {"image": 1}  # skipped in both passes, counted once here
    transform = TrainTransform(SPEC.image_size, SPEC.mean, SPEC.std, 0.8)
    for batch in batches:
        key = batch["key"][0]
        assert batch["embedding"].dtype == torch.float32 and batch["embedding"].shape == (1, 32)
        assert batch["view"].tolist() == [0]
        expected = reference(shards, key, view=0)
        torch.testing.assert_close(batch["embedding"][0].double(), expected, rtol=0, atol=1e-5)
        # The image is the very crop that was embedded.
        with tarfile.open(shards[int(key[1:3])]) as tar:
            image = Image.open(io.BytesIO(tar.extractfile(f"{key}.jpg").read()))
        crop = transform(image, random.Random(f"0/view/{key}/0"))
        assert torch.equal(batch["image"][0], crop)


def test_views_per_epoch_and_loader_without_images(tmp_path, tokenizer, checkpoint, reference) -> None:
    shards = write_source(tmp_path / "src")
    out = tmp_path / "emb"
    precompute(shards, out, checkpoint, "--views", "3", "--view-seed", "7")
    meta = load_meta(out)
    assert (meta.views, meta.view_seed) == (3, 7)
    options = dict(batch=1, embeddings=str(out), seed=5)
    loader = make_loader(shards, tokenizer, **options)
    with_images = take(loader, 34)  # two epochs of 17
    without = make_loader(shards, tokenizer, needs_images=False, **options)
    without_images = take(without, 34)
    # Without decoding, the corrupt JPEG is known from the companion's skip record.
    assert dict(without.stats().bad) == {"image": 2}  # once per epoch
    assert without.stats().as_dict() == loader.stats().as_dict()
    views_seen: dict[str, set[int]] = {}
    for position, (a, b) in enumerate(zip(with_images, without_images)):
        key, epoch = a["key"][0], position // 17
        assert b["key"] == a["key"] and "image" not in b and "image" in a
        assert torch.equal(a["input_ids"], b["input_ids"])
        assert torch.equal(a["embedding"], b["embedding"]) and torch.equal(a["view"], b["view"])
        view = random.Random(f"5/view-of/{epoch}/{key}").randrange(3)
        assert a["view"].tolist() == [view]
        views_seen.setdefault(key, set()).add(view)
        expected = reference(shards, key, view=view, view_seed=7)
        torch.testing.assert_close(a["embedding"][0].double(), expected, rtol=0, atol=1e-5)
    assert any(len(v) > 1 for v in views_seen.values())  # views change between epochs


@pytest.mark.parametrize("needs_images,workers", [(True, 0), (False, 2)])
def test_resume_continues_with_the_same_embeddings(tmp_path, tokenizer, checkpoint, needs_images, workers) -> None:
    shards = write_source(tmp_path / "src", shards=4, per_shard=5)
    out = tmp_path / "emb"
    precompute(shards, out, checkpoint, "--views", "2")
    options = dict(batch=3, embeddings=str(out), needs_images=needs_images,
                   num_workers=workers, resampled=True)  # fmt: skip
    uninterrupted = take(make_loader(shards, tokenizer, **options), 10)  # crosses epochs
    first = make_loader(shards, tokenizer, **options)
    take(first, 3)
    resumed = make_loader(shards, tokenizer, **options)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    rest = take(resumed, 7)
    assert keys_of(rest) == keys_of(uninterrupted[3:])
    for a, b in zip(rest, uninterrupted[3:]):
        assert torch.equal(a["embedding"], b["embedding"]) and torch.equal(a["view"], b["view"])
        assert not needs_images or torch.equal(a["image"], b["image"])
    other_views = make_loader(shards, tokenizer, **{**options, "embeddings": "", "views": 3,
                                                    "needs_images": True})  # fmt: skip
    with pytest.raises(ValueError, match="cannot resume exactly"):  # other views, other crops
        other_views.load_state_dict(first.state_dict())


def test_mismatches_are_clear_errors(tmp_path, tokenizer, checkpoint) -> None:
    shards = write_source(tmp_path / "src")
    out = tmp_path / "emb"
    precompute(shards, out, checkpoint)
    meta = load_meta(out)
    sha = file_sha256(checkpoint)

    # Another tower, another checkpoint file, another width, another input transform.
    with pytest.raises(ValueError, match=r"checkpoint sha256 .* expected 000000000000"):
        meta.check(TOWER, "0" * 64, 32)
    with pytest.raises(
        ValueError,
        match=r"tower 'vit_test', expected 'vit_scene_tiny'.*"
        r"width 32, expected 128",
    ):
        meta.check("vit_scene_tiny", sha, 128)
    with pytest.raises(ValueError, match="image_size 32, expected 64"):
        meta.check(TOWER, sha, 32, image_size=64)
    with pytest.raises(ValueError, match=r"crop_scale_min=0.8.*--crop-scale-min 0.5"):
        make_loader(shards, tokenizer, embeddings=str(out), crop_scale_min=0.5)
    with pytest.raises(ValueError, match=r"data.views=2.*hold 1 view"):
        make_loader(shards, tokenizer, embeddings=str(out), views=2)
    with pytest.raises(ValueError, match="needs_images=False without data.embeddings"):
        make_loader(shards, tokenizer, needs_images=False)

    # A source shard that was not precomputed.
    extra = write_source(tmp_path / "more", shards=1, prefix="x")
    with pytest.raises(EmbeddingsError, match=r"1 of 4 training shards .*x-00.tar"):
        make_loader(shards + extra, tokenizer, embeddings=str(out))

    # A sample added to a source shard after the precompute: named with its shard.
    with tarfile.open(shards[1]) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    samples: dict[str, dict[str, bytes]] = {}
    for name, payload in members:
        key, ext = name.split(".", 1)
        samples.setdefault(key, {})[ext] = payload
    items = list(samples.items())
    items.insert(3, sample("s01_new", 99))
    write_tar(Path(shards[1]), items)
    loader = make_loader(shards, tokenizer, batch=1, embeddings=str(out), shuffle_buffer=1)
    with pytest.raises(
        EmbeddingsError,
        match=r"sample 's01_new' of shard .*s-01.tar has no "
        r"precomputed embedding.*re-run",
    ):
        take(loader, 18)

    # Companions of another width: the first one at start, the others when read.
    for index, _when in ((0, "start"), (2, "read")):
        companion = out / meta.shards[index]["companion"]
        with tarfile.open(companion) as tar:
            records = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(companion, "w") as tar:
            for name, payload in records:
                if name.endswith(".emb.npy"):
                    buffer = io.BytesIO()
                    np.save(buffer, np.zeros((1, 8), np.float32))
                    payload = buffer.getvalue()
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
        expected = rf"emb-00000{index}.tar: embedding of sample 's0{index}_000' has shape \[1, 8\]"
        with pytest.raises(EmbeddingsError, match=expected):
            take(make_loader(shards[index:], tokenizer, batch=1, embeddings=str(out)), 18)


def test_meta_errors_guard_and_split_runs(tmp_path, tokenizer, checkpoint) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_meta(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no meta.json"):
        load_meta(tmp_path / "empty")
    (tmp_path / "empty" / "meta.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="not a tritower embeddings meta.json"):
        load_meta(tmp_path / "empty")

    shards = write_source(tmp_path / "src")
    whole = tmp_path / "whole"
    precompute(shards, whole, checkpoint)
    with pytest.raises(FileExistsError, match="--overwrite"):
        precompute(shards, whole, checkpoint)
    precompute(shards, whole, checkpoint, "--overwrite")

    split = tmp_path / "split"
    precompute(shards, split, checkpoint, "--part", "1", "--parts", "2")
    with pytest.raises(FileNotFoundError, match=r"parts \[0\] of 2 have not finished"):
        load_meta(split)
    with pytest.raises(FileExistsError, match="--overwrite"):
        precompute(shards, split, checkpoint, "--part", "1", "--parts", "2")
    precompute(shards, split, checkpoint, "--part", "0", "--parts", "2")
    merged, single = load_meta(split), load_meta(whole)
    assert (split / "meta.json").is_file() and merged.parts == 2
    assert [s["companion"] for s in merged.shards] == [s["companion"] for s in single.shards]
    assert (merged.samples, merged.skipped) == (single.samples, single.skipped)
    for entry in single.shards:
        assert (split / entry["companion"]).read_bytes() == (whole / entry["companion"]).read_bytes()


def test_builtin_scenes_from_the_training_cache(tmp_path, tokenizer, checkpoint) -> None:
    from tritower.data import ensure_builtin_data

    data = [
        "--data.cache_dir=" + str(tmp_path / "cache"),
        "--data.builtin_train_samples=24",
        "--data.builtin_eval_samples=4",
        "--data.builtin_shard_size=12",
    ]
    precompute("builtin", tmp_path / "emb", checkpoint, "--experiment", "clip_test", *data)
    config = DataConfig(
        cache_dir=str(tmp_path / "cache"),
        builtin_train_samples=24,
        builtin_eval_samples=4,
        builtin_shard_size=12,
        builtin_image_size=32,
    )
    builtin = ensure_builtin_data(config)  # the same generation, found in the cache
    meta = load_meta(tmp_path / "emb")
    assert [s["source"] for s in meta.shards] == builtin.train_shards and meta.samples == 24
    vocab = build_tokenizer(builtin.vocab_path)
    loader = make_loader(builtin.train_shards, vocab, batch=8, needs_images=False, embeddings=str(tmp_path / "emb"))
    assert len(set(keys_of(take(loader, 3)))) == 24


def test_a_non_finite_embedding_row_is_skipped_and_counted_as_a_bad_image(tmp_path, tokenizer, checkpoint) -> None:
    shards = write_source(tmp_path / "src")  # 18 samples, one corrupt JPEG: 17 embedded
    out = tmp_path / "emb"
    precompute(shards, out, checkpoint)
    companion = out / load_meta(out).shards[1]["companion"]
    members = {}
    with tarfile.open(companion) as tar:
        for member in tar.getmembers():
            members[member.name] = tar.extractfile(member).read()
    poisoned = sorted(name for name in members if name.endswith(".emb.npy"))[0]
    row = np.load(io.BytesIO(members[poisoned]))
    row[0, 3] = np.nan  # one value of one view
    buffer = io.BytesIO()
    np.save(buffer, row)
    members[poisoned] = buffer.getvalue()
    with tarfile.open(companion, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    loader = make_loader(shards, tokenizer, batch=1, embeddings=str(out), needs_images=False)
    keys = keys_of(take(loader, 16))  # one epoch: 17 embedded, one of them not finite
    assert poisoned.removesuffix(".emb.npy") not in keys and len(set(keys)) == 16
    assert dict(loader.stats().bad) == {"image": 2}  # the corrupt JPEG and the non-finite row
    assert all(torch.isfinite(batch["embedding"]).all() for batch in take(loader, 4))
