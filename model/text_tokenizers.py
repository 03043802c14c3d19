"""Tokenizers of the text tower families, from local files only.

- BERT / MiniLM (WordPiece): ``tritower.data.build_tokenizer`` (a ``vocab.txt``, a model folder,
  or ``package:<name>``); ``build_text_tokenizer`` hands such sources to it unchanged.
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

from collections.abc import Iterable
from pathlib import Path

from transformers import PreTrainedTokenizerBase

# T5's special-token ids: pad 0, end of sequence 1, unknown 2.
T5_SPECIALS = ("<pad>", "</s>", "<unk>")


def build_text_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer at ``source``: a WordPiece ``vocab.txt`` / BERT folder / ``package:<name>``
    (via ``tritower.data.build_tokenizer``) or a local SentencePiece/tokenizers folder."""
    from .pretrained import resolve_source

    path = resolve_source(str(source))
    has_sentencepiece = path.is_dir() and any(
        (path / name).is_file() for name in ("spiece.model", "tokenizer.json")
    )
    if not has_sentencepiece or (path / "vocab.txt").is_file():
        from tritower.data import build_tokenizer

        return build_tokenizer(source)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def train_unigram_tokenizer(
    texts: Iterable[str], folder: str | Path, vocab_size: int = 100
) -> PreTrainedTokenizerBase:
    """Trains a SentencePiece-style Unigram tokenizer (NFKC, lowercase, ``▁`` word boundaries,
    ``</s>`` appended) on ``texts`` and saves it to ``folder`` as a T5 tokenizer."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import UnigramTrainer
    from transformers import T5TokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = UnigramTrainer(
        vocab_size=vocab_size, special_tokens=list(T5_SPECIALS), unk_token="<unk>"
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tokenizer.token_to_id("</s>"))]
    )
    wrapped = T5TokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        extra_ids=0,
    )
    wrapped.save_pretrained(str(folder))
    return wrapped
