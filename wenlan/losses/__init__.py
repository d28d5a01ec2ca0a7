"""Contrastive objectives (queue InfoNCE, in-batch CLIP) and the negative queues."""

from wenlan.losses.infonce import clip_loss, info_nce
from wenlan.losses.objective import ContrastivePretraining, ObjectiveConfig, caption_ids
from wenlan.losses.queue import KeyGather, KeyQueues

__all__ = ["clip_loss", "info_nce", "ContrastivePretraining", "ObjectiveConfig", "caption_ids", "KeyGather",
           "KeyQueues"]
