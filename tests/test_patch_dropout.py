"""FLIP's patch dropout and drop-path on the image tower (training only), and ``train.compile``."""

from __future__ import annotations

import pytest
import torch

from tritower.launch.cli import load_config
from tritower.launch.towers.model_setup import build_towers, compile_towers
from tritower.model import build_image_tower


def _pair(**regularisation: float) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    plain = build_image_tower("vit_test")
    torch.manual_seed(0)
    other = build_image_tower("vit_test")
    other.set_regularisation(**regularisation)
    return plain, other


def test_patch_dropout_keeps_a_random_subset_of_patches_in_training_only() -> None:
    plain, dropped = _pair(patch_dropout=0.5)
    images = torch.randn(4, 3, 32, 32)
    seen = []
    dropped.vit.blocks[0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0].shape))
    dropped.train(), plain.train()
    assert not torch.allclose(dropped(images), plain(images))
    tokens = (32 // plain.spec.patch_size) ** 2
    assert seen[-1] == (4, tokens // 2, plain.width)  # [B, kept tokens, width]
    dropped.eval(), plain.eval()
    assert torch.equal(dropped(images), plain(images))  # evaluation sees every patch
    assert seen[-1] == (4, tokens, plain.width)


def test_drop_path_changes_training_only_and_rises_with_depth() -> None:
    plain, dropped = _pair(drop_path=0.5)
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for block in dropped.vit.blocks]
    assert rates[0] == 0.0 and rates[-1] == 0.5
    images = torch.randn(8, 3, 32, 32)
    torch.manual_seed(1)
    dropped.train(), plain.train()
    assert not torch.allclose(dropped(images), plain(images))
    dropped.eval(), plain.eval()
    assert torch.equal(dropped(images), plain(images))


def _model(*overrides: str) -> torch.nn.Module:
    cfg = load_config(["--experiment", "clip_test", *overrides])
    torch.manual_seed(0)
    return build_towers(cfg, vocab_size=100).model


def test_config_reaches_the_engines_image_tower_and_changes_training_not_evaluation() -> None:
    plain, dropped = _model(), _model("--model.image.patch_dropout=0.75", "--model.image.drop_path=0.1")
    assert dropped.image_tower.vit.patch_drop.prob == 0.75
    images = torch.randn(4, 3, 32, 32)
    ids, mask = torch.randint(0, 100, (4, 8)), torch.ones(4, 8, dtype=torch.long)
    plain.train(), dropped.train()
    train_out = dropped(images=images, input_ids=ids, attention_mask=mask)["image_features"]
    assert not torch.allclose(train_out, plain(images=images, input_ids=ids, attention_mask=mask)["image_features"])
    plain.eval(), dropped.eval()
    with torch.no_grad():
        a = plain(images=images, input_ids=ids, attention_mask=mask)["image_features"]
        b = dropped(images=images, input_ids=ids, attention_mask=mask)["image_features"]
    assert torch.equal(a, b)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in dropped.named_parameters()]


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["--model.image.patch_dropout=1.0"], "must be in [0, 1)"),
        (["--model.image.drop_path=-0.1"], "must be in [0, 1)"),
        (
            ["--model.setting=Lu", "--model.image.pretrained=x.safetensors", "--model.image.patch_dropout=0.5"],
            "is locked",
        ),
        (["--train.compile=fast"], "invalid choice 'fast' for argument '--train.compile'"),
    ],
)
def test_bad_values_fail_at_load(overrides: list[str], expected: str, usage_error) -> None:
    assert expected in usage_error(load_config, ["--experiment", "clip_test", *overrides])


def test_compile_keeps_names_and_outputs_on_the_cpu() -> None:
    """``aot_eager``: graph capture and autograd tracing without inductor's C++ compile (which takes
    minutes on 2 cores); inductor is the same call with ``--train.compile=inductor``."""
    torch._dynamo.reset()
    plain, compiled = _model(), _model("--train.compile=aot_eager")
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in compiled.named_parameters()]
    assert compiled.image_tower._compiled_call_impl is not None
    images = torch.randn(4, 3, 32, 32)
    ids, mask = torch.randint(0, 100, (4, 8)), torch.ones(4, 8, dtype=torch.long)
    plain.eval(), compiled.eval()
    expected = plain(images=images, input_ids=ids, attention_mask=mask)
    got = compiled(images=images, input_ids=ids, attention_mask=mask)
    for key in ("image_features", "text_features"):
        torch.testing.assert_close(got[key], expected[key])
    got["image_features"].sum().backward()
    assert compiled.image_tower.vit.patch_embed.proj.weight.grad is not None
    compile_towers(plain, "")  # "" = off: nothing changes
    assert plain.image_tower._compiled_call_impl is None


@pytest.mark.launch
def test_patch_dropout_and_compiled_towers_train_under_zero3_on_two_ranks(train) -> None:
    run = train(
        "--model.image.patch_dropout=0.5",
        "--model.image.drop_path=0.1",
        "--train.compile=aot_eager",
        "--train.steps=6",
        "--train.log_every=1",
        "--eval.at_end=False",
    )
    losses = run.losses()
    assert len(losses) == 6 and all(loss == loss for loss in losses)  # finite, no NaN
    assert run.metrics["step"] == 6
