"""The ``deepspeed`` section: the ZeRO policy file and the precision of training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass
class DeepSpeedConfig:
    """Which ZeRO policy file to use and the numeric precision of training."""

    zero: str = "zero_configs/z3.json"
    """ZeRO/precision policy JSON (``--zero`` on the command line). Relative paths are tried
    from the working directory, then from the installed package."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """``fp32``, ``bf16`` or ``fp16`` (fp16 uses dynamic loss scaling; GPUs only)."""
    use_apex: bool = True
    """Use NVIDIA apex's fused LayerNorm where apex is installed and the run is on CUDA."""
