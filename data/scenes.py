"""Built-in data: procedurally drawn shape scenes written as real webdataset tar shards.

Every scene holds one or two shapes (5 shapes x 6 colours x 2 sizes x 5 positions) on a light
background, with a templated English caption. Shards follow the img2dataset layout
(``{key}.jpg``, ``{key}.txt``, ``{key}.json``), so the built-in data goes through exactly the
same loader as user data. The zero-shot class of a scene is colour x shape of its first shape
(30 classes); the held-out split holds single-shape scenes only, so its labels are unambiguous.

Scenes are drawn in one or more styles (``data.builtin_styles``): ``plain`` (filled shapes on a
light background, the default), ``outline`` (the shapes' outlines only), ``noisy`` (a textured,
noisy background), ``shades`` (other shades of the same colour names) and ``offgrid`` (sizes and
positions outside the plain range). A split of several styles draws each scene in one of them at
random; ``broad`` is all five. The same symbolic scenes in another style make an out-of-distribution
set of the same content: an eval set ``NAME=builtin:STYLES`` (``eval.sets``) is the held-out split
drawn in ``STYLES``.

``ensure_builtin_data(cfg)`` generates the data once into ``cache_dir/scenes-<hash>/`` and reuses
it afterwards; concurrent callers (several ranks on one machine) serialise on a file lock.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import math
import os
import random
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from .config import DataConfig
from .styles import OFFGRID_SIZES, SHADES, parse_styles
from .tokenizer import SPECIAL_TOKENS, write_vocab

GENERATOR_VERSION = 2
"""Bump when drawing or captions change, so that stale caches are not reused."""

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (35, 70, 225),
    "yellow": (240, 205, 20),
    "purple": (140, 45, 185),
    "orange": (250, 135, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# Radii as a fraction of the side: at 64 px a small shape spans ~17 px, so a star, a cross and a
# triangle differ by more than a patch of the default ViT (patch 8).
SIZES: dict[str, float] = {"small": 0.13, "large": 0.22}
"""Half-width of a shape as a fraction of the image side."""
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "centre": (0.5, 0.5),
}

CLASSNAMES: list[str] = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]
"""Zero-shot classes, index = label: colour-major, e.g. 0 = ``red circle``."""
ZERO_SHOT_TEMPLATES: list[str] = [
    "a {c}.",
    "a photo of a {c}.",
    "a drawing of a {c}.",
    "a picture of a {c}.",
    "there is a {c}.",
    "an image with a {c}.",
]

# Caption grammar. Synonyms vary the wording without hiding the colour and shape words, which
# stay canonical so that the zero-shot prompts ("a red circle") use words seen in training.
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_PHRASES = {
    "top left": ("at the top left", "in the top left corner", "in the upper left"),
    "top right": ("at the top right", "in the top right corner", "in the upper right"),
    "bottom left": ("at the bottom left", "on the bottom left", "in the lower left"),
    "bottom right": ("at the bottom right", "on the bottom right", "in the lower right"),
    "centre": ("in the centre", "in the center", "in the middle"),
}
SINGLE_TEMPLATES = (
    "a {size} {colour} {shape} {where}",
    "there is a {size} {colour} {shape} {where}",
    "a {colour} {shape} {where}",
    "{where} there is a {colour} {shape}",
    "a picture of a {size} {colour} {shape} {where}",
    "a drawing of a {colour} {shape}",
    "a {size} {colour} {shape}",
)
PAIR_TEMPLATES = (
    "two shapes: a {a} and a {b}",
    "a {a} {where_a} and a {b} {where_b}",
    "there is a {a} {where_a} and a {b} {where_b}",
    "a {a} and a {b}",
    "a picture of a {a} next to a {b}",
)
EXTRA_WORDS = "an image with photo of".split()
"""Words of the zero-shot templates that the caption templates do not use."""


@dataclass
class BuiltinData:
    """Where the generated built-in data lives and what it holds."""

    root: Path
    """Folder of this generation (``cache_dir/scenes-<hash>``)."""
    train_shards: list[str]
    """Paths of the training tar shards."""
    eval_shards: list[str]
    """Paths of the held-out (single-shape) tar shards."""
    vocab_path: str
    """WordPiece vocabulary covering every word the caption grammar can produce."""
    classnames: list[str]
    """Zero-shot class names, index = label."""
    templates: list[str]
    """Zero-shot prompt templates with a ``{c}`` slot."""


def sample_scene(rng: random.Random, num_shapes: int) -> list[dict[str, str]]:
    """Draws the symbolic content of a scene: ``num_shapes`` shapes at distinct positions."""
    positions = rng.sample(list(POSITIONS), num_shapes)
    return [
        {
            "colour": rng.choice(list(COLOURS)),
            "shape": rng.choice(SHAPES),
            "size": rng.choice(list(SIZES)),
            "position": position,
        }
        for position in positions
    ]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred on (cx, cy) with half-width r."""
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    if shape == "cross":
        t = r * 0.35  # half-thickness of the bars
        return [
            (cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
            (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
            (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t),
        ]  # fmt: skip
    raise ValueError(f"not a polygon shape: {shape}")


def _noise_background(image_size: int, rng: random.Random) -> Image.Image:
    """A light, noisy texture: per-pixel grey values in [150, 250] from ``rng``."""
    table = bytes(150 + value * 100 // 255 for value in range(256))
    noise = rng.randbytes(image_size * image_size).translate(table)
    grey = Image.frombytes("L", (image_size, image_size), noise)
    tint = Image.new("RGB", (image_size, image_size), tuple(rng.randint(200, 255) for _ in range(3)))
    return Image.blend(Image.merge("RGB", (grey, grey, grey)), tint, 0.3)


def draw_scene(
    scene: list[dict[str, str]],
    image_size: int,
    rng: random.Random,
    style: str = "plain",
    style_rng: random.Random | None = None,
) -> Image.Image:
    """Renders a scene; the background tint and a small position jitter vary per image. ``style``
    (``STYLES``) draws its own randomness from ``style_rng``, so that ``plain`` consumes ``rng``
    exactly as before styles existed (the same seed writes the same plain shards)."""
    style_rng = style_rng or random.Random(0)
    background = tuple(rng.randint(225, 250) for _ in range(3))
    if style == "noisy":
        image = _noise_background(image_size, style_rng)
    else:
        image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    jitter = 0.03 * image_size
    for item in scene:
        fx, fy = POSITIONS[item["position"]]
        cx = fx * image_size + rng.uniform(-jitter, jitter)
        cy = fy * image_size + rng.uniform(-jitter, jitter)
        r = SIZES[item["size"]] * image_size
        fill = (SHADES if style == "shades" else COLOURS)[item["colour"]]
        if style == "offgrid":  # off the five positions: anywhere the shape fits, off-range sizes
            r = OFFGRID_SIZES[item["size"]] * image_size
            shift = (0.23 if len(scene) == 1 else 0.1) * image_size
            cx += style_rng.uniform(-shift, shift)
            cy += style_rng.uniform(-shift, shift)
            cx, cy = (min(max(c, r), image_size - r) for c in (cx, cy))
        paint = {"fill": fill} if style != "outline" else {"outline": fill, "width": max(2, round(r / 4))}
        if item["shape"] == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), **paint)
        elif item["shape"] == "square":
            s = r * 0.85  # a square of the same half-width looks bigger than the other shapes
            draw.rectangle((cx - s, cy - s, cx + s, cy + s), **paint)
        elif style == "outline":  # a polygon's outline of width w (PIL's polygon width is 1-pixel-stepped)
            points = _polygon(item["shape"], cx, cy, r)
            draw.line([*points, points[0], points[1]], fill=fill, width=paint["width"], joint="curve")
        else:
            draw.polygon(_polygon(item["shape"], cx, cy, r), fill=fill)
    return image


def caption_scene(scene: list[dict[str, str]], rng: random.Random) -> str:
    """Writes one caption for a scene from a random template with random synonyms."""

    def words(item: dict[str, str]) -> dict[str, str]:
        return {
            "size": rng.choice(SIZE_WORDS[item["size"]]),
            "colour": item["colour"],
            "shape": item["shape"],
            "where": rng.choice(POSITION_PHRASES[item["position"]]),
        }

    if len(scene) == 1:
        return rng.choice(SINGLE_TEMPLATES).format(**words(scene[0]))
    first, second = words(scene[0]), words(scene[1])
    return rng.choice(PAIR_TEMPLATES).format(
        a=f"{first['size']} {first['colour']} {first['shape']}",
        b=f"{second['size']} {second['colour']} {second['shape']}",
        where_a=first["where"],
        where_b=second["where"],
    )


def caption_words() -> list[str]:
    """Every word and punctuation mark the caption grammar and zero-shot prompts can produce."""
    texts = [*SINGLE_TEMPLATES, *PAIR_TEMPLATES, *ZERO_SHOT_TEMPLATES, *EXTRA_WORDS, *SHAPES]
    texts += [*COLOURS, *(w for ws in SIZE_WORDS.values() for w in ws)]
    texts += [p for ps in POSITION_PHRASES.values() for p in ps]
    words: set[str] = set()
    for text in texts:
        for slot in ("{size}", "{colour}", "{shape}", "{where}", "{a}", "{b}", "{c}",
                     "{where_a}", "{where_b}"):  # fmt: skip
            text = text.replace(slot, " ")
        for punct in ":.,":  # BERT's basic tokenizer splits punctuation into its own tokens
            text = text.replace(punct, f" {punct} ")
        words.update(text.lower().split())
    return sorted(words)


def encode_jpeg(image: Image.Image) -> bytes:
    """JPEG bytes at high quality: the colours must survive compression at 32-64 px."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def add_tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    """Appends one regular file; fixed mtime/owner so the same seed gives identical bytes."""
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(payload))


def write_split(
    out_dir: Path,
    prefix: str,
    num_samples: int,
    seed: int,
    image_size: int,
    shard_size: int,
    single_fraction: float,
    styles: tuple[str, ...] = ("plain",),
) -> list[str]:
    """Writes ``num_samples`` scenes into ``{prefix}-NNNNNN.tar`` shards; returns their paths.

    ``single_fraction`` of the scenes hold one shape, the rest two; each is drawn in one of
    ``styles`` at random. Everything derives from ``seed``: the same arguments write byte-identical
    shards, and the same seed in other styles draws the same scenes with the same captions.
    """
    rng = random.Random(seed)
    style_rng = random.Random(f"styles-{seed}")
    paths: list[str] = []
    tar: tarfile.TarFile | None = None
    for index in range(num_samples):
        if index % shard_size == 0:
            if tar is not None:
                tar.close()
            paths.append(str(out_dir / f"{prefix}-{index // shard_size:06d}.tar"))
            tar = tarfile.open(paths[-1], "w", format=tarfile.USTAR_FORMAT)
        assert tar is not None
        scene = sample_scene(rng, 1 if rng.random() < single_fraction else 2)
        caption = caption_scene(scene, rng)
        key = f"{prefix}{index:07d}"
        label = CLASSNAMES.index(f"{scene[0]['colour']} {scene[0]['shape']}")
        style = styles[0] if len(styles) == 1 else style_rng.choice(styles)
        meta = {"key": key, "caption": caption, "label": label,
                "classname": CLASSNAMES[label], "shapes": scene}  # fmt: skip
        if styles != ("plain",):
            meta["style"] = style
        image = draw_scene(scene, image_size, rng, style, style_rng)
        add_tar_member(tar, f"{key}.jpg", encode_jpeg(image))
        add_tar_member(tar, f"{key}.txt", caption.encode("utf-8"))
        add_tar_member(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
    if tar is not None:
        tar.close()
    return paths


def _generation_params(cfg: DataConfig) -> dict[str, int | str]:
    params: dict[str, int | str] = {
        "version": GENERATOR_VERSION,
        "train": cfg.builtin_train_samples,
        "eval": cfg.builtin_eval_samples,
        "size": cfg.builtin_image_size,
        "seed": cfg.builtin_seed,
        "shard": cfg.builtin_shard_size,
    }
    styles = parse_styles(cfg.builtin_styles)
    if styles != ("plain",):  # plain data keeps the cache folder it had before styles existed
        params["styles"] = "+".join(styles)
    return params


def _describe(root: Path) -> BuiltinData:
    manifest = json.loads((root / "manifest.json").read_text())
    return BuiltinData(
        root=root,
        train_shards=[str(root / name) for name in manifest["train_shards"]],
        eval_shards=[str(root / name) for name in manifest["eval_shards"]],
        vocab_path=str(root / "vocab.txt"),
        classnames=list(CLASSNAMES),
        templates=list(ZERO_SHOT_TEMPLATES),
    )


def generate_builtin_data(cfg: DataConfig, root: Path) -> None:
    """Writes shards, vocabulary and manifest into ``root`` (which must not exist yet)."""
    params = _generation_params(cfg)
    root.mkdir(parents=True)
    # Different seeds for the splits: held-out scenes are new draws, not training repeats
    # (a few coincide by chance: the scene space is small, but captions and jitter differ).
    styles = parse_styles(cfg.builtin_styles)
    train = write_split(
        root,
        "train",
        cfg.builtin_train_samples,
        2 * cfg.builtin_seed,
        cfg.builtin_image_size,
        cfg.builtin_shard_size,
        single_fraction=0.75,
        styles=styles,
    )
    held_out = _write_held_out(root, cfg, styles)
    write_vocab(root / "vocab.txt", caption_words())
    (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
    (root / "templates.txt").write_text("\n".join(ZERO_SHOT_TEMPLATES) + "\n")
    manifest = {
        "params": params,
        "train_shards": [Path(p).name for p in train],
        "eval_shards": [Path(p).name for p in held_out],
        "special_tokens": SPECIAL_TOKENS,
    }
    # The manifest is written last: its presence marks a complete generation.
    (root / "manifest.json").write_text(json.dumps(manifest, indent=1))


def _write_held_out(root: Path, cfg: DataConfig, styles: tuple[str, ...]) -> list[str]:
    """The held-out split: single-shape scenes of the held-out seed, in ``styles``."""
    return write_split(
        root,
        "eval",
        cfg.builtin_eval_samples,
        2 * cfg.builtin_seed + 1,
        cfg.builtin_image_size,
        cfg.builtin_shard_size,
        single_fraction=1.0,
        styles=styles,
    )


def builtin_eval_split(cfg: DataConfig, styles: str) -> list[str]:
    """Shards of the held-out split drawn in ``styles`` (``outline+noisy``, ``broad``): the same
    scenes, captions and labels as the run's own held-out split, drawn otherwise. Generated once
    into ``cache_dir/scenes-eval-<hash>/`` (the training split is not written)."""
    chosen = parse_styles(styles)
    params = _generation_params(cfg) | {"split": "eval", "styles": "+".join(chosen)}
    params.pop("train")

    def generate(root: Path) -> None:
        root.mkdir(parents=True)
        shards = _write_held_out(root, cfg, chosen)
        (root / "classnames.txt").write_text("\n".join(CLASSNAMES) + "\n")
        (root / "templates.txt").write_text("\n".join(ZERO_SHOT_TEMPLATES) + "\n")
        manifest = {"params": params, "train_shards": [], "eval_shards": [Path(p).name for p in shards]}
        (root / "manifest.json").write_text(json.dumps(manifest, indent=1))

    return _describe(_generate_once(cfg, "scenes-eval", params, generate)).eval_shards


def builtin_set_styles(path: str) -> str | None:
    """``builtin:outline+noisy`` -> ``outline+noisy`` (an eval set's path naming built-in styles);
    None for any other path."""
    return path.removeprefix("builtin:") if path.startswith("builtin:") else None


def _generate_once(cfg: DataConfig, prefix: str, params: dict, generate: Callable[[Path], None]) -> Path:
    """``cache_dir/<prefix>-<hash of params>``, made by ``generate(folder)`` on first use.

    Safe when several processes call it at once: they serialise on an ``fcntl`` lock next to
    the data, the first generates into a temporary folder and renames it into place (atomic on
    one file system), the others find it complete."""
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    cache = Path(cfg.cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    root = cache / f"{prefix}-{digest}"
    if (root / "manifest.json").exists():
        return root
    with open(cache / f"{prefix}-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another process generates
        if not (root / "manifest.json").exists():
            if root.exists():  # left over by a crashed, non-atomic writer: never reuse
                shutil.rmtree(root)
            staging = Path(tempfile.mkdtemp(prefix=f".{prefix}-{digest}-", dir=cache))
            try:
                generate(staging / "data")
                os.rename(staging / "data", root)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return root


def ensure_builtin_data(cfg: DataConfig) -> BuiltinData:
    """Returns the built-in data for ``cfg``, generating it on first use.

    Safe when several processes call it at once: they serialise on an ``fcntl`` lock next to
    the data, the first generates into a temporary folder and renames it into place (atomic on
    one file system), the others find it complete. Ranks on different machines each generate
    their own identical copy when ``cache_dir`` is machine-local.
    """
    root = _generate_once(cfg, "scenes", _generation_params(cfg), lambda folder: generate_builtin_data(cfg, folder))
    return _describe(root)
