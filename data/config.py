"""Configuration of the training and evaluation data (the ``data`` section)."""

from __future__ import annotations

from dataclasses import dataclass

from .styles import parse_styles


@dataclass
class DataConfig:
    """Where samples come from and how they are batched, decoded and augmented."""

    train_shards: str = ""
    """Training shards: a brace pattern, a ``.txt`` list of URLs, or ``builtin`` / "" for the
    built-in procedurally drawn scenes (generated once into ``cache_dir``)."""
    eval_shards: str = ""
    """Held-out shards for zero-shot and retrieval; "" with built-in data uses its eval split."""
    cache_dir: str = "~/.cache/tritower"
    """Folder for generated built-in data and its vocabulary."""
    builtin_train_samples: int = 20000
    """Number of built-in training scenes to generate."""
    builtin_eval_samples: int = 1500
    """Number of built-in held-out scenes (zero-shot and retrieval)."""
    builtin_image_size: int = 64
    """Side in pixels of the generated built-in scene images."""
    batch_size: int = 256
    """Global batch: image-text pairs per optimizer step over all ranks."""
    num_workers: int = 1
    """Dataloader worker processes per rank."""
    data_ranks: int = 0
    """The number of ranks the training stream is laid out for (0: the world size of the run's first
    start; a resume keeps the saved one). Global step s holds the same samples on any world size that
    divides it (``data/elastic.py``), so a run meant to resume on other world sizes sets a multiple of
    all of them (12 serves 1, 2, 3, 4, 6 and 12 ranks). Must divide ``batch_size``."""
    shuffle_buffer: int = 2000
    """Samples held in the in-worker shuffle buffer."""
    crop_scale_min: float = 0.8
    """Lower bound of the random-resized-crop area fraction (upper bound is 1)."""
    caption_key: str = "txt"
    """Field holding the caption: ``txt`` or ``json:<field>`` for a field of the json sidecar."""
    label_key: str = "json:label"
    """Companion class label (zero-shot evaluation, ``launch/tools/pretrain_image.py``): ``json:<field>``
    for an integer in the json sidecar, a field name holding the integer as text (``cls``, as
    webdataset's class-labelled shards), or "" to read none. Absent labels are -1."""
    train_weights: str = ""
    """Sampling weights of the ``::``-separated sources of ``train_shards`` (e.g. ``1::3``);
    "" weighs all sources equally. Per sample: a sample comes from source i with probability
    w_i / sum(w), whatever the shard sizes. Needs ``resampled``."""
    resampled: bool = True
    """True: each worker draws shards with replacement (infinite, mixes sources by weight).
    False: every shard is read once per epoch, split disjointly over ranks x workers."""
    samples_per_epoch: int = 0
    """Resampled mode only: samples read per epoch over all ranks and workers (each worker
    reads ``ceil(samples_per_epoch / (ranks*workers))``, then reseeds); 0: one shard draw per
    shard per epoch. Epochs are the unit of shuffling, reseeding and resume replay."""
    vocab: str = ""
    """WordPiece vocabulary: a vocab.txt path, a local model folder, or ``package:<name>``;
    "" uses the built-in scene vocabulary (only with built-in data)."""
    max_bad_fraction: float = 0.05
    """Stop with an error naming the worst shards when more than this fraction of a worker's
    samples is bad (undecodable image, bad caption, missing field, unreadable shard)."""
    bad_check_min_samples: int = 200
    """Samples a worker reads before ``max_bad_fraction`` is enforced (avoids noise at start)."""
    shard_retries: int = 2
    """Extra tries (after 1 s, 2 s, ...) of a remote shard (``pipe:``, URL) that fails before
    its first sample; local shards are not retried."""
    builtin_seed: int = 0
    """Seed of the built-in scene generator; the held-out split uses a different derived seed."""
    builtin_shard_size: int = 500
    """Built-in scenes per tar shard."""
    builtin_styles: str = "plain"
    """How the built-in scenes (both splits) are drawn: ``+``-joined styles out of plain, outline,
    noisy, shades, offgrid, or ``broad`` (all); with several, each scene takes one at random
    (``data/scenes.py``). An eval set ``NAME=builtin:STYLES`` in ``eval.sets`` is the held-out
    split in other styles: the same scenes out of the training distribution."""
    views: int = 0
    """Training crops per sample. 0: a fresh random resized crop every time a sample is read
    (seeded by its stream position). V > 0: each sample has V fixed crops (view v of sample
    ``key`` drawn with ``transforms.view_rng(view_seed, key, v)``) and epoch e uses view
    ``transforms.epoch_view(seed, e, key, V)``: the crops precomputed embeddings were taken
    from. With ``embeddings`` set, 0 means "as the embeddings' meta.json says"."""
    view_seed: int = 0
    """Seed of the fixed views' crop boxes (with ``views`` > 0). With ``embeddings`` set, the
    folder's value is used; a different non-zero value here is an error."""
    embeddings: str = ""
    """Folder of precomputed locked-tower embeddings written by ``launch/tools/precompute.py`` for
    these training shards; each batch then carries ``embedding`` [B, width] of exactly the view
    its image was cropped as. "" = none."""

    def __post_init__(self) -> None:
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise ValueError(f"data.crop_scale_min must be in (0, 1], got {self.crop_scale_min}")
        if self.shard_retries < 0:
            raise ValueError(f"data.shard_retries must be >= 0, got {self.shard_retries}")
        if self.data_ranks < 0:
            raise ValueError(f"data.data_ranks must be >= 0, got {self.data_ranks}")
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if self.batch_size <= 0:
            raise ValueError(f"data.batch_size must be positive, got {self.batch_size}")
        if self.caption_key != "txt" and not self.caption_key.startswith("json:"):
            raise ValueError(f"data.caption_key must be 'txt' or 'json:<field>', got {self.caption_key!r}")
        if self.label_key and (self.label_key == "json:" or self.label_key.startswith("__") or "/" in self.label_key):
            raise ValueError(
                f"data.label_key must be 'json:<field>', a field name such as 'cls', or '', got {self.label_key!r}"
            )
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.samples_per_epoch < 0 or (self.samples_per_epoch and not self.resampled):
            raise ValueError("data.samples_per_epoch must be >= 0 and needs data.resampled=True")
        if self.views < 0:
            raise ValueError(f"data.views must be >= 0, got {self.views}")
        if self.train_weights and not self.resampled:
            raise ValueError("data.train_weights needs data.resampled=True (sources are sampled)")
        parse_styles(self.builtin_styles)
        for name in ("builtin_train_samples", "builtin_eval_samples", "builtin_image_size",
                     "builtin_shard_size"):  # fmt: skip
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name} must be positive, got {getattr(self, name)}")

    @property
    def uses_builtin(self) -> bool:
        """True when training reads the built-in generated scenes."""
        return self.train_shards in ("", "builtin")
