"""Contrastive losses as plain functions of embeddings (no state, no communication).

Queue InfoNCE is computed in two parts so that the queue can be split across ranks: the queue's
contribution to each query's softmax normaliser is a log-sum-exp over queue logits
(``queue_logsumexp``, one column per queue shard), and ``info_nce`` adds the positive and the in-batch
logits to it. With one shard this is exactly cross-entropy over [this batch's keys; the queue].

Similarities are in fp32 whatever the towers run in: the queue is kept in fp32, and logits scaled by
1/T ~ 14-100 lose the ranking of close negatives in bf16.
"""

import torch
import torch.nn.functional as F

MASKED = -1e30
"""Logit of an excluded candidate. exp(MASKED - anything real) is exactly 0 in fp32, as with -inf, but
a query whose candidates are all excluded (a queue shard holding only its duplicates) gets a finite
log-sum-exp and a zero gradient instead of NaN."""


def batch_exclusion(ids: torch.Tensor, in_batch_negatives: bool, mask_duplicates: bool) -> torch.Tensor:
    """(B, B) in-batch candidates that are not negatives for each query (never the positive, i == j):
    all other keys unless ``in_batch_negatives`` (ALBEF's extra negatives), and with
    ``mask_duplicates`` keys carrying the query's own sample id (a copy of the positive)."""
    eye = torch.eye(ids.shape[0], dtype=torch.bool, device=ids.device)
    excluded = ~eye if not in_batch_negatives else torch.zeros_like(eye)
    if mask_duplicates:
        excluded = excluded | ((ids[:, None] == ids[None, :]) & ~eye)
    return excluded


class _QueueLogSumExp(torch.autograd.Function):
    """log-sum-exp over a constant queue in one (R, n) buffer: logits -> softmax in place, kept for the
    backward, which needs only the softmax-weighted queue key of each query (one matmul):
    d lse_r / d q_r = s * sum_j p_rj k_j and d lse_r / d s = q_r . sum_j p_rj k_j.
    Autograd's logsumexp would keep the logits, the mask and two more (R, n) temporaries."""

    @staticmethod
    def forward(ctx, query, queue, scale, excluded):
        probs = torch.mm(scale * query, queue.t())  # (R, n) logits for now
        if excluded is not None:
            probs.masked_fill_(excluded, MASKED)
        best = probs.amax(dim=1)  # (R,)
        total = probs.sub_(best[:, None]).exp_().sum(dim=1)  # (R,)
        probs.div_(total[:, None])  # softmax over the queue
        ctx.save_for_backward(query, queue, scale, probs)
        ctx.mark_non_differentiable(best)
        return best + total.log(), best

    @staticmethod
    def backward(ctx, grad_lse, _):
        query, queue, scale, probs = ctx.saved_tensors
        expected = torch.mm(probs, queue)  # (R, E): the softmax-weighted queue key of each query
        grad_query = (grad_lse * scale)[:, None] * expected if ctx.needs_input_grad[0] else None
        grad_scale = (grad_lse * (expected * query).sum(dim=1)).sum().reshape(scale.shape) \
            if ctx.needs_input_grad[2] else None
        return grad_query, None, grad_scale, None


def queue_logsumexp(query: torch.Tensor, queue: torch.Tensor, scale: torch.Tensor,
                    query_ids: torch.Tensor | None = None, queue_ids: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's log-sum-exp over its queue logits and its best queue logit (no gradient).

    query (R, E); queue (n, E) filled slots only, a constant (no gradient to it); with ids, slots
    carrying the query's own id are excluded (copies of its positive). Returns (R,), (R,); an empty
    queue gives -inf for both.
    """
    if queue.shape[0] == 0:
        # -inf, yet a function of the query: a rank whose queue shard is still empty must take part in
        # the backward's collectives like every other rank.
        empty = query.float().sum(dim=1).mul(0.0).sub(float("inf"))  # (R,)
        return empty, empty.detach()
    excluded = None if query_ids is None else query_ids[:, None] == queue_ids[None, :]  # (R, n)
    return _QueueLogSumExp.apply(query.float(), queue.float().detach(), scale.float(), excluded)


def info_nce(query: torch.Tensor, keys: torch.Tensor, scale: torch.Tensor, excluded: torch.Tensor,
             queue_lse: torch.Tensor, queue_best: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE of each query against [this batch's keys; the queue].

    query (B, E) online embeddings (with grad); keys (B, E) momentum keys of the same batch, the i-th
    being query i's positive; excluded (B, B) from ``batch_exclusion``; queue_lse (B, S) the queue's
    log-sum-exp per query and shard (S = 0 for no queue); queue_best (B,) the best queue logit.
    Returns the mean loss and the share of queries whose best candidate is their positive (ties go to
    the earlier candidate, as argmax over [keys; queue] would).
    """
    logits = (scale * query.float()) @ keys.float().t()  # (B, B)
    logits = logits.masked_fill(excluded, MASKED)
    positive = logits.diagonal()  # (B,)
    normaliser = torch.logsumexp(torch.cat([logits, queue_lse], dim=1), dim=1)  # (B,)
    loss = (normaliser - positive).mean()
    labels = torch.arange(query.shape[0], device=query.device)
    accuracy = ((logits.detach().argmax(dim=1) == labels) & (positive.detach() >= queue_best)).float().mean()
    return loss, accuracy


def clip_loss(image: torch.Tensor, text: torch.Tensor, all_image: torch.Tensor, all_text: torch.Tensor,
              offset: int, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """open_clip's ClipLoss with ``local_loss=True``: this rank's (B, E) embeddings against the
    (N*B, E) embeddings of the whole global batch (gathered with gradient); this rank's positives sit
    at ``offset`` + i. Returns the mean of the two directions, the image->text accuracy, and the two
    directions' losses (image->text, text->image; detached, for the log)."""
    labels = torch.arange(image.shape[0], device=image.device) + offset
    # fp32 before the product, as in info_nce: bf16 logits at scale ~100 are 0.5 apart.
    scale = scale.float()
    logits_i2t = (scale * image.float()) @ all_text.float().t()  # (B, N*B)
    logits_t2i = (scale * text.float()) @ all_image.float().t()  # (B, N*B)
    loss_i2t, loss_t2i = F.cross_entropy(logits_i2t, labels), F.cross_entropy(logits_t2i, labels)
    accuracy = (logits_i2t.argmax(dim=1) == labels).float().mean()
    return (loss_i2t + loss_t2i) / 2, accuracy, (loss_i2t.detach(), loss_t2i.detach())
