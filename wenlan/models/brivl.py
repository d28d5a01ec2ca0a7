"""BriVL: online image/text towers plus their momentum (key) copies.

The momentum towers are built from the same config and take the online weights through an EMA step
with m=0 (``wenlan.parallel.momentum.MomentumEMA``, partition-local under ZeRO-3), the same code path as
every later EMA step. They never receive gradients.
"""

import fnmatch
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from wenlan.models.shared import SharedEncoder
from wenlan.models.towers import ImageTower, ImageTowerConfig, TextTower, TextTowerConfig


@dataclass
class ModelConfig:
    """A whole BriVL model: both towers and the joint embedding width."""

    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    embed_dim: int = 128
    freeze: tuple[str, ...] = ()
    """Globs over the online towers' parameter names (``image_tower.backbone.*``, ``text_tower.bert.*``):
    matching parameters are frozen, on top of the towers' ``trainable_prefixes`` and
    ``trainable_bert_layers``. Frozen parameters get no gradient and no optimizer state."""
    shared_layers: int = 0
    """COOKIE's weight-sharing transformer (``wenlan.models.shared``): this many attention layers, of the
    image tower's width, heads and feed-forward size, run over both towers' token features before
    pooling. 0: none (set from ``--objective cookie``'s ``cookie.shared_layers``)."""


KEY_TOWER = "momentum_"
"""Names of the momentum (key) towers' modules contain this, in BriVL and in a pipeline's layers."""


def set_key_tower_modes(root: nn.Module) -> None:
    """After ``root.train()``: the modes a training step needs beyond PyTorch's one flag.

    - The momentum (key) towers compute targets: no dropout anywhere in them (a key does not change
      with the draw, as in MoCo and ALBEF's momentum distillation), while their BatchNorm layers
      normalise with the batch's statistics, as MoCo's key encoder does.
    - A BatchNorm layer whose online parameters are frozen (BriVL-1.0's frozen backbone blocks) keeps
      its pretrained running statistics: eval mode, in the online tower and in its momentum copy.

    Works on any module holding both towers' modules under their names (BriVL, a pipeline layer)."""
    modules = dict(root.named_modules())
    for name, module in modules.items():  # parents before children: a child's mode is set last
        key = KEY_TOWER in name
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            online = modules.get(name.replace(KEY_TOWER, "", 1)) if key else module
            params = list(online.parameters(recurse=False)) if online is not None else []
            module.train(not (params and not any(p.requires_grad for p in params)))
        elif key:
            module.train(False)


def model_config_from_dict(d: dict) -> ModelConfig:
    """The inverse of ``dataclasses.asdict`` on a ModelConfig (as stored in config.json, checkpoints and
    exported files; JSON turned its tuples into lists)."""
    image = dict(d["image"])
    if image.get("trainable_prefixes") is not None:
        image["trainable_prefixes"] = tuple(image["trainable_prefixes"])
    return ModelConfig(image=ImageTowerConfig(**image), text=TextTowerConfig(**d["text"]),
                       embed_dim=d["embed_dim"], freeze=tuple(d.get("freeze", ())),
                       shared_layers=d.get("shared_layers", 0))


def freeze_matching(model: nn.Module, patterns: tuple[str, ...]) -> None:
    """Freeze the parameters whose names match one of ``patterns`` (fnmatch globs); a pattern that
    matches nothing is an error (a typo would otherwise train what was meant to be frozen)."""
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        matched = fnmatch.filter(names, pattern)
        if not matched:
            raise ValueError(f"--freeze {pattern!r} matches no parameter; names look like "
                             f"{names[0]!r} or {names[-1]!r} (globs: * and ?)")
        for name in matched:
            model.get_parameter(name).requires_grad_(False)


def frozen_summary(model: nn.Module) -> str:
    """The frozen online parameters as the fewest module names that hold exactly them
    (``image_tower.backbone.net.blocks.0, ...``), for the start-up log; ``none`` if none."""
    frozen = []

    def visit(name: str, module: nn.Module) -> None:
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            frozen.append(name)
            return
        for child_name, child in module.named_children():
            visit(f"{name}.{child_name}" if name else child_name, child)
        for pname, p in module.named_parameters(recurse=False):
            if not p.requires_grad:
                frozen.append(f"{name}.{pname}" if name else pname)

    for tower in ("image_tower", "text_tower"):
        visit(tower, model.get_submodule(tower))
    return ", ".join(frozen) or "none"


class BriVL(nn.Module):
    def __init__(self, cfg: ModelConfig, momentum: bool = True):
        super().__init__()
        self.cfg = cfg
        self.image_tower = ImageTower(cfg.image, cfg.embed_dim)
        self.text_tower = TextTower(cfg.text, cfg.embed_dim)
        self.shared_encoder = SharedEncoder(cfg.image, cfg.text, cfg.shared_layers) if cfg.shared_layers else None
        freeze_matching(self, cfg.freeze)
        self.momentum_image_tower = self.momentum_text_tower = None
        if momentum:
            self.momentum_image_tower = ImageTower(cfg.image, cfg.embed_dim).requires_grad_(False)
            self.momentum_text_tower = TextTower(cfg.text, cfg.embed_dim).requires_grad_(False)

    def train(self, mode: bool = True) -> "BriVL":
        super().train(mode)
        if mode:
            set_key_tower_modes(self)
        return self

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
        shared = self.shared_encoder.image if self.shared_encoder is not None else None
        return self.image_tower(images, shared)  # (B, E)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        shared = self.shared_encoder.text if self.shared_encoder is not None else None
        return self.text_tower(input_ids, attention_mask, shared)  # (B, E)

    def encode_views(self, images, images2, input_ids, attention_mask, input_ids2, attention_mask2):
        """Two image views and two text views of a batch, each modality in one pass of its tower (the
        views stacked along the batch): (B, E) each of image view 1, image view 2, caption, text view 2."""
        B = images.shape[0]
        img = self.encode_image(torch.cat([images, images2]))  # (2B, E)
        txt = self.encode_text(torch.cat([input_ids, input_ids2]), torch.cat([attention_mask, attention_mask2]))  # (2B, E)
        return img[:B], img[B:], txt[:B], txt[B:]

    def forward(self, images, input_ids, attention_mask, with_keys: bool = True):
        """Online queries (with grad) and, if asked, momentum keys (without) for a batch."""
        img_q = self.encode_image(images)  # (B, E)
        txt_q = self.encode_text(input_ids, attention_mask)  # (B, E)
        if not with_keys:
            return img_q, txt_q, None, None
        with torch.no_grad():
            img_k = self.momentum_image_tower(images)  # (B, E)
            txt_k = self.momentum_text_tower(input_ids, attention_mask)  # (B, E)
        return img_q, txt_q, img_k, txt_k

