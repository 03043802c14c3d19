"""Configuration of the model (the ``model`` section of the training config) and its parsed form.

Users write one section per tower, the same shape for the image, text and third tower
(``--model.image.tower=... --model.image.pretrained=PATH``, ``model: {image: {tower: ...}}`` in a
YAML file; ``model/sections.py``: ``TowerSection`` documents the options, ``TOWER_FIELDS``
says where each is stored).
The dataclass stores them as flat fields (``model.image_tower``): the Python attribute names, the
keys of configs saved in checkpoints, and accepted command-line aliases. ``ModelConfig.parsed``
turns them, once, into a ``ParsedModel``: the setting's letters and one ``TowerOptions`` per
tower. Everything downstream reads those objects; this module is the only place that reads
per-tower fields by composed name or compares setting strings.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .registry import TEXT_POOLINGS, ImageTowerSpec, image_spec_at, image_tower_spec, text_tower_spec
from .sections import TOWER_FIELDS, TowerSection, tower_field

# The paper's eight settings, plus uU (from-scratch image, pretrained text tower), which the
# paper does not run but which the letters describe just as well.
LIT_SETTINGS = ("LU", "Lu", "UU", "Uu", "uu", "UL", "uL", "LL", "uU")
THREE_TOWERS = "3T"
SETTINGS = LIT_SETTINGS + (THREE_TOWERS,)
LETTERS = {"L": "pretrained, locked", "U": "pretrained, unlocked", "u": "from scratch"}
MAIN_TOWERS = ("image", "text")


@dataclass(frozen=True)
class TowerSetting:
    """A parsed setting: one letter per main tower and whether a third tower exists."""

    image: str
    """``L``, ``U`` or ``u``."""
    text: str
    """``L``, ``U`` or ``u``."""
    three_towers: bool = False
    """3T: a frozen pretrained third image tower and its heads join the model."""

    def letter(self, tower: str) -> str:
        """The letter of ``tower`` ("image" or "text")."""
        return {"image": self.image, "text": self.text}[tower]

    def locked(self, tower: str) -> bool:
        """Whether ``tower`` is L (pretrained and locked)."""
        return self.letter(tower) == "L"

    def pretrained(self, tower: str) -> bool:
        """Whether ``tower`` starts from pretrained weights (L or U)."""
        return self.letter(tower) in ("L", "U")

    @property
    def name(self) -> str:
        """The setting as the user writes it (``Lu``, ``3T``)."""
        return THREE_TOWERS if self.three_towers else self.image + self.text


def parse_setting(setting: str) -> TowerSetting:
    """``"Lu"`` -> TowerSetting("L", "u"); ``"3T"`` -> TowerSetting("u", "u", True).

    Letters are case-sensitive (U and u differ); anything else raises ValueError listing the
    valid settings.
    """
    if setting == THREE_TOWERS:
        return TowerSetting("u", "u", three_towers=True)
    if setting in LIT_SETTINGS:
        return TowerSetting(setting[0], setting[1])
    raise ValueError(
        f"model.setting={setting!r} is not a tower setting: use one of "
        f"{', '.join(SETTINGS)} (image letter first, then text; "
        + "; ".join(f"{k} = {v}" for k, v in LETTERS.items())
        + ")"
    )


@dataclass(frozen=True)
class TowerOptions:
    """One tower's options, parsed from the flat ``model.<tower>_*`` fields."""

    role: str
    """``image``, ``text`` or ``third`` (3T's frozen third image tower)."""
    letter: str
    """``L``, ``U`` or ``u`` (the third tower is always ``L``)."""
    name: str
    """Registry name of the tower."""
    pretrained: str = ""
    """Local weights of an L/U tower (for text towers the registry's default folder where the
    field is empty); "" for a tower trained from scratch."""
    unlock_last_blocks: int = 0
    """Partial unlocking of an L tower: its last N blocks (and final norm) train."""
    unlock_after_steps: int = 0
    """Delayed unlocking of a U tower: locked for the first N steps (0 = never)."""
    lr_mult: float = 1.0
    """Learning-rate multiplier of the tower's trainable parameters (not its head)."""
    grad_checkpointing: bool = False
    """Recompute the tower's block activations in the backward pass."""
    patch_dropout: float = 0.0
    """Image towers: fraction of patch tokens dropped in training (FLIP); evaluation sees all."""
    drop_path: float = 0.0
    """Image towers: stochastic-depth rate of the last block (timm's ``drop_path_rate``)."""
    image_size: int = 0
    """Image towers: input side in pixels the data pipeline and exports use (the override, else
    the weights' pretrained config); 0 for text towers."""
    mean: tuple[float, ...] = ()
    """Image towers: per-channel normalisation mean (the override, else the pretrained config's)."""
    std: tuple[float, ...] = ()
    """Image towers: per-channel normalisation std (the override, else the pretrained config's)."""

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
    towers, warnings = {}, []
    for role in MAIN_TOWERS:
        letter = setting.letter(role)
        spec = image_tower_spec(cfg.image_tower) if role == "image" else text_tower_spec(cfg.text_tower)
        field = getattr(cfg, f"{role}_pretrained")
        default = getattr(spec, "pretrained_dir", "")
        if letter in "LU" and not (field or default):
            raise ValueError(
                f"model.{role}.pretrained is required: setting {cfg.setting!r} makes the "
                f"{role} tower {letter} ({LETTERS[letter]}); give a local checkpoint path"
            )
        if letter == "u" and field:
            raise ValueError(
                f"model.{role}.pretrained={field!r} is set but setting {cfg.setting!r} trains "
                f"the {role} tower from scratch (u); clear it or use L/U"
            )
        blocks = getattr(cfg, f"{role}_unlock_last_blocks")
        if blocks < 0 or (blocks and letter != "L"):
            raise ValueError(
                f"model.{role}.unlock_last_blocks={blocks} applies to a locked (L) {role} "
                f"tower only and must be >= 0 (setting {cfg.setting!r})"
            )
        if blocks > spec.num_blocks:
            raise ValueError(
                f"model.{role}.unlock_last_blocks={blocks} exceeds the {spec.num_blocks} blocks of {spec.name}"
            )
        delay = getattr(cfg, f"{role}_unlock_after_steps")
        if delay < 0 or (delay and letter != "U"):
            raise ValueError(
                f"model.{role}.unlock_after_steps={delay} applies to an unlocked pretrained (U) "
                f"{role} tower only and must be >= 0 (setting {cfg.setting!r})"
            )
        mult = getattr(cfg, f"{role}_lr_mult")
        if not (mult > 0 and math.isfinite(mult)):
            raise ValueError(f"model.{role}.lr_mult must be positive, got {mult}")
        if letter == "L" and not cfg.locked_head_trainable and spec.width != cfg.embed_dim:
            raise ValueError(
                f"model.locked_head_trainable=False freezes the {role} head as the identity, "
                f"which needs model.embed_dim={cfg.embed_dim} to equal {spec.name}'s width "
                f"{spec.width}"
            )
        regularisation = {}
        if role == "image":
            regularisation = _image_regularisation(cfg, spec, setting)
            preprocess, warnings = _image_preprocess(cfg, spec, letter)
            regularisation.update(preprocess)
        towers[role] = TowerOptions(
            role=role,
            letter=letter,
            name=spec.name,
            pretrained=(field or default) if letter in "LU" else "",
            unlock_last_blocks=blocks,
            unlock_after_steps=delay,
            lr_mult=mult,
            grad_checkpointing=getattr(cfg, f"{role}_grad_checkpointing"),
            **regularisation,
        )
    third = None
    if setting.three_towers:
        if not cfg.third_pretrained:
            raise ValueError(
                "model.third.pretrained is required for setting '3T' (the frozen "
                "pretrained third tower); give a local checkpoint path"
            )
        name = cfg.third_tower or cfg.image_tower
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
        third = TowerOptions(role="third", letter="L", name=name, pretrained=cfg.third_pretrained)
    elif cfg.third_tower or cfg.third_pretrained or cfg.init_logit_scale_3t:
        raise ValueError(
            f"model.third.tower/third.pretrained/init_logit_scale_3t apply to setting '3T' only, not {cfg.setting!r}"
        )
    return ParsedModel(setting, towers["image"], towers["text"], third, tuple(warnings))


def _image_preprocess(cfg: ModelConfig, spec: ImageTowerSpec, letter: str) -> tuple[dict, list[str]]:
    """The image tower's input size, mean and std: ``model.image.image_size/mean/std`` where set,
    else the spec's (a ``timm:`` tower's are its pretrained config's); and a warning per override
    that differs from what pretrained (L/U) weights were trained with."""
    values = {"image_size": cfg.image_size or spec.image_size}
    values["mean"] = tuple(float(v) for v in cfg.image_mean) or tuple(spec.mean)
    values["std"] = tuple(float(v) for v in cfg.image_std) or tuple(spec.std)
    for name in ("mean", "std"):
        given = getattr(cfg, f"image_{name}")
        if given and len(given) != 3:
            raise ValueError(f"model.image.{name} needs 3 values (R,G,B), got {len(given)}: {tuple(given)}")
    if any(not (v > 0 and math.isfinite(v)) for v in values["std"]):
        raise ValueError(f"model.image.std must be positive, got {values['std']}")
    if cfg.image_size < 0:
        raise ValueError(f"model.image.image_size must be >= 0 (0 = the tower's own), got {cfg.image_size}")
    try:  # a ViT is built at the new size (position embeddings resampled); Mixer etc. refused
        image_spec_at(spec, values["image_size"])
    except ValueError as error:
        raise ValueError(f"model.image.image_size={cfg.image_size}: {error}") from None
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


def _image_regularisation(cfg: ModelConfig, spec: ImageTowerSpec, setting: TowerSetting) -> dict[str, float]:
    """``model.image.patch_dropout`` and ``model.image.drop_path``, checked: ViT towers that train."""
    values = {"patch_dropout": cfg.image_patch_dropout, "drop_path": cfg.image_drop_path}
    for name, value in values.items():
        if not 0.0 <= value < 1.0:
            raise ValueError(f"model.image_{name}={value} must be in [0, 1)")
    if any(values.values()):
        if spec.arch != "timm_vit":
            raise ValueError(
                f"model.image.patch_dropout/drop_path apply to ViT image towers, not {spec.name!r} ({spec.arch})"
            )
        if setting.image == "L" and not cfg.image_unlock_last_blocks:
            raise ValueError(
                f"model.image.patch_dropout/drop_path: the image tower of setting {cfg.setting!r} is "
                "locked (it runs in evaluation mode, outside training); they would change nothing"
            )
    return values


@dataclass
class ModelConfig:
    """Which towers make up the CLIP model and how their outputs meet in the shared space."""

    image_tower: str = "vit_scene_tiny"
    """Image tower name from ``tritower.model.registry`` (``vit_test``, ``vit_scene_tiny``,
    ``vit_base_patch16_224``, ``vit_large_patch14_224``, ``vit_giant_patch14_224``)."""
    text_tower: str = "bert_scene_tiny"
    """Text tower name from ``tritower.model.registry`` (``bert_test``, ``bert_scene_tiny``,
    ``bert_base``, ``bert_large``)."""
    embed_dim: int = 128
    """Size of the shared image-text embedding space (output of both linear projections)."""
    init_logit_scale: float = math.log(1 / 0.07)
    """Initial value of the learnable log-temperature; CLIP starts at ln(1/0.07)."""
    max_logit_scale: float = 100.0
    """Upper clamp of exp(logit_scale), as in CLIP, so the softmax cannot become one-hot."""
    init_logit_scale_3t: float = 0.0
    """3T only: initial log-temperature of the two third-tower terms (f_h-h_f and g_h-h_g);
    0 = the same as ``init_logit_scale``. (A true start at temperature 1 is ``1e-9``.)"""
    image_grad_checkpointing: bool = False
    """Recompute image-tower block activations in the backward pass (timm's own checkpointing)."""
    text_grad_checkpointing: bool = False
    """Recompute text-tower layer activations in the backward pass (transformers' checkpointing)."""
    text_pooling: str = ""
    """"" = the text family's own pooling (``mean`` for BERT and T5, ``eot`` for CLIP text).
    ``mean``: attention-masked mean over tokens; ``cls``: the first token's hidden state (BERT
    only); ``eot``: the last real token (CLIP's end-of-text token, seen whole under the causal
    mask). CLS pooling collapsed on the tiny default towers (loss stuck at ln(B)); mean trains."""
    vocab_size: int = 0
    """Rows of the token embedding table; 0 takes the tokenizer's size at build time. A positive
    value must be at least the tokenizer's size (a larger one pads the table, e.g. to a
    multiple of 64)."""
    setting: str = "uu"
    """LiT setting: image letter then text letter, each ``L`` (pretrained, locked), ``U``
    (pretrained, unlocked) or ``u`` (from scratch): LU, Lu, UU, Uu, uu, UL, uL, LL (the paper's
    eight) or uU; or ``3T`` (Three Towers: both main towers from scratch plus a frozen
    pretrained third image tower)."""
    image_pretrained: str = ""
    """Local checkpoint of the image tower (``.safetensors``/``.pth``/``.bin`` timm or open_clip
    visual state dict); required when the image letter is L or U, rejected for u."""
    text_pretrained: str = ""
    """Local transformers model folder of the text tower; required when the text letter is L or
    U unless the registry entry names a default (``minilm_l6``); rejected for u."""
    image_unlock_last_blocks: int = 0
    """Partial unlocking of a locked (L) image tower: its last N blocks (ResNet: stages) and the
    final norm train, everything before stays locked. 0 = fully locked."""
    text_unlock_last_blocks: int = 0
    """Partial unlocking of a locked (L) text tower: its last N layers (+ final norm) train."""
    image_lr_mult: float = 1.0
    """Learning-rate multiplier of the image tower's trainable parameters (not its head)."""
    text_lr_mult: float = 1.0
    """Learning-rate multiplier of the text tower's trainable parameters (not its head)."""
    locked_head_trainable: bool = True
    """Whether the projection head of a locked tower trains. False freezes it as the identity,
    which needs ``embed_dim`` equal to the locked tower's width; that is big_vision's LiT
    default (no image head, the text head projects to the image width; docs/towers.md)."""
    image_unlock_after_steps: int = 0
    """Delayed unlocking: a U image tower stays locked for the first N steps (0 = never)."""
    text_unlock_after_steps: int = 0
    """Delayed unlocking: a U text tower stays locked for the first N steps (0 = never)."""
    third_tower: str = ""
    """3T only: registry name of the frozen pretrained image model h; "" = ``image_tower``."""
    third_pretrained: str = ""
    """3T only: local checkpoint of the third tower (same formats as ``image_pretrained``)."""
    image_patch_dropout: float = 0.0
    """FLIP's patch dropout on a ViT image tower that trains: the fraction of patch tokens each
    training image drops after the position embedding (open_clip's ``patch_dropout``; 0.5 in
    FLIP, about 2x faster steps). Training only: evaluation and export see every patch."""
    image_drop_path: float = 0.0
    """Stochastic depth of a ViT image tower that trains (timm's ``drop_path_rate``): the drop
    rate of the last block, rising linearly from 0 at the first; 0 = off."""
    image_size: int = 0
    """Input side of the image tower in pixels; 0 = the tower's own (a ``timm:`` tower's
    pretrained config). A ViT is built at this size (a multiple of its patch size) and its
    pretrained position embeddings are resampled to the new grid when loaded; MLP-Mixers accept
    only their own size (their token-mixing MLPs fix the token count)."""
    image_mean: tuple[float, ...] = ()
    """Per-channel normalisation mean of the image tower's inputs; () = the tower's own."""
    image_std: tuple[float, ...] = ()
    """Per-channel normalisation std of the image tower's inputs; () = the tower's own."""

    def __post_init__(self) -> None:
        # Unknown names raise ValueError naming the closest valid tower.
        image_tower_spec(self.image_tower)
        text_tower_spec(self.text_tower)
        if self.embed_dim <= 0:
            raise ValueError(f"model.embed_dim must be positive, got {self.embed_dim}")
        if self.max_logit_scale <= 0:
            raise ValueError(f"model.max_logit_scale must be positive, got {self.max_logit_scale}")
        if math.exp(self.init_logit_scale) > self.max_logit_scale:
            raise ValueError(
                f"exp(model.init_logit_scale)={math.exp(self.init_logit_scale):.3g} exceeds "
                f"model.max_logit_scale={self.max_logit_scale}: the clamp would block its gradient"
            )
        if self.init_logit_scale_3t and math.exp(self.init_logit_scale_3t) > self.max_logit_scale:
            raise ValueError(
                f"exp(model.init_logit_scale_3t)={math.exp(self.init_logit_scale_3t):.3g} exceeds "
                f"model.max_logit_scale={self.max_logit_scale}: the clamp would block its gradient"
            )
        if self.text_pooling not in ("",) + TEXT_POOLINGS:
            raise ValueError(f"model.text_pooling must be '' or one of {TEXT_POOLINGS}, got {self.text_pooling!r}")
        if self.vocab_size < 0:
            raise ValueError(f"model.vocab_size must be >= 0, got {self.vocab_size}")
        self.parsed  # noqa: B018 -- parses and validates the setting and per-tower fields

    def section(self, role: str) -> TowerSection:
        """The per-tower section of ``image``, ``text`` or ``third`` with this config's values
        (options that do not apply to the tower keep their defaults)."""
        values = {option: getattr(self, field) for option, field in TOWER_FIELDS[role].items()}
        return TowerSection(**values)

    def set_tower_option(self, role: str, option: str, value: object) -> None:
        """``model.<role>.<option> = value``; ValueError naming why where it does not apply."""
        setattr(self, tower_field(role, option), value)

    def to_sections(self) -> dict:
        """The config as users write it: shared fields, then one mapping per tower holding the
        options that apply to it (what ``runs/<run>/config.yaml`` stores; it reads back)."""
        flat = dataclasses.asdict(self)
        stored = {field for fields in TOWER_FIELDS.values() for field in fields.values()}
        shared = {key: value for key, value in flat.items() if key not in stored}
        return shared | {role: {o: flat[f] for o, f in fields.items()} for role, fields in TOWER_FIELDS.items()}

    @property
    def parsed(self) -> ParsedModel:
        """The setting and per-tower options as objects (re-parsed only when a field changed)."""
        key = dataclasses.astuple(self)
        if self.__dict__.get("_parsed_key") != key:
            self.__dict__["_parsed"] = parse_model(self)
            self.__dict__["_parsed_key"] = key
        return self.__dict__["_parsed"]
