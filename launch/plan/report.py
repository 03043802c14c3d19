"""The memory planner's printed tables (``python -m tritower.launch.plan``)."""

from __future__ import annotations

from tritower.launch.plan.activations import (
    inference_bytes,
    naive_loss_bytes,
    tiled_loss_bytes,
    train_activations,
)
from tritower.launch.plan.planner import GIB, Candidate, PlanRequest, flags
from tritower.launch.plan.states import POLICIES

MIB = 2.0**20
STATE_ROWS = [
    ("params", "parameters (engine)"),
    ("grads", "gradients"),
    ("grad_fp32", "fp32 gradient partition (step)"),
    ("optimizer", "fp32 master + AdamW moments"),
    ("gathered", "ZeRO-3 gathered largest layer"),
    ("engine", "= engine (DeepSpeed's count)"),
    ("buckets", "communication buckets"),
    ("locked", "locked towers (params only)"),
    ("total", "= model states on GPU"),
    ("cpu", "host memory per GPU (offload)"),
]


def _gib(value: float) -> str:
    return f"{value / GIB:8.2f}"


def _setting_letter(request: PlanRequest, role: str, trained: bool) -> str:
    if role == "third":
        return "L (3T third tower)"
    if not trained:
        return "L (locked)"
    if request.setting == "3T":
        return "trained"
    return f"{request.setting[0 if role == 'image' else 1]} (trained)"


def _describe(c: Candidate) -> str:
    ckpt = ",".join(role for role, on in c.checkpointing.items() if on) or "none"
    return f"{c.policy.label:<12} ckpt={ckpt:<10} micro={c.micro:<5} M={c.micro_batches:<4} loss={c.loss_impl:<5}"


def format_plan(result: dict) -> str:
    """Human-readable tables for a ``plan()`` result."""
    request = PlanRequest(**result["request"])
    towers, states = result["towers"], result["states"]
    lines = [
        f"tritower memory plan: setting {request.setting}, {request.precision}, global batch "
        f"{request.global_batch} on {request.gpus} GPUs ({request.per_rank} per GPU), "
        f"{request.gpu_memory:g} GiB each, budget {result['budget'] / GIB:.1f} GiB "
        f"({request.margin:.0%} kept free)",
        "",
        "Towers                          params  role",
    ]
    unmodelled = sorted({t.shape.name for t in towers if not t.shape.modelled})
    if unmodelled:
        lines.insert(
            1,
            f"NOTE: activations of {', '.join(unmodelled)} are not modelled (only ViT and transformers text "
            "towers are); the totals below count their parameters and optimizer states but 0 activations.",
        )
    for t in towers:
        size = f", {request.image_size} px" if request.image_size and t.shape.kind == "image" else ""
        lines.append(
            f"  {t.role:<6} {t.shape.name:<22} {t.params / 1e6:8.1f}M  "
            f"{_setting_letter(request, t.role, t.trained)}{size}"
        )
    lines.append(f"  heads  projections+temperature {result['heads'] / 1e6:8.1f}M  trained")
    trained = result["trained_params"] / 1e6
    lines.append(f"  trained parameters in the DeepSpeed engine: {trained:.1f}M")
    header = "".join(f"{p.label:>13}" for p in POLICIES)
    lines += ["", f"Model states per GPU (GiB)        {header}"]
    for key, label in STATE_ROWS:
        values = [getattr(states[p.label], key) for p in POLICIES]
        lines.append(f"  {label:<32}" + "".join(f"{v / GIB:13.2f}" for v in values))

    elem = request.elem
    lines += [
        "",
        f"Activations per sample (MiB, {request.precision})   stored  +backward  "
        "= peak   | checkpointed: stored  +backward  = peak | no-grad fwd",
    ]
    for t in towers:
        full = train_activations(t.shape, elem, False, not request.unfused_attention)
        ckpt = train_activations(t.shape, elem, True, not request.unfused_attention)
        no_grad = f"{inference_bytes(t.shape, elem) / MIB:8.2f}"
        if not t.shape.modelled:
            lines.append(f"  {t.role:<6} {t.shape.name}: activations not modelled (not a transformer tower)")
            continue
        if not t.trained:
            note = "(no autograd: keeps nothing for backward)"
            lines.append(f"  {t.role:<6} locked  s={t.shape.tokens:<4} {note:<72} | {no_grad}")
            continue
        lines.append(
            f"  {t.role:<6} trained s={t.shape.tokens:<4} {full.stored / MIB:12.2f} "
            f"{full.working / MIB:9.2f} {full.peak / MIB:9.2f}   | {ckpt.stored / MIB:18.2f} "
            f"{ckpt.working / MIB:9.2f} {ckpt.peak / MIB:7.2f} | {no_grad}"
        )
    b, total, dim = request.per_rank, request.global_batch, request.embed_dim
    lines += [
        "",
        f"Loss buffers per GPU ({b} rows x {total} columns, dim {dim}): naive "
        f"{naive_loss_bytes(b, total, dim) / MIB:.1f} MiB (six fp32 {b}x{total} "
        f"matrices), tiled {tiled_loss_bytes(b, total, dim, request.tile) / MIB:.1f} "
        f"MiB (tile {request.tile})" + ("; x3 for 3T" if request.setting == "3T" else ""),
    ]

    lines += ["", f"Whole per-GPU batch ({b}), no checkpointing, naive loss (GiB):"]
    for label, c in result["full_batch"].items():
        verdict = "fits" if c.total <= result["budget"] else "does not fit"
        lines.append(f"  {label:<12} activations {_gib(c.parts['activations'])}  total {_gib(c.total)}  {verdict}")
    lines += ["", "Best fit per ZeRO policy (least recomputation, then largest micro-batch):"]
    for label, c in result["per_policy"].items():
        if c is None:
            lines.append(f"  {label:<12} nothing fits")
            continue
        note = "" if c.policy.zero_file else "  (no policy file shipped)"
        lines.append(
            f"  {_describe(c)} total {_gib(c.total)} GiB  (activations {c.parts['activations'] / GIB:.2f}){note}"
        )
    best = result["best"]
    lines.append("")
    if best is None:
        lines.append(
            "Recommendation: nothing fits. Use more GPUs, a smaller global batch, or "
            "precompute the locked towers' embeddings (--precomputed-locked)."
        )
    else:
        lines.append(
            f"Recommendation: {_describe(best)} -> {best.total / GIB:.2f} GiB of "
            f"{result['budget'] / GIB:.1f} GiB budget"
        )
        lines.append(f"  train with: {flags(request, best)}")
    return "\n".join(lines)
