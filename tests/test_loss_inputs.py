"""Input checks of the contrastive losses: non-finite features, shapes, config values."""

from __future__ import annotations

import pytest
import torch

from tritower.losses import OBJECTIVES, LossConfig, build_objective, clip_loss, sigmoid_loss


def objective(image, text, scale, bias=None, **config):
    """The objective for ``LossConfig(**config)`` on a model's output dict."""
    outputs = {"image_features": image, "text_features": text, "logit_scale": scale}
    if bias is not None:
        outputs["logit_bias"] = bias
    return build_objective(LossConfig(**config))(outputs)["loss"]


def _features(batch: int = 6, dim: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    image = torch.nn.functional.normalize(torch.randn(batch, dim), dim=1)
    text = torch.nn.functional.normalize(torch.randn(batch, dim), dim=1)
    return image, text, torch.tensor([10.0])


@pytest.mark.parametrize("impl", ["naive", "tiled"])
def test_nonfinite_features_name_the_input_and_count(impl: str) -> None:
    image, text, scale = _features()
    text[1, 2] = float("nan")
    text[4, 0] = float("inf")
    with pytest.raises(ValueError, match=r"text_features: 2 non-finite") as info:
        clip_loss(image, text, scale, impl=impl, tile_size=4)
    assert "image_features" not in str(info.value)
    image[0, 0] = float("-inf")
    with pytest.raises(ValueError, match=r"image_features: 1 non-finite.*text_features: 2"):
        sigmoid_loss(image, text, scale, torch.tensor([-10.0]), impl=impl, tile_size=4)


def test_nonfinite_scale_and_bias_are_reported() -> None:
    image, text, _ = _features()
    with pytest.raises(ValueError, match="logit_scale: 1 non-finite"):
        objective(image, text, torch.tensor([float("inf")]))
    with pytest.raises(ValueError, match="logit_bias: 1 non-finite"):
        objective(image, text, torch.tensor([1.0]), torch.tensor([float("nan")]), kind="sigmoid")


def test_check_can_be_turned_off() -> None:
    image, text, scale = _features()
    image[0, 0] = float("nan")
    loss = objective(image, text, scale, check_finite=False)
    assert torch.isnan(loss)


def test_bias_is_required_for_sigmoid_and_refused_for_softmax() -> None:
    image, text, scale = _features()
    with pytest.raises(ValueError, match="needs logit_bias"):
        objective(image, text, scale, kind="sigmoid")
    with pytest.raises(ValueError, match="takes no logit_bias"):
        objective(image, text, scale, torch.tensor([0.0]), kind="softmax")


def test_mismatched_shapes_are_refused() -> None:
    image, text, scale = _features()
    with pytest.raises(ValueError, match="one shape"):
        clip_loss(image, text[:-1], scale)


@pytest.mark.parametrize("field, value", [("kind", "hinge"), ("impl", "flash"), ("scope", "world"), ("tile_size", 0)])
def test_config_rejects_unknown_values(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        LossConfig(**{field: value})
    with pytest.raises(ValueError, match="kind='softmax' only"):
        LossConfig(kind="sigmoid", impl="triton")


def test_objective_is_chosen_from_one_table() -> None:
    loss = build_objective(LossConfig(kind="sigmoid", impl="tiled", tile_size=8))
    assert type(loss) is OBJECTIVES["siglip"] and loss.config.tile_size == 8
    assert "impl=tiled" in repr(loss)
    assert type(build_objective(LossConfig())) is OBJECTIVES["clip"]
    assert type(build_objective(LossConfig(), three_towers=True)) is OBJECTIVES["3T"]
    with pytest.raises(KeyError, match="logit_scale"):
        build_objective(LossConfig())({"image_features": torch.ones(2, 3), "text_features": torch.ones(2, 3)})


def test_triton_refuses_cpu_tensors_without_the_interpreter() -> None:
    pytest.importorskip("triton")
    from tritower.losses.triton_kernels import interpreting

    if interpreting():
        pytest.skip("TRITON_INTERPRET is set in this process")
    image, text, scale = _features()
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        clip_loss(image, text, scale, impl="triton")
