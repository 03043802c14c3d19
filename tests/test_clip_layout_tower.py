"""A CLIP-layout image tower locked: open_clip's own ViT-B-32 (random init, created by open_clip
itself, saved as open_clip saves it) loads as the timm tower ``timm:vit_base_patch32_clip_224``
through timm's checkpoint conversion, and its trunk features equal what open_clip computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tritower.model import LockedTower, image_tower_spec, load_image_tower

open_clip = pytest.importorskip("open_clip")  # a test dependency (setup.py extras "test")


def test_open_clip_visual_tower_loads_as_locked_timm_tower(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    path = tmp_path / "open_clip_vit_b32.pt"
    torch.save(model.state_dict(), path)

    name = "timm:vit_base_patch32_clip_224"
    spec = image_tower_spec(name)
    assert (spec.width, spec.image_size, spec.num_blocks) == (768, 224, 12)
    tower = LockedTower(load_image_tower(name, path), name)
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = tower.encode(images)  # [3, 768]: pooled, normed trunk features
        theirs = model.encode_image(images, normalize=False)  # [3, 512] = pooled @ visual.proj
    projected = ours @ model.visual.proj
    torch.testing.assert_close(projected, theirs, rtol=1e-4, atol=1e-4)
    assert tower.identity()["sha256"]
