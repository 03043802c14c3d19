"""Shard lists: brace patterns, ``.txt`` lists of URLs, ``pipe:`` commands, weighted sources.

A specification is one or more *sources* separated by ``::`` (open_clip's convention), e.g.
``/data/laion/{00000..41455}.tar::/data/cc12m/shards.txt``. Each source is

* a brace pattern over paths or URLs (``{000..099}``, ``{a,b}``), expanded with braceexpand;
* a ``.txt`` file with one shard per line (blank lines and ``#`` comments skipped; relative
  paths resolve against the file's folder; lines may be brace patterns or ``pipe:`` commands);
* a ``pipe:<command>`` whose stdout is a tar stream (``pipe:aws s3 cp s3://b/{0..9}.tar -``).

URLs are opened with ``webdataset.gopen`` (local paths, ``pipe:``, http(s)). A ``sizes.json``
next to local shards (``{"00000.tar": 9871, ...}``) gives their sample counts.
"""

from __future__ import annotations

import json
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import braceexpand


@dataclass
class ShardSource:
    """One source of a mixture: its shard URLs and its sampling weight."""

    urls: list[str]
    weight: float = 1.0


def _is_local(url: str) -> bool:
    return not url.startswith("pipe:") and "://" not in url


def _expand_one(pattern: str) -> list[str]:
    """Expands one source: a ``.txt`` list (recursively) or a brace pattern."""
    urls: list[str] = []
    for item in braceexpand.braceexpand(pattern.strip()):
        if _is_local(item) and item.endswith(".txt"):
            listing = Path(item).expanduser()
            if not listing.is_file():
                raise FileNotFoundError(f"shard list {item} does not exist")
            for line in listing.read_text().splitlines():
                line = line.split("#", 1)[0].strip() if not line.startswith("pipe:") else line
                if not line:
                    continue
                if _is_local(line) and not Path(line).expanduser().is_absolute():
                    line = str(listing.parent / line)
                urls.extend(_expand_one(line))
        else:
            urls.append(str(Path(item).expanduser()) if _is_local(item) else item)
    return urls


def parse_weights(weights: str, num_sources: int) -> list[float]:
    """``"1::3"`` -> ``[1.0, 3.0]``; "" -> all ones. One weight per source, all positive."""
    if not weights:
        return [1.0] * num_sources
    values = [float(w) for w in weights.split("::")]
    if len(values) != num_sources:
        raise ValueError(f"{len(values)} weights {weights!r} for {num_sources} shard sources")
    if any(v <= 0 for v in values):
        raise ValueError(f"shard source weights must be positive, got {weights!r}")
    return values


def resolve_sources(spec: str | list[str], weights: str = "") -> list[ShardSource]:
    """Parses a shard specification into sources (see the module docstring).

    A list of strings is one source made of all their expansions.
    """
    if isinstance(spec, list):
        sources = [ShardSource(urls=[url for item in spec for url in _expand_one(item)])]
    else:
        parts = [part for part in spec.split("::") if part.strip()]
        if not parts:
            raise ValueError("empty shard specification")
        sources = [ShardSource(urls=_expand_one(part)) for part in parts]
    for source, weight in zip(sources, parse_weights(weights, len(sources))):
        source.weight = weight
        if not source.urls:
            raise ValueError(f"a shard source of {spec!r} expands to no shards")
    return sources


def load_shard_sizes(urls: list[str]) -> dict[str, int] | None:
    """Samples per shard from ``sizes.json`` files next to local shards, if they cover all.

    The file maps shard file names to sample counts (open_clip's convention, e.g.
    ``{"00000.tar": 9871, ...}``). Returns None unless every shard is covered.
    """
    sizes: dict[str, int] = {}
    tables: dict[Path, dict[str, int]] = {}
    for url in urls:
        if not _is_local(url):
            return None
        folder = Path(url).parent
        if folder not in tables:
            listing = folder / "sizes.json"
            tables[folder] = json.loads(listing.read_text()) if listing.is_file() else {}
        count = tables[folder].get(Path(url).name)
        if not isinstance(count, int):
            return None
        sizes[url] = count
    return sizes


def estimate_samples(urls: list[str]) -> int | None:
    """Samples in local tar shards without ``sizes.json``: the first shard's samples (its members'
    keys, read from the tar headers only), scaled by the shards' total file size. None for remote
    shards. An estimate for progress lines (ETA), never for anything that must be exact."""
    if not urls or not all(_is_local(url) and Path(url).is_file() for url in urls):
        return None
    keys = set()
    with tarfile.open(urls[0]) as tar:  # iterating reads the headers and seeks over the payloads
        for member in tar:
            if member.isfile():
                folder, _, name = member.name.rpartition("/")
                keys.add((folder, name.split(".", 1)[0]))  # webdataset's key: up to the first dot
    first = Path(urls[0]).stat().st_size
    return round(len(keys) * sum(Path(url).stat().st_size for url in urls) / max(first, 1)) if keys else None


def expand_shards(spec: str | list[str]) -> list[str]:
    """All shard URLs of a specification, sources concatenated (weights dropped)."""
    return [url for source in resolve_sources(spec) for url in source.urls]


def check_local_shards(sources: list[ShardSource]) -> None:
    """Fails fast, before any worker starts, when local shards are missing.

    All missing is an error (training would only ever see unreadable shards); some missing is
    a warning: the loader skips them and counts each as one ``shard`` error, which a bad-sample
    fraction would hardly notice next to thousands of good samples per shard.
    """
    local = [url for source in sources for url in source.urls if _is_local(url)]
    missing = [url for url in local if not Path(url).is_file()]
    if local and len(missing) == len(local):
        raise FileNotFoundError(f"none of the {len(local)} local shards exists, e.g. {local[0]}")
    if missing:
        warnings.warn(
            f"{len(missing)} of {len(local)} local shards do not exist, e.g. {missing[:3]}; "
            "they will be skipped and counted as 'shard' errors",
            stacklevel=3,
        )
