"""Eval-set formats written by the real tools (clip_benchmark's converter, webdataset's ShardWriter,
plain image folders), the streamed split across ranks, kind planning, and the suite on a toy model
against NumPy computed here on that model's own features."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from tritower.data.eval_formats import clip_templates, imagenet_classnames, iter_eval_samples, open_eval_source
from tritower.data.eval_set import iter_eval_batches
from tritower.data.samples import BadDataStats
from tritower.evaluation import EvalSetError, evaluate_batches, plan_kinds, retrieval_metrics
from tritower.evaluation.config import EvalConfig, EvalSetSpec

COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 230)]
NAMES = ["red", "green", "blue"]
MEAN = STD = (0.5, 0.5, 0.5)


def picture(label: int, seed: int, size: int = 12) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(COLOURS[label]) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


class Listed(list):
    """A list of samples with the ``classes``/``templates`` clip_benchmark's converter reads."""

    classes = NAMES
    templates = ["a photo of {c}.", "{c} things."]


def clip_benchmark_sets(root: Path, n: int = 14) -> tuple[Path, Path]:
    """Written by clip_benchmark's own converter; its DataLoader runs in this process (num_workers=0)
    so that the unit tests start no processes."""
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset, convert_retrieval_dataset

    loader = torch.utils.data.DataLoader

    def in_process(*args: object, **kwargs: object) -> torch.utils.data.DataLoader:
        return loader(*args, **(kwargs | {"num_workers": 0}))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.utils.data, "DataLoader", in_process)
        _convert(root, n, PIL_to_bytes, convert_dataset, convert_retrieval_dataset)
    return root / "cls", root / "ret"


def _convert(root: Path, n: int, PIL_to_bytes, convert_dataset, convert_retrieval_dataset) -> None:  # noqa: ANN001, N803
    classification = Listed((picture(i % 3, i), i % 3) for i in range(n))
    convert_dataset(
        classification, "test", str(root / "cls"), transform=PIL_to_bytes("png"), max_count=5, verbose=False
    )
    captions = [[f"a {NAMES[i % 3]} picture", f"something {NAMES[i % 3]} number {i}"] for i in range(n)]
    retrieval = [(picture(i % 3, 100 + i), captions[i]) for i in range(n)]
    convert_retrieval_dataset(
        retrieval, "test", str(root / "ret"), transform=PIL_to_bytes("png"), max_count=5, verbose=False
    )


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-formats")
    cls, ret = clip_benchmark_sets(root)
    folder = root / "folder"
    for i in range(9):
        (folder / NAMES[i % 3]).mkdir(parents=True, exist_ok=True)
        picture(i % 3, 200 + i).save(folder / NAMES[i % 3] / f"{i}.png")
    (folder / "blue" / "broken.png").write_bytes(b"not an image")
    shards = root / "shards"
    shards.mkdir()
    with wds.ShardWriter(str(shards / "%03d.tar"), maxcount=4) as sink:
        for i in range(10):
            sample = {"__key__": f"{i:04d}", "png": png(picture(i % 3, 300 + i)), "txt": f"a {NAMES[i % 3]} one"}
            sample["json"] = json.dumps({"label": i % 3} if i != 4 else {})  # sample 4 unlabelled
            sink.write(sample)
    (shards / "classnames.txt").write_text("\n".join(NAMES) + "\n")
    plain = root / "plain"  # image + cls, no captions, no class names
    plain.mkdir()
    with wds.ShardWriter(str(plain / "%03d.tar"), maxcount=100) as sink:
        for i in range(6):
            sink.write({"__key__": f"{i:04d}", "png": png(picture(i % 3, 400 + i)), "cls": i % 3})
    return {"cls": cls, "ret": ret, "folder": folder, "shards": shards, "plain": plain}


def test_clip_benchmark_layouts_from_its_converter(sets: dict[str, Path]) -> None:
    cls = open_eval_source(str(sets["cls"]))
    assert cls.format == "clip_benchmark" and len(cls.urls) == 3  # 14 samples, 5 per shard
    assert cls.classnames == NAMES and cls.templates == Listed.templates
    assert not cls.has_captions and cls.has_labels
    samples = list(iter_eval_samples(cls, BadDataStats()))
    assert [s[0] for s in samples] == list(range(14)) and [s[3] for s in samples] == [i % 3 for i in range(14)]
    ret = open_eval_source(str(sets["ret"] / "test"))  # the split folder works too
    assert ret.format == "clip_benchmark" and ret.has_captions and ret.multi_caption
    captions = [s[2] for s in iter_eval_samples(ret, BadDataStats())]
    assert captions[3] == ["a red picture", "something red number 3"]
    # clip_benchmark's own reader sees the same labels.
    from clip_benchmark.datasets.builder import build_wds_dataset

    theirs = build_wds_dataset("cls", transform=lambda image: image, split="test", data_dir=str(sets["cls"]))
    assert [int(label) for _, label in theirs] == [s[3] for s in samples]


def test_imagefolder_and_shipped_names(sets: dict[str, Path]) -> None:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    source = open_eval_source(str(sets["folder"]))
    assert source.format == "imagefolder" and source.classnames == sorted(NAMES)
    assert len(source.templates) == 80  # no templates shipped: CLIP's 80
    stats = BadDataStats()
    labels = [s[3] for s in iter_eval_samples(source, stats)]
    assert stats.bad["image"] == 1 and stats.good == 9 and sorted(labels) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert imagenet_classnames() == list(IMAGENET_CLASSNAMES)
    assert clip_templates() == [template("{c}") for template in OPENAI_IMAGENET_TEMPLATES]


def test_builtin_shards_and_caption_less_shards(sets: dict[str, Path]) -> None:
    shards = open_eval_source(str(sets["shards"] / "{000..002}.tar"))
    assert shards.format == "shards" and shards.has_captions and shards.classnames == NAMES
    labels = [s[3] for s in iter_eval_samples(shards, BadDataStats())]
    assert labels == [i % 3 if i != 4 else -1 for i in range(10)]
    plain = open_eval_source(str(sets["plain"]), label_key="cls")
    assert not plain.has_captions and plain.classnames == []
    assert [s[3] for s in iter_eval_samples(plain, BadDataStats())] == [i % 3 for i in range(6)]


def test_split_across_ranks_is_a_partition(sets: dict[str, Path]) -> None:
    source = open_eval_source(str(sets["folder"]))
    whole = [(s[0], s[3]) for s in iter_eval_samples(source, BadDataStats())]
    stats = [BadDataStats(), BadDataStats()]
    parts = [[(s[0], s[3]) for s in iter_eval_samples(source, stats[r], rank=r, world_size=2)] for r in (0, 1)]
    assert sorted(parts[0] + parts[1]) == sorted(whole) and not set(parts[0]) & set(parts[1])
    assert sum(s.bad["image"] for s in stats) == 1  # the broken file counted once, by its rank
    # The first 4 samples in reading order; the 4th (blue/broken.png) is unreadable, and counted.
    assert [i for i, *_ in iter_eval_samples(source, BadDataStats(), max_samples=4)] == [0, 1, 2]


def test_kinds_planned_before_reading() -> None:
    plan = plan_kinds("coco", None, has_captions=True, has_labels=True, classnames=[], templates=[])
    assert plan.kinds == ("retrieval",) and "class names" in plan.skipped["zeroshot"]
    with pytest.raises(EvalSetError, match="cannot run zeroshot: no class names.*classnames.txt"):
        plan_kinds("coco", ("zeroshot",), has_captions=True, has_labels=True, classnames=[], templates=[])
    with pytest.raises(EvalSetError, match="cannot run retrieval"):
        plan_kinds("in1k", ("retrieval",), has_captions=False, has_labels=True, classnames=["a"], templates=["{c}"])


def test_eval_sets_config() -> None:
    specs = EvalConfig(sets="in1k=/d/in1k:zeroshot+linear_probe;coco=/d/{0..3}.tar, flickr=/f:auto").set_specs()
    assert specs == [
        EvalSetSpec("in1k", "/d/in1k", ("zeroshot", "linear_probe")),
        EvalSetSpec("coco", "/d/{0..3}.tar", None),
        EvalSetSpec("flickr", "/f", None),
    ]
    assert EvalConfig(sets="a=/x/{a,b}.tar").set_specs() == [EvalSetSpec("a", "/x/{a,b}.tar", None)]
    for bad in ("a=/x;a=/y", "=/x", "a=/x:zeroshot+oops", "no-path"):
        with pytest.raises(ValueError):
            EvalConfig(sets=bad)


class ColourModel(torch.nn.Module):
    """Mean colour as the image feature, a word-hash embedding as the text feature (normalised)."""

    def __init__(self) -> None:
        super().__init__()
        self.image = torch.nn.Linear(3, 8)
        self.words = torch.nn.Embedding(1000, 8)
        torch.nn.init.normal_(self.words.weight, generator=torch.Generator().manual_seed(0))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.image(images.mean(dim=(2, 3))), dim=1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        summed = (self.words(ids % 1000) * mask[..., None]).sum(dim=1)
        return torch.nn.functional.normalize(summed, dim=1)


def test_suite_on_streamed_sets_matches_direct_features(sets: dict[str, Path]) -> None:
    from transformers import BertTokenizerFast

    from tritower.data import tokenize

    torch.manual_seed(0)
    model = ColourModel()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "picture", "something", "number", "photo", "of"]
    vocab = Path(sets["ret"]).parent / "vocab.txt"
    vocab.write_text("\n".join(words + NAMES + [str(i) for i in range(20)] + ["things", "."]) + "\n")
    tokenizer = BertTokenizerFast(str(vocab))

    def tok(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return tokenize(tokenizer, texts, 12)

    common = dict(image_shape=(3, 12, 12), context_length=12, device=torch.device("cpu"))
    for name, kinds in (("cls", ("zeroshot", "linear_probe")), ("ret", ("retrieval",))):
        source = open_eval_source(str(sets[name]))
        stats = BadDataStats()
        batches = iter_eval_batches(source, tokenizer, 12, MEAN, STD, 12, batch_size=4, stats=stats)
        got = evaluate_batches(
            model, batches, tok, kinds=kinds, classnames=source.classnames, templates=source.templates, stats=stats,
            **common,
        )  # fmt: skip
        # Reference: the same model on every sample at once, metrics by this file's imports only.
        rows = list(iter_eval_batches(source, tokenizer, 12, MEAN, STD, 12, batch_size=100, stats=BadDataStats()))
        (whole,) = rows
        with torch.no_grad():
            image = model.encode_image(whole.images)
        assert got["eval_samples"] == 14 and got["eval_bad"] == 0
        if name == "cls":
            prompts = [[t.replace("{c}", c) for t in source.templates] for c in source.classnames]
            with torch.no_grad():
                means = [model.encode_text(*tok(p)).mean(0) for p in prompts]
            classifier = torch.stack([m / m.norm() for m in means])
            scores = (image @ classifier.T).numpy()
            assert got["zeroshot_top1"] == pytest.approx(np.mean(scores.argmax(1) == whole.labels.numpy()), abs=1e-9)
            assert "fewshot_1shot_top1" in got and "linear_probe_top1" in got
        else:
            with torch.no_grad():
                text = model.encode_text(whole.input_ids, whole.attention_mask)
            expected = retrieval_metrics(image, text, whole.caption_owner)
            assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-9)
