"""Image transforms for training (random resized crop) and evaluation (resize + centre crop).

Evaluation resizes the shorter side to the tower's size and centre-crops it, with torchvision's
own ``resize``/``center_crop`` (exactly open_clip's ``preprocess`` with ``resize_mode="shortest"``,
timm's ``create_transform(crop_pct=1.0)`` and so clip_benchmark's inputs: the same pixels).

Implemented on PIL directly (crop, then resize, as torchvision does); the crop is drawn from
an explicit ``random.Random`` so that a sample's augmentation depends only on the seed and its
position in the data stream (exact resume reproduces it bit for bit).
There are no horizontal flips: captions say "left" and "right".

Fixed views (``data.views = V > 0``): instead of a fresh crop per position, sample ``key`` has V
crops, view ``v`` drawn with ``view_rng(view_seed, key, v)``, and epoch ``e`` uses view
``epoch_view(seed, e, key, V)``. Both depend on the key, never on the position, so the crop a
training run takes is the crop ``launch/tools/precompute.py`` embedded for that key and view.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, functional

from .samples import to_8bit


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float],
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """A crop box (left, top, right, bottom), sampled as torchvision's RandomResizedCrop does.

    Area fraction uniform in ``scale``, aspect ratio log-uniform in ``ratio``; after 10 failed
    tries it falls back to the largest centred crop with the ratio clamped into ``ratio``.
    """
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left = rng.randint(0, width - w)
            top = rng.randint(0, height - h)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def view_rng(view_seed: int, key: str, view: int) -> random.Random:
    """The rng that draws the crop box of view ``view`` of sample ``key`` (``data.views`` > 0).

    Seeded by the string ``f"{view_seed}/view/{key}/{view}"``: the documented contract between a
    precompute run and the training runs that read its embeddings.
    """
    return random.Random(f"{view_seed}/view/{key}/{view}")


def epoch_view(seed: int, epoch: int, key: str, views: int) -> int:
    """Which of the ``views`` fixed views of ``key`` its worker's epoch ``epoch`` uses:
    ``random.Random(f"{seed}/view-of/{epoch}/{key}").randrange(views)``."""
    return random.Random(f"{seed}/view-of/{epoch}/{key}").randrange(views)


def to_normalised_tensor(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 HWC RGB image -> float32 CHW tensor, ``(x / 255 - mean) / std``.

    In numpy on purpose: torch's intra-op threads made this 5x slower in a busy main process
    (``num_workers=0``), and numpy element-wise ops stay on one core as a data worker should.
    """
    std_array = np.asarray(std, dtype=np.float32)
    scale = 1.0 / (255.0 * std_array)
    shift = np.asarray(mean, dtype=np.float32) / std_array
    pixels = np.asarray(image, dtype=np.float32) * scale - shift  # [H, W, 3]
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))  # [3, H, W]


class TrainTransform:
    """Random resized crop to ``image_size`` (scale ``(crop_scale_min, 1)``) + normalise."""

    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        crop_scale_min: float = 0.8,
    ) -> None:
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.scale = (crop_scale_min, 1.0)

    def __call__(self, image: Image.Image, rng: random.Random) -> torch.Tensor:
        image = to_8bit(image).convert("RGB")
        box = random_resized_crop_box(image.width, image.height, rng, self.scale)
        size = (self.image_size, self.image_size)
        # Crop first: resize(box=...) would let pixels outside the crop bleed in at the edges.
        # Bicubic like CLIP's preprocessing; reducing_gap speeds up large downscales.
        resized = image.crop(box).resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        return to_normalised_tensor(resized, self.mean, self.std)


INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
"""Resampling filters an eval transform takes (timm's and open_clip's names, PIL's filters)."""


class EvalTransform:
    """Resize the shorter side to ``image_size`` (``interpolation``), centre crop, normalise.

    The resize and the crop are torchvision's (``resize(image, size)`` keeps the aspect ratio,
    the longer side becoming ``int(size * long / short)``; ``center_crop`` rounds the offsets),
    as open_clip, timm (crop_pct 1) and clip_benchmark preprocess: a non-square image gives the
    same pixels in all of them. An image already of the tower's size is left as it is. The
    normalisation is ``to_normalised_tensor``'s (within float32 rounding of torchvision's
    ``ToTensor`` + ``Normalize``).
    """

    def __init__(
        self, image_size: int, mean: Sequence[float], std: Sequence[float], interpolation: str = "bicubic"
    ) -> None:
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {interpolation!r}: expected one of {', '.join(INTERPOLATIONS)}")
        self.image_size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.interpolation = interpolation
        self._mode = InterpolationMode(interpolation)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        # RGB first, as every image loader here (and torchvision's, webdataset's "pil") decodes.
        image = to_8bit(image).convert("RGB")  # deeper than 8 bits: scaled, not clipped
        image = functional.resize(image, self.image_size, interpolation=self._mode)
        image = functional.center_crop(image, [self.image_size, self.image_size])
        return to_normalised_tensor(image, self.mean, self.std)
