"""Optional fused kernels: NVIDIA apex where it is installed, torch-native ones otherwise.

apex is never a dependency (the PyPI package named ``apex`` is an unrelated web toolkit): it is
built from source on GPU clusters. When it imports and the run is on CUDA, every ``nn.LayerNorm``
is swapped for apex's ``FusedLayerNorm`` with the same weights. The run reports what is in use.
"""

from __future__ import annotations

import torch
from torch import nn


def apex_fused_layer_norm() -> type | None:
    """apex's FusedLayerNorm class, or None when apex (NVIDIA's) is not importable."""
    try:
        from apex.normalization import FusedLayerNorm  # type: ignore[import-not-found]
    except Exception:  # ImportError, or a CUDA-less apex build failing at import
        return None
    return FusedLayerNorm


def use_fused_layer_norm(model: nn.Module, device: torch.device, enabled: bool) -> str:
    """Swap LayerNorms for apex's fused one where possible; returns a line saying what is used."""
    fused_cls = apex_fused_layer_norm()
    if not enabled:
        return "LayerNorm: torch-native (apex disabled by deepspeed.use_apex=false)"
    if fused_cls is None:
        return "LayerNorm: torch-native (NVIDIA apex not installed)"
    if device.type != "cuda":
        return "LayerNorm: torch-native (apex found, but its fused kernels need CUDA)"
    swapped = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.LayerNorm and child.elementwise_affine:
                fused = fused_cls(child.normalized_shape, eps=child.eps)
                fused.load_state_dict(child.state_dict())
                setattr(parent, name, fused)
                swapped += 1
    return f"LayerNorm: apex FusedLayerNorm ({swapped} modules)"


def describe_optimizer(optimizer: object) -> str:
    """Name the optimizer implementation DeepSpeed picked (it wraps the real one under ZeRO)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    return f"optimizer: {type(inner).__module__}.{type(inner).__name__} (wrapped by {type(optimizer).__name__})"
