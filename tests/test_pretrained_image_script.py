"""``launch/tools/pretrain_image.py``: a few supervised steps on tiny built-in scenes, then
the written checkpoint loads as a locked (L) image tower of a LiT model.

Run: ``pytest tests/test_pretrained_image_script.py`` (CPU, ~10 s).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tritower.launch.tools.pretrain_image import parse_args, pretrain
from tritower.model import (
    ModelConfig,
    TowerConfig,
    build_clip,
    resolve_trainable,
    split_locked,
    trainable_rules,
)


def test_pretrain_then_load_as_locked_tower(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = parse_args(
        [
            "--tower=vit_test",
            "--steps=3",
            "--batch_size=16",
            "--warmup_steps=1",
            "--log_every=1",
            f"--out={tmp_path / 'out'}",
            "--eval_samples=32",
            f"--data.cache_dir={tmp_path / 'cache'}",
            "--data.builtin_train_samples=200",
            "--data.builtin_eval_samples=40",
            "--data.builtin_image_size=32",
            "--data.builtin_shard_size=100",
            "--data.shuffle_buffer=50",
            "--data.num_workers=0",
        ]
    )
    sidecar = pretrain(cfg)
    # The defaults: shape first for half of the steps (round(0.5 * 3) = 2), single-shape scenes only.
    out = capsys.readouterr().out
    assert "3 steps of 16 (the first 2 on the shape only); " in out and " single-shape training scenes" in out
    weights = tmp_path / "out" / "image_tower.safetensors"
    assert sidecar["tower"] == "vit_test" and 0.0 <= sidecar["held_out_accuracy"] <= 1.0
    assert json.loads((tmp_path / "out" / "image_tower.json").read_text()) == sidecar
    saved = load_file(str(weights))
    assert saved["head.weight"].shape == (30, 32)  # the classifier is in the file

    model_cfg = ModelConfig(
        image=TowerConfig(tower="vit_test", pretrained=str(weights)),
        text=TowerConfig(tower="bert_test"),
        embed_dim=16,
        setting="Lu",
    )
    model = build_clip(model_cfg, vocab_size=100)
    trainable = resolve_trainable(model, trainable_rules(model_cfg))
    model, locked = split_locked(model, model_cfg)
    for key, value in locked.image.tower.vit.state_dict().items():
        assert torch.equal(value, saved[key]), key
    assert locked.image.identity()["sha256"] == sidecar["sha256"]
    assert not any(trainable[n] for n in trainable if n.startswith("image_tower."))

    # The sidecar guards against loading the weights as another tower.
    with pytest.raises(ValueError, match="pretrained as image tower 'vit_test'"):
        from tritower.model import load_image_tower

        load_image_tower("vit_scene_tiny", weights)


def test_single_shape_keys_are_the_scenes_with_one_colour_word(tmp_path: Path) -> None:
    """``single_shape_keys`` against the captions: a one-shape caption names one colour, a
    two-shape caption two (``data/scenes.py``'s templates), independently of the json ``shapes``."""
    import re
    import tarfile

    from tritower.data import ensure_builtin_data
    from tritower.data.config import DataConfig
    from tritower.data.scenes import COLOURS
    from tritower.launch.tools.pretrain_image import single_shape_keys

    data = ensure_builtin_data(
        DataConfig(
            cache_dir=str(tmp_path),
            builtin_train_samples=300,
            builtin_eval_samples=50,
            builtin_image_size=32,
            builtin_shard_size=100,
        )
    )
    colour_word = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")
    colours_named: dict[str, int] = {}
    for path in data.train_shards:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.name.endswith(".txt"):
                    caption = tar.extractfile(member).read().decode()
                    colours_named[member.name[: -len(".txt")]] = len(colour_word.findall(caption))
    assert set(colours_named.values()) == {1, 2} and len(colours_named) == 300
    singles = single_shape_keys(data.train_shards)
    assert singles == {key for key, count in colours_named.items() if count == 1}
    assert 0.6 < len(singles) / 300 < 0.9  # the generator draws 75% single-shape training scenes
    assert len(single_shape_keys(data.eval_shards)) == 50  # the held-out split is all single-shape


def test_shape_logits_sum_the_colours_of_each_shape() -> None:
    """The shape marginal's softmax = the 30-class softmax summed over the classes whose name
    ends with the shape (reference from the class names, not from the colour-major layout)."""
    from tritower.data.scenes import CLASSNAMES, SHAPES
    from tritower.launch.tools.pretrain_image import shape_logits

    torch.manual_seed(0)
    logits = torch.randn(4, len(CLASSNAMES), dtype=torch.float64) * 3
    probs = logits.softmax(-1)
    expected = torch.stack(
        [probs[:, [i for i, name in enumerate(CLASSNAMES) if name.split()[-1] == shape]].sum(-1) for shape in SHAPES],
        dim=-1,
    )
    torch.testing.assert_close(shape_logits(logits).softmax(-1), expected)


def test_bad_option_is_rejected(usage_error) -> None:
    from tritower.launch.config import ConfigError

    with pytest.raises(ConfigError, match="unknown option --stpes .did you mean '--steps'.."):
        parse_args(["--stpes=3"])
    with pytest.raises(ConfigError, match="did you mean '--data.builtin_image_size'"):
        parse_args(["--data.builtin_image_sise=32"])
    with pytest.raises(ConfigError, match=r"shape_fraction must be in \[0, 1\), got 1.0"):
        parse_args(["--shape_fraction=1"])


def test_label_sets_of_the_builtin_scenes() -> None:
    from tritower.data.scenes import CLASSNAMES, COLOURS, SHAPES
    from tritower.launch.config import ConfigError
    from tritower.launch.tools.pretrain_image import num_labels, relabel

    # "green triangle" is class 7 (colour-major, 5 shapes per colour): shape 2, colour 1.
    assert CLASSNAMES[7] == "green triangle"
    labels = torch.tensor([7, 0, 29, -1])
    assert relabel(labels, "shape").tolist() == [SHAPES.index("triangle"), 0, 4, -1]
    assert relabel(labels, "colour").tolist() == [list(COLOURS).index("green"), 0, 5, -1]
    assert relabel(labels, "colour_shape").tolist() == [7, 0, 29, -1]
    assert (num_labels("shape", 30), num_labels("colour", 30), num_labels("colour_shape", 30)) == (5, 6, 30)
    assert parse_args(["--labels=shape"]).labels == "shape"
    with pytest.raises(ConfigError, match="labels='size' is not a label set; use one of colour_shape, shape, colour"):
        parse_args(["--labels=size"])
    with pytest.raises(ConfigError, match="needs the built-in scenes"):
        parse_args(["--labels=shape", "--data.train_shards=/x/{0..1}.tar", "--data.vocab=/x/vocab.txt"])
