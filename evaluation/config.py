"""Configuration of evaluation (the ``eval`` section)."""

from __future__ import annotations

import re
from dataclasses import dataclass

KIND_NAMES: tuple[str, ...] = ("zeroshot", "retrieval", "linear_probe")
SET_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class EvalSetSpec:
    """One named eval set of ``eval.sets``."""

    name: str
    path: str
    kinds: tuple[str, ...] | None
    """None: ``auto`` (what the set supports, see ``tritower.evaluation.plan_kinds``)."""


def parse_kinds(text: str, where: str) -> tuple[str, ...] | None:
    """``zeroshot+retrieval`` -> ("zeroshot", "retrieval"); ``auto`` or "" -> None."""
    if text.strip() in ("", "auto"):
        return None
    kinds = tuple(k.strip() for k in text.split("+") if k.strip())
    for kind in kinds:
        if kind not in KIND_NAMES:
            raise ValueError(f"{where}: unknown kind {kind!r}; kinds are {'+'.join(KIND_NAMES)} or auto")
    return kinds


@dataclass
class EvalConfig:
    """Zero-shot classification, retrieval and linear probes on held-out sets."""

    every_steps: int = 100
    """Evaluate every N optimizer steps (0: only at the end)."""
    at_end: bool = True
    """Evaluate once more after the last step."""
    batch_size: int = 256
    """Images (and their captions) encoded per forward pass, per rank, during evaluation."""
    max_samples: int = 0
    """Cap on the samples read of each eval set (its first N in reading order, bad ones included;
    0: all)."""
    alphas: str = ""
    """3T only: comma-separated mixing weights alpha in [0, 1] (e.g. ``0,0.25,0.5,0.75,1``) at
    which the alpha mixture of the main towers and the third tower is also evaluated
    (``evaluate_alphas``: metrics named ``zeroshot_top1@alpha=0.5``); "" = none."""
    kinds: str = "auto"
    """Kinds run on ``data.eval_shards`` (its metrics keep their plain names, ``zeroshot_top1``):
    ``auto`` (zero-shot when it has class names, retrieval when it has captions; what it lacks is
    skipped with a logged reason) or ``+``-joined kinds out of zeroshot, retrieval, linear_probe
    (one it cannot run is an error at start)."""
    sets: str = ""
    """More named eval sets: ``NAME=PATH[:KINDS]`` separated by ``;`` (or ``,`` before the next
    ``NAME=``), e.g. ``imagenet=/data/imagenet_wds:zeroshot+linear_probe;coco=/data/coco:retrieval``.
    PATH is a clip_benchmark webdataset folder, an ImageFolder, or shards in the built-in format
    (docs/evaluation.md); KINDS as in ``kinds``. Metrics are logged as ``NAME/<metric>``."""
    split: str = "test"
    """Split folder read in clip_benchmark-layout sets (``ROOT/<split>/0.tar``)."""
    fewshot_shots: str = "1,5,10,25"
    """linear_probe: shots per class of the few-shot ridge probes (``fewshot_<n>shot_top1``)."""
    fewshot_l2: float = 1.0
    """linear_probe: ridge penalty of the few-shot probes (big_vision's closed form)."""
    probe_C: float = 1.0
    """linear_probe: inverse L2 strength of the full-data logistic regression (scikit-learn's C)."""
    probe_train_fraction: float = 0.5
    """linear_probe: fraction of the labelled samples the logistic probe trains on (seeded); the
    rest is its test set (``linear_probe_top1``)."""
    progress_every_s: float = 10.0
    """Seconds between rank 0's progress lines while a set is encoded (images over all ranks,
    rate, time left when the set's size is known); 0: after every batch."""

    def __post_init__(self) -> None:
        self.alpha_values()  # validates
        self.set_specs()
        self.shot_values()
        parse_kinds(self.kinds, "eval.kinds")
        if not 0.0 < self.probe_train_fraction < 1.0:
            raise ValueError(f"eval.probe_train_fraction={self.probe_train_fraction} must be in (0, 1)")
        if self.batch_size <= 0:
            raise ValueError(f"eval.batch_size={self.batch_size} must be positive")
        if self.progress_every_s < 0:
            raise ValueError(f"eval.progress_every_s={self.progress_every_s} must be >= 0 (0: every batch)")

    def alpha_values(self) -> list[float]:
        """``alphas`` parsed: a list of floats in [0, 1] (empty for "")."""
        values = []
        for item in self.alphas.split(","):
            if not item.strip():
                continue
            try:
                value = float(item)
            except ValueError:
                raise ValueError(f"eval.alphas={self.alphas!r}: {item.strip()!r} is not a number") from None
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"eval.alphas={self.alphas!r}: {value} is outside [0, 1]")
            values.append(value)
        return values

    def shot_values(self) -> tuple[int, ...]:
        """``fewshot_shots`` parsed (positive integers)."""
        try:
            shots = tuple(int(s) for s in self.fewshot_shots.split(",") if s.strip())
        except ValueError:
            raise ValueError(f"eval.fewshot_shots={self.fewshot_shots!r}: not comma-separated integers") from None
        if any(s <= 0 for s in shots):
            raise ValueError(f"eval.fewshot_shots={self.fewshot_shots!r}: shots must be positive")
        return shots

    def legacy_kinds(self) -> tuple[str, ...] | None:
        """``kinds`` parsed (None = auto)."""
        return parse_kinds(self.kinds, "eval.kinds")

    def set_specs(self) -> list[EvalSetSpec]:
        """``sets`` parsed and checked (names unique and plain, a path for each)."""
        specs: list[EvalSetSpec] = []
        for item in re.split(r";|,(?=\s*[A-Za-z0-9_.-]+=)", self.sets):
            if not item.strip():
                continue
            name, eq, rest = item.strip().partition("=")
            name = name.strip()
            if not eq or not SET_NAME.match(name) or not rest.strip():
                raise ValueError(f"eval.sets: {item.strip()!r} is not NAME=PATH[:KINDS] (NAME of letters, digits, _.-)")
            path, kinds = rest.strip(), None
            head, colon, tail = path.rpartition(":")
            # A last ":" part naming any kind is the kinds (a typo among them is an error); else the path.
            if colon and head and "/" not in tail and any(k.strip() in KIND_NAMES + ("auto",) for k in tail.split("+")):
                path, kinds = head, parse_kinds(tail, f"eval.sets {name}")
            if any(spec.name == name for spec in specs):
                raise ValueError(f"eval.sets: the name {name!r} is used twice")
            specs.append(EvalSetSpec(name, path, kinds))
        return specs
