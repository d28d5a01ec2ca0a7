"""Pure PyTorch BriVL: towers, momentum copies, presets. Nothing here knows about DeepSpeed."""

from wenlan.models.brivl import BriVL, ModelConfig, momentum_update
from wenlan.models.presets import PRESETS, count_parameters, get_preset
from wenlan.models.towers import ImageTowerConfig, TextTowerConfig

__all__ = ["BriVL", "ModelConfig", "momentum_update", "PRESETS", "count_parameters", "get_preset",
           "ImageTowerConfig", "TextTowerConfig"]
