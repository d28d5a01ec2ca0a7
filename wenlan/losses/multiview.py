"""Multi-view in-batch objectives: ERNIE-ViL 2.0 and COOKIE.

Every sample gives four embeddings: two augmented views of its image through the one image tower
(``image``, ``image2``) and two textual views through the one text tower: its ``caption`` and a second
view ``text2`` (the sample's object tags where the data has them, else an augmented caption; see
``wenlan.data.transforms.augment_caption``). An objective is a weighted set of view pairs; each pair is
contrasted both ways with in-batch InfoNCE over the global batch (open_clip's ClipLoss), and the loss
is the weighted sum. With queues (``ernie-vil2``'s ``queue``, a combination neither paper has), a
query's candidates also include the negative queue of its target view's modality: momentum keys of
earlier steps' first image views (image queue) and captions (text queue). Neither paper released
pre-training code; the choices they leave open are the config fields below, documented where they
are defined.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from wenlan.losses.gather import gather_with_grad
from wenlan.losses.infonce import queue_logsumexp

VIEWS = ("image", "image2", "caption", "text2")
MODALITY = {"image": 0, "image2": 0, "caption": 1, "text2": 1}
"""Which queue holds negatives for a view as target: 0 the image queue, 1 the text queue."""


@dataclass
class ErnieVil2Config:
    """ERNIE-ViL 2.0 (arXiv 2209.15270) multi-view contrastive learning. The paper sums inter-modal
    pairs (each image view with each textual view) and intra-modal pairs (the two image views, the
    caption and its textual view) without stating weights; equal weights of 1 are the default, and
    each is a field here. Every pair's loss is symmetric InfoNCE (the mean of its two directions)."""

    caption_weight: float = 1.0
    """Each image view <-> the caption (two pairs)."""
    tags_weight: float = 1.0
    """Each image view <-> the second textual view: the tags, the paper's special view for noisy pairs
    (two pairs)."""
    image_image_weight: float = 1.0
    """Image view 1 <-> image view 2 (intra-modal)."""
    text_text_weight: float = 1.0
    """Caption <-> the second textual view (intra-modal)."""
    queue: bool = False
    """Also this stack's momentum towers and negative queues (ObjectiveConfig's queue_size, momentum,
    queue_warmup_steps, mask_duplicates): every query is also scored against the queue of its target
    view's modality. The paper is in-batch only; off by default."""

    def pairs(self) -> dict[tuple[str, str], float]:
        return {("image", "caption"): self.caption_weight, ("image2", "caption"): self.caption_weight,
                ("image", "text2"): self.tags_weight, ("image2", "text2"): self.tags_weight,
                ("image", "image2"): self.image_image_weight, ("caption", "text2"): self.text_text_weight}


@dataclass
class CookieConfig:
    """COOKIE (arXiv 2207.00733): a weight-sharing transformer over both towers' token features (built
    into the model from ``shared_layers``) and three contrastive terms: cross-modal (image <-> caption)
    and single-modal (image view <-> image view, caption <-> text view). The paper gives no term
    weights; 1 each by default. The cross-modal term pairs image view 1 with the caption: the second
    image view enters only the image-image term, as in the paper's figure of the three paths."""

    shared_layers: int = 1
    """Attention layers in the shared transformer (the tiny preset's towers have 2 of their own each)."""
    cross_weight: float = 1.0
    image_image_weight: float = 1.0
    text_text_weight: float = 1.0

    def pairs(self) -> dict[tuple[str, str], float]:
        return {("image", "caption"): self.cross_weight, ("image", "image2"): self.image_image_weight,
                ("caption", "text2"): self.text_text_weight}


def pair_loss(a, b, all_a, all_b, offset: int, scale, queue_ab=None, queue_ba=None
              ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Symmetric InfoNCE of this rank's (B, E) views ``a`` and ``b`` against the global batch's
    (N*B, E), positives at ``offset`` + i (open_clip's ClipLoss, local loss); ``queue_ab`` (B,): the
    log-sum-exp of each a -> b query over a queue, one more column of its softmax normaliser (and
    ``queue_ba`` for b -> a). Returns the loss, the a -> b accuracy over the batch, and the a -> b and
    b -> a losses (detached, for the log)."""
    labels = torch.arange(a.shape[0], device=a.device) + offset
    scale = scale.float()
    logits_ab = (scale * a.float()) @ all_b.float().t()  # (B, N*B); fp32 as info_nce
    logits_ba = (scale * b.float()) @ all_a.float().t()  # (B, N*B)
    accuracy = (logits_ab.detach().argmax(dim=1) == labels).float().mean()
    if queue_ab is not None:
        logits_ab = torch.cat([logits_ab, queue_ab[:, None]], dim=1)  # (B, N*B + 1)
        logits_ba = torch.cat([logits_ba, queue_ba[:, None]], dim=1)  # (B, N*B + 1)
    loss_ab, loss_ba = F.cross_entropy(logits_ab, labels), F.cross_entropy(logits_ba, labels)
    return (loss_ab + loss_ba) / 2, accuracy, (loss_ab.detach(), loss_ba.detach())


def multiview_objective(views: dict[str, torch.Tensor], pairs: dict[tuple[str, str], float], scale, group=None,
                        queues: tuple | None = None) -> tuple[torch.Tensor, dict]:
    """The weighted sum over ``pairs`` of symmetric in-batch InfoNCE for this rank's (B, E) views, each
    view scored against the whole global batch's other view (gathered with gradient, as ``clip``).
    ``queues``: (image queue (n, E), text queue (n, E), their ids (n,) or None, this rank's ids (B,)
    or None): extra negatives (constants), duplicates of a query's own id masked when ids are given."""
    local = torch.cat([views[v] for v in VIEWS], dim=1)  # (B, 4E)
    gathered, offset = local, 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        # All-gather WITH gradient, all four views in one collective: each rank's loss also pulls on the
        # other ranks' embeddings, whose owners receive it in this gather's backward (a sum over ranks).
        gathered = gather_with_grad(local, group)  # (N*B, 4E)
        offset = dist.get_rank(group) * local.shape[0]
    everyone = dict(zip(VIEWS, gathered.chunk(len(VIEWS), dim=1)))  # (N*B, E) each
    lse = {}
    if queues is not None:  # each view as a query against each modality's queue it is contrasted with
        *queue, queue_ids, ids = queues
        for a, b in (p for p, weight in pairs.items() if weight):
            for query, target in ((a, b), (b, a)):
                if (query, MODALITY[target]) not in lse:
                    modality = MODALITY[target]
                    lse[query, modality] = queue_logsumexp(views[query], queue[modality], scale, ids, queue_ids)[0]  # (B,)
    loss, stats = 0.0, {}
    for (a, b), weight in pairs.items():
        if weight:
            term, acc, directions = pair_loss(views[a], views[b], everyone[a], everyone[b], offset, scale,
                                              lse.get((a, MODALITY[b])), lse.get((b, MODALITY[a])))
            loss = loss + weight * term
            stats[f"loss_{a}_{b}"], stats[f"acc_{a}_{b}"] = term.detach(), acc
            if (a, b) == ("image", "caption"):  # the pair every objective has: its directions are logged
                stats["loss_i2t"], stats["loss_t2i"] = directions
    zero = torch.zeros((), device=local.device)
    stats.update(acc_i2t=stats.get("acc_image_caption", zero), loss_i2t=stats.get("loss_i2t", zero),
                 loss_t2i=stats.get("loss_t2i", zero), temperature=1.0 / scale.detach())
    return loss, stats
