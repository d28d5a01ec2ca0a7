"""Contrastive losses as plain functions of embeddings (no state, no communication)."""

import torch
import torch.nn.functional as F


def info_nce(query: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor, scale: torch.Tensor,
             excluded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of each query against [this batch's keys; the queue].

    query (B, E) online embeddings (with grad); keys (B, E) momentum keys of the same batch, the i-th
    being query i's positive; queue (K, E) negatives; excluded (B, B + K) True where a candidate must
    not count (never on the positive). Returns the mean loss and the share of queries whose best
    candidate is their positive.
    """
    # Similarities in fp32 whatever the towers run in: the queue is kept in fp32, and logits scaled
    # by 1/T ~ 14-100 lose the ranking of close negatives in bf16.
    candidates = torch.cat([keys.float(), queue.float()])  # (B + K, E)
    logits = scale.float() * query.float() @ candidates.t()  # (B, B + K)
    logits = logits.masked_fill(excluded, float("-inf"))
    labels = torch.arange(query.shape[0], device=query.device)
    loss = F.cross_entropy(logits, labels)
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return loss, accuracy


def exclusion_mask(batch_ids: torch.Tensor, queue_ids: torch.Tensor, queue_valid: torch.Tensor,
                   in_batch_negatives: bool, use_queue: bool, mask_duplicates: bool) -> torch.Tensor:
    """(B, B + K) candidates that are not negatives for each query.

    - other in-batch keys, unless ``in_batch_negatives`` (ALBEF's extra negatives);
    - the whole queue while ``use_queue`` is off (queue warm-up), and its unfilled entries always;
    - with ``mask_duplicates``, keys carrying the query's own sample id: a copy of the positive is no
      negative.
    """
    B = batch_ids.shape[0]
    eye = torch.eye(B, dtype=torch.bool, device=batch_ids.device)
    in_batch = torch.zeros(B, B, dtype=torch.bool, device=batch_ids.device) if in_batch_negatives else ~eye
    in_queue = (~queue_valid).expand(B, -1)  # (B, K)
    if not use_queue:
        in_queue = torch.ones_like(in_queue)
    if mask_duplicates:
        in_batch = in_batch | ((batch_ids[:, None] == batch_ids[None, :]) & ~eye)
        in_queue = in_queue | (batch_ids[:, None] == queue_ids[None, :])
    return torch.cat([in_batch, in_queue], dim=1)


def clip_loss(image: torch.Tensor, text: torch.Tensor, all_image: torch.Tensor, all_text: torch.Tensor,
              offset: int, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """open_clip's ClipLoss with ``local_loss=True``: this rank's (B, E) embeddings against the
    (N*B, E) embeddings of the whole global batch (gathered with gradient); this rank's positives sit
    at ``offset`` + i. Returns the mean of the two directions and the image->text accuracy."""
    labels = torch.arange(image.shape[0], device=image.device) + offset
    logits_i2t = scale * image @ all_text.t()  # (B, N*B)
    logits_t2i = scale * text @ all_image.t()  # (B, N*B)
    loss = (F.cross_entropy(logits_i2t.float(), labels) + F.cross_entropy(logits_t2i.float(), labels)) / 2
    accuracy = (logits_i2t.argmax(dim=1) == labels).float().mean()
    return loss, accuracy
