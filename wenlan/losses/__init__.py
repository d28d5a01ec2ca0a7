"""Contrastive objectives (queue InfoNCE, in-batch CLIP) and the negative queues."""

from wenlan.losses.infonce import clip_loss, exclusion_mask, info_nce
from wenlan.losses.objective import ContrastivePretraining, ObjectiveConfig, caption_ids
from wenlan.losses.queue import KeyQueues, gather_keys

__all__ = ["clip_loss", "exclusion_mask", "info_nce", "ContrastivePretraining", "ObjectiveConfig",
           "caption_ids", "KeyQueues", "gather_keys"]
