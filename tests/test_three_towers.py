"""Three Towers (3T): the loss, the model's four 3T heads, the alpha mixture and its export.

Every number is checked against an independent float64 reference written from the formulas of
docs/towers.md, never against the code under test:

- the loss L = (1/3) [w_fg L(f,g) + w_fh L(f_h,h_f) + w_gh L(g_h,h_g)], L CLIP's symmetric
  cross-entropy written from its definition: value and gradients for impl naive and tiled (and
  triton under ``TRITON_INTERPRET=1``, in a subprocess as ``test_loss_triton.py`` does), odd
  sizes, weights and temperatures; on 2 gloo ranks (naive, tiled; triton in the subprocess)
  equal to the one-process loss with exactly one all_gather per step; NaN inputs raise
  ``NonFiniteInputError`` on every rank;
- the heads f_h(f), g_h(g), h_f(h), h_g(h) from the separate weights;
- the alpha score alpha <f(x), g(t)> + (1-alpha) <h_g(h(x)), g_h(g(t))> from the separate
  pieces, through the evaluation wrapper, ``evaluate_alphas`` and an ``--alpha`` export.

Run: ``pytest tests/test_three_towers.py`` (CPU; one 2-rank gloo spawn, one triton subprocess).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tritower.losses import LossConfig, NonFiniteInputError, ThreeTowersLoss, three_towers_loss
from tritower.losses.three_towers import INPUT_KEYS, TERMS

VOCAB = 64
WEIGHTS = (1.0, 1.0, 1.0)
TOLERANCES = {torch.float64: (1e-10, 1e-12), torch.float32: (2e-5, 2e-6)}


# ---- the float64 reference, from the formulas -----------------------------------------------


def reference_clip(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CLIP's loss: the mean of the a->b and b->a cross-entropies of logits s a b^T."""
    logits = scale.reshape(()) * (a @ b.T)  # [N, N]
    n = a.shape[0]
    a_to_b = -sum(logits[i, i] - torch.log(torch.exp(logits[i, :]).sum()) for i in range(n)) / n
    b_to_a = -sum(logits[i, i] - torch.log(torch.exp(logits[:, i]).sum()) for i in range(n)) / n
    return (a_to_b + b_to_a) / 2


def reference_loss(inputs: dict[str, torch.Tensor], weights=WEIGHTS) -> tuple[torch.Tensor, list]:
    """(1/3) [w_fg L(f, g; s_fg) + w_fh L(f_h, h_f; s_fh) + w_gh L(g_h, h_g; s_gh)] and the terms."""
    s_3t = inputs["logit_scale_3t"]
    terms = [reference_clip(inputs["image_features"], inputs["text_features"], inputs["logit_scale"]),
             reference_clip(inputs["image_features_3t"], inputs["third_image_features"], s_3t[0]),
             reference_clip(inputs["text_features_3t"], inputs["third_text_features"], s_3t[1])]
    return sum(w * t for w, t in zip(weights, terms)) / 3, terms


def unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def random_inputs(batch: int, dim: int, seed: int, scales=(14.0, 30.0, 70.0)) -> dict[str, torch.Tensor]:
    """Unit-norm float64 features for the six feature keys and the three multipliers."""
    g = torch.Generator().manual_seed(seed)
    inputs = {key: unit(torch.randn(batch, dim, generator=g, dtype=torch.float64))
              for key in INPUT_KEYS if "scale" not in key}
    inputs["logit_scale"] = torch.tensor([scales[0]], dtype=torch.float64)
    inputs["logit_scale_3t"] = torch.tensor(scales[1:], dtype=torch.float64)
    return inputs


def with_grads(inputs: dict[str, torch.Tensor], dtype: torch.dtype, compute) -> tuple:
    """(total, terms, {key: gradient}) of ``compute(leaves)`` on copies of ``inputs`` in ``dtype``."""
    leaves = {k: v.to(dtype).clone().requires_grad_() for k, v in inputs.items()}
    total, terms = compute(leaves)
    grads = torch.autograd.grad(total, list(leaves.values()))
    return total, terms, dict(zip(leaves, grads, strict=True))


def reference_with_grads(inputs: dict[str, torch.Tensor], weights=WEIGHTS) -> tuple:
    return with_grads(inputs, torch.float64, lambda leaves: reference_loss(leaves, weights))


def loss_with_grads(inputs, dtype, impl, weights=WEIGHTS, **kwargs) -> tuple:
    def compute(leaves):
        total, terms = three_towers_loss(*(leaves[k] for k in INPUT_KEYS), weights=weights, impl=impl, **kwargs)
        return total, [terms[name] for name in TERMS]

    return with_grads(inputs, dtype, compute)


def assert_matches(got: tuple, want: tuple, rtol: float, atol: float, label: str = "") -> None:
    torch.testing.assert_close(got[0].double(), want[0], rtol=rtol, atol=atol, msg=f"{label} value")
    for k, (g, w) in enumerate(zip(got[1], want[1], strict=True)):
        torch.testing.assert_close(g.double(), w.detach(), rtol=rtol, atol=atol, msg=f"{label} term {k}")
    for key in want[2]:
        torch.testing.assert_close(got[2][key].double(), want[2][key], rtol=rtol, atol=atol,
                                   msg=lambda m, key=key: f"{label} d/d{key}: {m}")


# ---- the loss, one process --------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["naive", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch,dim", [(7, 5), (13, 9)])
def test_loss_matches_float64_reference(impl: str, dtype: torch.dtype, batch: int, dim: int) -> None:
    inputs = random_inputs(batch, dim, seed=batch * 10 + dim)
    got = loss_with_grads(inputs, dtype, impl, tile_size=4)  # tiles of 4: partial tiles, split diagonals
    assert_matches(got, reference_with_grads(inputs), *TOLERANCES[dtype], label=impl)


@pytest.mark.parametrize("impl", ["naive", "tiled"])
def test_weights_and_temperatures_are_honoured(impl: str) -> None:
    weights = (0.5, 0.0, 2.0)
    inputs = random_inputs(11, 6, seed=3, scales=(5.0, 40.0, 90.0))
    want = reference_with_grads(inputs, weights)
    got = loss_with_grads(inputs, torch.float64, impl, weights=weights, tile_size=4)
    assert_matches(got, want, *TOLERANCES[torch.float64], label=impl)
    # A weight of 0 stops that term's gradient, and its value is still reported.
    assert torch.count_nonzero(got[2]["third_image_features"]) == 0 and got[1][1] > 0
    assert got[2]["logit_scale_3t"][0] == 0 and got[2]["logit_scale_3t"][1] != 0
    # Swapping the two 3T temperatures changes the loss: each term reads its own.
    swapped = dict(inputs, logit_scale_3t=inputs["logit_scale_3t"].flip(0))
    assert not torch.isclose(loss_with_grads(swapped, torch.float64, impl, weights=weights)[0], got[0])


def test_module_reads_the_model_dict_and_config() -> None:
    inputs = random_inputs(9, 4, seed=5)
    config = LossConfig(impl="tiled", tile_size=4, weight_main=2.0, weight_image_third=0.25, weight_text_third=1.5)
    total, terms = ThreeTowersLoss.from_config(config)({**inputs, "unused": torch.ones(1)})
    want, want_terms = reference_loss(inputs, (2.0, 0.25, 1.5))
    torch.testing.assert_close(total, want)
    for name, value in zip(TERMS, want_terms, strict=True):
        torch.testing.assert_close(terms[name], value)
        assert not terms[name].requires_grad
    with pytest.raises(KeyError, match="third_text_features"):
        ThreeTowersLoss(LossConfig())({k: v for k, v in inputs.items() if k != "third_text_features"})
    with pytest.raises(ValueError, match="sigmoid.*not supported"):
        ThreeTowersLoss(LossConfig(kind="sigmoid"))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight_text_third"):
            LossConfig(weight_text_third=bad)


@pytest.mark.parametrize("key", ["third_image_features", "logit_scale_3t", "text_features"])
def test_nonfinite_inputs_raise(key: str) -> None:
    inputs = random_inputs(5, 4, seed=1)
    inputs[key] = inputs[key].clone()
    inputs[key].view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteInputError, match=f"{key}: 1 non-finite"):
        ThreeTowersLoss(LossConfig())(inputs)


# ---- the loss on 2 gloo ranks -----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def count_gathers() -> list[str]:
    """Wrap torch.distributed's gathers (looked up at call time) to count the calls."""
    calls: list[str] = []
    for name in ("all_gather", "all_gather_into_tensor"):
        original = getattr(dist, name)

        def counting(*args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        setattr(dist, name, counting)
    return calls


def check_rank(rank: int, world: int, impl: str, scope: str, calls: list[str]) -> None:
    batch = 7
    inputs = random_inputs(world * batch, 6, seed=11)
    rows = slice(rank * batch, (rank + 1) * batch)
    local = {k: v[rows] if "scale" not in k else v for k, v in inputs.items()}
    before = len(calls)
    got = loss_with_grads(local, torch.float32, impl, tile_size=4, scope=scope)
    if scope == "global":
        assert len(calls) - before == 1, f"{impl}: {calls[before:]} (expected one all_gather)"
        value, terms, grads = reference_with_grads(inputs)
        want_grads = {k: g if "scale" in k else world * g[rows] for k, g in grads.items()}
    else:
        assert len(calls) == before, calls[before:]
        per_rank = [reference_with_grads({k: v[r * batch:(r + 1) * batch] if "scale" not in k else v
                                          for k, v in inputs.items()}) for r in range(world)]
        value = torch.stack([p[0] for p in per_rank]).mean()
        terms = [torch.stack([p[1][t] for p in per_rank]).mean() for t in range(3)]
        want_grads = dict(per_rank[rank][2])
        for key in ("logit_scale", "logit_scale_3t"):
            want_grads[key] = torch.stack([p[2][key] for p in per_rank]).mean(0)
    # Replicated temperatures: DeepSpeed applies the mean over ranks of their gradients.
    for key in ("logit_scale", "logit_scale_3t"):
        dist.all_reduce(got[2][key])
        got[2][key] /= world
    assert_matches(got, (value, terms, want_grads), 2e-5, 2e-6, label=f"rank {rank} {impl} {scope}")


def rank_worker(rank: int, world: int, port: int, impls: tuple[str, ...] = ("naive", "tiled")) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        calls = count_gathers()
        for impl in impls:
            for scope in ("global", "local"):
                check_rank(rank, world, impl, scope, calls)
        inputs = random_inputs(4, 3, seed=rank)
        if rank == world - 1:
            inputs["third_text_features"][0, 0] = float("nan")
        with pytest.raises(NonFiniteInputError, match=f"over {world} ranks.*third_text_features: 1"):
            ThreeTowersLoss(LossConfig(impl="tiled"))(inputs)
        dist.barrier()  # every rank raised, none is left waiting in a collective
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_with_one_gather() -> None:
    mp.spawn(rank_worker, args=(2, free_port()), nprocs=2, join=True)


# ---- triton, under the interpreter in a fresh process -----------------------------------------


def test_triton_under_interpreter() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    assert "3T triton checks passed" in done.stdout


def check_triton() -> None:
    for batch, dim, dtype in ((13, 9, torch.float64), (33, 16, torch.float32)):
        inputs = random_inputs(batch, dim, seed=batch)
        got = loss_with_grads(inputs, dtype, "triton", weights=(1.0, 0.5, 2.0), tile_size=16)
        assert_matches(got, reference_with_grads(inputs, (1.0, 0.5, 2.0)), *TOLERANCES[dtype], label="triton")


# ---- the model's 3T heads ---------------------------------------------------------------------


def tiny_three_towers(seed: int = 0, **kwargs):
    from tritower.model import CLIPModel, LockedTower, build_image_tower, build_text_tower

    torch.manual_seed(seed)
    model = CLIPModel(build_image_tower("vit_test"), build_text_tower("bert_test", VOCAB), 16, 2.0, 100.0,
                      third_width=32, **kwargs).eval()
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
    return {"f": f, "g": g, "f_h": head("image_proj_3t", f), "g_h": head("text_proj_3t", g),
            "h_f": head("third_proj_image", h), "h_g": head("third_proj_text", h)}


def test_model_heads_match_their_formulas() -> None:
    model, third = tiny_three_towers(init_logit_scale_3t=1.5)
    images, ids, mask = batch()
    out = model(images, ids, mask, third_embeddings=third.encode(images))
    want = pieces(model, third, images, ids, mask)
    names = {"image_features": "f", "text_features": "g", "image_features_3t": "f_h",
             "text_features_3t": "g_h", "third_image_features": "h_f", "third_text_features": "h_g"}
    for key, piece in names.items():
        torch.testing.assert_close(out[key].double(), want[piece], rtol=1e-5, atol=1e-6, msg=key)
    torch.testing.assert_close(out["logit_scale_3t"], torch.full([2], 1.5).exp())
    assert not torch.allclose(want["h_f"], want["h_g"])  # two heads on h, not one
    total, _ = ThreeTowersLoss(LossConfig())(out)
    total.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad is None for p in third.parameters())


def test_config_rules_and_sigmoid_bias(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from tritower.model import (ModelConfig, build_clip, build_image_tower, parameter_counts, parameter_groups,
                                resolve_trainable, trainable_rules)

    vit = tmp_path / "vit.safetensors"
    save_file(build_image_tower("vit_test").vit.state_dict(), str(vit))
    common = dict(image_tower="vit_test", text_tower="bert_test", embed_dim=16)
    cfg = ModelConfig(setting="3T", third_pretrained=str(vit), init_logit_scale_3t=0.5, **common)
    model = build_clip(cfg, vocab_size=VOCAB, logit_bias=-10.0)
    torch.testing.assert_close(model.logit_scale_3t.data, torch.full([2], 0.5))
    assert model.logit_bias.shape == (1,) and model.logit_bias.item() == -10.0  # [1]: never 0-dim
    trainable = resolve_trainable(model, trainable_rules(cfg))
    assert all(trainable.values()) and {"third_proj_image.weight", "third_proj_text.weight", "image_proj_3t.weight",
                                        "text_proj_3t.weight", "logit_scale_3t", "logit_bias"} <= set(trainable)
    groups = parameter_groups(model, trainable, cfg, weight_decay=0.1, base_lr=1e-3)
    no_decay = {id(p) for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {id(model.logit_bias), id(model.logit_scale_3t)} <= no_decay
    assert parameter_counts(model, trainable)["logit_scale"] == (1 + 2 + 1, 0)
    assert "logit_bias" in model(*batch(), third_embeddings=torch.randn(6, 32))
    default = build_clip(ModelConfig(setting="3T", third_pretrained=str(vit), **common), vocab_size=VOCAB)
    torch.testing.assert_close(default.logit_scale_3t.data, default.logit_scale.data.expand(2))
    with pytest.raises(ValueError, match="init_logit_scale_3t"):
        ModelConfig(setting="uu", init_logit_scale_3t=1.0, **common)
    with pytest.raises(ValueError, match="init_logit_scale_3t"):
        ModelConfig(setting="3T", third_pretrained=str(vit), init_logit_scale_3t=5.0, **common)


def test_planner_counts_the_model_heads() -> None:
    from tritower.launch import plan

    model, _ = tiny_three_towers()
    request = plan.PlanRequest("vit_test", "bert_test", "3T", 8, 1, 80, embed_dim=16, vocab_size=VOCAB)
    heads = sum(p.numel() for name, p in model.named_parameters()
                if name.split(".")[0] not in ("image_tower", "text_tower"))
    assert plan.head_parameters(request, plan.build_towers(request)) == heads


# ---- the alpha mixture --------------------------------------------------------------------------


def alpha_scores(p: dict[str, torch.Tensor], alpha: float) -> torch.Tensor:
    """alpha <f(x), g(t)> + (1 - alpha) <h_g(h(x)), g_h(g(t))>, [images, texts], float64."""
    return alpha * p["f"] @ p["g"].T + (1 - alpha) * p["h_g"] @ p["g_h"].T


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_mixture_scores_are_the_alpha_formula(alpha: float) -> None:
    from tritower.evaluation import ThreeTowersMixture
    from tritower.model import CLIPWithLocked, LockedTowers

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
    return types.SimpleNamespace(images=images, input_ids=ids, attention_mask=mask,
                                 labels=torch.arange(n) % len(classnames), classnames=classnames,
                                 templates=["a {}.", "a photo of a {c}.", "{} drawn"])


def test_evaluate_alphas_equals_evaluate_on_each_mixture() -> None:
    from tritower.evaluation import ThreeTowersMixture, evaluate, evaluate_alphas

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
    from tritower.launch.config import ConfigError, load_config

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
    third = LockedTower(torch.nn.Identity(), cfg.third_tower or cfg.image_tower, source=cfg.third_pretrained)
    torch.save({"module": model.state_dict(), "ds_config": {"zero_optimization": {"stage": 0}}, "step": 3,
                "config": TrainConfig(model=cfg).to_dict(), "dp_world_size": 1,
                "locked": {"third_tower": third.identity()}}, tag / "mp_rank_00_model_states.pt")
    (root / "checkpoints" / "latest").write_text(tag.name)
    return root / "checkpoints"


def test_export_plain_and_alpha_mixture(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from tritower.launch.export import ExportError, export
    from tritower.model import ModelConfig, build_clip, build_image_tower, build_third_tower
    from tritower.model.inference import load_export

    torch.manual_seed(1)
    save_file(build_image_tower("vit_test").vit.state_dict(), str(tmp_path / "vit.safetensors"))
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                                                  [f"w{i}" for i in range(VOCAB - 5)]) + "\n")
    cfg = ModelConfig(image_tower="vit_test", text_tower="bert_test", embed_dim=16, setting="3T",
                      third_pretrained=str(tmp_path / "vit.safetensors"))
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
    assert config["three_towers"]["alpha"] == 0.4 and str(tmp_path / "vit.safetensors") in config["tensors"]["locked_sources"]
    mixed = load_export(tmp_path / "mixed")
    assert mixed.alpha == 0.4
    torch.testing.assert_close(mixed.similarity(images, captions, scaled=False).double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mixed.similarity(images, captions), mixed.similarity(images, captions, scaled=False)
                               * model.scale().item())

    with pytest.raises(ExportError, match=r"\[0, 1\]"):
        export(checkpoint, tmp_path / "bad", vocab=vocab, alpha=1.5)
    torch.manual_seed(2)
    save_file(build_image_tower("vit_test").vit.state_dict(), str(tmp_path / "other.safetensors"))
    with pytest.raises(ExportError, match="sha256"):
        export(checkpoint, tmp_path / "bad", vocab=vocab, alpha=0.4,
               pretrained={"third_pretrained": str(tmp_path / "other.safetensors")})
    uu = ModelConfig(image_tower="vit_test", text_tower="bert_test", embed_dim=16)
    with pytest.raises(ExportError, match="3T"):
        export(fake_checkpoint(tmp_path / "uu", build_clip(uu, vocab_size=VOCAB), uu), tmp_path / "bad",
               vocab=vocab, alpha=0.5)


if __name__ == "__main__":
    assert os.environ.get("TRITON_INTERPRET") == "1", "run via pytest or set TRITON_INTERPRET=1"
    check_triton()
    mp.spawn(rank_worker, args=(2, free_port(), ("triton",)), nprocs=2, join=True)
    print("3T triton checks passed")
