"""The built-in scenes' drawing styles: what each changes, measured on the decoded pixels with NumPy,
and the out-of-distribution eval set ``builtin:STYLES`` (the held-out scenes drawn otherwise)."""

from __future__ import annotations

import io
import json
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tritower.data.config import DataConfig
from tritower.data.scenes import (
    COLOURS,
    SIZES,
    builtin_eval_split,
    builtin_set_styles,
    draw_scene,
    ensure_builtin_data,
)
from tritower.data.styles import OFFGRID_SIZES, SHADES, STYLES, parse_styles

SMALL = dict(builtin_train_samples=200, builtin_eval_samples=40, builtin_shard_size=20, builtin_image_size=32)
SIDE = 64


def _pixels(style: str, scene: list[dict[str, str]], seed: int = 0) -> np.ndarray:
    image = draw_scene(scene, SIDE, random.Random(seed), style, random.Random(seed + 1))
    return np.asarray(image, dtype=np.float64)


def _one(colour: str = "blue", shape: str = "circle", size: str = "large", position: str = "centre") -> list[dict]:
    return [{"colour": colour, "shape": shape, "size": size, "position": position}]


def _shape_mask(pixels: np.ndarray) -> np.ndarray:
    """Pixels far from the light background (every channel of it is >= 150)."""
    return pixels.min(axis=2) < 130


def test_outline_leaves_the_inside_of_a_shape_background() -> None:
    centre = SIDE // 2
    plain, outline = _pixels("plain", _one()), _pixels("outline", _one())
    np.testing.assert_allclose(plain[centre, centre], COLOURS["blue"])
    assert outline[centre, centre].min() >= 225  # the background, not the colour
    assert 0.1 < _shape_mask(outline).sum() / _shape_mask(plain).sum() < 0.7  # a ring, not a disc


def test_noisy_background_varies_and_plain_does_not() -> None:
    corner = (slice(0, 8), slice(0, 8))
    assert _pixels("plain", _one())[corner].std(axis=(0, 1)).max() == 0.0
    noisy = _pixels("noisy", _one())
    assert noisy[corner].std(axis=(0, 1)).min() > 10 and noisy[corner].min() >= 150 - 1e-9
    np.testing.assert_allclose(noisy[SIDE // 2, SIDE // 2], COLOURS["blue"])  # the shape itself is plain


@pytest.mark.parametrize("colour", list(COLOURS))
def test_shades_paint_another_shade_of_the_same_colour_name(colour: str) -> None:
    centre = SIDE // 2
    shade = _pixels("shades", _one(colour))[centre, centre]
    np.testing.assert_allclose(shade, SHADES[colour])
    assert np.abs(shade - np.array(COLOURS[colour])).max() >= 40
    # Still nearer its own name's plain colour than any other plain colour (the name stays right).
    distances = {name: np.linalg.norm(shade - np.array(rgb)) for name, rgb in COLOURS.items()}
    assert min(distances, key=distances.get) == colour


def test_offgrid_sizes_and_positions_leave_the_plain_range() -> None:
    def extent(style: str, size: str, seed: int) -> tuple[float, float, float]:
        rows, cols = np.nonzero(_shape_mask(_pixels(style, _one("red", "square", size), seed)))
        return (cols.max() - cols.min() + 1) / SIDE, cols.mean() / SIDE, rows.mean() / SIDE

    plain_small = max(extent("plain", "small", seed)[0] for seed in range(10))
    plain_large = min(extent("plain", "large", seed)[0] for seed in range(10))
    for seed in range(10):
        assert extent("offgrid", "small", seed)[0] < plain_small
        assert extent("offgrid", "large", seed)[0] > plain_large
    # Plain centres stay within the 3 % jitter of the centre; off-grid ones move well beyond it.
    shifts = [max(abs(x - 0.5), abs(y - 0.5)) for _, x, y in (extent("offgrid", "small", s) for s in range(20))]
    assert max(abs(c - 0.5) for s in range(10) for c in extent("plain", "small", s)[1:]) <= 0.04
    assert max(shifts) > 0.1
    assert OFFGRID_SIZES["small"] < min(SIZES.values()) and OFFGRID_SIZES["large"] > max(SIZES.values())


def test_style_names_parse_and_an_unknown_one_is_one_clear_error() -> None:
    assert parse_styles("broad") == STYLES
    assert parse_styles("outline+noisy") == ("outline", "noisy")
    with pytest.raises(ValueError, match=r"unknown 'dotted'.*plain, outline, noisy, shades, offgrid, or broad"):
        parse_styles("outline+dotted")
    with pytest.raises(ValueError, match="unknown 'dotted'"):
        DataConfig(builtin_styles="dotted")
    assert builtin_set_styles("builtin:shades") == "shades" and builtin_set_styles("/data/coco") is None


def _read(paths: list[str]) -> dict[str, dict]:
    """key -> {"txt": caption, "json": metadata, "pixels": array} with plain tarfile and PIL."""
    samples: dict[str, dict] = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                payload = tar.extractfile(member).read()
                value = {"txt": payload.decode, "json": lambda b: json.loads(b)}.get(ext)
                if ext == "jpg":
                    samples.setdefault(key, {})["pixels"] = np.asarray(Image.open(io.BytesIO(payload)), np.float64)
                else:
                    samples.setdefault(key, {})[ext] = value(payload) if ext == "json" else payload.decode()
    return samples


def test_an_eval_set_in_other_styles_holds_the_same_scenes_drawn_otherwise(tmp_path: Path) -> None:
    cfg = DataConfig(cache_dir=str(tmp_path), **SMALL)
    own = _read(ensure_builtin_data(cfg).eval_shards)
    shards = builtin_eval_split(cfg, "outline+noisy")
    root = Path(shards[0]).parent
    assert not list(root.glob("train-*.tar"))  # the training split is not written
    for name in ("classnames.txt", "templates.txt"):  # what zero-shot reads beside the shards
        assert (root / name).read_text() == (Path(ensure_builtin_data(cfg).root) / name).read_text()
    other = _read(shards)
    assert sorted(other) == sorted(own)
    for key, sample in own.items():
        moved = other[key]
        assert moved["txt"] == sample["txt"] and moved["json"]["label"] == sample["json"]["label"]
        assert moved["json"]["shapes"] == sample["json"]["shapes"] and "style" not in sample["json"]
        assert moved["json"]["style"] in ("outline", "noisy")
        assert np.abs(moved["pixels"] - sample["pixels"]).max() > 40
    assert {s["json"]["style"] for s in other.values()} == {"outline", "noisy"}
    assert builtin_eval_split(cfg, "outline+noisy") == shards  # generated once, then reused


def test_plain_keeps_its_cache_folder_and_other_styles_get_their_own(tmp_path: Path) -> None:
    plain = ensure_builtin_data(DataConfig(cache_dir=str(tmp_path), **SMALL))
    named = ensure_builtin_data(DataConfig(cache_dir=str(tmp_path), builtin_styles="plain", **SMALL))
    broad = ensure_builtin_data(DataConfig(cache_dir=str(tmp_path), builtin_styles="broad", **SMALL))
    assert named.root == plain.root != broad.root
    styles = [sample["json"]["style"] for sample in _read(broad.train_shards).values()]
    counts = {style: styles.count(style) for style in STYLES}
    assert all(count >= 20 for count in counts.values()), counts  # 200 scenes over 5 styles at random
