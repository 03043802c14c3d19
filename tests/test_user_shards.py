"""User data in the img2dataset layout, written by webdataset's own ShardWriter, trains end to end."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest
import webdataset as wds
from PIL import Image, ImageDraw

pytestmark = pytest.mark.launch

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 60)}


def _write_shards(folder: Path, count: int) -> tuple[str, Path]:
    """img2dataset layout: {key}.jpg, {key}.txt, {key}.json, 000000.tar, 000001.tar ..."""
    rng = random.Random(0)
    words = set()
    with wds.ShardWriter(str(folder / "%06d.tar"), maxcount=count // 3) as sink:
        for index in range(count):
            colour = rng.choice(sorted(COLOURS))
            image = Image.new("RGB", (40, 40), (240, 240, 240))
            ImageDraw.Draw(image).ellipse((8, 8, 32, 32), fill=COLOURS[colour])
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=90)
            caption = f"a {colour} disc on a grey background"
            words.update(caption.split())
            meta = {"url": f"http://example.invalid/{index}.jpg", "caption": caption, "width": 40, "height": 40}
            # The first sample of every shard is a truncated JPEG: whichever shard is read, the
            # run meets one, skips it and counts it.
            payload = buffer.getvalue()[:50] if index % (count // 3) == 0 else buffer.getvalue()
            sink.write({"__key__": f"{index:09d}", "jpg": payload, "txt": caption, "json": json.dumps(meta).encode()})
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]) + "\n")
    return str(folder / "{000000..000002}.tar"), vocab


def test_shardwriter_img2dataset_shards_train(train, tmp_path: Path) -> None:
    shards, vocab = _write_shards(tmp_path, 240)
    run = train(
        f"--data.train_shards={shards}",
        f"--data.vocab={vocab}",
        "--data.caption_key=json:caption",
        "--train.steps=6",
        "--train.log_every=2",
        "--eval.at_end=false",
        "--wandb.mode=disabled",
        ranks=1,
    )
    assert [record["step"] for record in run.steps()] == [2, 4, 6]
    metrics = run.metrics
    assert metrics["step"] == 6 and metrics["nonfinite_steps"] == 0
    assert metrics["data_bad"].get("image", 0) >= 1 and set(metrics["data_bad"]) == {"image"}, metrics
    assert metrics["data_samples"] >= 6 * 32
