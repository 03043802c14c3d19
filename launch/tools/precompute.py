"""Precompute a locked image tower's embeddings once, into companion shards of the training data.

    python -m tritower.launch.tools.precompute --tower vit_scene_tiny \\
        --checkpoint runs/pretrain_image/image_tower.safetensors --shards builtin --out runs/emb
    python -m tritower.launch.tools.precompute --tower vit_base_patch16_224 \\
        --checkpoint /ckpt/vit_b16.safetensors --shards '/data/laion/{00000..41455}.tar' \\
        --views 4 --device cuda --dtype bf16 --num-workers 8 --part 3 --parts 16 --out /data/emb

Then train with ``--data.embeddings=<out>``: under Lu the locked image tower is never built and
no image is decoded; under 3T the batch carries the third tower's embedding of exactly the view
the trainable image tower sees. Format, matching and errors: ``tritower/data/embeddings.py``.

Each sample gets ``--views`` fixed crops (view v drawn with ``data.transforms.view_rng(view_seed,
key, v)``) of the tower's input size and normalisation, embedded under ``torch.inference_mode``.
Every source shard gets a companion, written under a temporary name and renamed when complete;
``meta.json`` comes last. ``--part I --parts N`` takes shards I, I+N, I+2N, ... of the list, so
N machines can share the work; each part writes its own ``meta.part-*.json`` and the last to
finish merges them into ``meta.json`` (``data.embeddings.load_meta`` merges complete parts too).
``--shards builtin`` precomputes the built-in scenes that ``--experiment`` (and ``--data.FIELD=
VALUE`` overrides, as given to ``launch/train.py``) would train on, from the same cache.
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from tritower.data.config import DataConfig
from tritower.data.embeddings import (
    META,
    CompanionWriter,
    EmbeddingsMeta,
    companion_name,
    merge_parts,
    part_meta_name,
    write_meta,
)
from tritower.data.samples import BadDataStats, decode_image, image_field, read_shard
from tritower.data.shards import estimate_samples, expand_shards, load_shard_sizes
from tritower.data.transforms import TrainTransform, view_rng
from tritower.launch.cli import parse, parse_options
from tritower.launch.config import ConfigError, TrainConfig
from tritower.model.precision import PRECISIONS, autocast_dtype

STORE_DTYPES = {"fp16": "float16", "fp32": "float32"}


COMMAND = "python -m tritower.launch.tools.precompute"
FORWARD_DTYPES, STORED_DTYPES = tuple(sorted(PRECISIONS)), tuple(sorted(STORE_DTYPES))


@dataclass
class PrecomputeConfig:
    """Options of the precompute command (``--name value``; ``--data.FIELD=VALUE`` for builtin)."""

    tower: str
    """Image tower name from the registry (the locked tower, or the 3T third tower)."""
    checkpoint: str
    """Its local weights file (as ``model.image.pretrained`` / ``model.third.pretrained``)."""
    shards: str
    """Training shards: as ``data.train_shards`` (brace pattern, ``.txt`` list, ``::`` sources)
    or ``builtin`` for the built-in scenes of ``experiment``."""
    out: str
    """Output folder of the companion shards and ``meta.json``."""
    views: int = 1
    """Fixed crops per sample; training picks one per epoch (1: the same crop every epoch)."""
    view_seed: int = 0
    """Seed of the crop boxes (``data.view_seed``)."""
    crop_scale_min: float | None = None
    """Lower bound of the crops' area fraction; None: the experiment's ``data.crop_scale_min``."""
    batch_size: int = 256
    """Images (sample views) per forward pass."""
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    """Where the tower runs."""
    dtype: Literal[FORWARD_DTYPES] = "fp32"
    """Precision of the forward pass: fp32, or bf16 / fp16 autocast."""
    store_dtype: Literal[STORED_DTYPES] = "fp16"
    """Storage of the embeddings: fp16 (half the bytes) or fp32 (exact)."""
    num_workers: int = 2
    """Processes reading, decoding and cropping; 0 reads in the main process."""
    part: int = 0
    """This machine's part of a split run (0 <= part < parts)."""
    parts: int = 1
    """Machines the shard list is split over (shards part, part + parts, ...)."""
    overwrite: bool = False
    """Replace this run's files in a folder that already holds some."""
    experiment: str = ""
    """With ``--shards builtin``: the experiment whose data section names the built-in scenes
    (and whose ``crop_scale_min`` is the default); "" = the training default."""
    data_overrides: list[tuple[str, str]] = field(default_factory=list)
    """``--data.FIELD=VALUE`` overrides of that data section, as given to ``launch/train.py``."""
    log_every_s: float = 10.0
    """Seconds between progress lines."""


class ViewStream(torch.utils.data.IterableDataset):
    """Chunks of one shard at a time: {"shard", "records": [(key, bad kind | None)], "pixels":
    [n*views, 3, H, W] for the good records, "done", and on the last chunk "good"/"bad"}.
    Workers take whole shards (``shards[worker::workers]``), so each companion has one writer."""

    def __init__(
        self, shards: list[tuple[int, str]], transform: TrainTransform, views: int, view_seed: int, chunk_samples: int
    ) -> None:
        super().__init__()
        self.shards, self.transform = shards, transform
        self.views, self.view_seed, self.chunk_samples = views, view_seed, chunk_samples

    def _crops(self, sample: dict[str, Any]) -> torch.Tensor | str:
        """[views, 3, H, W] of the sample, or the bad-data kind that stops it (as the loader)."""
        ext = image_field(sample)
        if ext is None:
            return "missing"
        try:
            image = decode_image(sample[ext])
            key = sample["__key__"]
            return torch.stack([self.transform(image, view_rng(self.view_seed, key, v)) for v in range(self.views)])
        except Exception:  # noqa: BLE001 - PIL raises many types; a degenerate size too
            return "image"

    def _shard(self, index: int, url: str) -> Iterator[dict[str, Any]]:
        stats = BadDataStats()
        records: list[tuple[str, str | None]] = []
        pixels: list[torch.Tensor] = []
        for sample in read_shard(url, stats):
            crops = self._crops(sample)
            if isinstance(crops, str):
                stats.add_bad(crops, url)
                records.append((sample["__key__"], crops))
            else:
                stats.good += 1
                records.append((sample["__key__"], None))
                pixels.append(crops)
            if len(pixels) == self.chunk_samples:
                yield {"shard": index, "records": records, "pixels": torch.cat(pixels), "done": False}
                records, pixels = [], []
        yield {
            "shard": index,
            "records": records,
            "done": True,
            "good": stats.good,
            "bad": {kind: n for kind, n in stats.bad.items() if n},
            "pixels": torch.cat(pixels) if pixels else None,
        }

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for index, url in self.shards[worker::workers]:
            yield from self._shard(index, url)


def resolve_shards(cfg: PrecomputeConfig) -> tuple[list[str], float]:
    """(every source shard URL in order, the default crop_scale_min) for ``cfg.shards``."""
    from tritower.data import ensure_builtin_data

    data = experiment_data(cfg)
    if cfg.shards in ("", "builtin"):
        return ensure_builtin_data(data).train_shards, data.crop_scale_min
    return expand_shards(cfg.shards), data.crop_scale_min


def experiment_data(cfg: PrecomputeConfig) -> DataConfig:
    """``cfg.experiment``'s data section with the ``--data.FIELD=VALUE`` overrides, checked."""
    from tritower.launch.experiments import DEFAULT_EXPERIMENT, get_experiment

    overrides = [f"--{key}={value}" for key, value in cfg.data_overrides]
    train = parse(TrainConfig, overrides, default=get_experiment(cfg.experiment or DEFAULT_EXPERIMENT), prog=COMMAND)
    try:
        train.data.__post_init__()
    except ValueError as error:
        raise ConfigError(f"data: {error}") from None
    return train.data


def prepare_out(out: Path, cfg: PrecomputeConfig, indices: list[int]) -> None:
    """Refuses to write into a folder holding this run's files unless ``--overwrite``; with it,
    removes them first (stale metadata must never describe new shards)."""
    ours = [out / companion_name(i) for i in indices] + [out / META]
    if cfg.parts > 1:
        ours.append(out / part_meta_name(cfg.part, cfg.parts))
        stale_parts = [p for p in out.glob("meta.part-*.json") if not p.name.endswith(f"-of-{cfg.parts:05d}.json")]
        clash = [p for p in ours if p.exists()] + stale_parts
    else:
        clash = sorted(out.iterdir()) if out.is_dir() else []
        ours += list(out.glob("meta.part-*.json"))
    if clash and not cfg.overwrite:
        raise FileExistsError(
            f"{out} already holds {len(clash)} files of a precompute, e.g. {clash[0].name}; pass "
            "--overwrite to replace them, or choose another --out"
        )
    for path in ours + (stale_parts if cfg.parts > 1 else []):
        path.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return (
        f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
        if seconds >= 3600
        else (f"{seconds // 60}m{seconds % 60:02d}s")
    )


def precompute(cfg: PrecomputeConfig) -> EmbeddingsMeta:
    """Embeds this part's shards into ``cfg.out``; returns the metadata written."""
    from tritower.model import LockedTower, file_sha256, image_tower_spec, load_image_tower

    if not 0 <= cfg.part < cfg.parts:
        raise ValueError(f"--part {cfg.part} must be in [0, --parts {cfg.parts})")
    if cfg.views < 1 or cfg.batch_size < 1:
        raise ValueError("--views and --batch-size must be >= 1")
    urls, default_scale = resolve_shards(cfg)
    crop_scale_min = default_scale if cfg.crop_scale_min is None else cfg.crop_scale_min
    mine = [(i, url) for i, url in enumerate(urls) if i % cfg.parts == cfg.part]
    out = Path(cfg.out).expanduser()
    prepare_out(out, cfg, [i for i, _ in mine])

    spec = image_tower_spec(cfg.tower)
    tower = load_image_tower(cfg.tower, cfg.checkpoint)
    locked = LockedTower(tower, cfg.tower, autocast_dtype=autocast_dtype(cfg.dtype)).to(cfg.device)
    transform = TrainTransform(spec.image_size, spec.mean, spec.std, crop_scale_min)
    stream = ViewStream(mine, transform, cfg.views, cfg.view_seed, chunk_samples=max(1, cfg.batch_size // cfg.views))
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=cfg.num_workers,
        pin_memory=cfg.device.startswith("cuda"),
    )  # fmt: skip
    print(
        f"precompute: {cfg.tower} ({locked.source}) over {len(mine)} of {len(urls)} shards "
        f"(part {cfg.part} of {cfg.parts}), {cfg.views} view(s) per sample at "
        f"{spec.image_size} px, {cfg.dtype} forward on {cfg.device}, {cfg.store_dtype} store "
        f"-> {out}",
        flush=True,
    )
    sizes = load_shard_sizes([url for _, url in mine])
    total = sum(sizes.values()) if sizes else estimate_samples([url for _, url in mine])
    if total:
        estimate = "" if sizes else " (estimated from the first shard's size; sizes.json gives it exactly)"
        print(f"precompute: about {total:,} samples to embed{estimate}", flush=True)

    writers: dict[int, CompanionWriter] = {}
    entries: list[dict[str, Any]] = []
    skipped: Counter = Counter()
    embedded = seen = 0
    started = last_log = time.time()
    try:
        for chunk in loader:
            index = chunk["shard"]
            if index not in writers:
                writers[index] = CompanionWriter(
                    out / companion_name(index), cfg.views, spec.width, STORE_DTYPES[cfg.store_dtype]
                )
            rows = iter(())
            if chunk["pixels"] is not None:
                features = locked.encode(chunk["pixels"].to(cfg.device, non_blocking=True))
                # [n * views, width] -> [n, views, width]: a sample's views are adjacent.
                rows = iter(features.float().cpu().numpy().reshape(-1, cfg.views, spec.width))
            for key, kind in chunk["records"]:
                if kind is None:
                    writers[index].add(key, next(rows))
                else:
                    writers[index].skip(key, kind)
            seen += len(chunk["records"])
            if chunk["done"]:
                writers.pop(index).close()
                entries.append({"index": index, "source": urls[index],
                                "companion": companion_name(index), "samples": chunk["good"],
                                "skipped": chunk["bad"]})  # fmt: skip
                embedded += chunk["good"]
                skipped.update(chunk["bad"])
            now = time.time()
            if now - last_log >= cfg.log_every_s:
                last_log = now
                rate = seen / (now - started)
                done = min(seen / total, 0.99) if total else len(entries) / max(1, len(mine))
                eta = _duration((now - started) * (1 - done) / done) if done > 0 else "?"
                print(
                    f"precompute: {seen:,} samples, {len(entries)}/{len(mine)} shards, {rate:.0f} samples/s, ETA {eta}",
                    flush=True,
                )
    finally:
        for writer in writers.values():  # an error: never leave a half-written companion
            writer.abort()

    meta = EmbeddingsMeta(
        tower=cfg.tower, source=locked.source, sha256=file_sha256(locked.source),
        width=spec.width, views=cfg.views, view_seed=cfg.view_seed,
        dtype=STORE_DTYPES[cfg.store_dtype], image_size=spec.image_size, mean=list(spec.mean),
        std=list(spec.std), crop_scale_min=crop_scale_min, num_shards=len(urls),
        shards=sorted(entries, key=lambda e: e["index"]), samples=embedded,
        skipped=dict(skipped), forward_dtype=cfg.dtype,
        part=cfg.part if cfg.parts > 1 else None, parts=cfg.parts, folder=out,
    )  # fmt: skip
    if embedded == 0:
        raise RuntimeError(
            f"precompute: no sample could be embedded ({dict(skipped)} skipped); check --shards {cfg.shards!r}"
        )
    elapsed = time.time() - started
    print(
        f"precompute: {embedded:,} samples embedded, skipped {dict(skipped) or 'none'}, "
        f"{_duration(elapsed)} ({seen / max(elapsed, 1e-9):.0f} samples/s)",
        flush=True,
    )
    if cfg.parts == 1:
        write_meta(meta, out / META)
        print(f"precompute: wrote {out / META}", flush=True)
        return meta
    write_meta(meta, out / part_meta_name(cfg.part, cfg.parts))
    try:
        merge_parts(out, write=True)
        print(f"precompute: all {cfg.parts} parts done, wrote {out / META}", flush=True)
    except FileNotFoundError as waiting:
        print(f"precompute: part {cfg.part} done; {waiting}", flush=True)
    return meta


def parse_args(argv: list[str] | None) -> PrecomputeConfig:
    """The command line -> PrecomputeConfig (``launch/cli.py``: ``--name value`` or ``--name=value``,
    ``--data.FIELD=VALUE`` checked against the experiment's data section at once)."""
    cfg = parse_options(
        PrecomputeConfig,
        argv,
        command=COMMAND,
        example="--tower vit_scene_tiny --checkpoint runs/pretrain_image/image_tower.safetensors "
        "--shards builtin --out runs/emb",
        sections={"data": "data_overrides"},
    )
    experiment_data(cfg)  # an unknown experiment or data key fails before any tower is built
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done, 2 a usage or config error (one line naming the option)."""
    try:
        cfg = parse_args(argv)
    except ConfigError as error:
        print(f"tritower precompute: error: {error}", file=sys.stderr)
        return 2
    precompute(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
