"""A checkpoint folder's tags and manifests on disk, and what a resume checks from them before any
engine exists: the world size, the model architecture, the ZeRO stage, optimizer, precision and
global batch, the data stream and the locked-tower files."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tritower.data.atomic import write_text_atomic
from tritower.model.config import migrate_model

TAG_PATTERN = re.compile(r"^step(\d{8})$")
PARTIAL_SUFFIX = ".partial"
MANIFEST = "manifest.json"
SUSPECT = "suspect"
ARCHITECTURE_FIELDS = ("setting", "image.tower", "text.tower", "third.tower", "embed_dim", "vocab_size", "text.pooling")
"""``model.*`` fields that shape the engine's parameters: a resume must not change them."""


STREAM_FIELDS = ("data.train_shards", "data.train_weights", "data.resampled", "data.num_workers", "data.views",
                 "data.view_seed", "data.embeddings", "train.seed")  # fmt: skip
"""Settings a saved data position is only valid for (the loader's own check, made before any
loader exists): the shards, how they are drawn and split over workers, and their seed."""


RESHARDABLE_STAGES = (1, 2)
"""ZeRO stages whose checkpoints load on another world size (``Checkpointer.reshard``). ZeRO-0 has
no universal conversion; under ZeRO-3, DeepSpeed 0.19.8's universal load got the weights right but
not the optimizer state (2 -> 1 ranks, ``clip_test``: the first resumed step's loss matched to 1e-7,
the second differed by 3.5e-4 relative, where ZeRO-1 and ZeRO-2 matched bit for bit)."""


def not_reshardable(where: str, saved_world: int, world_size: int, stage: int) -> str:
    """The one line refusing another world size for ``stage``."""
    return (
        f"{where} was written by {saved_world} ranks, this run has {world_size}: ZeRO-{stage} checkpoints are "
        f"not resharded (only ZeRO-{' and ZeRO-'.join(map(str, RESHARDABLE_STAGES))}: docs/training.md, elastic "
        f"resume); resume on {saved_world} ranks, or export its weights and start a new run from them (docs/export.md)"
    )


TRAINING_FIELDS = ("zero_stage", "optim.name", "deepspeed.precision", "data.batch_size")
"""What the saved optimizer state and data position are laid out for: DeepSpeed cannot load
another ZeRO stage's partitions, another optimizer's state or another precision's master
weights (it fails with an AssertionError or a KeyError), and another global batch would put
every rank's data position at other samples."""


def training_identity(config: dict, zero_stage: int) -> dict:
    """``TRAINING_FIELDS`` of ``config`` (``TrainConfig.to_dict()``), by their command-line names."""
    fields = {name: config[name.split(".")[0]].get(name.split(".")[1]) for name in TRAINING_FIELDS[1:]}
    return {"zero_stage": zero_stage, **fields}


BUILTIN_FIELDS = (
    "data.builtin_train_samples",
    "data.builtin_seed",
    "data.builtin_shard_size",
    "data.builtin_image_size",
)
"""With built-in data: what the generated training shards are made from."""


def data_identity(config: dict) -> dict:
    """The settings of ``config`` (``TrainConfig.to_dict()``) that a data position depends on,
    by their command-line names (``STREAM_FIELDS``, plus ``BUILTIN_FIELDS`` for built-in data)."""
    builtin = config["data"].get("train_shards") in ("", "builtin")
    fields = STREAM_FIELDS + (BUILTIN_FIELDS if builtin else ())
    return {name: config[name.split(".")[0]].get(name.split(".")[1]) for name in fields}


def _same_stream_value(name: str, saved: object, now: object) -> bool:
    if name == "data.train_shards":  # "" and "builtin" both name the built-in scenes
        return (saved or "builtin") == (now or "builtin")
    if name == "data.num_workers":  # 0 workers reads inline as one logical worker: the same stream as 1
        return max(1, int(saved or 0)) == max(1, int(now or 0))
    return saved == now


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def complete_tags(folder: Path) -> list[str]:
    """Finished tags, oldest first."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))


def write_manifest(tag_folder: Path, extra: dict) -> None:
    """List every file of a finished tag with its size, plus ``extra`` (step, world size, model
    architecture); written last, atomically, so a tag with a valid manifest was complete."""
    files = {
        str(path.relative_to(tag_folder)): path.stat().st_size
        for path in sorted(tag_folder.rglob("*"))
        if path.is_file() and path.name not in (MANIFEST, "keep", SUSPECT)
    }
    write_text_atomic(tag_folder / MANIFEST, json.dumps({**extra, "files": files}, indent=1))


def read_manifest(tag_folder: Path) -> dict:
    """The tag's manifest after checking every file it lists is there at its size; ValueError
    naming what is missing, cut short or unreadable."""
    try:
        manifest = json.loads((tag_folder / MANIFEST).read_text())
    except FileNotFoundError:
        raise ValueError(f"{tag_folder.name} has no {MANIFEST} (its save never finished)") from None
    except (OSError, ValueError) as error:
        raise ValueError(f"{tag_folder.name}/{MANIFEST} is unreadable ({error})") from None
    for name, size in manifest.get("files", {}).items():
        path = tag_folder / name
        if not path.is_file():
            raise ValueError(f"{tag_folder.name} lost {name}")
        if path.stat().st_size != size:
            raise ValueError(f"{tag_folder.name}/{name} has {path.stat().st_size} bytes, its manifest says {size}")
    return manifest


def locate(path: str | Path, tag: str | None = None) -> tuple[Path, str]:
    """(checkpoints folder, tag) of a checkpoint: a run's ``checkpoints`` folder (its ``latest``,
    or ``tag``) or one tag folder in it. FileNotFoundError naming what was expected otherwise."""
    path = Path(path).expanduser()
    if tag is None and not (path / "latest").is_file() and path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    named_by_latest = tag is None
    if tag is None:
        if not (path / "latest").is_file():
            raise FileNotFoundError(
                f"no DeepSpeed checkpoint at {path}: pass a run's checkpoints folder (holding 'latest') "
                "or one of its step folders (or --resume auto to resume this run's own)"
            )
        tag = (path / "latest").read_text().strip()
    if named_by_latest and not (path / tag).is_dir():
        raise FileNotFoundError(f"{path / 'latest'} names {tag}, which is missing: pass one of {complete_tags(path)}")
    if not any((path / tag).glob("*model_states.pt")):
        raise FileNotFoundError(f"no checkpoint tag {tag!r} in {path} (found: {complete_tags(path)})")
    return path, tag


def pick_resume(resume: str, checkpoints: Path) -> tuple[tuple[Path, str] | None, dict, list[str]]:
    """(target or None, its manifest, warnings): what ``--resume`` names, checked against the
    tags' manifests, without touching an engine. ``auto`` takes the newest tag whose manifest
    holds (every file there at its size), skipping newer ones with a warning naming each; an
    explicit path must hold (ValueError naming what is wrong), except a tag written before
    manifests existed, which is loaded with a warning."""
    if not resume:
        return None, {}, []
    if resume != "auto":
        folder, tag = locate(resume)
        if not (folder / tag / MANIFEST).exists():
            return (folder, tag), {}, [f"{folder / tag} has no {MANIFEST}: loading it unchecked"]
        return (folder, tag), read_manifest(folder / tag), []
    skipped = []
    latest = checkpoints / "latest"
    named = latest.read_text().strip() if latest.is_file() else ""
    if named and not (checkpoints / named).is_dir():  # its folder deleted (by hand, a cleanup job)
        skipped.append(f"{latest} names {named}, which is missing")
    for tag in reversed(complete_tags(checkpoints)):
        if (checkpoints / tag / SUSPECT).is_file():
            reason = (checkpoints / tag / SUSPECT).read_text().strip()
            skipped.append(f"skipping checkpoint {checkpoints / tag}: marked suspect ({reason})")
            continue
        try:
            manifest = read_manifest(checkpoints / tag)
        except ValueError as error:
            skipped.append(f"skipping checkpoint {checkpoints / tag}: {error}")
            continue
        if skipped:
            skipped.append(f"resuming from the newest complete checkpoint, {checkpoints / tag}")
        return (checkpoints, tag), manifest, skipped
    if skipped:
        raise ValueError(f"no complete checkpoint in {checkpoints}: " + "; ".join(skipped))
    return None, {}, []


def architecture(model: dict) -> dict:
    """The ``ARCHITECTURE_FIELDS`` of a saved ``model`` mapping (today's nested layout or the older
    flat one), as {"image.tower": value, ...}; fields it does not hold are left out."""
    model, found = migrate_model(model), {}
    for key in ARCHITECTURE_FIELDS:
        role, _, option = key.rpartition(".")
        section = model.get(role, {}) if role else model
        if option in section:
            found[key] = section[option]
    return found


def nested(fields: dict) -> dict:
    """{"image.tower": v} -> {"image": {"tower": v}} (how a manifest stores them)."""
    out: dict = {}
    for key, value in fields.items():
        role, _, option = key.rpartition(".")
        (out.setdefault(role, {}) if role else out)[option] = value
    return out


def check_manifest(
    manifest: dict, where: str, *, world_size: int, model: dict, data: dict | None = None, training: dict | None = None
) -> None:
    """What a resume can check before any engine exists: a world size that divides the saved data
    ranks (``data/elastic.py``; another world size is resharded on load), the same model
    architecture (``ARCHITECTURE_FIELDS``), given ``training`` (``training_identity`` of this run)
    the same ZeRO stage, optimizer, precision and global batch, and given ``data`` (``data_identity``
    of this run) the same training data stream. ValueError naming the mismatch and the fix."""
    saved_world = manifest.get("world_size", world_size)
    data_ranks = manifest.get("data_ranks", saved_world)
    if data_ranks % world_size:
        raise ValueError(
            f"{where} was written by {saved_world} ranks, this run has {world_size}: its data stream is laid "
            f"out for {data_ranks} data ranks, which {world_size} ranks cannot share evenly; resume on a world "
            f"size that divides {data_ranks}, or start runs meant to change size with --data.data_ranks set to "
            "a multiple of every world size they may get (docs/training.md, elastic resume)"
        )
    saved_stage = manifest.get("training", {}).get("zero_stage")
    if saved_world != world_size and saved_stage is not None and saved_stage not in RESHARDABLE_STAGES:
        raise ValueError(not_reshardable(where, saved_world, world_size, saved_stage))
    saved_model, this_model = architecture(manifest.get("model", {})), architecture(model)
    changed = [f"model.{key}={value!r} there, {this_model.get(key)!r} here"
               for key, value in saved_model.items() if value != this_model.get(key)]  # fmt: skip
    if changed:
        raise ValueError(
            f"{where} was trained with another model ({'; '.join(changed)}): pass its model "
            "settings to resume it, or start a new run (a new --train.run_name, without --resume)"
        )
    saved_training = manifest.get("training", {})
    changed = [f"{name}={saved_training[name]!r} there, {now!r} here" for name, now in (training or {}).items()
               if name in saved_training and saved_training[name] != now]  # fmt: skip
    if changed:
        raise ValueError(
            f"{where} was trained with other settings ({'; '.join(changed)}): its optimizer state and data "
            "position only load with those; pass them to resume it, or export its weights and start a new run "
            "from them (docs/export.md)"
        )
    saved_data = manifest.get("data", {})
    changed = [f"{name}={saved_data[name]!r} there, {now!r} here" for name, now in (data or {}).items()
               if name in saved_data and not _same_stream_value(name, saved_data[name], now)]  # fmt: skip
    if changed:
        raise ValueError(
            f"{where} was trained on another data stream ({'; '.join(changed)}): its saved data position "
            "is only valid for those settings; pass them to resume it, or start a new run (a new "
            "--train.run_name, without --resume)"
        )


def check_locked(recorded: dict[str, dict[str, str]], current: dict[str, dict[str, str]], where: str) -> None:
    """A locked tower held outside the engine has no copy in the checkpoint: its identity (file
    and sha256, saved as client state ``locked``) is the only proof that the file loaded now is
    the one trained with. ValueError naming both files where a recorded hash differs; towers
    without a recorded or current hash (older runs, towers not loaded) are not compared."""
    for name, identity in recorded.items():
        now = current.get(name, {})
        if identity.get("sha256") and now.get("sha256") and identity["sha256"] != now["sha256"]:
            raise ValueError(
                f"{where} was trained with the locked {name} {identity.get('source')!r} "
                f"(sha256 {identity['sha256'][:12]}...), this run loads {now.get('source')!r} (sha256 "
                f"{now['sha256'][:12]}...): pass the original file to resume, or start a new run"
            )
