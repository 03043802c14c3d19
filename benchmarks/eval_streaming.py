"""Streamed, sharded evaluation of a large classification set: wall time and peak RSS per rank;
and the memory of retrieval scoring as the set grows.

Part 1 generates (once) a clip_benchmark-layout classification set of ``--images`` 224 px JPEGs in
``--classes`` classes (small flat-colour JPEGs, ~2-3 KB, written straight into tar shards with
webdataset's ShardWriter, plus a ``sizes.json`` so the set size is known), then evaluates
zero-shot on it on ``--ranks`` gloo CPU ranks with ``tritower.evaluation.evaluate_batches``: each
rank decodes only its share, holds one batch of images at a time, and only features are gathered.
A tiny pooled-linear "model" stands in for the towers, so the numbers are those of the input side
(read, decode, resize, normalise, gather), which is what grows with the set. Each size in
``--sizes`` (prefixes of the set via ``max_samples``) runs in fresh processes. Peak RSS is each
rank's own high-water mark (``VmHWM``; ``ru_maxrss`` also counts what a spawned process inherits
from its parent before exec), read at the end of encoding and at the end; a thread samples RSS
every 0.5 s for the timeline in the JSON. Rank 0 prints the evaluation's progress lines.

Part 2 (``--retrieval-sizes``): ``retrieval_metrics`` on N random 64-d image and caption features
in a fresh process per run, with today's blocks (``SCORE_BLOCK`` scores at once) and with the
previous fixed 1024 queries per block, side by side: peak RSS above the process's RSS before the
call, wall time, and whether the metrics are identical.

Run: ``python benchmarks/eval_streaming.py --images 50000 --ranks 2 --sizes 5000,20000,50000 \\
    --retrieval-sizes 5000,10000,20000 --root /tmp/eval50k --out docs/results/eval_streaming_devbox.json``
"""

from __future__ import annotations

import io
import json
import os
import platform
import resource
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image

from tritower.benchmarks.cli import Ints, parse_benchmark
from tritower.launch.metrics.console import matmul_gflops  # the machine's reference rate, as every run prints it


@dataclass
class EvalStreamingOptions:
    """Options of the streamed-evaluation benchmark (``--field value`` or ``--field=value``)."""

    images: int = 50000
    """Images of the generated classification set (written once under ``--root``)."""
    classes: int = 1000
    """Classes of the generated set (ImageNet-1k's count: the zero-shot classifier's size)."""
    ranks: int = 2
    """gloo CPU ranks the evaluation is sharded over."""
    sizes: Ints = (5000, 50000)
    """Prefixes of the set evaluated, each in fresh processes (``--sizes 5000,20000,50000``;
    ``--sizes ""``: none)."""
    retrieval_sizes: Ints = ()
    """N of the retrieval memory part, N x N random pairs each (default: the part is not run)."""
    batch_size: int = 256
    """Images per evaluation batch on each rank: what a rank holds at once."""
    root: str = "/tmp/tritower-eval-streaming"
    """Folder of the generated set, reused when it exists."""
    out: str = ""
    """Write the results as JSON here (default: the printed lines only)."""


def generate(root: Path, images: int, classes: int, size: int = 224, per_shard: int = 5000) -> float:
    """Writes ROOT/test/{0..}.tar, nshards.txt, sizes.json, classnames.txt; returns seconds (0 if it existed)."""
    import webdataset as wds

    folder = root / "test"
    if (folder / "nshards.txt").is_file():
        if not (folder / "sizes.json").is_file():  # a set written before sizes.json was
            shards = int((folder / "nshards.txt").read_text())
            counts = {f"{i}.tar": min(per_shard, images - i * per_shard) for i in range(shards)}
            (folder / "sizes.json").write_text(json.dumps(counts))
        return 0.0
    started = time.time()
    folder.mkdir(parents=True, exist_ok=True)
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
    counts: dict[str, int] = {}
    with wds.ShardWriter(str(folder / "%d.tar"), maxcount=per_shard, verbose=0) as sink:
        for index in range(images):
            label = index % classes
            sink.write({"__key__": f"s{index:07d}", "jpg": encoded[label][index % variants], "cls": label})
            counts[f"{index // per_shard}.tar"] = counts.get(f"{index // per_shard}.tar", 0) + 1
        shards = sink.shard
    (folder / "nshards.txt").write_text(f"{shards}\n")
    (folder / "sizes.json").write_text(json.dumps(counts))
    (root / "classnames.txt").write_text("\n".join(f"class {i}" for i in range(classes)) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("a photo of a {c}.\n")
    return time.time() - started


def memory_mib() -> dict[str, float]:
    """This process's RSS now and its own high-water mark (Linux /proc), in MiB."""
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) / 1024
    return {"rss": round(fields["VmRSS"], 1), "hwm": round(fields["VmHWM"], 1)}


class RssSampler:
    """A thread that records (seconds, RSS MiB) every ``every_s`` seconds."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.samples: list[tuple[float, float]] = []
        self.started, self.every_s, self.stop = time.time(), every_s, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((round(time.time() - self.started, 2), memory_mib()["rss"]))
            self.stop.wait(self.every_s)

    def finish(self) -> list[tuple[float, float]]:
        self.stop.set()
        self.thread.join()
        return self.samples


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
    sampler = RssSampler()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from tritower.data.eval_formats import expected_samples, open_eval_source
    from tritower.data.eval_set import iter_eval_batches
    from tritower.data.samples import BadDataStats
    from tritower.evaluation import evaluate_batches
    from tritower.evaluation.features import ProgressReporter

    def tokenize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.tensor([[101] + [1000 + len(w) for w in t.split()][:14] + [102] for t in texts])
        return ids, torch.ones_like(ids)

    class Tok:  # the streamed classification set has no captions: the tokenizer is never called
        pass

    source = open_eval_source(root)
    stats = BadDataStats()
    progress = None
    if rank == 0:
        total = expected_samples(source, max_samples)
        progress = ProgressReporter(lambda r: print(f"    {r.line()}", flush=True), name="bench", total=total)
    dist.barrier()
    at_start = memory_mib()
    started = time.time()
    marks: dict[str, dict] = {}

    def batches():  # marks the end of this rank's encoding
        yield from iter_eval_batches(
            source, Tok(), 224, (0.5,) * 3, (0.5,) * 3, 16, batch_size=batch, stats=stats, rank=rank,
            world_size=world, max_samples=max_samples,
        )  # fmt: skip
        marks["encoded"] = memory_mib() | {"s": round(time.time() - started, 2)}

    metrics = evaluate_batches(
        PooledLinear(), batches(), tokenize, kinds=("zeroshot",), classnames=source.classnames,
        templates=source.templates, image_shape=(3, 224, 224), context_length=16, device=torch.device("cpu"),
        stats=stats, progress=progress,
    )  # fmt: skip
    wall = time.time() - started
    end = memory_mib()
    timeline = sampler.finish()
    queue.put(
        {
            "rank": rank,
            "wall_s": round(wall, 2),
            "peak_rss_mib": end["hwm"],
            "peak_rss_encoding_mib": marks["encoded"]["hwm"],
            "rss_at_start_mib": at_start["rss"],
            "rss_after_encoding_mib": marks["encoded"]["rss"],
            "rss_at_end_mib": end["rss"],
            "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "own": stats.good,
            "rss_timeline": timeline[::4],  # every 2 s
        }
        | metrics
    )
    dist.destroy_process_group()


def _spawned(target: object, args_of_rank: list[tuple]) -> list[dict]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    processes = [context.Process(target=target, args=(*args, queue)) for args in args_of_rank]
    for process in processes:
        process.start()
    results = [queue.get() for _ in processes]
    for process in processes:
        process.join()
    return results


def measure(root: Path, world: int, max_samples: int, batch: int) -> list[dict]:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    results = _spawned(rank_main, [(r, world, port, str(root), max_samples, batch) for r in range(world)])
    return sorted(results, key=lambda r: r["rank"])


def retrieval_main(count: int, fixed_rows: int, queue: mp.Queue) -> None:
    """``retrieval_metrics`` on ``count`` random pairs; ``fixed_rows`` > 0: that many queries per
    block whatever the candidates (the code before ``SCORE_BLOCK``)."""
    torch.set_num_threads(1)
    from tritower.evaluation import ranking, retrieval_metrics

    generator = torch.Generator().manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(count, 64, generator=generator), dim=1)
    text = torch.nn.functional.normalize(image + 0.5 * torch.randn(count, 64, generator=generator), dim=1)
    if fixed_rows:
        ranking.SCORE_BLOCK = fixed_rows * count  # block_rows(count) == fixed_rows
    before = memory_mib()["rss"]
    started = time.time()
    metrics = retrieval_metrics(image, text, torch.arange(count))
    wall = time.time() - started
    queue.put({"wall_s": round(wall, 2), "peak_above_start_mib": round(memory_mib()["hwm"] - before, 1)} | metrics)


def main(argv: list[str] | None = None) -> None:
    options = parse_benchmark(EvalStreamingOptions, argv, command="python benchmarks/eval_streaming.py")
    root = Path(options.root)
    generated = generate(root, options.images, options.classes)
    gflops = matmul_gflops(repeats=20)
    print(f"reference rate: 1024x1024 float32 matmul at {gflops:.0f} GFLOP/s", flush=True)
    rows = []
    for size in options.sizes:
        print(f"{size} images on {options.ranks} ranks:", flush=True)
        per_rank = measure(root, options.ranks, size, options.batch_size)
        rows.append({"images": size, "ranks": per_rank})
        wall = max(r["wall_s"] for r in per_rank)
        peaks = " / ".join(f"{r['peak_rss_mib']:.0f}" for r in per_rank)
        start = " / ".join(f"{r['rss_at_start_mib']:.0f}" for r in per_rank)
        print(
            f"  wall {wall:.1f} s, {size / wall:.0f} images/s, peak RSS per rank {peaks} MiB "
            f"(at start {start}), eval_samples {per_rank[0]['eval_samples']:.0f}",
            flush=True,
        )
    retrieval = []
    for count in options.retrieval_sizes:
        (blocked,) = _spawned(retrieval_main, [(count, 0)])
        (fixed,) = _spawned(retrieval_main, [(count, 1024)])
        same = all(blocked[k] == fixed[k] for k in blocked if "_R@" in k)
        retrieval.append({"images": count, "blocked": blocked, "fixed_1024_rows": fixed, "identical_metrics": same})
        print(
            f"retrieval {count} x {count}: peak above start {blocked['peak_above_start_mib']:.0f} MiB "
            f"({blocked['wall_s']:.1f} s) in blocks, {fixed['peak_above_start_mib']:.0f} MiB "
            f"({fixed['wall_s']:.1f} s) with 1024 queries per block; identical metrics: {same}",
            flush=True,
        )
    result = {
        "benchmark": "eval_streaming",
        "machine": f"{platform.node()} ({os.cpu_count()} cores)",
        "matmul_gflops": round(gflops, 1),
        "generated_s": round(generated, 1),
        "image_size": 224,
        "batch_size": options.batch_size,
        "rows": rows,
        "retrieval": retrieval,
    }
    if options.out:
        Path(options.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
