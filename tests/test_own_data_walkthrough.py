"""docs/towers.md's "LiT on your own data" walkthrough, run as written: img2dataset shards, training,
export in both formats, and open_clip and clip_benchmark on the export."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from test_export_open_clip import CAPTIONS, MINILM, TOLERANCE, load_open_clip

from tritower.inference import load_export


def walkthrough_commands(marker: str = "walkthrough") -> list[list[str]]:
    """The commands of docs/towers.md's block between ``<!-- marker:start -->`` and its end, as
    argument lists ("walkthrough": the GPU-sized one; "walkthrough-cpu": its CPU variant)."""
    import shlex

    text = (Path(__file__).resolve().parent.parent / "docs" / "towers.md").read_text()
    block = text.split(f"<!-- {marker}:start -->")[1].split(f"<!-- {marker}:end -->")[0]
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line) for line in lines if line and not line.startswith(("#", "```"))]


def write_img2dataset_shards(folder: Path, shards: int, per_shard: int, seed: int) -> None:
    """Shards in img2dataset's layout (``00000.tar``: ``000000000.jpg/.txt/.json``, and a
    ``00000_stats.json`` beside each), written with webdataset's own ShardWriter."""
    import io
    import json

    import webdataset as wds
    from PIL import ImageDraw

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (240, 220, 40)}
    shapes = ("circle", "square")
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=per_shard, verbose=0) as sink:
        for index in range(shards * per_shard):
            shard, offset = divmod(index, per_shard)
            colour, shape = rng.choice(list(colours)), rng.choice(shapes)
            image = Image.new("RGB", (96, 96), tuple(int(v) for v in rng.integers(0, 256, 3)))
            draw = ImageDraw.Draw(image)
            box = [int(v) for v in rng.integers(8, 40, 2)] + [int(v) for v in rng.integers(56, 90, 2)]
            (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=colours[colour])
            encoded = io.BytesIO()
            image.save(encoded, format="JPEG", quality=90)
            key = f"{shard:05d}{offset:04d}"
            caption = f"a photo of a {colour} {shape}"
            meta = {"url": f"https://example.invalid/{key}.jpg", "key": key, "status": "success",
                    "caption": caption, "width": 96, "height": 96}  # fmt: skip
            sink.write({"__key__": key, "jpg": encoded.getvalue(), "txt": caption, "json": json.dumps(meta)})
    for shard in range(shards):
        stats = {
            "count": per_shard,
            "successes": per_shard,
            "failed_to_download": 0,
            "status_dict": {"success": per_shard},
        }
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats))


@pytest.mark.launch
def test_lit_on_your_own_data_walkthrough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/towers.md's walk-through as written, at toy size: a locked open_clip CLIP (made by
    open_clip from a small ViT config, saved whole, text half included) as timm's CLIP-layout twin
    ``timm:vit_xsmall_patch16_clip_224``, MiniLM-L6's folder as the BERT,
    img2dataset-layout shards; ``LU`` for 3 steps on 2 CPU ranks under ZeRO-2 (the doc's policy);
    both exports and the evaluation through their command entry points. The open_clip export equals
    the native one on the same images and captions; the run's checkpoint given as pretrained
    weights is refused naming the export command, as one line from ``launch/train.py`` (exit 2)."""
    from launching import launch_train

    from tritower.launch.tools import evaluate
    from tritower.launch.tools import export as export_tool
    from tritower.model import load_image_tower
    from tritower.model.pretrained import PretrainedError
    from tritower.sources import resolve_source

    # open_clip's own model from a config of the size of timm's vit_xsmall_patch16_clip_224 (width
    # 256, 10 blocks, 4 heads, patch 16): a 34 MB file where open_clip's smallest ViT-M-32 is 412 MB.
    config = {"embed_dim": 128, "vision_cfg": {"image_size": 224, "layers": 10, "width": 256, "head_width": 64,
              "patch_size": 16}, "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 128, "heads": 2,
              "layers": 1}}  # fmt: skip
    (tmp_path / "ViT-XS-16-walkthrough.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "ViT-XS-16-walkthrough.json")
    torch.manual_seed(0)
    weights = tmp_path / "open_clip_vit_xs16.pt"
    torch.save(open_clip.create_model("ViT-XS-16-walkthrough", pretrained=None).state_dict(), weights)
    write_img2dataset_shards(tmp_path / "data" / "train", shards=4, per_shard=8, seed=0)
    write_img2dataset_shards(tmp_path / "data" / "eval", shards=1, per_shard=16, seed=1)
    toy = {  # the doc's placeholders -> this test's files, and its sizes -> toy sizes
        "/models/open_clip_vit_b32.pt": str(weights),
        "timm:vit_base_patch32_clip_224": "timm:vit_xsmall_patch16_clip_224",
        "/models/bert-base-uncased": str(resolve_source(MINILM)),
        "/data/mine/": f"{tmp_path}/data/",
        "{00000..00099}": "{00000..00003}",
        "{00000..00001}": "{00000..00000}",
        "runs/": f"{tmp_path}/runs/",
        "exports/": f"{tmp_path}/exports/",
    }

    def substituted(argv: list[str]) -> list[str]:
        for placeholder, value in toy.items():
            argv = [item.replace(placeholder, value) for item in argv]
        return argv

    train, open_clip_export, native_export, evaluation = [substituted(c) for c in walkthrough_commands()]
    assert train[:4] == ["deepspeed", "--num_gpus", "8", "launch/train.py"]
    small = ["--deepspeed.precision=fp32", "--data.batch_size=8", "--train.steps=3", "--optim.warmup_steps=1",
             "--train.log_every=1", "--data.num_workers=0", "--eval.batch_size=8", "--wandb.mode=disabled",
             f"--train.output_dir={tmp_path}/runs"]  # fmt: skip
    # The walk-through's optional normalisation override, given here to follow it through the run:
    # one warning at start naming both values (rank 0 only), then both exports carry it.
    override = ["--model.image.mean=0.5,0.5,0.5", "--model.image.std=0.5,0.5,0.5"]
    run = launch_train(train[4:] + small + override, ranks=2, timeout=600)
    assert len(run.steps()) == 3 and all(np.isfinite(run.losses()))
    clip_mean = ",".join(f"{v:g}" for v in open_clip.OPENAI_DATASET_MEAN)  # timm's pretrained config's
    warned = [line for line in run.output.splitlines() if "model.image.mean=0.5,0.5,0.5 differs" in line]
    assert len(warned) == 1 and f"(mean {clip_mean})" in warned[0], run.output[-3000:]
    assert warned[0].startswith("tritower: warning: ") and "timm:vit_xsmall_patch16_clip_224" in warned[0]
    assert 0.0 <= run.metrics["image_to_text_R@1"] <= 1.0  # the run's own eval on the eval shards

    # The run's checkpoint is not tower weights: refused with the command that makes it one.
    with pytest.raises(PretrainedError, match=r"DeepSpeed checkpoint folder.*tritower.launch.tools.export"):
        load_image_tower("timm:vit_xsmall_patch16_clip_224", run.run_dir / "checkpoints")
    refused = subprocess.run(
        [sys.executable, "launch/train.py", "--experiment=clip_test", "--model.setting=Lu",
         f"--model.image.pretrained={run.run_dir / 'checkpoints'}", f"--train.output_dir={tmp_path}/refused"],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr[-3000:]
    (line,) = refused.stderr.strip().splitlines()[-1:]
    assert line.startswith("tritower: config error: pretrained weights: ") and "--resume=" in line, line
    assert "Traceback" not in refused.stderr, refused.stderr[-3000:]

    for command in (open_clip_export, native_export):
        assert command[:3] == ["python", "-m", "tritower.launch.tools.export"]
        assert export_tool.main(command[3:]) == 0
    assert evaluation[:3] == ["python", "-m", "tritower.launch.tools.evaluate"]
    assert evaluate.main(evaluation[3:]) == 0
    metrics = json.loads((tmp_path / "exports" / "lit_mine" / "metrics.json").read_text())
    print("walk-through metrics:", metrics)
    # The export reproduces the run's final evaluation (same code, same eval shards, fp32).
    assert metrics["image_to_text_R@1"] == pytest.approx(run.metrics["image_to_text_R@1"], abs=1e-6)

    native = load_export(tmp_path / "exports" / "lit_mine")
    assert native.config["model"]["setting"] == "LU"
    assert native.config["image_preprocessing"]["mean"] == [0.5, 0.5, 0.5]  # the run's override
    assert json.loads((tmp_path / "exports" / "lit_mine_open_clip" / "open_clip_config.json").read_text())[
        "preprocess_cfg"
    ]["std"] == [0.5, 0.5, 0.5]
    loaded, preprocess, tokenizer = load_open_clip(
        tmp_path / "exports" / "lit_mine_open_clip", tmp_path / "elsewhere", monkeypatch
    )
    pictures = [Image.open(io_bytes) for io_bytes in _eval_jpegs(tmp_path / "data" / "eval" / "00000.tar", 3)]
    pixels = torch.stack([preprocess(p) for p in pictures])
    assert (pixels - native.preprocess(pictures)).abs().max() <= 1e-5  # same size, mean and std
    with torch.no_grad():
        assert (loaded.encode_image(pixels, normalize=True) - native.encode_image(pixels)).abs().max() <= TOLERANCE
        text = loaded.encode_text(tokenizer(CAPTIONS), normalize=True)
        assert (text - native.encode_text(CAPTIONS)).abs().max() <= TOLERANCE


@pytest.mark.launch
def test_the_cpu_walkthrough_at_toy_size(tmp_path: Path) -> None:
    """docs/towers.md's CPU variant as written, at toy size: the packages it installs are the real
    distributions, EfficientNet-Lite0 converted from its package, its embeddings of img2dataset
    shards precomputed (two views), ``python launch/train.py --experiment=lit_emoji`` as ``LU``
    on them for 3 steps of 8 (one process, no launcher), the export and its evaluation, which
    reproduces the run's own final evaluation."""
    import importlib.metadata

    from tritower.launch.tools import convert_efficientnet, evaluate, precompute
    from tritower.launch.tools import export as export_tool

    write_img2dataset_shards(tmp_path / "data" / "train", shards=4, per_shard=8, seed=0)
    write_img2dataset_shards(tmp_path / "data" / "eval", shards=1, per_shard=16, seed=1)
    toy = {
        "models/": f"{tmp_path}/models/",
        "embeddings/mine": f"{tmp_path}/embeddings/mine",
        "/data/mine/": f"{tmp_path}/data/",
        "{00000..00009}": "{00000..00003}",
        "runs/": f"{tmp_path}/runs/",
        "exports/": f"{tmp_path}/exports/",
    }
    commands = []
    for argv in walkthrough_commands("walkthrough-cpu"):
        for placeholder, value in toy.items():
            argv = [item.replace(placeholder, value) for item in argv]
        commands.append(argv)
    install, convert, embed, train, export, evaluation = commands
    assert install[:2] == ["pip", "install"]
    for name in install[2:]:  # each is a distribution this project's test install has put here
        assert importlib.metadata.distribution(name).version

    assert convert[:3] == ["python", "-m", "tritower.launch.tools.convert_efficientnet"]
    assert convert_efficientnet.main(convert[3:]) == 0
    assert embed[:3] == ["python", "-m", "tritower.launch.tools.precompute"]
    assert precompute.main([*embed[3:], "--num_workers=0", "--batch_size=16"]) == 0
    meta = json.loads((tmp_path / "embeddings" / "mine" / "meta.json").read_text())
    assert meta["views"] == 2 and meta["tower"] == "efficientnet_lite0", meta

    assert train[:2] == ["python", "launch/train.py"]
    small = ["--data.batch_size=8", "--train.steps=3", "--optim.warmup_steps=1", "--train.log_every=1",
             "--data.num_workers=0", "--eval.batch_size=8", "--wandb.mode=disabled", "--log.curves=False",
             f"--train.output_dir={tmp_path}/runs"]  # fmt: skip
    repo = Path(__file__).resolve().parent.parent
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.pop("RANK", None)
    done = subprocess.run(
        [sys.executable, *train[1:], *small], cwd=repo, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
    run_dir = tmp_path / "runs" / "lit_mine_cpu"
    logged = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logged if "loss" in r and "event" not in r]
    assert len(losses) == 3 and all(np.isfinite(losses)), logged
    run_metrics = json.loads((run_dir / "metrics.json").read_text())
    assert run_metrics["step"] == 3 and "image_to_text_R@1" in run_metrics

    assert export[:3] == ["python", "-m", "tritower.launch.tools.export"]
    assert export_tool.main(export[3:]) == 0
    assert evaluation[:3] == ["python", "-m", "tritower.launch.tools.evaluate"]
    assert evaluate.main(evaluation[3:]) == 0
    metrics = json.loads((tmp_path / "exports" / "lit_mine_cpu" / "metrics.json").read_text())
    assert load_export(tmp_path / "exports" / "lit_mine_cpu").config["model"]["setting"] == "LU"
    for name in ("image_to_text_R@1", "text_to_image_R@1"):
        assert metrics[name] == pytest.approx(run_metrics[name], abs=1e-6), (name, metrics, run_metrics)


def _eval_jpegs(shard: Path, count: int) -> list:
    """The first ``count`` JPEGs of a tar shard, as file-like objects."""
    import io
    import tarfile

    with tarfile.open(shard) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".jpg")][:count]
        return [io.BytesIO(tar.extractfile(m).read()) for m in members]
