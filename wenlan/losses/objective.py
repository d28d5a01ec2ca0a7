"""The pre-training objective around a BriVL model: what the engine wraps and calls.

``brivl``: cross-modal MoCo. Image queries are scored against momentum text keys (this batch's, then
the text queue) and text queries against momentum image keys; loss = i2t + t2i as in BriVL.
``clip``: in-batch InfoNCE over the global batch, no momentum towers and no queues.
"""

import functools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn

from wenlan.losses.infonce import clip_loss, exclusion_mask, info_nce
from wenlan.losses.queue import KeyQueues
from wenlan.models.brivl import BriVL


@dataclass
class ObjectiveConfig:
    """Loss and cold-start options. The defaults train the demo reliably from random weights; BriVL-1.0
    (pretrained backbones) used in_batch_negatives=False, fixed temperature, constant momentum."""

    name: str = "brivl"
    """``brivl`` (momentum encoders + queues) or ``clip`` (in-batch, the baseline)."""
    queue_size: int = 4096
    """Negatives per queue; must be a multiple of the global batch so writes never straddle the end."""
    temperature: float = 0.07
    learnable_temperature: bool = True
    """Learn log(1/T) (CLIP-style), clamped to T >= min_temperature."""
    min_temperature: float = 0.01
    momentum: float = 0.99
    """Target EMA coefficient of the momentum towers (BriVL 0.99, MoCo 0.999)."""
    momentum_start: float | None = None
    """If set, the coefficient rises from this to ``momentum`` on a cosine over the run (BYOL)."""
    in_batch_negatives: bool = True
    """Also use this batch's other momentum keys as negatives (ALBEF); keeps the cold start moving."""
    queue_warmup_steps: int = 0
    """Steps that use no queue negatives (stale keys of a random encoder only add noise early on)."""
    mask_duplicates: bool = True
    """Mask negatives whose sample id equals the query's (copies of the positive, e.g. same caption)."""

    def momentum_at(self, step: int, max_steps: int) -> float:
        if self.momentum_start is None or max_steps <= 1:
            return self.momentum
        progress = min(step / (max_steps - 1), 1.0)
        return self.momentum - (self.momentum - self.momentum_start) * (math.cos(math.pi * progress) + 1) / 2

    def validate(self) -> None:
        if self.name not in ("brivl", "clip"):
            raise ValueError(f"--objective: unknown objective {self.name!r}; use brivl or clip")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"objective.momentum={self.momentum} must be in [0, 1)")
        if self.temperature <= 0 or self.min_temperature <= 0:
            raise ValueError("objective.temperature and objective.min_temperature must be > 0")


class ContrastivePretraining(nn.Module):
    """BriVL towers + queues + temperature: the module handed to the DeepSpeed engine."""

    def __init__(self, model: BriVL, cfg: ObjectiveConfig):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.log_scale = nn.Parameter(torch.full((1,), math.log(1.0 / cfg.temperature)),
                                      requires_grad=cfg.learnable_temperature)
        self.queues = KeyQueues(cfg.queue_size, model.cfg.embed_dim) if cfg.name == "brivl" else None

    def scale(self) -> torch.Tensor:
        return self.log_scale.clamp(max=math.log(1.0 / self.cfg.min_temperature)).exp()

    def forward(self, images, input_ids, attention_mask, ids, use_queue: bool = True):
        """Returns (loss, stats, keys); ``keys`` = (image_keys, text_keys, ids) to enqueue once the
        optimizer has stepped (the queues must not change while the loss graph still needs them)."""
        if self.cfg.name == "clip":
            return self._clip(images, input_ids, attention_mask)
        img_q, txt_q, img_k, txt_k = self.model(images, input_ids, attention_mask)  # 4 x (B, E)
        excluded = exclusion_mask(ids, self.queues.ids, self.queues.valid(), self.cfg.in_batch_negatives,
                                  use_queue, self.cfg.mask_duplicates)  # (B, B + K)
        scale = self.scale()
        loss_i2t, acc_i2t = info_nce(img_q, txt_k, self.queues.text, scale, excluded)
        loss_t2i, acc_t2i = info_nce(txt_q, img_k, self.queues.image, scale, excluded)
        stats = dict(loss_i2t=loss_i2t.detach(), loss_t2i=loss_t2i.detach(), acc_i2t=acc_i2t, acc_t2i=acc_t2i,
                     temperature=1.0 / scale.detach())
        return loss_i2t + loss_t2i, stats, (img_k, txt_k, ids)

    def _clip(self, images, input_ids, attention_mask):
        img, txt, _, _ = self.model(images, input_ids, attention_mask, with_keys=False)  # 2 x (B, E)
        offset = 0
        all_img, all_txt = img, txt
        if dist.is_initialized() and dist.get_world_size() > 1:
            # All-gather WITH gradient: each rank's loss also pulls on the other ranks' embeddings.
            all_img = torch.cat(dist_nn.all_gather(img))  # (N*B, E)
            all_txt = torch.cat(dist_nn.all_gather(txt))  # (N*B, E)
            offset = dist.get_rank() * img.shape[0]
        scale = self.scale()
        loss, acc = clip_loss(img, txt, all_img, all_txt, offset, scale)
        return loss, dict(acc_i2t=acc, temperature=1.0 / scale.detach()), None


@functools.lru_cache(maxsize=8)
def _hash_weights(length: int) -> torch.Tensor:
    return torch.randint(1, 2**62, (length,), generator=torch.Generator().manual_seed(0))


def caption_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) token ids -> (B,) int64 ids equal exactly for identical captions; a fixed random linear
    hash (wrapping int64 arithmetic), the same on every rank and run. Called every micro-step, so the
    weights are drawn once per length."""
    weights = _hash_weights(input_ids.shape[1]).to(input_ids.device)
    return (input_ids.long() * weights).sum(dim=1)
