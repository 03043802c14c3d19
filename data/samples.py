"""Reading tar shards into samples, decoding them, and counting bad data by kind.

Bad data never stops the stream silently and never disappears silently: every skip is counted
under one of ``BAD_KINDS`` and charged to its shard, and ``BadDataStats.check`` turns too much
of it into a ``DataQualityError`` that names the worst shards.

Kinds: ``image`` (undecodable image), ``caption`` (empty, non-UTF-8 or unparsable caption),
``missing`` (no image or no caption field), ``shard`` (shard could not be opened or read at all),
``truncated`` (shard broke off mid-way, inside a member or a header, or at a member boundary
without the tar's end-of-archive blocks; the samples before the break are kept, the one being
assembled is dropped: as in webdataset, a sample is known to be complete only when the next one
starts). A truncated shard counts the samples it lost when they can be known (its ``sizes.json``
count minus the samples read), else 1.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import webdataset as wds
from PIL import Image

BAD_KINDS: tuple[str, ...] = ("image", "caption", "missing", "shard", "truncated")
IMAGE_EXTENSIONS: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")


class DataQualityError(RuntimeError):
    """Too much bad data, or no readable data at all. Single-string constructor on purpose:
    torch's DataLoader re-raises a worker's exception in the main process by its type."""


@dataclass
class BadDataStats:
    """Counters of one worker (or, merged, of a rank): good samples, bad ones by kind and shard."""

    good: int = 0
    bad: Counter = field(default_factory=Counter)
    bad_by_shard: Counter = field(default_factory=Counter)
    muted: bool = False
    """While True (a resumed worker re-reading up to its position) nothing is counted: those
    events are already in the counters restored from the checkpoint."""

    def add_bad(self, kind: str, url: str) -> None:
        assert kind in BAD_KINDS, kind
        if self.muted:
            return
        self.bad[kind] += 1
        self.bad_by_shard[url] += 1

    @property
    def total_bad(self) -> int:
        return sum(self.bad.values())

    def bad_fraction(self) -> float:
        seen = self.good + self.total_bad
        return self.total_bad / seen if seen else 0.0

    def worst_shards(self, n: int = 5) -> list[tuple[str, int]]:
        return self.bad_by_shard.most_common(n)

    def check(self, max_bad_fraction: float, min_samples: int, where: str) -> None:
        """Raises ``DataQualityError`` once enough samples are seen and too many were bad."""
        seen = self.good + self.total_bad
        if seen >= min_samples and self.bad_fraction() > max_bad_fraction:
            raise DataQualityError(
                f"{where}: {self.total_bad} of {seen} samples bad ({self.bad_fraction():.1%} > "
                f"max_bad_fraction {max_bad_fraction:.1%}); by kind {dict(self.bad)}; worst "
                f"shards {self.worst_shards()}"
            )

    def as_dict(self, max_shards: int = 20) -> dict[str, Any]:
        """Plain, picklable summary; only the worst ``max_shards`` shards are kept."""
        return {
            "good": self.good,
            "bad": {kind: self.bad[kind] for kind in BAD_KINDS},
            "bad_by_shard": dict(self.bad_by_shard.most_common(max_shards)),
        }

    @classmethod
    def merged(cls, summaries: list[dict[str, Any]]) -> BadDataStats:
        """Sums ``as_dict`` summaries (e.g. of all workers of a rank)."""
        total = cls()
        for summary in summaries:
            total.good += summary["good"]
            total.bad.update({kind: n for kind, n in summary["bad"].items() if n})
            total.bad_by_shard.update(summary["bad_by_shard"])
        return total


def _split_key(name: str) -> tuple[str, str]:
    """``dir/abc.def.jpg`` -> (``dir/abc``, ``def.jpg``): the key ends at the first dot of the
    basename, as in webdataset, so ``x.seg.png`` belongs to sample ``x``."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def read_shard(
    url: str, stats: BadDataStats, retries: int = 0, backoff_s: float = 1.0, expected: int | None = None
) -> Iterator[dict[str, Any]]:
    """Yields the samples of one tar shard as ``{"__key__", "__url__", ext: bytes, ...}``.

    Members are grouped by key in tar order (the webdataset convention: a sample's files are
    adjacent). Open and read errors are counted, not raised. A remote shard (``pipe:``, URL)
    that fails before its first sample is tried ``retries`` more times, after ``backoff_s``,
    then twice that, ...: object stores fail transiently. Local failures are permanent, and a
    shard that broke off after some samples is never re-read (its samples would repeat).
    ``expected``: the shard's sample count (``sizes.json``), so that a truncated shard counts
    the samples it lost.
    """
    for attempt in range(retries + 1):
        # Counted into a scratch counter first, so that a retried failure counts nothing.
        # The counts move over in the same resumption of this generator in which they arose.
        attempt_stats = BadDataStats()
        yielded = False
        for sample in _read_shard_once(url, attempt_stats, expected):
            yielded = True
            yield sample
        remote = url.startswith("pipe:") or "://" in url
        if not yielded and attempt_stats.total_bad and remote and attempt < retries:
            time.sleep(backoff_s * 2**attempt)
            continue
        for kind, count in attempt_stats.bad.items():
            for _ in range(count):
                stats.add_bad(kind, url)
        return


class _EndAwareTarInfo(tarfile.TarInfo):
    """Records on the archive whether it ended with its end-of-archive (zero) blocks: ``tarfile``
    ends a stream without them, or at a garbled header, as silently as a complete one."""

    @classmethod
    def fromtarfile(cls, archive: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(archive)
        except tarfile.EOFHeaderError:
            archive.tritower_complete = True
            raise


class TruncatedShardError(OSError):
    """The tar stream ended before its end-of-archive blocks."""


_META = re.compile(r"__[^/]*__($|/)")


def _tar_members(stream: Any) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular file of a tar stream (plain or compressed), in order;
    TruncatedShardError at the end when the end-of-archive blocks never came."""
    archive = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareTarInfo)
    archive.tritower_complete = False
    for info in archive:
        if info.isreg() and info.name and not _META.match(info.name):
            yield info.name, archive.extractfile(info).read()
        archive.members = []  # a stream of millions of members: keep no index
    if not archive.tritower_complete:
        raise TruncatedShardError("tar stream ended without its end-of-archive blocks")


def _read_shard_once(url: str, stats: BadDataStats, expected: int | None = None) -> Iterator[dict[str, Any]]:
    yielded = 0
    finished = False
    current: dict[str, Any] | None = None
    stream = None
    try:
        stream = wds.gopen(url)
        for name, data in _tar_members(stream):
            key, ext = _split_key(name)
            if current is not None and key != current["__key__"]:
                yield current
                yielded += 1
                current = None
            if current is None:
                current = {"__key__": key, "__url__": url}
            current[ext] = data
        if current is not None:
            yield current
            yielded += 1
        finished = True
    except Exception:  # noqa: BLE001 - any failure of a shard is bad data, not a crash
        if yielded or current is not None:
            # The sample being assembled is dropped; with a known size, so is everything after it.
            lost = max(1, expected - yielded) if expected is not None else 1
            for _ in range(lost):
                stats.add_bad("truncated", url)
        else:
            stats.add_bad("shard", url)
    finally:
        if stream is not None:
            try:
                stream.close()
            except Exception:  # noqa: BLE001
                # A pipe: command's exit status shows here. Count it only when nothing else
                # told of the failure: an empty but valid tar from a failed command. A reader
                # closed early (GeneratorExit) kills its command, which is no data error.
                if finished and not yielded:
                    stats.add_bad("shard", url)


def _json_field(sample: dict[str, Any], key: str) -> Any:
    """The value at ``json:<dotted.path>`` in the json sidecar. KeyError when the sidecar or a
    path part is absent, ValueError/UnicodeDecodeError when the sidecar does not parse."""
    if "json" not in sample:
        raise KeyError("json")
    value = json.loads(sample["json"])
    for part in key.removeprefix("json:").split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(part)
        value = value[part]
    return value


def _caption(sample: dict[str, Any], caption_key: str) -> tuple[str | None, str | None]:
    """Returns (caption, None) or (None, bad kind)."""
    if caption_key == "txt":
        raw = sample.get("txt")
        if raw is None:
            return None, "missing"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return None, "caption"
    else:
        try:
            value = _json_field(sample, caption_key)
        except KeyError:
            return None, "missing"
        except (ValueError, UnicodeDecodeError):
            return None, "caption"
        if not isinstance(value, str):
            return None, "caption"
        text = value
    text = text.strip()
    return (text, None) if text else (None, "caption")


def _label(sample: dict[str, Any], label_key: str) -> int:
    """The sample's integer class label (zero-shot class, supervised pretraining), or -1.

    ``label_key``: ``json:<field>`` (dotted path into the json sidecar, e.g. ``json:label``), a
    field holding the integer as text (webdataset's ``cls`` convention), or "" for no labels.
    A missing or non-integer label is -1, not a bad sample: labels are optional.
    """
    if not label_key:
        return -1
    if label_key.startswith("json:"):
        try:
            value = _json_field(sample, label_key)
        except (KeyError, ValueError, UnicodeDecodeError):
            return -1
        # bool is an int subclass; a json true is no class index.
        return value if isinstance(value, int) and not isinstance(value, bool) else -1
    raw = sample.get(label_key)
    if raw is None:
        return -1
    try:
        return int(raw.decode("utf-8").strip())
    except (ValueError, UnicodeDecodeError, AttributeError):
        return -1


def decode_image(payload: bytes) -> Image.Image:
    """Decodes fully (``load``), so a truncated file fails here and not later in a transform.
    Single-channel images deeper than 8 bits are scaled to 8 bits first (``to_8bit``)."""
    image = Image.open(io.BytesIO(payload))
    image.load()
    return to_8bit(image).convert("RGB")


def to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (``I;16*``), 32-bit integer (``I``) and float (``F``) grey images as 8-bit ``L``.

    Written by hand because PIL's ``convert`` clips them at 255 (a 16-bit PNG or an int32 TIFF
    turns all white, a float TIFF in [0, 1] all black). Scale by the range the values lie in:
    16-bit data (and integers up to 65535) by 255/65535, floats in [0, 1] by 255, values already in
    [0, 255] as they are, anything else from its own minimum and maximum."""
    if image.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and 255 < high <= 65535):
        scaled = values * (255.0 / 65535.0)
    elif image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif low >= 0 and high <= 255:
        scaled = values
    else:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def image_field(sample: dict[str, Any]) -> str | None:
    """The sample's image extension (``jpg``, ``jpeg``, ``png`` or ``webp``), or None."""
    return next((e for e in IMAGE_EXTENSIONS if e in sample), None)


def decode_sample(
    sample: dict[str, Any],
    caption_key: str,
    stats: BadDataStats,
    decode: bool = True,
    label_key: str = "json:label",
) -> tuple[Image.Image | None, str, int] | None:
    """(image, caption, label), or None after counting why the sample is bad (label -1 when
    the sample has none under ``label_key``, see ``_label``).

    ``decode=False`` checks that an image field is present but leaves it undecoded (image
    None): for batches that carry precomputed embeddings instead of pixels.
    """
    url = sample.get("__url__", "?")
    ext = image_field(sample)
    caption, bad_kind = _caption(sample, caption_key)
    if ext is None or bad_kind == "missing":
        stats.add_bad("missing", url)
        return None
    if bad_kind is not None:
        stats.add_bad(bad_kind, url)
        return None
    image = None
    if decode:
        try:
            image = decode_image(sample[ext])
        except Exception:  # noqa: BLE001 - PIL raises many types for corrupt data
            stats.add_bad("image", url)
            return None
    assert caption is not None
    return image, caption, _label(sample, label_key)


def probe_shards(urls: list[str], caption_key: str, retries: int = 0, shards: int = 3, samples: int = 16) -> None:
    """Fails fast, in the calling process, when the first samples are all unusable.

    A wrong ``caption_key`` or a wrong shard pattern would otherwise surface only as a worker's
    ``DataQualityError`` after the DataLoader started; this names the fields actually present.
    """
    stats, fields = BadDataStats(), set()
    for url in urls[:shards]:
        reader = read_shard(url, stats, retries)
        for index, sample in enumerate(reader):
            fields.update(name for name in sample if not name.startswith("__"))
            if decode_sample(sample, caption_key, stats) is not None:
                reader.close()
                return
            if index + 1 == samples:
                break
        reader.close()
    raise DataQualityError(
        f"no usable sample among the first of {urls[:shards]} (caption_key={caption_key!r}): "
        f"bad by kind {dict(stats.bad)}; fields present {sorted(fields)}"
    )
