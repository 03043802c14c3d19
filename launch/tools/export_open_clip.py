"""Export a CLIPModel as an open_clip ``local-dir:`` folder (``export.py --format open_clip``).

    import open_clip
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:exports/clip_open_clip")
    tokenizer = open_clip.get_tokenizer("local-dir:exports/clip_open_clip")

The folder is what open_clip 3.x reads offline (``open_clip/factory.py``, ``local-dir:``):

- ``open_clip_config.json``: ``model_cfg`` (a ``CustomTextCLIP``: ``vision_cfg`` names a timm
  trunk, ``text_cfg`` a transformers text encoder or open_clip's own ``TextTransformer``) and
  ``preprocess_cfg``; under ``tritower`` the provenance, the key mapping and the self-check;
- ``open_clip_model.safetensors``: the weights under open_clip's names (``MAPPING``);
- ``timm_image_trunk/config.json``: the timm trunk's own config (timm's ``save_config_for_hf``:
  registry architecture + ``model_args``), loaded by timm as ``local-dir:<folder>``;
- ``hf_text_encoder/config.json``: the transformers config of the text encoder (BERT, T5/mT5);
- the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``) at the top level, where
  ``open_clip.get_tokenizer("local-dir:...")`` looks for them (``HFTokenizer``).

open_clip hands ``timm_model_name`` and ``hf_model_name`` to timm and transformers as they are, and
both resolve a relative path against the current directory, not the export folder: the config
holds absolute paths. After moving the folder run
``python -m tritower.launch.tools.export_open_clip FOLDER`` to rewrite them (no re-export needed).

The writer checks its own output: it loads the folder with open_clip and compares
``encode_image`` / ``encode_text`` and the token ids with the tritower model (``verify``).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tritower.launch.cli import parse_options
from tritower.launch.config import ConfigError
from tritower.launch.tools.open_clip_names import MAPPING, NATIVE, UNMAPPED, OpenClipExportError, open_clip_state
from tritower.model import CLIPModel, ModelConfig
from tritower.model.registry import ImageTowerSpec, TextTowerSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CONFIG = "open_clip_config.json"
WEIGHTS = "open_clip_model.safetensors"
IMAGE_TRUNK = "timm_image_trunk"
TEXT_ENCODER = "hf_text_encoder"
FORMAT = "tritower-open-clip-export"
FORMAT_VERSION = 1
VERIFY_CAPTIONS = (
    "a red circle.",
    "a small blue star at the top left.",
    "Two  shapes: a GREEN cross and a purple square, " + "far " * 40 + "apart.",  # truncated
)

# tritower key (prefix) -> open_clip key (prefix), for every family open_clip can express. The
# CLIP text transformer is mapped layer by layer in ``_clip_text_state`` (its own table there).
# Tensors of the tritower model that open_clip does not hold, and why they are not needed.
HF_POOLERS = {"mean": "mean_pooler", "cls": "cls_last_hidden_state_pooler"}
# The model types open_clip's HFTextEncoder knows (open_clip/hf_configs.py arch_dict), per arch.
HF_MODEL_TYPE = {"bert": "bert", "t5": "mt5", "mt5": "mt5"}


def check_expressible(cfg: ModelConfig, alpha: float | None = None, pooling: str | None = None) -> None:
    """Refuse, naming why, what open_clip cannot express (``cfg``: the run's model section)."""
    from tritower.model import image_tower_spec, text_tower_spec

    if alpha is not None:
        raise OpenClipExportError(
            "an alpha-mixed Three Towers export (--alpha) has no open_clip form: open_clip's CLIP "
            "holds one image and one text tower, the mixture needs the third tower h and the 3T heads "
            f"and concatenated features; export without --alpha for the plain CLIP (f, g), or {NATIVE}"
        )
    image, text = image_tower_spec(cfg.image.tower), text_tower_spec(cfg.text.tower)
    if image.timm_class:
        raise OpenClipExportError(
            f"image tower {cfg.image.tower!r} is built from the class {image.timm_class} directly, not "
            "from a timm registry name, and open_clip's TimmModel builds registry names only; " + NATIVE
        )
    pooling = pooling or cfg.text.pooling or text.pooling
    if text.arch in HF_MODEL_TYPE:
        if pooling not in HF_POOLERS:
            raise OpenClipExportError(
                f"text pooling {pooling!r} of a {text.arch} tower has no open_clip pooler (HFTextEncoder "
                f"has mean, max and cls poolers: open_clip/hf_model.py); {NATIVE}"
            )
    elif text.arch == "clip_text":
        if pooling != "eot":
            raise OpenClipExportError(
                f"text pooling {pooling!r} of a CLIP text transformer: open_clip's TextTransformer pools "
                f"first/last/argmax/eos tokens, not a mean; {NATIVE}"
            )
    else:
        raise OpenClipExportError(f"text tower arch {text.arch!r} has no open_clip form; {NATIVE}")


def _image_cfg(model: CLIPModel, spec: ImageTowerSpec, out: Path) -> dict:
    """Write the timm trunk's config (timm's own format) and return open_clip's ``vision_cfg``."""
    import timm
    from timm.models._hub import save_config_for_hf  # timm's own writer of local-dir configs

    trunk = model.image_tower.model
    if not hasattr(trunk, "_model_args"):
        raise OpenClipExportError(f"{spec.name}: the timm trunk was not built by timm.create_model; {NATIVE}")
    folder = out / IMAGE_TRUNK
    folder.mkdir(exist_ok=True)
    save_config_for_hf(trunk, str(folder / "config.json"))
    saved = json.loads((folder / "config.json").read_text())
    for key in ("tag", "license"):  # the weights are this run's, not the named timm release's
        saved["pretrained_cfg"].pop(key, None)
    (folder / "config.json").write_text(json.dumps(saved, indent=1) + "\n")
    # What open_clip's TimmModel builds from it (timm_pool "" keeps the trunk's own pooling;
    # reset_classifier(0) drops the classifier): it must be this trunk, module for module.
    with torch.device("meta"):
        rebuilt = timm.create_model(f"local-dir:{folder.resolve()}", pretrained=False)
        rebuilt.reset_classifier(0)
    if repr(rebuilt) != repr(trunk) or _shapes(rebuilt) != _shapes(trunk):
        raise OpenClipExportError(
            f"{spec.name}: timm does not rebuild the same trunk from its saved model_args "
            f"({saved.get('architecture')}, {saved.get('model_args')}); {NATIVE}"
        )
    bias = model.image_proj.bias is not None
    return {
        "timm_model_name": f"local-dir:{folder.resolve()}",
        "timm_model_pretrained": False,
        "timm_pool": "",
        "timm_proj": "linear",
        "timm_proj_bias": bias,
        "timm_drop": 0.0,
        "image_size": spec.image_size,
    }


def _shapes(module: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _end_token(tokenizer: PreTrainedTokenizerBase, context_length: int) -> int:
    """The id the tokenizer ends every caption with (its [SEP] / </s>)."""
    from tritower.data.tokenizer import tokenize

    ids, mask = tokenize(tokenizer, list(VERIFY_CAPTIONS), context_length)
    last = ids[torch.arange(len(ids)), mask.sum(dim=1) - 1]
    if not bool((last == last[0]).all()) or int(last[0]) not in tokenizer.all_special_ids:
        raise OpenClipExportError(
            "eot pooling needs a tokenizer that ends every caption with one special end token "
            f"(open_clip pools the first position holding it); this one ends with {last.tolist()}; {NATIVE}"
        )
    return int(last[0])


def _text_cfg(
    model: CLIPModel, spec: TextTowerSpec, out: Path, tokenizer: PreTrainedTokenizerBase, context_length: int
) -> dict:
    """Write the text encoder's transformers config (HF towers) and return ``text_cfg``."""
    import transformers

    tower = model.text_tower
    common = {"context_length": context_length, "vocab_size": tower.vocab_rows, "hf_tokenizer_name": str(out.resolve())}
    if spec.arch == "clip_text":
        config = tower.model.config
        if config.hidden_act not in ("quick_gelu", "gelu"):
            raise OpenClipExportError(f"CLIP text activation {config.hidden_act!r} has no open_clip form; {NATIVE}")
        return {
            **common,
            "width": config.hidden_size,
            "heads": config.num_attention_heads,
            "layers": config.num_hidden_layers,
            "mlp_ratio": config.intermediate_size / config.hidden_size,
            "pool_type": "eos",
            "eos_id": _end_token(tokenizer, context_length),
            "pad_id": int(tokenizer.pad_token_id),
            "proj_type": "linear",
            "proj_bias": model.text_proj.bias is not None,
            "norm_kwargs": {"eps": config.layer_norm_eps},
            "quick_gelu": config.hidden_act == "quick_gelu",  # moved to model_cfg by the caller
        }
    if model.text_proj.bias is not None:
        raise OpenClipExportError(f"HFTextEncoder's linear projection has no bias; {NATIVE}")
    saved = tower.model.config.to_dict()
    # HFTextEncoder masks positions whose id is the config's pad id: the tokenizer's pad id.
    saved["pad_token_id"] = int(tokenizer.pad_token_id)
    if spec.arch in ("t5", "mt5"):
        # open_clip knows T5 encoders as model type mt5 (the same modules) and takes the encoder
        # of the encoder-decoder model that is_encoder_decoder makes AutoModel build.
        saved.update(model_type="mt5", is_encoder_decoder=True, architectures=["MT5EncoderModel"])
    kind = saved.pop("model_type")
    for key in ("transformers_version", "_name_or_path"):
        saved.pop(key, None)
    config = transformers.AutoConfig.for_model(kind, **saved)
    config.save_pretrained(out / TEXT_ENCODER)
    return {
        **common,
        "hf_model_name": str((out / TEXT_ENCODER).resolve()),
        "hf_model_pretrained": False,
        "hf_proj_type": "linear",
        "hf_pooler_type": HF_POOLERS[tower.pooling],
    }


def write_open_clip(
    model: CLIPModel,
    cfg: ModelConfig,
    out: str | Path,
    vocab_source: str,
    *,
    dtype: str = "fp32",
    extra: dict | None = None,
    alpha: float | None = None,
    verify: bool = True,
) -> dict:
    """Write ``model`` (a CLIPModel built from ``cfg``, a ModelConfig) as an open_clip folder.

    Returns the written ``open_clip_config.json`` as a dict; ``extra`` (provenance) goes under its
    ``tritower`` key. ``verify`` loads the folder with open_clip and requires its features to
    equal the model's (``verify_open_clip``). Raises OpenClipExportError for what open_clip cannot
    express (``check_expressible``).
    """
    from safetensors.torch import save_file

    from tritower.data.tokenizer import build_text_tokenizer
    from tritower.model import text_tower_spec
    from tritower.model.precision import dtype_of

    check_expressible(cfg, alpha, model.text_tower.pooling)
    # The run's image inputs: model.image.image_size/mean/std overrides included.
    image_spec, text_spec = cfg.parsed.image_spec, text_tower_spec(cfg.text.tower)
    if image_spec.interpolation not in ("bicubic", "bilinear"):  # open_clip/transform.py asserts these
        raise OpenClipExportError(
            f"{image_spec.name} resizes with {image_spec.interpolation!r}; open_clip's preprocess knows "
            f"bicubic and bilinear only; {NATIVE}"
        )
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    context_length = text_spec.context_length
    tokenizer = build_text_tokenizer(vocab_source)
    vision_cfg = _image_cfg(model, image_spec, out)
    text_cfg = _text_cfg(model, text_spec, out, tokenizer, context_length)
    clip_text = text_spec.arch == "clip_text"
    quick_gelu = text_cfg.pop("quick_gelu", False)
    tokenizer.save_pretrained(str(out))
    state, unmapped = open_clip_state(model, clip_text, context_length)
    target = dtype_of(dtype)
    weights = {k: (v.to(target) if v.is_floating_point() else v).contiguous().clone() for k, v in state.items()}
    save_file(weights, str(out / WEIGHTS), metadata={"format": "pt"})
    model_cfg = {"embed_dim": cfg.embed_dim, "custom_text": True, "vision_cfg": vision_cfg, "text_cfg": text_cfg}
    if quick_gelu:
        model_cfg["quick_gelu"] = True
    if getattr(model, "logit_bias", None) is not None:
        model_cfg["init_logit_bias"] = 0.0  # its value comes from the weights
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            # open_clip's Resize(size) + CenterCrop(size): tritower's EvalTransform, the same pixels.
            "size": image_spec.image_size,
            "mode": "RGB",
            "mean": list(image_spec.mean),
            "std": list(image_spec.std),
            "interpolation": image_spec.interpolation,
            "resize_mode": "shortest",
        },
        "tritower": {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dtype": dtype,
            "model": dataclasses.asdict(cfg),
            "text_pooling": model.text_tower.pooling,
            "context_length": context_length,
            "max_logit_scale": model.max_logit_scale,
            "logit_scale_clamped": bool(model.logit_scale.detach().float().max() > math.log(model.max_logit_scale)),
            "key_mapping": [list(pair) for pair in MAPPING]
            + ([["text_tower.clip.*", "text.* (see export_open_clip._clip_text_state)"]] if clip_text else []),
            "unmapped": {k: UNMAPPED[k] for k in unmapped},
            "tokenizer_source": vocab_source,
            **(extra or {}),
        },
    }
    (out / CONFIG).write_text(json.dumps(config, indent=1, default=str) + "\n")
    if verify:
        config["tritower"]["verified"] = verify_open_clip(out, model, tokenizer, context_length, dtype)
        (out / CONFIG).write_text(json.dumps(config, indent=1, default=str) + "\n")
    return config


@torch.no_grad()
def verify_open_clip(
    out: Path, model: CLIPModel, tokenizer: PreTrainedTokenizerBase, context_length: int, dtype: str = "fp32"
) -> dict:
    """Load ``out`` with open_clip and compare with ``model`` on random images and fixed captions.

    The reference is ``model`` with its weights rounded to the written ``dtype``. Returns the
    largest absolute differences; raises OpenClipExportError above 1e-4 or on different ids.
    """
    import open_clip

    from tritower.data.tokenizer import tokenize
    from tritower.model.precision import dtype_of

    reference = model
    if dtype != "fp32":
        reference = copy.deepcopy(model)
        for tensor in reference.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.to(dtype_of(dtype)).float())
    was_training = reference.training
    reference.eval()
    try:
        loaded = open_clip.create_model(f"local-dir:{out.resolve()}").eval()
        ids = open_clip.get_tokenizer(f"local-dir:{out.resolve()}")(list(VERIFY_CAPTIONS))
        ours, mask = tokenize(tokenizer, list(VERIFY_CAPTIONS), context_length)
        if not torch.equal(ids, ours):
            raise OpenClipExportError(f"open_clip's tokenizer gives other ids than tritower's: {ids} vs {ours}")
        size = loaded.visual.image_size
        images = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(0))
        image_gap = (loaded.encode_image(images, normalize=True) - reference.encode_image(images)).abs().max()
        text_gap = (loaded.encode_text(ids, normalize=True) - reference.encode_text(ours, mask)).abs().max()
        scale_gap = (loaded.logit_scale.exp() - reference.scale()).abs().max()
    finally:
        reference.train(was_training)
    result = {"image_max_abs_diff": image_gap.item(), "text_max_abs_diff": text_gap.item()}
    result["logit_scale_exp_rel_diff"] = (scale_gap / reference.scale()).item()
    if (
        max(result["image_max_abs_diff"], result["text_max_abs_diff"]) > 1e-4
        or result["logit_scale_exp_rel_diff"] > 1e-5
    ):
        raise OpenClipExportError(f"{out}: open_clip's features differ from tritower's: {result}")
    return result


def relocate(folder: str | Path) -> dict:
    """Point the absolute paths in a moved folder's ``open_clip_config.json`` at its new place."""
    folder = Path(folder).expanduser().resolve()
    config = json.loads((folder / CONFIG).read_text())
    vision, text = config["model_cfg"]["vision_cfg"], config["model_cfg"]["text_cfg"]
    vision["timm_model_name"] = f"local-dir:{folder / IMAGE_TRUNK}"
    text["hf_tokenizer_name"] = str(folder)
    if "hf_model_name" in text:
        text["hf_model_name"] = str(folder / TEXT_ENCODER)
    (folder / CONFIG).write_text(json.dumps(config, indent=1) + "\n")
    return config


@dataclasses.dataclass
class RelocateOptions:
    """Options of ``python -m tritower.launch.tools.export_open_clip FOLDER``."""

    folder: str
    """The open_clip export folder, at its new place (also ``--folder PATH``)."""


def main(argv: list[str] | None = None) -> int:
    """Rewrite the absolute paths of a moved open_clip export (``relocate``); exit 2 on an error."""
    try:
        options = parse_options(
            RelocateOptions,
            argv,
            command="python -m tritower.launch.tools.export_open_clip",
            example="exports/clip_tiny_oc",
            positional="folder",
        )
    except ConfigError as error:
        print(f"tritower export_open_clip: error: {error}", file=sys.stderr)
        return 2
    try:
        relocate(options.folder)
    except (OSError, KeyError, ValueError) as error:
        print(f"tritower export_open_clip: {options.folder}: {error}", file=sys.stderr)
        return 2
    print(f"{options.folder}: paths now point at {Path(options.folder).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
