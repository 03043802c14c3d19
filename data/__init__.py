"""Training and held-out data: webdataset tar shards, built-in scenes, tokenizer, transforms.

* ``config.DataConfig``: the ``data`` section of the training config.
* ``scenes.ensure_builtin_data``: generates (once) the built-in procedurally drawn scenes.
* ``tokenizer.build_tokenizer`` / ``tokenizer.tokenize``: local WordPiece vocabularies only.
* ``webdataset.build_train_loader``: infinite, resumable per-rank batches from tar shards.
* ``eval_set.load_eval_set``: the held-out split in memory for zero-shot and retrieval.
* ``embeddings.load_meta``: precomputed locked-tower embeddings (``launch/tools/precompute.py``).

Nothing in this package imports DeepSpeed.
"""

from .config import DataConfig
from .embeddings import EmbeddingsError, EmbeddingsMeta, load_meta
from .eval_set import EvalSet, load_eval_set
from .samples import BAD_KINDS, BadDataStats, DataQualityError
from .scenes import CLASSNAMES, ZERO_SHOT_TEMPLATES, BuiltinData, ensure_builtin_data
from .shards import expand_shards, resolve_sources
from .tokenizer import build_text_tokenizer, build_tokenizer, tokenize, train_unigram_tokenizer
from .transforms import epoch_view, view_rng
from .webdataset import TrainLoader, build_train_loader

__all__ = [
    "BAD_KINDS",
    "CLASSNAMES",
    "ZERO_SHOT_TEMPLATES",
    "BadDataStats",
    "BuiltinData",
    "DataConfig",
    "DataQualityError",
    "EmbeddingsError",
    "EmbeddingsMeta",
    "EvalSet",
    "TrainLoader",
    "build_text_tokenizer",
    "build_tokenizer",
    "build_train_loader",
    "ensure_builtin_data",
    "epoch_view",
    "expand_shards",
    "load_eval_set",
    "load_meta",
    "resolve_sources",
    "tokenize",
    "train_unigram_tokenizer",
    "view_rng",
]
