"""Models: tower registry, image and text towers, the CLIP model (two towers, or three under
3T), tower settings (the LiT matrix and lock rules), locked towers and pretrained loading,
the 3T alpha mixture, and the export architecture.

Imports no DeepSpeed, so it can be used and tested on its own.
"""

from .clip import CLIPModel, build_clip
from .config import ModelConfig, ParsedModel, TowerConfig, TowerOptions
from .locked import CLIPWithLocked, LockedTower, LockedTowers, build_third_tower, split_locked
from .mixture import ThreeTowersMixture, check_alpha, mix_embeddings
from .pretrained import file_sha256, load_image_tower, load_state_dict, load_text_tower
from .registry import (
    ImageTowerSpec,
    TextTowerSpec,
    image_tower_spec,
    list_towers,
    text_tower_spec,
    tower_spec,
)
from .setting import LIT_SETTINGS, SETTINGS, TowerSetting, parse_setting
from .settings import (
    apply_trainable,
    parameter_counts,
    parameter_groups,
    parameter_table,
    resolve_trainable,
    trainable_rules,
    trainable_towers_at,
)
from .towers import ImageTower, TextTower, build_image_tower, build_text_tower, count_parameters, masked_mean

__all__ = [
    "CLIPModel",
    "CLIPWithLocked",
    "ImageTower",
    "ImageTowerSpec",
    "LIT_SETTINGS",
    "LockedTower",
    "LockedTowers",
    "ModelConfig",
    "ParsedModel",
    "SETTINGS",
    "TowerConfig",
    "TowerOptions",
    "TextTower",
    "ThreeTowersMixture",
    "TextTowerSpec",
    "TowerSetting",
    "apply_trainable",
    "build_clip",
    "build_image_tower",
    "build_text_tower",
    "build_third_tower",
    "check_alpha",
    "count_parameters",
    "file_sha256",
    "image_tower_spec",
    "list_towers",
    "load_image_tower",
    "load_state_dict",
    "load_text_tower",
    "masked_mean",
    "mix_embeddings",
    "parameter_counts",
    "parameter_groups",
    "parameter_table",
    "parse_setting",
    "resolve_trainable",
    "split_locked",
    "text_tower_spec",
    "tower_spec",
    "trainable_rules",
    "trainable_towers_at",
]
