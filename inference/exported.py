"""Inference on an exported model (``python -m tritower.launch.tools.export``): no DeepSpeed, no
checkpoint, no pretrained files needed, only the export folder.

    from tritower.inference import load_export

    clip = load_export("exports/clip_tiny")
    image_features = clip.encode_image([Image.open("cat.jpg")])      # [1, D], unit norm
    text_features = clip.encode_text(["a red circle.", "a blue star."])  # [2, D], unit norm
    logits = clip.similarity([Image.open("cat.jpg")], ["a red circle."])  # [1, 1]

An export of a Three Towers run made with ``--alpha A`` loads as the alpha mixture
(``tritower.model.ThreeTowersMixture``: the main towers, the 3T heads and the third tower);
its features are [sqrt(A) f(x), sqrt(1-A) h_g(h(x))] and [sqrt(A) g(t), sqrt(1-A) g_h(g(t))], so
``similarity(..., scaled=False)`` is exactly A <f(x), g(t)> + (1-A) <h_g(h(x)), g_h(g(t))>.

Images go through the evaluation transform the run was evaluated with (shorter side resized to
the tower's size with its interpolation, centre crop, the tower's mean/std:
``tritower.data.transforms.EvalTransform``, the pixels open_clip's ``preprocess`` makes);
captions through the exported tokenizer (``tritower.data.build_text_tokenizer``, padded or
truncated to the tower's context length: ``tritower.data.tokenize``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from tritower.data.tokenizer import build_text_tokenizer, tokenize
from tritower.data.transforms import EvalTransform
from tritower.model.architecture import FORMAT, build_architecture, build_third_tower_architecture
from tritower.model.mixture import ThreeTowersMixture
from tritower.model.precision import dtype_of


class ExportedModel:
    """An exported CLIP-style model with its tokenizer and image preprocessing.

    ``model`` is the plain ``CLIPModel`` (``encode_image(tensor)``,
    ``encode_text(input_ids, attention_mask)``), e.g. for ``tritower.evaluation.evaluate``; for an
    alpha-mixed 3T export it is the ``ThreeTowersMixture`` with the same methods.
    """

    def __init__(self, model: torch.nn.Module, config: dict, folder: Path, device: torch.device) -> None:
        self.model = model
        self.config = config
        self.folder = folder
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.context_length = int(config["context_length"])
        self.tokenizer = build_text_tokenizer(folder / config["tokenizer"]["path"])
        prep = config["image_preprocessing"]
        # Exports written before the interpolation was recorded resized bicubic.
        self.transform = EvalTransform(
            prep["image_size"], prep["mean"], prep["std"], prep.get("interpolation", "bicubic")
        )

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Captions -> (input_ids, attention_mask), int64 [N, context_length] each."""
        return tokenize(self.tokenizer, list(texts), self.context_length)

    def preprocess(self, images: Sequence[Image.Image] | torch.Tensor) -> torch.Tensor:
        """PIL images -> float32 [N,3,H,W] (evaluation transform); a tensor is taken as already
        preprocessed and passed through."""
        if isinstance(images, torch.Tensor):
            return images
        return torch.stack([self.transform(image) for image in images])

    @torch.no_grad()
    def encode_image(self, images: Sequence[Image.Image] | torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """PIL images, or a preprocessed tensor [N,3,H,W] -> unit-norm features [N,D] (float32)."""
        pixels = self.preprocess(images)
        chunks = [
            self.model.encode_image(pixels[i : i + batch_size].to(self.device, self.dtype)).float().cpu()
            for i in range(0, len(pixels), batch_size)
        ]
        return torch.cat(chunks)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Captions -> unit-norm features [N,D] (float32)."""
        input_ids, attention_mask = self.tokenize(texts)
        chunks = [
            self.model.encode_text(
                input_ids[i : i + batch_size].to(self.device), attention_mask[i : i + batch_size].to(self.device)
            )
            .float()
            .cpu()
            for i in range(0, len(input_ids), batch_size)
        ]
        return torch.cat(chunks)

    @torch.no_grad()
    def logit_scale(self) -> float:
        """The learnt temperature's inverse, exp(logit_scale) clamped as in training."""
        return float(self.model.scale().float().item())

    @property
    def alpha(self) -> float | None:
        """The 3T mixing weight of an alpha-mixed export; None for a plain CLIP."""
        return (self.config.get("three_towers") or {}).get("alpha")

    def similarity(
        self, images: Sequence[Image.Image] | torch.Tensor, texts: Sequence[str], scaled: bool = True
    ) -> torch.Tensor:
        """[N images, M texts]: cosine similarity times the learnt logit scale (the logits the
        contrastive loss saw; softmax over texts gives zero-shot probabilities), or the plain
        cosine in [-1, 1] with ``scaled=False``. For an alpha-mixed 3T export the cosine is the
        alpha score A <f, g> + (1-A) <h_g(h), g_h(g)>, scaled by the image-text multiplier."""
        cosine = self.encode_image(images) @ self.encode_text(texts).T  # [N,D] @ [D,M]
        return cosine * self.logit_scale() if scaled else cosine


def _mixture_key(key: str) -> str:
    """A key of an alpha-mixed export -> the ThreeTowersMixture's: the CLIPModel's keys sit under
    ``model.``, the third tower's (``third_tower.`` + the ImageTower's names) under
    ``third_tower.tower.`` (a LockedTower holds its tower as ``.tower``)."""
    if key.startswith("third_tower."):
        return "third_tower.tower." + key[len("third_tower.") :]
    return "model." + key


def load_export(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> ExportedModel:
    """Load an export folder (``model.safetensors`` + ``config.json`` + tokenizer files).

    ``dtype`` None keeps the exported precision. Every tensor of the file must fit the model
    and every model tensor must be in the file (strict load): a missing or extra key raises.
    """
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    config = json.loads((folder / "config.json").read_text())
    if config.get("format") != FORMAT:
        raise ValueError(f"{folder / 'config.json'} is not a tritower export (format {config.get('format')!r})")
    model: torch.nn.Module = build_architecture(config)
    if config.get("three_towers"):
        model = ThreeTowersMixture(model, build_third_tower_architecture(config), config["three_towers"]["alpha"])
        state = {_mixture_key(k): v for k, v in load_file(str(folder / "model.safetensors"), device="cpu").items()}
    else:
        state = load_file(str(folder / "model.safetensors"), device="cpu")
    result = model.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=False
    )
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{folder / 'model.safetensors'} does not fit its config: missing "
            f"{result.missing_keys[:8]}, unexpected {result.unexpected_keys[:8]}"
        )
    stored = dtype_of(config["dtype"])
    device = torch.device(device)
    model = model.to(device=device, dtype=dtype or stored).eval()
    return ExportedModel(model, config, folder, device)
