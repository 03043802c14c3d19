"""Configuration of the model (the ``model`` section of the training config) and its parsed form.

One ``TowerConfig`` per tower, the same shape for the image, text and third tower, nested in
``ModelConfig`` (``--model.image.tower=... --model.image.pretrained=PATH``; in a YAML file
``model: {image: {tower: ...}}``). Each option is declared once, in ``TowerConfig``.
``ModelConfig.parsed`` turns the config, once, into a ``ParsedModel``: the setting's letters and
one ``TowerOptions`` per tower (the tower's options resolved, plus its role and letter).
Everything downstream reads those objects; this module is the only place that compares setting
strings. ``migrate_model`` reads configs saved with the older flat keys (``image_tower``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..suggest import closest
from .registry import TEXT_POOLINGS, ImageTowerSpec, image_spec_at, image_tower_spec, text_tower_spec
from .setting import LETTERS, MAIN_TOWERS, TowerSetting, parse_setting

TOWER_ROLES = ("image", "text", "third")


@dataclass
class TowerConfig:
    """One tower's options, the same shape for the image, text and third tower
    (``--model.<tower>.<option>=...``). Whether a pretrained tower is locked (L), unlocked (U) or
    trained from scratch (u) is ``model.setting``'s letter; an option that does not apply to a
    tower is refused, naming why."""

    tower: str = ""
    """Architecture: a registry name (``vit_base_patch16_224``, ``bert_base``, ``minilm_l6``),
    ``timm:<model name>`` (image) or ``hf:<local transformers folder>`` (text). The third tower's
    "" = the image tower's."""
    pretrained: str = ""
    """Local weights of an L/U tower: an image state dict (``.safetensors``/``.pth``/``.bin``, timm,
    open_clip or OpenAI-CLIP layout, big_vision ``.npz``) or a transformers folder (text;
    ``package:<name>`` too). Required for L/U unless the tower names a default; refused for u."""
    unlock_last_blocks: int = 0
    """Partial unlocking of a locked (L) tower: its last N blocks (ResNet: stages) and final norm
    train, everything before stays locked. 0 = fully locked."""
    unlock_after_steps: int = 0
    """Delayed unlocking of an unlocked pretrained (U) tower: locked for its first N steps."""
    lr_mult: float = 1.0
    """Learning-rate multiplier of the tower's trainable parameters (not its head)."""
    grad_checkpointing: bool = False
    """Recompute the tower's block activations in the backward pass (timm's or transformers' own
    checkpointing)."""
    image_size: int = 0
    """Image towers: input side in pixels; 0 = the tower's own (a ``timm:`` tower's pretrained
    config). A ViT is built at this size (a multiple of its patch size) and pretrained position
    embeddings are resampled; MLP-Mixers accept only their own size."""
    mean: tuple[float, ...] = ()
    """Image towers: normalisation mean (R,G,B), e.g. ``0.5,0.5,0.5``; () = the tower's own. An
    override that differs from pretrained weights' config warns at start, naming both."""
    std: tuple[float, ...] = ()
    """Image towers: normalisation std (R,G,B); () = the tower's own."""
    patch_dropout: float = 0.0
    """ViT image towers that train: FLIP's fraction of patch tokens each training image drops
    (open_clip's ``patch_dropout``; 0.5 in FLIP). Evaluation and export see every patch."""
    drop_path: float = 0.0
    """ViT image towers that train: stochastic-depth rate of the last block (timm's
    ``drop_path_rate``), rising linearly from 0 at the first; 0 = off."""
    pooling: str = ""
    """Text towers: ``mean`` (masked mean), ``cls`` (BERT's first token) or ``eot`` (CLIP text's
    end-of-text token); "" = the family's own. CLS collapsed on the tiny default towers."""


# The options that apply to each tower (all others must keep their defaults), and why not.
APPLIES = {
    "image": {f.name for f in dataclasses.fields(TowerConfig)} - {"pooling"},
    "text": {
        "tower",
        "pretrained",
        "unlock_last_blocks",
        "unlock_after_steps",
        "lr_mult",
        "grad_checkpointing",
        "pooling",
    },
    "third": {"tower", "pretrained"},
}
NOT_FOR = {
    "image": "an image tower pools as its architecture does (pooling is a text-tower option)",
    "text": "it is an image-tower option (input size, normalisation, patch dropout, drop-path)",
    "third": (
        "the third tower is always locked and sees the image tower's inputs (3T's frozen h: "
        "no trainable parameters, no own preprocessing); set model.image.* for the inputs"
    ),
}

# The flat keys of configs saved before the towers were nested: flat key -> (tower, option).
LEGACY_KEYS = {
    (option if option == "image_size" else f"{role}_{option}"): (role, option)
    for role, options in APPLIES.items()
    for option in sorted(options)
}


def migrate_model(values: dict) -> dict:
    """A saved ``model`` mapping in today's nested layout: flat keys of the older layout
    (``image_tower``, ``image_lr_mult``, ``image_mean``, ``text_pooling``) move into the tower
    mappings; nested mappings and shared keys pass through. A key given both ways must agree."""
    for role in TOWER_ROLES:
        if role in values and not isinstance(values[role], dict):
            raise ValueError(f"'model.{role}' must be a mapping of its fields, not {values[role]!r}")
    migrated = {key: dict(value) if key in TOWER_ROLES else value for key, value in values.items()}
    for key, (role, option) in LEGACY_KEYS.items():
        if key not in values:
            continue
        tower = migrated.setdefault(role, {})
        value = migrated.pop(key)
        if option in tower and tower[option] != value:
            raise ValueError(f"model.{key}={value!r} and model.{role}.{option}={tower[option]!r} disagree")
        tower[option] = value
    return migrated


@dataclass
class TowerOptions(TowerConfig):
    """One tower's options as parsed: ``TowerConfig`` with the registry's defaults resolved
    (name, pretrained folder, input size, mean and std), plus the tower's role and letter."""

    role: str = "image"
    """``image``, ``text`` or ``third`` (3T's frozen third image tower)."""
    letter: str = "u"
    """``L``, ``U`` or ``u`` (the third tower is always ``L``)."""

    @property
    def name(self) -> str:
        """Registry name of the tower."""
        return self.tower

    @property
    def locked(self) -> bool:
        """L: pretrained and locked (possibly with its last blocks unlocked)."""
        return self.letter == "L"

    @property
    def fully_locked(self) -> bool:
        """L without partial unlocking: the tower is held outside the engine."""
        return self.letter == "L" and self.unlock_last_blocks == 0

    @property
    def is_pretrained(self) -> bool:
        """L or U: starts from ``pretrained`` weights."""
        return self.letter in ("L", "U")

    def updates_at(self, step: int) -> bool:
        """Whether the tower's own parameters update at optimizer ``step`` (0-based): u always,
        U from ``unlock_after_steps`` on, L only through partially unlocked blocks."""
        if self.letter == "L":
            return self.unlock_last_blocks > 0
        if self.letter == "U":
            return step >= self.unlock_after_steps
        return True

    def unlock_factor(self, step: int, warmup_steps: int) -> float | None:
        """Learning-rate factor at ``step`` of a tower with a delayed unlock (None without one):
        0 before ``unlock_after_steps``, then a linear ramp to 1 over ``warmup_steps``."""
        if not self.unlock_after_steps:
            return None
        if step < self.unlock_after_steps:
            return 0.0
        return min(1.0, (step - self.unlock_after_steps + 1) / max(1, warmup_steps))


@dataclass(frozen=True)
class ParsedModel:
    """``ModelConfig`` parsed: the setting and one ``TowerOptions`` per tower."""

    setting: TowerSetting
    image: TowerOptions
    text: TowerOptions
    third: TowerOptions | None = None
    """3T's third tower; None for the LiT settings."""
    warnings: tuple[str, ...] = ()
    """Overrides that differ from the pretrained weights' own config, each naming both values;
    the trainer prints them once at start (global rank 0)."""

    @property
    def three_towers(self) -> bool:
        return self.setting.three_towers

    @property
    def main_towers(self) -> tuple[TowerOptions, TowerOptions]:
        """(image, text)."""
        return self.image, self.text

    @property
    def image_spec(self) -> ImageTowerSpec:
        """The image tower's spec with the configured input size, mean and std: what the data
        pipeline, evaluation and exports apply to images, and what the tower is built as (a ViT
        at another size: ``registry.image_spec_at``)."""
        spec = image_spec_at(image_tower_spec(self.image.name), self.image.image_size)
        return dataclasses.replace(spec, mean=self.image.mean, std=self.image.std)

    def tower(self, role: str) -> TowerOptions:
        """The options of ``image``, ``text`` or ``third``."""
        options = {"image": self.image, "text": self.text, "third": self.third}.get(role)
        if options is None:
            raise ValueError(f"no {role} tower in setting {self.setting.name!r}")
        return options


def parse_model(cfg: ModelConfig) -> ParsedModel:
    """Parses and checks the setting-related fields of ``cfg`` together; ValueError naming the
    field and the fix."""
    setting = parse_setting(cfg.setting)
    for role in TOWER_ROLES:
        section, defaults = getattr(cfg, role), TowerConfig()
        for option in sorted({f.name for f in dataclasses.fields(TowerConfig)} - APPLIES[role]):
            if getattr(section, option) != getattr(defaults, option):
                raise ValueError(f"model.{role}.{option} does not apply to the {role} tower: {NOT_FOR[role]}")
    towers, warnings = {}, []
    for role in MAIN_TOWERS:
        section, letter = getattr(cfg, role), setting.letter(role)
        spec = image_tower_spec(section.tower) if role == "image" else text_tower_spec(section.tower)
        default = getattr(spec, "pretrained_dir", "")
        if letter in "LU" and not (section.pretrained or default):
            raise ValueError(
                f"model.{role}.pretrained is required: setting {cfg.setting!r} makes the "
                f"{role} tower {letter} ({LETTERS[letter]}); give a local checkpoint path"
            )
        if letter == "u" and section.pretrained:
            raise ValueError(
                f"model.{role}.pretrained={section.pretrained!r} is set but setting {cfg.setting!r} trains "
                f"the {role} tower from scratch (u); clear it or use L/U"
            )
        blocks = section.unlock_last_blocks
        if blocks < 0 or (blocks and letter != "L"):
            raise ValueError(
                f"model.{role}.unlock_last_blocks={blocks} applies to a locked (L) {role} "
                f"tower only and must be >= 0 (setting {cfg.setting!r})"
            )
        if blocks > spec.num_blocks:
            raise ValueError(
                f"model.{role}.unlock_last_blocks={blocks} exceeds the {spec.num_blocks} blocks of {spec.name}"
            )
        delay = section.unlock_after_steps
        if delay < 0 or (delay and letter != "U"):
            raise ValueError(
                f"model.{role}.unlock_after_steps={delay} applies to an unlocked pretrained (U) "
                f"{role} tower only and must be >= 0 (setting {cfg.setting!r})"
            )
        if not (section.lr_mult > 0 and math.isfinite(section.lr_mult)):
            raise ValueError(f"model.{role}.lr_mult must be positive, got {section.lr_mult}")
        if letter == "L" and not cfg.locked_head_trainable and spec.width != cfg.embed_dim:
            raise ValueError(
                f"model.locked_head_trainable=False freezes the {role} head as the identity, "
                f"which needs model.embed_dim={cfg.embed_dim} to equal {spec.name}'s width "
                f"{spec.width}"
            )
        resolved = {"tower": spec.name, "pretrained": (section.pretrained or default) if letter in "LU" else ""}
        if role == "image":
            _check_image_regularisation(cfg, spec, setting)
            preprocess, warnings = _image_preprocess(section, spec, letter)
            resolved |= preprocess
        towers[role] = TowerOptions(**(dataclasses.asdict(section) | resolved), role=role, letter=letter)
    third = None
    if setting.three_towers:
        if not cfg.third.pretrained:
            raise ValueError(
                "model.third.pretrained is required for setting '3T' (the frozen "
                "pretrained third tower); give a local checkpoint path"
            )
        name = cfg.third.tower or cfg.image.tower
        third_spec, inputs = image_tower_spec(name), towers["image"]  # unknown name -> ValueError
        if third_spec.patch_size and third_spec.image_size != inputs.image_size:
            # Built at its own size (its weights' grid); another token count cannot run through it.
            raise ValueError(
                f"model.third.tower={name} is a patch model built for {third_spec.image_size} px, but 3T "
                f"feeds it the image tower's {inputs.image_size} px inputs; set model.image.image_size="
                f"{third_spec.image_size} or use a third tower built for {inputs.image_size} px"
            )
        # 3T feeds the third tower the image tower's inputs: a tower built for another size or
        # normalisation (EfficientNet-Lite0 at 224 px behind a 64 px scene tower) runs off its training.
        if (third_spec.image_size, tuple(third_spec.mean), tuple(third_spec.std)) != (
            inputs.image_size, inputs.mean, inputs.std
        ):  # fmt: skip
            warnings.append(
                f"model.third.tower={name} was trained on {third_spec.image_size} px images (mean "
                f"{tuple(third_spec.mean)}, std {tuple(third_spec.std)}) but 3T feeds it the image tower's "
                f"inputs ({inputs.image_size} px, mean {inputs.mean}, std {inputs.std}); use an image tower "
                "with the same inputs, or set model.image.image_size/mean/std to the third tower's"
            )
        third = TowerOptions(tower=name, pretrained=cfg.third.pretrained, role="third", letter="L")
    elif cfg.third.tower or cfg.third.pretrained or cfg.init_logit_scale_3t:
        raise ValueError(
            f"model.third.tower/third.pretrained/init_logit_scale_3t apply to setting '3T' only, not {cfg.setting!r}"
        )
    return ParsedModel(setting, towers["image"], towers["text"], third, tuple(warnings))


def _image_preprocess(section: TowerConfig, spec: ImageTowerSpec, letter: str) -> tuple[dict, list[str]]:
    """The image tower's input size, mean and std: ``model.image.image_size/mean/std`` where set,
    else the spec's (a ``timm:`` tower's are its pretrained config's); and a warning per override
    that differs from what pretrained (L/U) weights were trained with."""
    values = {"image_size": section.image_size or spec.image_size}
    values["mean"] = tuple(float(v) for v in section.mean) or tuple(spec.mean)
    values["std"] = tuple(float(v) for v in section.std) or tuple(spec.std)
    for name in ("mean", "std"):
        given = getattr(section, name)
        if given and len(given) != 3:
            raise ValueError(f"model.image.{name} needs 3 values (R,G,B), got {len(given)}: {tuple(given)}")
    if any(not (v > 0 and math.isfinite(v)) for v in values["std"]):
        raise ValueError(f"model.image.std must be positive, got {values['std']}")
    if section.image_size < 0:
        raise ValueError(f"model.image.image_size must be >= 0 (0 = the tower's own), got {section.image_size}")
    try:  # a ViT is built at the new size (position embeddings resampled); Mixer etc. refused
        image_spec_at(spec, values["image_size"])
    except ValueError as error:
        raise ValueError(f"model.image.image_size={section.image_size}: {error}") from None
    warnings = []
    if letter in "LU":
        defaults = {"image_size": spec.image_size, "mean": tuple(spec.mean), "std": tuple(spec.std)}
        for name, default in defaults.items():
            if values[name] != default:
                warnings.append(
                    f"model.image.{name}={_plain(values[name])} differs from the pretrained config of "
                    f"{spec.name} ({name} {_plain(default)}), which its weights were trained with; "
                    "using the override"
                )
    return values, warnings


def _plain(value: object) -> str:
    """A value as the user writes it on the command line (``0.5,0.5,0.5``)."""
    return ",".join(f"{v:g}" for v in value) if isinstance(value, tuple) else str(value)


def _check_image_regularisation(cfg: ModelConfig, spec: ImageTowerSpec, setting: TowerSetting) -> None:
    """``model.image.patch_dropout`` and ``model.image.drop_path``, checked: ViT towers that train."""
    values = {"patch_dropout": cfg.image.patch_dropout, "drop_path": cfg.image.drop_path}
    for name, value in values.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"model.image.{name}={value} must be in [0, 1)")
    if any(values.values()):
        if spec.arch != "timm_vit":
            raise ValueError(
                f"model.image.patch_dropout/drop_path apply to ViT image towers, not {spec.name!r} ({spec.arch})"
            )
        if setting.image == "L" and not cfg.image.unlock_last_blocks:
            raise ValueError(
                f"model.image.patch_dropout/drop_path: the image tower of setting {cfg.setting!r} is "
                "locked (it runs in evaluation mode, outside training); they would change nothing"
            )


@dataclass
class ModelConfig:
    """Which towers make up the CLIP model and how their outputs meet in the shared space."""

    setting: str = "uu"
    """LiT setting: image letter then text letter, each ``L`` (pretrained, locked), ``U``
    (pretrained, unlocked) or ``u`` (from scratch): LU, Lu, UU, Uu, uu, UL, uL, LL (the paper's
    eight) or uU; or ``3T`` (Three Towers: both main towers from scratch plus a frozen
    pretrained third image tower)."""
    image: TowerConfig = field(default_factory=lambda: TowerConfig(tower="vit_scene_tiny"))
    """The image tower (registry: ``vit_test``, ``vit_scene_tiny``, ``vit_base_patch16_224``, ...)."""
    text: TowerConfig = field(default_factory=lambda: TowerConfig(tower="bert_scene_tiny"))
    """The text tower (registry: ``bert_test``, ``bert_scene_tiny``, ``bert_base``, ``minilm_l6``, ...)."""
    third: TowerConfig = field(default_factory=TowerConfig)
    """3T only: the frozen pretrained third image tower h (its ``tower`` "" = the image tower's)."""
    embed_dim: int = 128
    """Size of the shared image-text embedding space (output of both linear projections)."""
    init_logit_scale: float = math.log(1 / 0.07)
    """Initial value of the learnable log-temperature; CLIP starts at ln(1/0.07)."""
    max_logit_scale: float = 100.0
    """Upper clamp of exp(logit_scale), as in CLIP, so the softmax cannot become one-hot."""
    init_logit_scale_3t: float = 0.0
    """3T only: initial log-temperature of the two third-tower terms (f_h-h_f and g_h-h_g);
    0 = the same as ``init_logit_scale``. (A true start at temperature 1 is ``1e-9``.)"""
    vocab_size: int = 0
    """Rows of the token embedding table; 0 takes the tokenizer's size at build time. A positive
    value must be at least the tokenizer's size (a larger one pads the table, e.g. to a
    multiple of 64)."""
    locked_head_trainable: bool = True
    """Whether the projection head of a locked tower trains. False freezes it as the identity,
    which needs ``embed_dim`` equal to the locked tower's width; that is big_vision's LiT
    default (no image head, the text head projects to the image width; docs/towers.md)."""

    def __post_init__(self) -> None:
        # Unknown names raise ValueError naming the closest valid tower.
        image_tower_spec(self.image.tower)
        text_tower_spec(self.text.tower)
        if self.embed_dim <= 0:
            raise ValueError(f"model.embed_dim must be positive, got {self.embed_dim}")
        if self.max_logit_scale <= 0:
            raise ValueError(f"model.max_logit_scale must be positive, got {self.max_logit_scale}")
        for name in ("init_logit_scale", "init_logit_scale_3t"):
            value = getattr(self, name)
            if value and math.exp(value) > self.max_logit_scale:
                raise ValueError(
                    f"exp(model.{name})={math.exp(value):.3g} exceeds "
                    f"model.max_logit_scale={self.max_logit_scale}: the clamp would block its gradient"
                )
        if self.text.pooling not in ("",) + TEXT_POOLINGS:
            raise ValueError(f"model.text.pooling must be '' or one of {TEXT_POOLINGS}, got {self.text.pooling!r}")
        if self.vocab_size < 0:
            raise ValueError(f"model.vocab_size must be >= 0, got {self.vocab_size}")
        self.parsed  # noqa: B018 -- parses and validates the setting and per-tower fields

    @classmethod
    def from_dict(cls, values: dict) -> ModelConfig:
        """A config from a saved mapping (``dataclasses.asdict`` of today's or the older flat
        layout: checkpoints, exports, ``config.yaml``); ValueError naming an unknown key."""
        values = migrate_model(values)
        towers = {}
        for role in TOWER_ROLES:
            options = dict(values.pop(role, {}))
            _refuse_unknown(options, TowerConfig, f"model.{role}.")
            for name in ("mean", "std"):
                if name in options:
                    options[name] = tuple(options[name])
            base = dataclasses.asdict(getattr(cls(), role))  # a tower's registry default stays
            towers[role] = TowerConfig(**(base | options))
        _refuse_unknown(values, cls, "model.")
        return cls(**values, **towers)

    @property
    def parsed(self) -> ParsedModel:
        """The setting and per-tower options as objects (re-parsed only when a field changed)."""
        key = dataclasses.astuple(self)
        if self.__dict__.get("_parsed_key") != key:
            self.__dict__["_parsed"] = parse_model(self)
            self.__dict__["_parsed_key"] = key
        return self.__dict__["_parsed"]


def _refuse_unknown(values: dict, cls: type, prefix: str) -> None:
    """ValueError for a key of ``values`` that is no field of ``cls``, naming the closest."""
    names = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in names:
            hint = closest(f"{prefix}{key}", [f"{prefix}{name}" for name in names])
            raise ValueError(f"unknown config key '{prefix}{key}'{hint}")
