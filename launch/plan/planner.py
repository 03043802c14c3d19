"""The memory planner's model: per-GPU memory of a run, and the ZeRO stage, micro-batch and checkpointing
that fit it into the GPUs (docs/memory_planner.md has the formulas and their checks).

    python -m tritower.launch.plan --image vit_giant_patch14_224 --text bert_large \\
        --setting Uu --global-batch 32768 --gpus 256 --gpu-memory 80

Settings, image tower first: L locked, U pretrained unlocked, u from scratch (U and u cost the
same); 3T trains both towers against a locked third image tower (``--third``, default: the image
tower's architecture). ``--json`` prints the plan as JSON. Sizes are GiB (2^30 bytes).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

from tritower.launch.plan.activations import (
    TowerShape,
    inference_bytes,
    input_bytes,
    naive_loss_bytes,
    tiled_loss_bytes,
    tower_shape,
    train_activations,
)
from tritower.launch.plan.states import (
    POLICIES,
    ModelStates,
    ZeroPolicy,
    largest_layer_parameters,
    model_states,
    tower_parameters,
)
from tritower.model.setting import SETTINGS

GIB = 2.0**30


@dataclass(frozen=True)
class PlanRequest:
    """What the user asks about: towers, setting, batch and hardware (the options of
    ``python -m tritower.launch.plan``, field by field)."""

    image: str
    """Image tower registry name."""
    text: str
    """Text tower registry name."""
    global_batch: int
    """Samples per optimizer step over all GPUs (the contrastive batch)."""
    gpus: int
    """GPUs in the run."""
    gpu_memory: float
    """Memory per GPU, GiB."""
    setting: Literal[SETTINGS] = "uu"
    """LiT setting (image letter, text letter: L locked, U pretrained-unlocked, u from scratch) or 3T."""
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    """Training precision."""
    gpus_per_node: int = 8
    """GPUs per node: the nodes of DeepSpeed's own estimate (its host-memory figures)."""
    margin: float = 0.10
    """Fraction of GPU memory kept free: CUDA context, allocator fragmentation, NCCL buffers."""
    embed_dim: int = 1024
    """Width of the shared embedding space."""
    third: str = ""
    """3T's third tower; "": the image tower's architecture."""
    vocab_size: int | None = None
    """Token table rows of the text tower; None: the registry tower's default vocabulary."""
    tile: int = 1024
    """Tile size of the tiled contrastive loss."""
    precomputed_locked: bool = False
    """Locked towers' embeddings are precomputed: no locked parameters or forward on the GPU."""
    unfused_attention: bool = False
    """Attention keeps its s x s probabilities (the math kernel) instead of a fused kernel."""
    image_size: int = 0
    """Input side of the image (and third) tower in pixels, as --model.image.image_size; 0: the
    tower's own. A ViT's tokens, activations and position table grow with it."""

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ValueError(f"--setting {self.setting!r}; expected one of {', '.join(SETTINGS)}")
        if self.precision not in ("bf16", "fp16", "fp32"):
            raise ValueError(f"--precision {self.precision!r}; expected bf16, fp16 or fp32")
        if self.global_batch % self.gpus:
            raise ValueError(f"--global-batch {self.global_batch} is not divisible by --gpus {self.gpus}")

    @property
    def elem(self) -> int:
        return 4 if self.precision == "fp32" else 2

    @property
    def per_rank(self) -> int:
        return self.global_batch // self.gpus


@dataclass(frozen=True)
class Tower:
    """One tower as the planner sees it."""

    role: str
    """``image``, ``text`` or ``third``."""
    shape: TowerShape
    params: int
    trained: bool
    largest_layer: int


def build_towers(request: PlanRequest) -> list[Tower]:
    """The towers of the setting, with parameter counts (meta device, nothing allocated)."""
    letters = "Uu" if request.setting == "3T" else request.setting
    roles = [("image", request.image, letters[0] != "L"), ("text", request.text, letters[1] != "L")]
    if request.setting == "3T":
        roles.append(("third", request.third or request.image, False))
    towers = []
    for role, name, trained in roles:
        size = request.image_size if role != "text" else 0
        shape = tower_shape(name, size)
        vocab = request.vocab_size if shape.kind == "text" else None
        towers.append(
            Tower(
                role,
                shape,
                tower_parameters(name, shape.kind, vocab, size),
                trained,
                largest_layer_parameters(name, vocab, size) if trained else 0,
            )
        )
    return towers


def head_parameters(request: PlanRequest, towers: list[Tower]) -> int:
    """Always-trained small parts: the two projections and the temperature; 3T adds the four
    heads of ``model/clip.py`` (f_h, g_h: embed_dim x embed_dim on the main embeddings; h_f,
    h_g: third width x embed_dim on the third tower) and their two temperatures."""
    dim = request.embed_dim
    heads = sum(t.shape.width * dim for t in towers if t.role != "third") + 1
    if request.setting == "3T":
        third = next(t for t in towers if t.role == "third")
        heads += 2 * third.shape.width * dim + 2 * dim * dim + 2
    return heads


def forward_flops(shape: TowerShape) -> float:
    """Forward FLOPs per sample: QKV + output projections, MLP, attention scores and mix."""
    s, h, f = shape.tokens, shape.width, shape.mlp
    return 2 * shape.depth * s * (4 * h * h + 2 * h * f + 2 * s * h)


@dataclass
class Candidate:
    """One configuration and its per-GPU memory (bytes)."""

    policy: ZeroPolicy
    checkpointing: dict[str, bool]
    micro: int
    micro_batches: int
    loss_impl: str
    parts: dict[str, float] = field(default_factory=dict)
    states: ModelStates | None = None
    extra_forward: float = 0.0
    """Compute on top of one forward + backward, in trained-tower forwards (GradCache's first
    pass: 1; checkpointing a tower: its share of the forward FLOPs)."""

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def activation_parts(
    request: PlanRequest, towers: list[Tower], micro: int, checkpointing: dict[str, bool], loss_impl: str
) -> dict[str, float]:
    """Batch-dependent memory of one step (bytes): the activation phase and the input batch."""
    elem, b, total = request.elem, request.per_rank, request.global_batch
    trained = [t for t in towers if t.trained]
    locked = [t for t in towers if not t.trained and not request.precomputed_locked]
    acts = [train_activations(t.shape, elem, checkpointing[t.role], not request.unfused_attention) for t in trained]
    stored = micro * sum(a.stored for a in acts)
    working = micro * max((a.working for a in acts), default=0.0)
    # A locked tower's forward keeps nothing, but may run while the trained activations wait.
    locked_forward = micro * max((inference_bytes(t.shape, elem) for t in locked), default=0.0)
    losses = 3 if request.setting == "3T" else 1  # 3T: image-text, image-third, text-third
    if loss_impl == "naive":
        loss = losses * naive_loss_bytes(b, total, request.embed_dim)
    else:
        loss = losses * tiled_loss_bytes(b, total, request.embed_dim, request.tile)
    # Same pixels feed the image and third towers; ids and mask feed the text tower.
    inputs = b * sum(input_bytes(t.shape, elem) for t in towers if t.role != "third")
    if micro == b:
        # Plain step: the loss runs backward while every activation is still stored.
        peak = stored + max(working, locked_forward, loss)
        cached = 0.0
    else:
        # GradCache: encode without autograd, loss on cached features, re-encode with autograd.
        first_pass = micro * max((inference_bytes(t.shape, elem) for t in trained), default=0.0)
        peak = max(stored + max(working, locked_forward), loss, first_pass)
        cached = 2 * 4 * b * request.embed_dim * len(towers)  # fp32 features and their grads
    return {"activations": peak, "cached_features": cached, "inputs": inputs}


def evaluate(
    request: PlanRequest,
    towers: list[Tower],
    policy: ZeroPolicy,
    micro: int,
    checkpointing: dict[str, bool],
    loss_impl: str,
) -> Candidate:
    """Per-GPU memory of one configuration."""
    trained = sum(t.params for t in towers if t.trained) + head_parameters(request, towers)
    locked = 0 if request.precomputed_locked else sum(t.params for t in towers if not t.trained)
    largest = max([t.largest_layer for t in towers] + [max(t.shape.width for t in towers) * request.embed_dim])
    states = model_states(trained, locked, largest, request.gpus, policy, request.precision)
    parts = {"model_states": states.engine, "buckets": states.buckets, "locked_params": states.locked}
    parts.update(activation_parts(request, towers, micro, checkpointing, loss_impl))
    flops = {t.role: forward_flops(t.shape) for t in towers if t.trained}
    extra = (micro < request.per_rank) + sum(flops[role] for role, on in checkpointing.items() if on) / max(
        sum(flops.values()), 1.0
    )
    return Candidate(policy, checkpointing, micro, request.per_rank // micro, loss_impl, parts, states, extra)


def candidates(request: PlanRequest, towers: list[Tower], policy: ZeroPolicy) -> list[Candidate]:
    """Every micro-batch (divisor of the per-rank batch), checkpointing and loss choice."""
    roles = [t.role for t in towers if t.trained]
    options = [{}]
    for role in roles:
        options = [dict(o, **{role: on}) for o in options for on in (False, True)]
    b = request.per_rank
    micros = [m for m in range(b, 0, -1) if b % m == 0]
    return [
        evaluate(request, towers, policy, m, ckpt, impl)
        for ckpt in options
        for m in micros
        for impl in ("naive", "tiled")
    ]


def preference(candidate: Candidate) -> tuple:
    """Lower is better: no offload (host transfers are slow), least recomputation, lowest ZeRO
    stage (ZeRO-3 gathers parameters every forward and backward), the reference loss, then the
    largest micro-batch."""
    return (
        candidate.policy.offload_optimizer,
        round(candidate.extra_forward, 3),
        candidate.policy.stage,
        candidate.loss_impl == "tiled",
        -candidate.micro,
    )


def plan(request: PlanRequest) -> dict:
    """The full plan: parameters, per-policy best fits, activation breakdown, recommendation."""
    towers = build_towers(request)
    budget = request.gpu_memory * GIB * (1 - request.margin)
    per_policy = {}
    for policy in POLICIES:
        fitting = [c for c in candidates(request, towers, policy) if c.total <= budget]
        per_policy[policy.label] = min(fitting, key=preference) if fitting else None
    shippable = [c for p, c in zip(POLICIES, per_policy.values()) if c and p.zero_file]
    best = min(shippable, key=preference) if shippable else None
    no_ckpt = {t.role: False for t in towers if t.trained}
    full_batch = {p.label: evaluate(request, towers, p, request.per_rank, no_ckpt, "naive") for p in POLICIES}
    trained = sum(t.params for t in towers if t.trained) + head_parameters(request, towers)
    states = {p.label: full_batch[p.label].states for p in POLICIES}
    return {
        "request": asdict(request),
        "towers": towers,
        "budget": budget,
        "states": states,
        "trained_params": trained,
        "heads": head_parameters(request, towers),
        "per_policy": per_policy,
        "full_batch": full_batch,
        "best": best,
    }


def flags(request: PlanRequest, best: Candidate) -> str:
    """The training command-line options that realise a candidate."""
    parts = [
        f"--zero {best.policy.zero_file}",
        f"--data.batch_size={request.global_batch}",
        f"--train.micro_batch_size={best.micro}",
        f"--loss.impl={best.loss_impl}",
        f"--deepspeed.precision={request.precision}",
    ]
    if request.image_size:
        parts.append(f"--model.image.image_size={request.image_size}")
    for role, on in best.checkpointing.items():
        parts.append(f"--model.{role}_grad_checkpointing={'true' if on else 'false'}")
    if best.loss_impl == "tiled":
        parts.append(f"--loss.tile_size={request.tile}")
    return " ".join(parts)


def to_json(result: dict) -> dict:
    """The plan as plain JSON-able values (bytes for memory)."""

    def candidate(c: Candidate | None) -> dict | None:
        if c is None:
            return None
        return {
            "zero": c.policy.label,
            "zero_file": c.policy.zero_file,
            "checkpointing": c.checkpointing,
            "micro_batch": c.micro,
            "micro_batches": c.micro_batches,
            "loss_impl": c.loss_impl,
            "extra_forward": c.extra_forward,
            "parts": c.parts,
            "total": c.total,
        }

    request = PlanRequest(**result["request"])
    towers = [dict(asdict(t), shape=asdict(t.shape)) for t in result["towers"]]
    best = result["best"]
    return {
        "request": result["request"],
        "towers": towers,
        "head_params": result["heads"],
        "trained_params": result["trained_params"],
        "budget": result["budget"],
        "model_states": {k: dict(asdict(v), engine=v.engine, total=v.total) for k, v in result["states"].items()},
        "full_batch_no_checkpointing": {k: candidate(v) for k, v in result["full_batch"].items()},
        "best_per_zero": {k: candidate(v) for k, v in result["per_policy"].items()},
        "recommendation": candidate(best),
        "flags": flags(request, best) if best else None,
        "activations_not_modelled": [t.shape.name for t in result["towers"] if not t.shape.modelled],
    }
