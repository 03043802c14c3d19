"""Three Towers (3T): the model's four heads, the alpha mixture and its export, checked against
float64 formulas written from docs/towers.md, never against the code under test:

- the heads f_h(f), g_h(g), h_f(h), h_g(h) from the separate weights;
- the alpha score alpha <f(x), g(t)> + (1-alpha) <h_g(h(x)), g_h(g(t))> from the separate
  pieces, through the evaluation wrapper, ``evaluate_alphas`` and an ``--alpha`` export.

The loss itself: ``test_three_towers.py``. Run: ``pytest tests/test_three_towers_model.py`` (CPU).
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch

from tritower.losses import LossConfig, ThreeTowersObjective

VOCAB = 64


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# ---- the model's 3T heads ---------------------------------------------------------------------


def tiny_three_towers(seed: int = 0, **kwargs):
    from tritower.model import CLIPModel, LockedTower, build_image_tower, build_text_tower

    torch.manual_seed(seed)
    model = CLIPModel(
        build_image_tower("vit_test"), build_text_tower("bert_test", VOCAB), 16, 2.0, 100.0, third_width=32, **kwargs
    ).eval()
    return model, LockedTower(build_image_tower("vit_test"), "vit_test")


def batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, 16, dtype=torch.long)
    mask[:, 10:] = 0
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(5, VOCAB, (n, 16), generator=g), mask


def pieces(model, third, images, ids, mask) -> dict[str, torch.Tensor]:
    """f, g, f_h, g_h, h_f, h_g in float64 from the towers' outputs and the separate head weights."""

    def head(name: str, x: torch.Tensor) -> torch.Tensor:
        return unit(x @ getattr(model, name).weight.double().T)

    with torch.no_grad():
        image, text = model.image_tower(images).double(), model.text_tower(ids, mask).double()
        h = third.encode(images).double()
    f, g = head("image_proj", image), head("text_proj", text)
    return {
        "f": f,
        "g": g,
        "f_h": head("image_proj_3t", f),
        "g_h": head("text_proj_3t", g),
        "h_f": head("third_proj_image", h),
        "h_g": head("third_proj_text", h),
    }


def test_model_heads_match_their_formulas() -> None:
    model, third = tiny_three_towers(init_logit_scale_3t=1.5)
    images, ids, mask = batch()
    out = model(images, ids, mask, third_embeddings=third.encode(images))
    want = pieces(model, third, images, ids, mask)
    names = {
        "image_features": "f",
        "text_features": "g",
        "image_features_3t": "f_h",
        "text_features_3t": "g_h",
        "third_image_features": "h_f",
        "third_text_features": "h_g",
    }
    for key, piece in names.items():
        torch.testing.assert_close(out[key].double(), want[piece], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(out["logit_scale_3t"], torch.full([2], 1.5).exp())
    assert not torch.allclose(want["h_f"], want["h_g"])  # two heads on h, not one
    total = ThreeTowersObjective(LossConfig())(out)["loss"]
    total.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in third.parameters())


def test_config_rules_and_sigmoid_bias(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from tritower.model import (
        ModelConfig,
        TowerConfig,
        build_clip,
        build_image_tower,
        parameter_counts,
        parameter_groups,
        resolve_trainable,
        trainable_rules,
    )

    vit = tmp_path / "vit.safetensors"
    save_file(build_image_tower("vit_test").vit.state_dict(), str(vit))
    common = dict(image=TowerConfig(tower="vit_test"), text=TowerConfig(tower="bert_test"), embed_dim=16)
    cfg = ModelConfig(third=TowerConfig(pretrained=str(vit)), setting="3T", init_logit_scale_3t=0.5, **common)
    model = build_clip(cfg, vocab_size=VOCAB, logit_bias=-10.0)
    torch.testing.assert_close(model.logit_scale_3t.data, torch.full([2], 0.5))
    assert model.logit_bias.shape == (1,) and model.logit_bias.item() == -10.0  # [1]: never 0-dim
    trainable = resolve_trainable(model, trainable_rules(cfg))
    assert all(trainable.values()) and {
        "third_proj_image.weight",
        "third_proj_text.weight",
        "image_proj_3t.weight",
        "text_proj_3t.weight",
        "logit_scale_3t",
        "logit_bias",
    } <= set(trainable)
    groups = parameter_groups(model, trainable, cfg, weight_decay=0.1, base_lr=1e-3)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {id(model.logit_bias), id(model.logit_scale_3t)} <= no_decay
    assert parameter_counts(model, trainable)["logit_scale"] == (1 + 2 + 1, 0)
    assert "logit_bias" in model(*batch(), third_embeddings=torch.randn(6, 32))
    default = build_clip(ModelConfig(third=TowerConfig(pretrained=str(vit)), setting="3T", **common), vocab_size=VOCAB)
    torch.testing.assert_close(default.logit_scale_3t.data, default.logit_scale.data.expand(2))
    with pytest.raises(ValueError, match="init_logit_scale_3t"):
        ModelConfig(setting="uu", init_logit_scale_3t=1.0, **common)
    with pytest.raises(ValueError, match="init_logit_scale_3t"):
        ModelConfig(third=TowerConfig(pretrained=str(vit)), setting="3T", init_logit_scale_3t=5.0, **common)


def test_planner_counts_the_model_heads() -> None:
    from tritower.launch import plan

    model, _ = tiny_three_towers()
    request = plan.PlanRequest("vit_test", "bert_test", 8, 1, 80, "3T", embed_dim=16, vocab_size=VOCAB)
    heads = sum(
        p.numel() for name, p in model.named_parameters() if name.split(".")[0] not in ("image_tower", "text_tower")
    )
    assert plan.head_parameters(request, plan.build_towers(request)) == heads


# ---- the alpha mixture --------------------------------------------------------------------------


def alpha_scores(p: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """alpha <f(x), g(t)> + (1 - alpha) <h_g(h(x)), g_h(g(t))>, [images, texts], float64."""
    return alpha * p["f"] @ p["g"].T + (1 - alpha) * p["h_g"] @ p["g_h"].T


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_mixture_scores_are_the_alpha_formula(alpha: float) -> None:
    from tritower.model import CLIPWithLocked, LockedTowers, ThreeTowersMixture

    model, third = tiny_three_towers()
    images, ids, mask = batch()
    want = alpha_scores(pieces(model, third, images, ids, mask), alpha)
    for wrapped in (model, CLIPWithLocked(model, LockedTowers(third=third))):
        mixture = ThreeTowersMixture(wrapped, third, alpha)
        with torch.no_grad():
            image, text = mixture.encode_image(images), mixture.encode_text(ids, mask)
        assert image.shape == (6, 32) and torch.allclose(image.norm(dim=1), torch.ones(6))
        torch.testing.assert_close((image @ text.T).double(), want, rtol=1e-5, atol=1e-6)
    if alpha == 1.0:  # the plain 3T model: f.g scores of the main towers alone
        with torch.no_grad():
            plain = model.encode_image(images) @ model.encode_text(ids, mask).T
        torch.testing.assert_close(image @ text.T, plain, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        ThreeTowersMixture(model, third, 1.5)


def tokenize(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed toy tokenizer: one id per word (hashed into the vocabulary), padded to 16."""
    ids, mask = torch.zeros(len(prompts), 16, dtype=torch.long), torch.zeros(len(prompts), 16, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        words = [5 + sum(map(ord, w)) % (VOCAB - 5) for w in prompt.split()][:16]
        ids[row, : len(words)], mask[row, : len(words)] = torch.tensor(words), 1
    return ids, mask


def toy_eval_set(n: int = 24):
    images, ids, mask = batch(n, seed=4)
    classnames = ["red circle", "blue star", "green cross", "purple square", "small dot"]
    return types.SimpleNamespace(
        images=images,
        input_ids=ids,
        attention_mask=mask,
        labels=torch.arange(n) % len(classnames),
        classnames=classnames,
        templates=["a {}.", "a photo of a {c}.", "{} drawn"],
    )


def test_evaluate_alphas_equals_evaluate_on_each_mixture() -> None:
    from tritower.evaluation import evaluate, evaluate_alphas
    from tritower.model import ThreeTowersMixture

    model, third = tiny_three_towers()
    eval_set = toy_eval_set()
    alphas = [0.0, 0.25, 1.0]
    common = dict(device=torch.device("cpu"), batch_size=10, max_samples=20)
    got = evaluate_alphas(model, third, eval_set, tokenize, alphas, **common)
    plain = evaluate(model, eval_set, tokenize, **common)
    assert set(got) == {f"{k}@alpha={a:g}" for k in plain for a in alphas}
    for alpha in alphas:
        mixed = evaluate(ThreeTowersMixture(model, third, alpha), eval_set, tokenize, **common)
        assert {k: got[f"{k}@alpha={alpha:g}"] for k in mixed} == pytest.approx(mixed, abs=1e-9)
    assert {k: got[f"{k}@alpha=1"] for k in plain} == pytest.approx(plain, abs=1e-9)
    assert not model.training  # evaluating through the wrapper leaves an eval-mode model in eval mode
    model.train()
    evaluate_alphas(model, third, eval_set, tokenize, [0.5], **common)
    evaluate(ThreeTowersMixture(model, third, 0.5), eval_set, tokenize, **common)
    assert model.training and not third.training


def test_eval_config_alphas() -> None:
    from tritower.evaluation.config import EvalConfig
    from tritower.launch.cli import load_config
    from tritower.launch.config import ConfigError

    assert EvalConfig(alphas=" 0, 0.5,1 ").alpha_values() == [0.0, 0.5, 1.0] and EvalConfig().alpha_values() == []
    for bad in ("1.5", "half"):
        with pytest.raises(ValueError, match="eval.alphas"):
            EvalConfig(alphas=bad)
    with pytest.raises(ConfigError, match="3T only"):
        load_config(["--experiment", "clip_test", "--eval.alphas=0.5"])
    with pytest.raises(ConfigError, match="3T only"):
        load_config(["--experiment", "clip_test", "--loss.weight_main=0.5"])


# ---- export: plain CLIP by default, the alpha mixture with --alpha ------------------------------


def fake_checkpoint(root: Path, model, cfg) -> Path:
    """A ZeRO-0 DeepSpeed checkpoint folder as the engine writes it (module state + client state)."""
    from tritower.launch.config import TrainConfig
    from tritower.model import LockedTower

    tag = root / "checkpoints" / "step00000003"
    tag.mkdir(parents=True)
    third = LockedTower(torch.nn.Identity(), cfg.third.tower or cfg.image.tower, source=cfg.third.pretrained)
    torch.save(
        {
            "module": model.state_dict(),
            "ds_config": {"zero_optimization": {"stage": 0}},
            "step": 3,
            "config": TrainConfig(model=cfg).to_dict(),
            "dp_world_size": 1,
            "locked": {"third_tower": third.identity()},
        },
        tag / "mp_rank_00_model_states.pt",
    )
    (root / "checkpoints" / "latest").write_text(tag.name)
    return root / "checkpoints"


def test_export_plain_and_alpha_mixture(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from tritower.inference import load_export
    from tritower.launch.tools.export import ExportError, export
    from tritower.model import ModelConfig, TowerConfig, build_clip, build_image_tower, build_third_tower

    torch.manual_seed(1)
    save_file(build_image_tower("vit_test").vit.state_dict(), str(tmp_path / "vit.safetensors"))
    (tmp_path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]) + "\n"
    )
    cfg = ModelConfig(
        image=TowerConfig(tower="vit_test"),
        text=TowerConfig(tower="bert_test"),
        third=TowerConfig(pretrained=str(tmp_path / "vit.safetensors")),
        embed_dim=16,
        setting="3T",
    )
    model = build_clip(cfg, vocab_size=VOCAB).eval()  # "trained": a different seed than the export's rebuild
    checkpoint = fake_checkpoint(tmp_path / "run", model, cfg)
    vocab = str(tmp_path / "vocab.txt")
    captions = ["w1 w2 w3", "w4", "w7 w7 w9 w10 w11"]
    images = batch(4, seed=2)[0]

    config = export(checkpoint, tmp_path / "plain", vocab=vocab)
    weights = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert config["three_towers"] is None and not any("3t" in k or "third" in k for k in weights)
    plain = load_export(tmp_path / "plain")
    ids, mask = plain.tokenize(captions)
    with torch.no_grad():
        torch.testing.assert_close(plain.encode_image(images), model.encode_image(images), rtol=0, atol=0)
        torch.testing.assert_close(plain.encode_text(captions), model.encode_text(ids, mask), rtol=0, atol=0)

    third = build_third_tower(cfg)
    want = alpha_scores(pieces(model, third, images, ids, mask), 0.4)
    config = export(checkpoint, tmp_path / "mixed", vocab=vocab, alpha=0.4)
    assert (
        config["three_towers"]["alpha"] == 0.4
        and str(tmp_path / "vit.safetensors") in config["tensors"]["locked_sources"]
    )
    mixed = load_export(tmp_path / "mixed")
    assert mixed.alpha == 0.4
    torch.testing.assert_close(mixed.similarity(images, captions, scaled=False).double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        mixed.similarity(images, captions), mixed.similarity(images, captions, scaled=False) * model.scale().item()
    )

    with pytest.raises(ExportError, match=r"\[0, 1\]"):
        export(checkpoint, tmp_path / "bad", vocab=vocab, alpha=1.5)
    torch.manual_seed(2)
    save_file(build_image_tower("vit_test").vit.state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(ExportError, match="sha256"):
        export(
            checkpoint,
            tmp_path / "bad",
            vocab=vocab,
            alpha=0.4,
            pretrained={"third": str(tmp_path / "other.safetensors")},
        )
    uu = ModelConfig(image=TowerConfig(tower="vit_test"), text=TowerConfig(tower="bert_test"), embed_dim=16)
    with pytest.raises(ExportError, match="3T"):
        export(
            fake_checkpoint(tmp_path / "uu", build_clip(uu, vocab_size=VOCAB), uu),
            tmp_path / "bad",
            vocab=vocab,
            alpha=0.5,
        )
