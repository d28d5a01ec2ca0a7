"""BriVL: online image/text towers plus their momentum (key) copies.

The momentum towers are built from the same config and take the online weights through an EMA step
with m=0 (``wenlan.parallel.momentum.MomentumEMA``, partition-local under ZeRO-3), the same code path as
every later EMA step. They never receive gradients.
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from wenlan.models.towers import ImageTower, ImageTowerConfig, TextTower, TextTowerConfig


@dataclass
class ModelConfig:
    """A whole BriVL model: both towers and the joint embedding width."""

    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = 128


class BriVL(nn.Module):
    def __init__(self, cfg: ModelConfig, momentum: bool = True):
        super().__init__()
        self.cfg = cfg
        self.image_tower = ImageTower(cfg.image, cfg.embed_dim)
        self.text_tower = TextTower(cfg.text, cfg.embed_dim)
        self.momentum_image_tower = self.momentum_text_tower = None
        if momentum:
            self.momentum_image_tower = ImageTower(cfg.image, cfg.embed_dim).requires_grad_(False)
            self.momentum_text_tower = TextTower(cfg.text, cfg.embed_dim).requires_grad_(False)

    def pretrained_state(self) -> dict[str, torch.Tensor]:
        """The configured pretrained backbone / text encoder weights, named as in this model's state
        dict (online towers only: the momentum towers copy them when they are initialised)."""
        state = {f"image_tower.backbone.{k}": v for k, v in self.image_tower.backbone.pretrained_state().items()}
        state.update({f"text_tower.{k}": v for k, v in self.text_tower.pretrained_state().items()})
        return state

    def named_momentum_pairs(self):
        """(momentum parameter name, online parameter, momentum parameter), in a fixed order, for the EMA."""
        for prefix, online, key in (("momentum_image_tower.", self.image_tower, self.momentum_image_tower),
                                    ("momentum_text_tower.", self.text_tower, self.momentum_text_tower)):
            for (name, p), q in zip(online.named_parameters(), key.parameters()):
                yield prefix + name, p, q

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image_tower(images)  # (B, E)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_tower(input_ids, attention_mask)  # (B, E)

    def forward(self, images, input_ids, attention_mask, with_keys: bool = True):
        """Online queries (with grad) and, if asked, momentum keys (without) for a batch."""
        img_q = self.image_tower(images)  # (B, E)
        txt_q = self.text_tower(input_ids, attention_mask)  # (B, E)
        if not with_keys:
            return img_q, txt_q, None, None
        with torch.no_grad():
            img_k = self.momentum_image_tower(images)  # (B, E)
            txt_k = self.momentum_text_tower(input_ids, attention_mask)  # (B, E)
        return img_q, txt_q, img_k, txt_k

