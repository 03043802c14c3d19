"""Streamed, sharded evaluation of a large classification set: wall time and peak RSS per rank.

Generates (once) a clip_benchmark-layout classification set of ``--images`` 224 px JPEGs in
``--classes`` classes (small flat-colour JPEGs, ~2-3 KB, written straight into tar shards with
webdataset's ShardWriter), then evaluates zero-shot on it on ``--ranks`` gloo CPU ranks with
``tritower.evaluation.evaluate_batches``: each rank decodes only its share, holds one batch of
images at a time, and only features are gathered. A tiny pooled-linear "model" stands in for the
towers, so the numbers are those of the input side (read, decode, resize, normalise, gather),
which is what grows with the set. Runs each size in ``--sizes`` (prefixes of the set via
``max_samples``) to show that peak RSS does not grow with the image count.

Run: ``python benchmarks/eval_streaming.py --images 50000 --ranks 2 --sizes 5000,50000 \\
    --root /tmp/eval50k --out docs/results/eval_streaming_devbox.json``
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image


def generate(root: Path, images: int, classes: int, size: int = 224, per_shard: int = 5000) -> float:
    """Writes ROOT/test/{0..}.tar, nshards.txt, classnames.txt; returns seconds (0 if it existed)."""
    import webdataset as wds

    if (root / "test" / "nshards.txt").is_file():
        return 0.0
    started = time.time()
    (root / "test").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, size=(classes, 3))
    # Pre-encode a few JPEGs per class and reuse them: decoding, not encoding, is what is measured.
    variants = 4
    encoded = []
    for label in range(classes):
        row = []
        for _ in range(variants):
            pixels = np.clip(palette[label] + rng.normal(0, 8, (size // 8, size // 8, 3)), 0, 255).astype(np.uint8)
            picture = Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST)
            out = io.BytesIO()
            picture.save(out, format="JPEG", quality=60)
            row.append(out.getvalue())
        encoded.append(row)
    with wds.ShardWriter(str(root / "test" / "%d.tar"), maxcount=per_shard, verbose=0) as sink:
        for index in range(images):
            label = index % classes
            sink.write({"__key__": f"s{index:07d}", "jpg": encoded[label][index % variants], "cls": label})
        shards = sink.shard
    (root / "test" / "nshards.txt").write_text(f"{shards}\n")
    (root / "classnames.txt").write_text("\n".join(f"class {i}" for i in range(classes)) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    return time.time() - started


class PooledLinear(torch.nn.Module):
    """Stand-in towers: mean-pooled pixels / token ids through a linear map, normalised."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image, self.text = torch.nn.Linear(3 * 16, 64), torch.nn.Embedding(30522, 64)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1)  # [B, 48]
        return torch.nn.functional.normalize(self.image(pooled), dim=1)

    def encode_text(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize((self.text(ids) * mask[..., None]).sum(1), dim=1)


def rank_main(rank: int, world: int, port: int, root: str, max_samples: int, batch: int, queue: mp.Queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from tritower.data.eval_formats import open_eval_source
    from tritower.data.eval_set import iter_eval_batches
    from tritower.data.samples import BadDataStats
    from tritower.evaluation import evaluate_batches

    def tokenize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([[101] + [1000 + len(w) for w in t.split()][:14] + [102] for t in texts])
        return ids, torch.ones_like(ids)

    class Tok:  # the streamed classification set has no captions: the tokenizer is never called
        pass

    source = open_eval_source(root)
    stats = BadDataStats()
    dist.barrier()
    started = time.time()
    batches = iter_eval_batches(
        source, Tok(), 224, (0.5,) * 3, (0.5,) * 3, 16, batch_size=batch, stats=stats, rank=rank,
        world_size=world, max_samples=max_samples,
    )  # fmt: skip
    metrics = evaluate_batches(
        PooledLinear(), batches, tokenize, kinds=("zeroshot",), classnames=source.classnames,
        templates=source.templates, image_shape=(3, 224, 224), context_length=16, device=torch.device("cpu"),
        stats=stats,
    )  # fmt: skip
    wall = time.time() - started
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    queue.put({"rank": rank, "wall_s": round(wall, 2), "peak_rss_mib": round(peak_mib, 1), "own": stats.good} | metrics)
    dist.destroy_process_group()


def measure(root: Path, world: int, max_samples: int, batch: int) -> list[dict]:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [
        context.Process(target=rank_main, args=(r, world, port, str(root), max_samples, batch, queue))
        for r in range(world)
    ]
    for process in processes:
        process.start()
    results = [queue.get() for _ in processes]
    for process in processes:
        process.join()
    return sorted(results, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=50000)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--sizes", default="5000,50000", help="prefixes of the set evaluated, comma-separated")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--root", default="/tmp/tritower-eval-streaming")
    parser.add_argument("--out", default=None)
    options = parser.parse_args()
    root = Path(options.root)
    generated = generate(root, options.images, options.classes)
    rows = []
    for size in (int(s) for s in options.sizes.split(",")):
        per_rank = measure(root, options.ranks, size, options.batch_size)
        rows.append({"images": size, "ranks": per_rank})
        rss = ", ".join(f"{r['peak_rss_mib']:.0f}" for r in per_rank)
        print(
            f"{size:>7} images on {options.ranks} ranks: wall {max(r['wall_s'] for r in per_rank):.1f} s, "
            f"{size / max(r['wall_s'] for r in per_rank):.0f} images/s, peak RSS per rank (MiB) {rss}, "
            f"eval_samples {per_rank[0]['eval_samples']:.0f}",
            flush=True,
        )
    result = {
        "benchmark": "eval_streaming",
        "machine": f"{platform.node()} ({os.cpu_count()} cores)",
        "generated_s": round(generated, 1),
        "image_size": 224,
        "batch_size": options.batch_size,
        "rows": rows,
    }
    if options.out:
        Path(options.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
