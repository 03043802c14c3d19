"""Eval sets in the layouts users have, read as a stream of samples split across ranks.

Three formats, told apart by what the path holds (``open_eval_source``):

* ``clip_benchmark``: the webdataset layout clip_benchmark's converter writes (``convert_dataset``,
  ``convert_retrieval_dataset``): ``ROOT/<split>/{0..n-1}.tar`` with ``ROOT/<split>/nshards.txt``,
  and at ROOT ``classnames.txt``, ``zeroshot_classification_templates.txt``, ``dataset_type.txt``.
  Classification samples are an image (webp, png, jpg) + ``cls``; retrieval samples an image +
  ``txt`` holding one caption per line. The path is ROOT (or ROOT/<split>).
* ``imagefolder``: one sub-folder per class holding image files (torchvision's ImageFolder);
  classes are the sorted folder names. 1000 folders named by WordNet id (``n01440764``) are
  ImageNet-1k: their sorted order is its class order, and the shipped class names apply.
* ``shards``: the built-in format (a brace pattern, ``.txt`` list or folder of tar shards): image +
  caption (``caption_key``) + label (``label_key``), ``classnames.txt`` / ``templates.txt`` (or
  ``zeroshot_classification_templates.txt``) next to the shards. Shards whose first sample has no
  caption are a classification set.

A set with class names but no templates gets the CLIP paper's 80 ImageNet prompt templates;
``classnames="imagenet"`` names the shipped ImageNet-1k class names (CLIP's cleaned list).

Streaming: every rank walks the same sample order and decodes only samples ``i`` with
``i % world_size == rank``; nothing but the current sample is held.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .samples import IMAGE_EXTENSIONS, BadDataStats, decode_image, decode_sample, image_field, read_shard
from .samples import _label as sample_label
from .shards import check_local_shards, load_shard_sizes, resolve_sources

RESOURCES = Path(__file__).parent / "resources"
WNID = re.compile(r"^n\d{8}$")


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet-1k class names in class-index order (CLIP's cleaned names)."""
    return (RESOURCES / "imagenet1k_classnames.txt").read_text().splitlines()


def clip_templates() -> list[str]:
    """The CLIP paper's 80 ImageNet prompt templates, with a ``{c}`` slot."""
    return (RESOURCES / "clip_imagenet_templates.txt").read_text().splitlines()


@dataclass
class EvalSource:
    """Where an eval set's samples are and what they carry."""

    path: str | list[str]
    format: str
    """``shards``, ``clip_benchmark`` or ``imagefolder``."""
    urls: list[str]
    """Tar shards, or image files (imagefolder), in reading order."""
    classnames: list[str] = field(default_factory=list)
    templates: list[str] = field(default_factory=list)
    has_captions: bool = True
    """Samples carry captions (retrieval is possible)."""
    has_labels: bool = True
    """Samples may carry class labels (zero-shot, linear probe)."""
    multi_caption: bool = False
    """A caption field holds one caption per line (clip_benchmark retrieval)."""
    caption_key: str = "txt"
    label_key: str = "json:label"
    file_labels: list[int] = field(default_factory=list)
    """imagefolder: the class index of each file in ``urls``."""


def _lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _clip_benchmark_root(path: Path, split: str) -> tuple[Path, Path] | None:
    """(ROOT, ROOT/<split>) when ``path`` is a clip_benchmark set (ROOT or its split folder)."""
    for root, folder in ((path, path / split), (path.parent, path)):
        if (folder / "nshards.txt").is_file() or (
            folder.is_dir() and (root / "dataset_type.txt").is_file() and any(folder.glob("*.tar"))
        ):
            return root, folder
    return None


def _resolve_names(classnames: list[str] | str | None, found: list[str]) -> list[str]:
    if classnames == "imagenet":
        return imagenet_classnames()
    if isinstance(classnames, str):
        return _lines(Path(classnames))
    return list(classnames) if classnames is not None else found


def _first_sample_fields(url: str) -> set[str]:
    reader = read_shard(url, BadDataStats())
    try:
        sample = next(reader, None)
    finally:
        reader.close()
    return set(sample or ()) - {"__key__", "__url__"}


def open_eval_source(
    path: str | list[str],
    *,
    caption_key: str = "txt",
    label_key: str = "json:label",
    split: str = "test",
    classnames: list[str] | str | None = None,
    templates: list[str] | str | None = None,
) -> EvalSource:
    """Finds the format of the set at ``path`` (see the module docstring).

    ``classnames``/``templates``: a list, a path to a text file with one per line, or (class
    names) ``"imagenet"``; None takes what the set ships.
    """
    local = Path(path).expanduser() if isinstance(path, str) else None  # None: a list of shards
    folder_given = local is not None and local.is_dir()
    source: EvalSource
    if folder_given and (found := _clip_benchmark_root(local, split)) is not None:
        root, folder = found
        kind = (_lines(root / "dataset_type.txt") or ["classification"])[0].lower()
        if kind == "multilabel":
            raise ValueError(f"{path}: clip_benchmark multilabel sets are not supported")
        count = _lines(folder / "nshards.txt")
        shards = (
            [str(folder / f"{i}.tar") for i in range(int(count[0]))]
            if count
            else sorted(
                (str(p) for p in folder.glob("*.tar")),
                key=lambda name: int(Path(name).stem) if Path(name).stem.isdigit() else 0,
            )
        )
        retrieval = kind == "retrieval"
        source = EvalSource(
            path,
            "clip_benchmark",
            shards,
            _lines(root / "classnames.txt"),
            _lines(root / "zeroshot_classification_templates.txt"),
            has_captions=retrieval,
            has_labels=not retrieval,
            multi_caption=retrieval,
            caption_key="txt",
            label_key="cls",
        )
    elif folder_given and (classes := sorted(p.name for p in local.iterdir() if p.is_dir())):
        files, labels = [], []
        for index, name in enumerate(classes):
            for file in sorted((local / name).rglob("*")):
                if file.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS and file.is_file():
                    files.append(str(file))
                    labels.append(index)
        if not files:
            raise FileNotFoundError(f"{path}: no image files in its {len(classes)} class folders")
        names = [name.replace("_", " ") for name in classes]
        if len(classes) == 1000 and all(WNID.match(name) for name in classes):
            names = imagenet_classnames()
        source = EvalSource(path, "imagefolder", files, names, has_captions=False, file_labels=labels)
    else:
        if folder_given:
            urls = sorted(str(p) for p in local.glob("*.tar"))
            if not urls:
                raise FileNotFoundError(f"{path}: neither tar shards, class folders nor a clip_benchmark set")
        else:
            sources = resolve_sources(path)
            check_local_shards(sources)
            urls = [url for s in sources for url in s.urls]
        folder = next((Path(u).parent for u in urls if "://" not in u and not u.startswith("pipe:")), None)
        side = (lambda name: _lines(folder / name)) if folder is not None else (lambda name: [])
        fields = _first_sample_fields(urls[0])
        caption_field = "json" if caption_key.startswith("json:") else caption_key
        source = EvalSource(
            path,
            "shards",
            urls,
            side("classnames.txt"),
            side("templates.txt") or side("zeroshot_classification_templates.txt"),
            has_captions=not fields or caption_field in fields,
            caption_key=caption_key,
            label_key=label_key,
        )
    source.classnames = _resolve_names(classnames, source.classnames)
    source.templates = _resolve_names(templates, source.templates) if templates != "imagenet" else clip_templates()
    if source.classnames and not source.templates:
        source.templates = clip_templates()
    return source


def expected_samples(source: EvalSource, max_samples: int = 0) -> int | None:
    """Samples ``iter_eval_samples`` will walk (bad ones included), when known without reading the
    set: an ImageFolder's file count, or tar shards covered by ``sizes.json``; else None (a
    ``max_samples`` cap alone is only an upper bound: the set may be smaller)."""
    if source.format == "imagefolder":
        count = len(source.urls)
    else:
        sizes = load_shard_sizes(source.urls)
        if sizes is None:
            return None
        count = sum(sizes.values())
    return min(count, max_samples) if max_samples > 0 else count


def iter_eval_samples(
    source: EvalSource, stats: BadDataStats, *, rank: int = 0, world_size: int = 1, max_samples: int = 0
) -> Iterator[tuple[int, Image.Image, list[str], int]]:
    """``(index, image, captions, label)`` of this rank's samples (index % world_size == rank).

    ``index`` counts every sample of the set in reading order (bad ones too); ``max_samples`` > 0
    stops after the first that many. Bad samples of this rank are counted in ``stats`` by kind;
    samples of other ranks are not decoded. ``captions`` is empty for a classification set and
    ``label`` -1 where a sample has none.
    """
    index = 0
    if source.format == "imagefolder":
        for path, label in zip(source.urls, source.file_labels):
            if max_samples and index >= max_samples:
                return
            if index % world_size == rank:
                try:
                    image = decode_image(Path(path).read_bytes())
                except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
                    stats.add_bad("image", path)
                else:
                    stats.good += 1
                    yield index, image, [], label
            index += 1
        return
    # A shard that fails to open is every rank's failure: rank 0 alone counts it.
    shard_stats = stats if rank == 0 else BadDataStats()
    for url in source.urls:
        for sample in read_shard(url, shard_stats):
            if max_samples and index >= max_samples:
                return
            mine = index % world_size == rank
            index += 1
            if not mine:
                continue
            if source.has_captions:
                decoded = decode_sample(sample, source.caption_key, stats, label_key=source.label_key)
                if decoded is None:
                    continue
                image, caption, label = decoded
                captions = caption.splitlines() if source.multi_caption else [caption]
                captions = [c.strip() for c in captions if c.strip()]
            else:
                ext = image_field(sample)
                if ext is None:
                    stats.add_bad("missing", url)
                    continue
                try:
                    image = decode_image(sample[ext])
                except Exception:  # noqa: BLE001
                    stats.add_bad("image", url)
                    continue
                captions, label = [], sample_label(sample, source.label_key)
            stats.good += 1
            yield index - 1, image, captions, label
