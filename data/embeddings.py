"""Precomputed locked-tower embeddings: companion shards, their ``meta.json``, the join by key.

``launch/tools/precompute.py`` runs a locked image tower once over the training shards and writes one
folder::

    out/emb-000000.tar   # companion of source shard 0: per source sample, in the source's order,
    out/emb-000001.tar   #   key.emb.npy [views, width], or key.skip (a bad-data kind) when the
    ...                  #   sample could not be embedded (no image, undecodable image)
    out/meta.json        # written last: tower, checkpoint sha256, width, views, transform,
                         # source shard -> companion mapping, sample counts

A run split over machines (``--part I --parts N``) writes ``meta.part-0000I-of-0000N.json``
per part instead; the part that finishes last merges them into ``meta.json``, and
``load_meta`` merges them itself when all parts are there but ``meta.json`` is not.

Training with ``data.embeddings=out`` streams every source shard and its companion side by side
(``join_embeddings``): the n-th sample of the source must be the n-th record of the companion,
key for key, so nothing is held in memory but the record at hand, and a resumed worker's
fast-forward re-reads both in step. Skip records exist for loaders that do not decode images
(``needs_images=False``): they learn from the companion that a sample's image was bad, count it
as the decoding loader would, and never mistake it for a missing embedding.

Any mismatch (a source shard without a companion, a key out of step, another tower, checkpoint,
width, view count or crop scale) is an ``EmbeddingsError`` or ``ValueError`` naming the shard
or key, what was expected, and the precompute command that fixes it.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import write_text_atomic
from .samples import BAD_KINDS, BadDataStats, read_shard

FORMAT = "tritower-embeddings"
VERSION = 1
META = "meta.json"
STORE_DTYPES = ("float16", "float32")
_PART = re.compile(r"meta\.part-(\d+)-of-(\d+)\.json$")
# Fields every part of a split run must agree on (the rest are per-shard counts; ``source``,
# the checkpoint's path, may differ between machines: its sha256 may not).
_SHARED = (
    "tower",
    "sha256",
    "width",
    "views",
    "view_seed",
    "dtype",
    "image_size",
    "mean",
    "std",
    "crop_scale_min",
    "num_shards",
    "forward_dtype",
)


class EmbeddingsError(ValueError):
    """Precomputed embeddings that do not fit the samples being read. Single-string constructor:
    torch's DataLoader re-raises a worker's exception in the main process by its type."""


def companion_name(index: int) -> str:
    """File name of the companion of source shard ``index`` (position in the shard list)."""
    return f"emb-{index:06d}.tar"


def part_meta_name(part: int, parts: int) -> str:
    """``meta.part-00001-of-00004.json``: the metadata one part of a split run writes."""
    return f"meta.part-{part:05d}-of-{parts:05d}.json"


def _rerun(meta: EmbeddingsMeta | None = None, shards: str = "<the training shards>", tower: str = "") -> str:
    """The fix, as a command: precompute again (with ``meta``'s settings when known)."""
    if tower:
        tower, checkpoint = tower, "<the run's checkpoint of it>"
    else:
        tower = meta.tower if meta else "<locked tower>"
        checkpoint = meta.source if meta else "<its checkpoint>"
    views = f" --views {meta.views}" if meta else ""
    return (
        f"re-run `python -m tritower.launch.tools.precompute --tower {tower} --checkpoint "
        f"{checkpoint} --shards {shards}{views} --out <new folder>` and point "
        "data.embeddings at it"
    )


@dataclass
class EmbeddingsMeta:
    """What ``meta.json`` of an embeddings folder states (``folder`` is where it was read)."""

    tower: str
    """Registry name of the image tower that computed the embeddings."""
    source: str
    """Path of its checkpoint file when they were computed."""
    sha256: str
    """SHA-256 of that file (``model.pretrained.file_sha256``): the tower's identity."""
    width: int
    """Feature size of one embedding."""
    views: int
    """Fixed views (crops) per sample; ``emb.npy`` members are [views, width]."""
    view_seed: int
    """Seed of the views' crop boxes (``transforms.view_rng``)."""
    dtype: str
    """Storage dtype of the ``emb.npy`` members: float16 or float32."""
    image_size: int
    """Side of the crops fed to the tower."""
    mean: list[float]
    """Per-channel normalisation mean of the tower's input."""
    std: list[float]
    """Per-channel normalisation std of the tower's input."""
    crop_scale_min: float
    """Lower bound of the crops' area fraction (the training loader must use the same)."""
    num_shards: int
    """Source shards of the whole precompute (over all parts)."""
    shards: list[dict[str, Any]] = field(default_factory=list)
    """Per source shard: ``index``, ``source`` (URL as given), ``companion`` (file name in the
    folder), ``samples`` (embedded) and ``skipped`` ({bad kind: count})."""
    samples: int = 0
    """Samples embedded, over the shards listed."""
    skipped: dict[str, int] = field(default_factory=dict)
    """Samples skipped as bad, by kind (shards that could not be read count under ``shard``)."""
    forward_dtype: str = "fp32"
    """Precision of the tower's forward pass (fp32, bf16 or fp16 autocast)."""
    part: int | None = None
    """This file's part of a split run (None: the whole run, or the merge of all parts)."""
    parts: int = 1
    """Parts the run was split into."""
    format: str = FORMAT
    version: int = VERSION
    folder: Path = field(default=Path("."), compare=False)
    """Where the metadata was read from (not stored)."""

    def to_json(self) -> str:
        """The ``meta.json`` text."""
        data = {k: v for k, v in asdict(self).items() if k != "folder"}
        return json.dumps(data, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, path: Path) -> EmbeddingsMeta:
        """Parses ``meta.json``; a wrong format, version or field set is a ValueError naming it."""
        try:
            data = json.loads(text)
        except ValueError as error:
            raise ValueError(f"{path}: not valid JSON ({error}); {_rerun()}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(
                f"{path}: not a tritower embeddings meta.json (format "
                f"{data.get('format') if isinstance(data, dict) else None!r}, "
                f"expected {FORMAT!r}); {_rerun()}"
            )
        if data.get("version") != VERSION:
            raise ValueError(
                f"{path}: embeddings format version {data.get('version')}, this "
                f"tritower reads version {VERSION}; {_rerun()}"
            )
        known = {f.name for f in fields(cls) if f.name != "folder"}
        required = {
            "tower",
            "source",
            "sha256",
            "width",
            "views",
            "view_seed",
            "dtype",
            "image_size",
            "mean",
            "std",
            "crop_scale_min",
            "num_shards",
            "shards",
        }
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"{path}: fields {missing} missing; {_rerun()}")
        meta = cls(**{k: v for k, v in data.items() if k in known})
        meta.folder = path.parent
        return meta

    def check(
        self,
        tower: str,
        sha256: str,
        width: int,
        *,
        image_size: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        """ValueError naming every difference unless these embeddings are of ``tower`` loaded
        from a file with ``sha256`` (a changed checkpoint is another tower), of ``width``, and,
        when given, computed on crops of ``image_size`` normalised with ``mean``/``std`` (the
        locked tower's input spec)."""
        wrong = []
        if tower != self.tower:
            wrong.append(f"tower {self.tower!r}, expected {tower!r}")
        if sha256 != self.sha256:
            wrong.append(f"checkpoint sha256 {self.sha256[:12]}... ({self.source}), expected {sha256[:12]}...")
        if width != self.width:
            wrong.append(f"width {self.width}, expected {width}")
        if image_size is not None and image_size != self.image_size:
            wrong.append(f"image_size {self.image_size}, expected {image_size}")
        for name, value in (("mean", mean), ("std", std)):
            stored = getattr(self, name)
            if value is not None and (
                len(value) != len(stored) or not all(math.isclose(a, b, rel_tol=1e-6) for a, b in zip(value, stored))
            ):
                wrong.append(f"{name} {list(stored)}, expected {list(value)}")
        if wrong:
            raise ValueError(
                f"precomputed embeddings in {self.folder} do not fit the locked tower "
                f"{tower!r}: {'; '.join(wrong)}; {_rerun(self, tower=tower)}"
            )

    def check_views(self, views: int, view_seed: int, crop_scale_min: float) -> tuple[int, int]:
        """(views, view_seed) the loader must crop with: the folder's. ValueError when the data
        config asks for other views (0 = "as stored") or another crop scale."""
        if views not in (0, self.views):
            raise ValueError(
                f"data.views={views}, but the embeddings in {self.folder} hold {self.views} "
                f"view(s) per sample (meta.json views={self.views}); set data.views=0 (use the "
                f"folder's) or re-run precompute with --views {views}"
            )
        if view_seed not in (0, self.view_seed):
            raise ValueError(
                f"data.view_seed={view_seed}, but the embeddings in {self.folder} were cropped "
                f"with view_seed={self.view_seed}; set data.view_seed=0 (use the folder's) or "
                f"re-run precompute with --view-seed {view_seed}"
            )
        if not math.isclose(crop_scale_min, self.crop_scale_min, rel_tol=1e-9):
            raise ValueError(
                f"data.crop_scale_min={crop_scale_min}, but the embeddings in {self.folder} were "
                f"computed on crops with crop_scale_min={self.crop_scale_min}; set "
                f"data.crop_scale_min={self.crop_scale_min} or re-run precompute with "
                f"--crop-scale-min {crop_scale_min}"
            )
        return self.views, self.view_seed

    def companions(self, urls: list[str]) -> dict[str, str]:
        """Source shard URL -> companion path, for every training shard, or an EmbeddingsError
        naming the shards without one. A shard is found by its URL as given to precompute, else
        by its file name when that is unique in the folder (data moved to another mount)."""
        by_url = {entry["source"]: entry for entry in self.shards}
        names = Counter(Path(entry["source"]).name for entry in self.shards)
        by_name = {Path(e["source"]).name: e for e in self.shards if names[Path(e["source"]).name] == 1}
        found, missing = {}, []
        for url in urls:
            entry = by_url.get(url) or by_name.get(Path(url).name)
            if entry is None:
                missing.append(url)
            else:
                found[url] = str(self.folder / entry["companion"])
        if missing:
            raise EmbeddingsError(
                f"{len(missing)} of {len(set(urls))} training shards have no precomputed "
                f"embeddings in {self.folder} (it holds {len(self.shards)} shards, e.g. "
                f"{self.shards[0]['source'] if self.shards else 'none'}): {missing[:3]}; " + _rerun(self)
            )
        absent = sorted({path for path in found.values() if not Path(path).is_file()})
        if absent:
            raise EmbeddingsError(
                f"{len(absent)} companion shards listed in {self.folder / META} do not exist, "
                f"e.g. {absent[:3]}; copy the whole folder, or {_rerun(self)}"
            )
        return found


def load_meta(folder: str | Path) -> EmbeddingsMeta:
    """The metadata of an embeddings folder (merging a split run's parts when needed)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"embeddings folder {folder} does not exist; write it with "
            f"`python -m tritower.launch.tools.precompute ... --out {folder}`"
        )
    path = folder / META
    if not path.is_file():
        if any(_PART.match(p.name) for p in folder.iterdir()):
            return merge_parts(folder)
        raise FileNotFoundError(
            f"{folder}: no {META} (precompute writes it last: the run did not finish or this "
            f"is not an embeddings folder); {_rerun()}"
        )
    return EmbeddingsMeta.from_json(path.read_text(), path)


def write_meta(meta: EmbeddingsMeta, path: Path) -> None:
    """Writes ``meta`` to ``path`` atomically (a temporary name, then a rename)."""
    write_text_atomic(path, meta.to_json())


def merge_parts(folder: Path, write: bool = False) -> EmbeddingsMeta:
    """One metadata for all parts of a split run; ValueError when parts are missing or disagree.
    ``write``: also store it as ``meta.json``."""
    found = {}
    for path in folder.iterdir():
        match = _PART.match(path.name)
        if match:
            found[(int(match[1]), int(match[2]))] = EmbeddingsMeta.from_json(path.read_text(), path)
    counts = {parts for _, parts in found}
    if len(counts) != 1:
        raise ValueError(
            f"{folder}: part metadata of runs split {sorted(counts)} ways; remove "
            "the stale ones (or re-run every part with --overwrite)"
        )
    parts = counts.pop()
    missing = [i for i in range(parts) if (i, parts) not in found]
    if missing:
        raise FileNotFoundError(
            f"{folder}: parts {missing} of {parts} have not finished (no "
            f"{part_meta_name(missing[0], parts)}); run them with --part I --parts {parts}"
        )
    metas = [found[(i, parts)] for i in range(parts)]
    for name in _SHARED:
        values = [getattr(m, name) for m in metas]
        if any(v != values[0] for v in values):
            raise ValueError(f"{folder}: the parts disagree on {name} ({values}); re-run them with the same options")
    merged = EmbeddingsMeta(
        **{name: getattr(metas[0], name) for name in _SHARED}, source=metas[0].source, parts=parts, folder=folder
    )
    merged.shards = sorted((s for m in metas for s in m.shards), key=lambda s: s["index"])
    merged.samples = sum(m.samples for m in metas)
    merged.skipped = dict(sum((Counter(m.skipped) for m in metas), Counter()))
    if [s["index"] for s in merged.shards] != list(range(merged.num_shards)):
        raise ValueError(
            f"{folder}: the parts do not cover shards 0..{merged.num_shards - 1} "
            "once each; re-run them with the same --shards"
        )
    if write:
        write_meta(merged, folder / META)
    return merged


class CompanionWriter:
    """Writes one companion shard under a temporary name; ``close`` renames it into place, so
    a crashed run never leaves a complete-looking companion."""

    def __init__(self, path: Path, views: int, width: int, dtype: str) -> None:
        if dtype not in STORE_DTYPES:
            raise ValueError(f"store dtype must be one of {STORE_DTYPES}, got {dtype!r}")
        self.path = path
        self.temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        self.shape = (views, width)
        self.dtype = np.dtype(dtype)
        self.samples = 0
        self.skipped: Counter = Counter()
        self.tar = tarfile.open(self.temp, "w")

    def _member(self, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode = len(payload), 0o644
        self.tar.addfile(info, io.BytesIO(payload))

    def add(self, key: str, embeddings: np.ndarray) -> None:
        """The embeddings [views, width] of sample ``key`` (the next one of the source)."""
        if tuple(embeddings.shape) != self.shape:
            raise ValueError(f"{key}: embeddings {list(embeddings.shape)}, expected {list(self.shape)}")
        buffer = io.BytesIO()
        np.save(buffer, np.ascontiguousarray(embeddings, dtype=self.dtype), allow_pickle=False)
        self._member(f"{key}.emb.npy", buffer.getvalue())
        self.samples += 1

    def skip(self, key: str, kind: str) -> None:
        """Sample ``key`` was skipped as bad data of ``kind`` (one of ``BAD_KINDS``)."""
        self._member(f"{key}.skip", kind.encode())
        self.skipped[kind] += 1

    def close(self) -> dict[str, Any]:
        """Finishes the file; returns {"samples", "skipped"} for the metadata."""
        self.tar.close()
        os.replace(self.temp, self.path)
        return {"samples": self.samples, "skipped": dict(self.skipped)}

    def abort(self) -> None:
        """Drops the unfinished file."""
        self.tar.close()
        self.temp.unlink(missing_ok=True)


def join_embeddings(samples: Iterator[dict[str, Any]], url: str, companion: str) -> Iterator[dict[str, Any]]:
    """The samples of source shard ``url`` with their companion record attached, in step:
    ``__emb__`` (the ``emb.npy`` bytes) or ``__skip__`` (the bad kind precompute recorded),
    and ``__companion__``. A key out of step is an EmbeddingsError naming both sides."""
    scratch = BadDataStats()
    records = read_shard(companion, scratch)
    read = 0
    try:
        for sample in samples:
            record = next(records, None)
            if record is None or record["__key__"] != sample["__key__"]:
                there = (
                    f"found {record['__key__']!r} there instead"
                    if record is not None
                    else f"it ends after {read} records"
                    + (f" ({dict(scratch.bad)} reading it)" if scratch.total_bad else "")
                )
                raise EmbeddingsError(
                    f"sample {sample['__key__']!r} of shard {url} has no precomputed embedding in "
                    f"{companion} ({there}): the embeddings were computed from other data; " + _rerun(shards=url)
                )
            read += 1
            if "emb.npy" in record:
                sample["__emb__"] = record["emb.npy"]
            else:
                kind = record.get("skip", b"image").decode(errors="replace")
                sample["__skip__"] = kind if kind in BAD_KINDS else "image"
            sample["__companion__"] = companion
            yield sample
    finally:
        records.close()


def decode_embedding(sample: dict[str, Any], view: int, views: int, width: int) -> np.ndarray:
    """float32 [width]: view ``view`` of the sample's ``__emb__`` record; EmbeddingsError naming
    the companion and key when its shape is not [views, width] as meta.json states."""
    array = np.load(io.BytesIO(sample["__emb__"]), allow_pickle=False)
    if array.shape != (views, width):
        raise EmbeddingsError(
            f"{sample.get('__companion__')}: embedding of sample {sample['__key__']!r} has shape "
            f"{list(array.shape)}, expected [views, width] = [{views}, {width}] as meta.json "
            f"states; the companion is not from this precompute: {_rerun(shards=sample['__url__'])}"
        )
    return array[view].astype(np.float32)


def probe_companion(companion: str, views: int, width: int) -> None:
    """Fails fast, in the calling process, when the first embedding of ``companion`` does not
    have the shape meta.json states (a companion copied from another run)."""
    records = read_shard(companion, BadDataStats())
    for record in records:
        if "emb.npy" in record:
            record |= {"__emb__": record["emb.npy"], "__companion__": companion, "__url__": "<its source shard>"}
            decode_embedding(record, 0, views, width)
            break
    records.close()
