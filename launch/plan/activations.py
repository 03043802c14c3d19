"""Activation and loss-buffer memory of the towers, from their sizes alone (no tensors built).

The memory planner (``launch/plan/planner.py``) adds these to the model states. Every count below is a
tensor that autograd keeps for backward, read off the saved-tensor lists of timm's ViT block and
transformers' BertLayer (``torch.autograd.graph.saved_tensors_hooks``); ``docs/memory_planner.md``
derives them and compares them with measured runs.

Notation, per sample: s tokens, h width, f MLP hidden size, a heads, e bytes per activation
element (2 in bf16/fp16, 4 in fp32). Per transformer layer, without recomputation, autograd keeps

    e * s * (8h + 2f)  +  4 * a * s  +  16 * s  [+ 2 * s * h with dropout]  [+ e * a * s^2 unfused]

(block input, LN output, q/k/v, attention output, LN input and output, MLP hidden before and
after GELU; the fused attention kernel's fp32 log-sum-exp; fp32 LayerNorm mean and rstd; 1-byte
dropout masks; the probability matrix where attention is not fused). With f = 4h this is
Korthikanti et al.'s 34 * s * h bytes in 16-bit; their 5 * a * s^2 term disappears because flash
and memory-efficient attention keep no s x s matrix.
"""

from __future__ import annotations

from dataclasses import dataclass

from tritower.model.registry import image_spec_at, image_tower_spec, text_tower_spec

# fp32 bytes: LayerNorm statistics, attention log-sum-exp and the loss are always fp32.
FP32 = 4


@dataclass(frozen=True)
class TowerShape:
    """What activation memory depends on: one tower's transformer geometry."""

    name: str
    """Registry name."""
    kind: str
    """``image`` or ``text``."""
    tokens: int
    """Sequence length s: (image / patch)^2 (+1 with a class token) or the context length."""
    width: int
    """Hidden size h."""
    depth: int
    """Transformer layers L."""
    heads: int
    """Attention heads a."""
    mlp: int
    """MLP hidden size f."""
    dropout: bool
    """Hidden dropout on (keeps a 1-byte mask per dropped element)."""
    input_elements: int
    """Elements of one sample's input: 3 x side^2 pixels, or context-length token ids."""
    modelled: bool = True
    """Whether the transformer formulas below describe the tower. False for image towers that
    are not ViTs (ResNet, BiT, Mixer, EfficientNet, ...): their activations are reported as not
    modelled (counted as 0, and said so), never as a made-up number."""


def tower_shape(name: str, image_size: int = 0) -> TowerShape:
    """The geometry of a registered image or text tower; an image tower at ``image_size`` px
    inputs (0: its own size; a ViT's token count grows with it, as ``--model.image.image_size``)."""
    try:
        spec = image_tower_spec(name)
    except ValueError:
        spec = None  # a text tower
    if spec is not None:  # ValueError for a size the tower cannot take, naming the fix
        spec = image_spec_at(spec, image_size)
    if spec is not None and spec.arch != "timm_vit":
        return TowerShape(name, "image", 0, spec.width, 0, 0, 0, False, 3 * spec.image_size**2, modelled=False)
    if spec is not None:
        # A class token adds one token; the avg-pooled tiny towers have none.
        tokens = (spec.image_size // spec.patch_size) ** 2 + (spec.global_pool == "token")
        return TowerShape(
            name,
            "image",
            tokens,
            spec.width,
            spec.depth,
            spec.num_heads,
            int(spec.width * spec.mlp_ratio),
            False,
            3 * spec.image_size**2,
        )
    text = text_tower_spec(name)
    return TowerShape(
        name,
        "text",
        text.context_length,
        text.width,
        text.depth,
        text.num_heads,
        text.intermediate_size,
        text.dropout > 0,
        text.context_length,
    )


def layer_saved_bytes(shape: TowerShape, elem: int, fused_attention: bool = True) -> float:
    """Bytes one layer keeps for backward, per sample, without recomputation."""
    s, h, f, a = shape.tokens, shape.width, shape.mlp, shape.heads
    saved = elem * s * (8 * h + 2 * f) + FP32 * a * s + 2 * 2 * FP32 * s
    if shape.dropout:
        saved += 2 * s * h  # bool masks after the attention output and the MLP output
    if not fused_attention:
        saved += elem * a * s * s  # softmax probabilities, kept by the math kernel
    return saved


def edge_saved_bytes(shape: TowerShape, elem: int) -> float:
    """Bytes kept outside the layers, per sample: the final (ViT) or embedding (BERT) LayerNorm
    input and the pooled feature fed to the projection. The input batch itself is counted apart
    (``input_bytes``): it exists whether or not autograd keeps it."""
    s, h = shape.tokens, shape.width
    saved = elem * s * h + elem * h + 2 * FP32 * s
    if shape.dropout:
        saved += s * h  # embedding dropout mask
    return saved


def input_bytes(shape: TowerShape, elem: int) -> float:
    """One sample of the input batch on the device: pixels in the compute dtype, or int64 token
    ids plus their attention mask."""
    if shape.kind == "image":
        return elem * shape.input_elements
    return 2 * 8 * shape.input_elements


def backward_transient_bytes(shape: TowerShape, elem: int) -> float:
    """Gradients on top of the stored activations while a layer runs backward, per sample.

    Autograd frees a node's saved tensors as soon as its backward has run, so each new
    activation gradient mostly replaces a tensor of the same size just freed; what stays on top
    is the residual stream's gradient plus one in-flight gradient of width h (measured: about
    2 s h elements, see docs/memory_planner.md)."""
    return elem * 2 * shape.tokens * shape.width


def inference_bytes(shape: TowerShape, elem: int) -> float:
    """Peak working set of a forward without autograd, per sample (a locked tower, or
    GradCache's first pass): the residual stream, q/k/v and attention output, and the MLP
    hidden before and after GELU of the one layer running."""
    s, h, f = shape.tokens, shape.width, shape.mlp
    return elem * s * (6 * h + 2 * f)


@dataclass(frozen=True)
class TowerActivations:
    """Per-sample activation memory of one tower in training (bytes)."""

    stored: float
    """Kept from forward to backward for the whole batch."""
    working: float
    """Extra live at the worst moment of backward (the recomputed layer plus gradients)."""

    @property
    def peak(self) -> float:
        return self.stored + self.working


def train_activations(
    shape: TowerShape, elem: int, checkpointing: bool, fused_attention: bool = True
) -> TowerActivations:
    """Per-sample activations of a trained tower, with or without full activation checkpointing.

    Checkpointing keeps each layer's input (e*s*h, Korthikanti's 2sbh in 16-bit) and in backward
    rebuilds one layer's full activations at a time, on top of the gradients in flight.
    """
    layer = layer_saved_bytes(shape, elem, fused_attention)
    edge = edge_saved_bytes(shape, elem)
    transient = backward_transient_bytes(shape, elem)
    if checkpointing:
        return TowerActivations(shape.depth * elem * shape.tokens * shape.width + edge, layer + transient)
    return TowerActivations(shape.depth * layer + edge, transient)


def naive_loss_bytes(local: int, total: int, dim: int) -> float:
    """The reference loss on a rank with ``local`` rows against ``total`` columns: six fp32
    [local, total] matrices at the backward peak (per direction: the raw products kept for the
    temperature's gradient and log-softmax's output, plus the gradients of both in backward;
    measured 6.0 x on the CPU), plus the feature buffers of ``feature_bytes``."""
    return 6 * FP32 * local * total + feature_bytes(local, total, dim)


def tiled_loss_bytes(local: int, total: int, dim: int, tile: int) -> float:
    """The tiled loss: three fp32 tiles live in backward (products, probabilities, gradient),
    plus the feature buffers; nothing scales with local x total."""
    return 3 * FP32 * min(tile, local) * min(tile, total) + feature_bytes(local, total, dim)


def feature_bytes(local: int, total: int, dim: int) -> float:
    """fp32 copies of the rows and gathered columns and their gradients (image and text)."""
    return 2 * 2 * FP32 * (local + total) * dim
