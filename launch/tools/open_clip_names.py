"""tritower's tensors under open_clip's names: the key mapping, the CLIP-text conversion (Hugging
Face CLIPTextModel to open_clip's TextTransformer) and the error for what open_clip cannot hold."""

from __future__ import annotations

import math

import torch

from tritower.model import CLIPModel

NATIVE = "use --format native (the default), which exports every tritower model"


MAPPING = (
    ("image_tower.vit.", "visual.trunk."),  # timm ViT, same module names (TimmModel.trunk)
    ("image_tower.trunk.", "visual.trunk."),  # other timm models (ResNet, BiT, ...)
    ("image_proj.weight", "visual.head.proj.weight"),  # timm_proj="linear"
    ("image_proj.bias", "visual.head.proj.bias"),  # only if the projection has a bias
    ("text_tower.bert.", "text.transformer."),  # HFTextEncoder.transformer = BertModel
    ("text_tower.t5.encoder.", "text.transformer."),  # HFTextEncoder.transformer = (M)T5Model.encoder
    ("text_proj.weight", "text.proj.weight"),  # hf_proj_type="linear"
    ("logit_scale", "logit_scale"),  # [1] -> 0-dim, clamped to log(max_logit_scale)
    ("logit_bias", "logit_bias"),  # SigLIP's bias, [1] -> 0-dim
)


UNMAPPED = {
    "text_tower.t5.shared.weight": "tied to text_tower.t5.encoder.embed_tokens.weight (checked equal)",
    "text_tower.clip.embeddings.position_ids": "a buffer of positions 0..N-1, rebuilt by open_clip",
}


class OpenClipExportError(RuntimeError):
    """The model (or this export request) cannot be expressed in open_clip's format."""


def _clip_text_state(state: dict[str, torch.Tensor], context_length: int) -> dict[str, torch.Tensor]:
    """HF CLIPTextModel (``text_tower.clip.*``) -> open_clip TextTransformer (``text.*``).

    embeddings.token_embedding.weight -> token_embedding.weight; embeddings.position_embedding
    .weight[:context_length] -> positional_embedding (rows past the context length are never used);
    encoder.layers.N.self_attn.{q,k,v}_proj.{weight,bias} -> transformer.resblocks.N.attn
    .in_proj_{weight,bias} (q, k, v stacked); self_attn.out_proj -> attn.out_proj; layer_norm1 ->
    ln_1; layer_norm2 -> ln_2; mlp.fc1 -> mlp.c_fc; mlp.fc2 -> mlp.c_proj; final_layer_norm ->
    ln_final; text_proj.weight -> text_projection (transposed: open_clip computes x @ P).
    """
    src = "text_tower.clip."
    out = {
        "text.token_embedding.weight": state[src + "embeddings.token_embedding.weight"],
        "text.positional_embedding": state[src + "embeddings.position_embedding.weight"][:context_length],
        "text.ln_final.weight": state[src + "final_layer_norm.weight"],
        "text.ln_final.bias": state[src + "final_layer_norm.bias"],
    }
    if "text_proj.bias" in state:
        out["text.text_projection.weight"] = state["text_proj.weight"]
        out["text.text_projection.bias"] = state["text_proj.bias"]
    else:
        out["text.text_projection"] = state["text_proj.weight"].T
    layers = sorted({int(k.split(".")[4]) for k in state if k.startswith(src + "encoder.layers.")})
    renames = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2"}
    renames.update({"mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"})
    for n in layers:
        layer, block = f"{src}encoder.layers.{n}.", f"text.transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{layer}self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")]
            out[f"{block}attn.in_proj_{kind}"] = torch.cat(qkv)
            for theirs, ours in renames.items():
                out[f"{block}{ours}.{kind}"] = state[f"{layer}{theirs}.{kind}"]
    return out


def open_clip_state(
    model: CLIPModel, clip_text: bool, context_length: int
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The model's tensors under open_clip's names (``MAPPING``); returns (state, unmapped keys).

    Raises OpenClipExportError naming any tensor that has no open_clip place."""
    from tritower.model.settings import THREE_TOWER_PARAMETERS

    state = {k: v for k, v in model.state_dict().items() if k.split(".", 1)[0] not in THREE_TOWER_PARAMETERS}
    result: dict[str, torch.Tensor] = {}
    unmapped, stray = [], []
    if clip_text:
        result.update(_clip_text_state(state, context_length))
    for key, value in state.items():
        if key in UNMAPPED:
            unmapped.append(key)
            continue
        if clip_text and (key.startswith("text_tower.clip.") or key.startswith("text_proj.")):
            continue
        for ours, theirs in MAPPING:
            if key == ours or (ours.endswith(".") and key.startswith(ours)):
                result[theirs + key[len(ours) :]] = value
                break
        else:
            stray.append(key)
    if stray:
        raise OpenClipExportError(f"tensors with no place in open_clip's model: {stray[:8]}; {NATIVE}")
    if "text_tower.t5.shared.weight" in state and not torch.equal(
        state["text_tower.t5.shared.weight"], state["text_tower.t5.encoder.embed_tokens.weight"]
    ):
        raise OpenClipExportError("the T5 token table is untied (shared != encoder.embed_tokens); " + NATIVE)
    # open_clip's logit_scale is 0-dim and its forward does not clamp exp(logit_scale): storing
    # min(logit_scale, log(max_logit_scale)) makes its logits the clamped ones tritower uses.
    bound = math.log(model.max_logit_scale)
    result["logit_scale"] = result["logit_scale"].clamp(max=bound).reshape([])
    if "logit_bias" in result:
        result["logit_bias"] = result["logit_bias"].reshape([])
    return result, unmapped
