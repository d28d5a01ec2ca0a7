"""Pure PyTorch BriVL: towers, momentum copies, presets. Nothing here knows about DeepSpeed."""

from wenlan.models.brivl import BriVL, ModelConfig
from wenlan.models.presets import PRESETS, count_parameters, get_preset
from wenlan.models.towers import ImageTowerConfig, TextTowerConfig

__all__ = ["BriVL", "ModelConfig", "PRESETS", "count_parameters", "get_preset",
           "ImageTowerConfig", "TextTowerConfig"]
