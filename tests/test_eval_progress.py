"""Progress lines while an eval set is encoded: the reporter fires with the images encoded so far
(checked against the samples this file writes), its rate and time left are plain arithmetic on a
slowed encoding, and the set size is known where it can be without reading the set.

The sum over ranks is checked in the 2-rank launch of ``tests/test_eval_launch.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import webdataset as wds
from test_eval_formats import NAMES, ColourModel, picture, png

from tritower.data.eval_formats import expected_samples, open_eval_source
from tritower.data.eval_set import iter_eval_batches
from tritower.data.samples import BadDataStats
from tritower.evaluation import evaluate_batches
from tritower.evaluation.config import EvalConfig
from tritower.evaluation.features import EncodeProgress, ProgressReporter

MEAN = STD = (0.5, 0.5, 0.5)


def _folder(root: Path, good: int) -> Path:
    """An ImageFolder of ``good`` pictures in 3 classes and one unreadable file."""
    for i in range(good):
        (root / NAMES[i % 3]).mkdir(parents=True, exist_ok=True)
        picture(i % 3, i).save(root / NAMES[i % 3] / f"{i:03d}.png")
    (root / "blue" / "broken.png").write_bytes(b"not an image")
    return root


def _run(source_path: Path, reporter: ProgressReporter, batch_size: int, model: torch.nn.Module) -> dict:
    source = open_eval_source(str(source_path))
    stats = BadDataStats()
    batches = iter_eval_batches(source, None, 12, MEAN, STD, 12, batch_size=batch_size, stats=stats)
    return evaluate_batches(
        model, batches, lambda texts: (torch.zeros(len(texts), 12, dtype=torch.int64),) * 2, kinds=("zeroshot",),
        classnames=source.classnames, templates=source.templates, image_shape=(3, 12, 12), context_length=12,
        device=torch.device("cpu"), stats=stats, progress=reporter,
    )  # fmt: skip


def test_progress_fires_with_the_images_encoded_so_far(tmp_path: Path) -> None:
    good = 11  # 11 readable pictures + 1 broken file: batches of 4, 4, 3
    folder = _folder(tmp_path / "folder", good)
    source = open_eval_source(str(folder))
    assert expected_samples(source) == good + 1  # every file is walked, the broken one too
    reports: list[EncodeProgress] = []
    reporter = ProgressReporter(reports.append, name="tiny", total=expected_samples(source), every_s=0)
    torch.manual_seed(0)
    metrics = _run(folder, reporter, 4, ColourModel())
    assert metrics["eval_samples"] == good and metrics["eval_bad"] == 1
    # One report after each batch is encoded (the count before the first says nothing), then the last.
    assert [r.encoded for r in reports] == [4, 8, 11]
    assert [r.done for r in reports] == [False, False, True]
    assert all(r.name == "tiny" and r.total == good + 1 for r in reports)
    assert reports[0].line().startswith("eval set tiny: 4 of 12 images encoded (33%), ")
    assert reports[-1].line().startswith("eval set tiny: 11 images encoded in ")


def test_slowed_encoding_reports_every_interval_with_rate_and_time_left(tmp_path: Path) -> None:
    folder = _folder(tmp_path / "folder", 20)  # batches of 3: 3, 6, ..., 18, 20
    now = [100.0]

    class Slow(ColourModel):
        def encode_image(self, images: torch.Tensor) -> torch.Tensor:
            now[0] += 4.0  # every batch takes 4 s on this clock
            return super().encode_image(images)

    reports: list[EncodeProgress] = []
    reporter = ProgressReporter(reports.append, name="slow", total=21, every_s=10.0, clock=lambda: now[0])
    torch.manual_seed(0)
    _run(folder, reporter, 3, Slow())
    # The count reaches the reporter before batch b's forward: after b - 1 batches, at (b - 1) * 4 s.
    # Reports at 12 s (9 images), 24 s (18 images), then the closing one at 28 s (20 images).
    assert [(r.encoded, r.elapsed_s, r.done) for r in reports] == [
        (9, 12.0, False),
        (18, 24.0, False),
        (20, 28.0, True),
    ]
    assert reports[0].rate == pytest.approx(9 / 12)
    assert reports[0].remaining_s == pytest.approx((21 - 9) / (9 / 12))  # 16 s at 0.75 images/s
    assert reports[0].line() == "eval set slow: 9 of 21 images encoded (43%), 0.8 images/s, about 16 s left"
    assert reports[-1].remaining_s is None
    assert reports[-1].line() == "eval set slow: 20 images encoded in 28 s (0.7 images/s)"


def test_a_quick_set_prints_nothing(tmp_path: Path) -> None:
    reports: list[EncodeProgress] = []
    _run(_folder(tmp_path / "folder", 5), ProgressReporter(reports.append, name="quick"), 2, ColourModel())
    assert reports == []  # done within the default 10 s: no line at all


def test_set_size_known_without_reading(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    with wds.ShardWriter(str(shards / "%03d.tar"), maxcount=4) as sink:
        for i in range(10):
            sink.write({"__key__": f"{i:04d}", "png": png(picture(i % 3, i)), "txt": f"a {NAMES[i % 3]} one"})
    source = open_eval_source(str(shards / "{000..002}.tar"))
    assert expected_samples(source) is None  # no sizes.json: unknown until read
    (shards / "sizes.json").write_text(json.dumps({"000.tar": 4, "001.tar": 4, "002.tar": 2}))
    assert expected_samples(source) == 10
    assert expected_samples(source, max_samples=7) == 7 and expected_samples(source, max_samples=50) == 10
    with pytest.raises(ValueError, match="progress_every_s"):
        EvalConfig(progress_every_s=-1)
