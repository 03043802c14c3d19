"""Throughput of the training data loader on 224 px JPEGs (~35 KB) in local tar shards.

Measures samples/s of ``build_train_loader`` (read tar -> shuffle -> decode -> random resized
crop to 224 -> normalise -> tokenise -> batch) with 0 (in-process), 1 and 2 workers, and the
same work in a plain loop without a DataLoader (the per-core ceiling). Prints a table; ``--out``
also writes the numbers as JSON.

Run: ``python benchmarks/data_loader.py --samples 2000 --out /tmp/data_loader.json``
"""

from __future__ import annotations

import io
import json
import os
import platform
import random
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter
from transformers import PreTrainedTokenizerBase

from tritower.benchmarks.cli import Ints, parse_benchmark
from tritower.data.config import DataConfig
from tritower.data.samples import BadDataStats, decode_sample, read_shard
from tritower.data.scenes import caption_words
from tritower.data.tokenizer import build_tokenizer, tokenize, write_vocab
from tritower.data.transforms import TrainTransform
from tritower.data.webdataset import build_train_loader
from tritower.model.specs import CLIP_MEAN, CLIP_STD

WORDS = "a photo of the small large red blue dog cat on in with and street beach".split()


@dataclass
class DataLoaderOptions:
    """Options of the data-loader benchmark (``--field value`` or ``--field=value``)."""

    samples: int = 2000
    """Samples written to the shards (224 px JPEGs, ~35 KB each at quality 95)."""
    per_shard: int = 250
    """Samples per tar shard: enough shards for every worker to read its own."""
    quality: int = 95
    """JPEG quality; it sets the bytes read and decoded per sample (~35 KB at 95)."""
    batch: int = 64
    """Per-rank batch of the loader."""
    batches: int = 20
    """Timed batches per setting, after each setting's start-up batches."""
    workers: Ints = (0, 1, 2)
    """DataLoader worker counts measured (0 = in-process), e.g. ``--workers 0 1 2 4 8``."""
    vocab: str = ""
    """``vocab.txt`` or a model folder for the tokenizer (default: a built-in caption vocabulary)."""
    out: str = ""
    """Write the results as JSON here (default: the table only)."""


def photo_like_jpeg(rng: np.random.Generator, size: int, quality: int) -> bytes:
    """A JPEG with photo-like statistics: smooth colour fields plus fine texture."""
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    base = Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC)
    texture = rng.normal(0, 30, (size, size, 3))
    pixels = np.clip(np.asarray(base, dtype=np.float64) + texture, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(0.6))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_shards(folder: Path, samples: int, per_shard: int, quality: int) -> tuple[list[str], float]:
    """Writes the benchmark shards; returns their paths and the mean JPEG size in bytes."""
    rng = np.random.default_rng(0)
    words = random.Random(0)
    paths, jpeg_bytes = [], 0
    for start in range(0, samples, per_shard):
        path = folder / f"bench-{start // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for index in range(start, min(start + per_shard, samples)):
                jpeg = photo_like_jpeg(rng, 224, quality)
                jpeg_bytes += len(jpeg)
                caption = " ".join(words.choice(WORDS) for _ in range(words.randint(8, 20)))
                for ext, payload in (("jpg", jpeg), ("txt", caption.encode())):
                    info = tarfile.TarInfo(f"{index:08d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        paths.append(str(path))
    return paths, jpeg_bytes / samples


def plain_loop(shards: list[str], tokenizer: PreTrainedTokenizerBase, batch: int) -> float:
    """samples/s of decode + crop + tokenise in a loop on this core (no DataLoader)."""
    transform = TrainTransform(224, CLIP_MEAN, CLIP_STD, 0.8)
    stats, rng = BadDataStats(), random.Random(0)
    started, count, captions = time.perf_counter(), 0, []
    for url in shards:
        for sample in read_shard(url, stats):
            image, caption, _ = decode_sample(sample, "txt", stats)
            transform(image, rng)
            captions.append(caption)
            count += 1
            if len(captions) == batch:
                tokenize(tokenizer, captions, 32)
                captions = []
    return count / (time.perf_counter() - started)


def loader_rate(shards: list[str], tokenizer: PreTrainedTokenizerBase, workers: int, batch: int, batches: int) -> float:
    """samples/s of the real loader after one warm-up batch per worker."""
    cfg = DataConfig(num_workers=workers, resampled=True, shuffle_buffer=256)
    loader = build_train_loader(
        cfg, shards=shards, tokenizer=tokenizer, image_size=224, mean=CLIP_MEAN, std=CLIP_STD,
        context_length=32, rank=0, world_size=1, per_rank_batch=batch, seed=0,
    )  # fmt: skip
    iterator = iter(loader)
    for _ in range(max(1, workers)):  # worker start-up and the first batches are not throughput
        next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    rate = batches * batch / (time.perf_counter() - started)
    del iterator
    return rate


def main(argv: list[str] | None = None) -> None:
    options = parse_benchmark(DataLoaderOptions, argv, command="python benchmarks/data_loader.py")

    with tempfile.TemporaryDirectory() as folder:
        if options.vocab:
            tokenizer = build_tokenizer(options.vocab)
        else:
            write_vocab(Path(folder) / "vocab.txt", [*caption_words(), *WORDS])
            tokenizer = build_tokenizer(Path(folder) / "vocab.txt")
        shards, jpeg_bytes = write_shards(Path(folder), options.samples, options.per_shard,
                                          options.quality)  # fmt: skip
        shard_bytes = sum(os.path.getsize(p) for p in shards) / options.samples
        rows = [("plain loop, no DataLoader", 1, plain_loop(shards, tokenizer, options.batch))]
        for workers in options.workers:
            rate = loader_rate(shards, tokenizer, workers, options.batch, options.batches)
            name = "loader, in-process" if workers == 0 else f"loader, {workers} worker(s)"
            rows.append((name, max(1, workers), rate))

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; JPEG {jpeg_bytes / 1e3:.1f} KB"
        f"/sample, tar {shard_bytes / 1e3:.1f} KB/sample; batch {options.batch}"
    )
    print(f"{'setting':<28}{'procs':>6}{'samples/s':>12}{'per proc':>10}{'MB/s read':>11}")
    for name, procs, rate in rows:
        print(f"{name:<28}{procs:>6}{rate:>12.1f}{rate / procs:>10.1f}{rate * shard_bytes / 1e6:>11.1f}")
    if options.out:
        result = {
            "cpu_count": os.cpu_count(),
            "jpeg_bytes_per_sample": jpeg_bytes,
            "tar_bytes_per_sample": shard_bytes,
            "batch": options.batch,
            "rows": [{"setting": n, "processes": p, "samples_per_s": r} for n, p, r in rows],
        }
        Path(options.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
