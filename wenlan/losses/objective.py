"""The pre-training objective around a BriVL model: what the engine wraps and calls.

``brivl``: cross-modal MoCo. Image queries are scored against momentum text keys (this batch's, then
the text queue) and text queries against momentum image keys; loss = i2t + t2i as in BriVL.
``clip``: in-batch InfoNCE over the global batch, no momentum towers and no queues.
``ernie-vil2`` and ``cookie``: multi-view in-batch objectives (``wenlan.losses.multiview``): two image
views and two textual views per sample; ``cookie`` adds a weight-sharing transformer to the model.

``OBJECTIVES`` says what each objective needs from the rest of the stack; ``ObjectiveConfig`` holds the
options of ``brivl`` and ``clip`` and one config dataclass per multi-view objective.
"""

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn as nn

from wenlan.losses.infonce import batch_exclusion, clip_loss, info_nce, queue_logsumexp
from wenlan.losses.multiview import VIEWS, CookieConfig, ErnieVil2Config, multiview_objective
from wenlan.losses.gather import all_gather_single, gather_with_grad
from wenlan.losses.queue import KeyGather, KeyQueues

if TYPE_CHECKING:  # the losses need no model code; importing the towers (timm) costs seconds per process
    from wenlan.models.brivl import BriVL


@dataclass(frozen=True)
class ObjectiveSpec:
    """What an objective needs from the model, the data and the engines."""

    momentum: bool
    """Momentum (key) towers and negative queues."""
    views: bool
    """A second image view and a second textual view per sample (``wenlan.losses.multiview``)."""
    unimodal: bool
    """Claims unimodal gains: evaluation adds image->image and text->text retrieval."""
    pipeline: bool
    """Runs on the pipeline engine. The pipeline's stages pass one image batch and one caption batch
    through the towers' blocks; two views per modality, or layers shared by both towers (which sit on
    different stages), do not fit that layout."""


TOTALS_FIELDS = ("loss", "loss_i2t", "loss_t2i", "acc_i2t", "temperature", "micro_batches")
"""The running sums an objective keeps for the log line. ``loss`` is what the objective optimises;
``loss_i2t`` / ``loss_t2i`` are the image->text and text->image cross-entropies of the image-caption
pair (brivl's loss is their sum, clip's their mean; ernie-vil2 and cookie add other pairs)."""
TOTALS = len(TOTALS_FIELDS)

OBJECTIVES = {
    "brivl": ObjectiveSpec(momentum=True, views=False, unimodal=False, pipeline=True),
    "clip": ObjectiveSpec(momentum=False, views=False, unimodal=False, pipeline=True),
    "ernie-vil2": ObjectiveSpec(momentum=False, views=True, unimodal=True, pipeline=False),
    "cookie": ObjectiveSpec(momentum=False, views=True, unimodal=True, pipeline=False),
}


@dataclass
class ObjectiveConfig:
    """Loss and cold-start options. The defaults train the demo reliably from random weights; BriVL-1.0
    (pretrained backbones) used in_batch_negatives=False, fixed temperature, constant momentum."""

    name: str = "brivl"
    """``brivl`` (momentum encoders + queues), ``clip`` (in-batch, the baseline), ``ernie-vil2`` or
    ``cookie`` (multi-view, in-batch); see ``OBJECTIVES``."""
    queue_size: int = 4096
    """Negatives per queue; a multiple of the global batch, so a step's keys never straddle the end."""
    queue_mode: str = "replicated"
    """``replicated``: every rank holds the whole queue. ``sharded``: each rank holds queue_size / world
    slots and the ranks combine their partial softmax normalisers (same loss and gradients, for queues
    too large for one device)."""
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
    queue_warmup_steps: int | None = None
    """Steps that use no queue negatives; None: as many as the learning-rate warm-up (``wenlan.config``
    resolves it). From random weights the encoder changes fastest then, and a queue filled with its
    keys holds keys of many different encoders: as 4,096 of the tiny preset's 4,224 candidates they
    set the softmax normaliser and drown the in-batch signal. Measured on the demo: with the queue from
    step 0 one seed in two learned the captions' positions only after hundreds of steps (the README's
    "The objective and the cold start"). The keys still enter the queue during the warm-up."""
    mask_duplicates: bool = True
    """Mask negatives whose sample id equals the query's (copies of the positive, e.g. same caption)."""
    ernie_vil2: ErnieVil2Config = field(default_factory=ErnieVil2Config)
    """``ernie-vil2``'s pair weights (unused by the other objectives)."""
    cookie: CookieConfig = field(default_factory=CookieConfig)
    """``cookie``'s shared transformer depth and term weights (unused by the other objectives)."""

    @property
    def spec(self) -> ObjectiveSpec:
        return OBJECTIVES[self.name]

    @property
    def uses_momentum(self) -> bool:
        """Momentum towers and queues: brivl's, or ernie-vil2's with its ``queue`` option."""
        return self.spec.momentum or (self.name == "ernie-vil2" and self.ernie_vil2.queue)

    def view_pairs(self) -> dict[tuple[str, str], float]:
        """The weighted view pairs of a multi-view objective."""
        return (self.ernie_vil2 if self.name == "ernie-vil2" else self.cookie).pairs()

    @staticmethod
    def from_dict(d: dict) -> "ObjectiveConfig":
        """The inverse of ``dataclasses.asdict`` (config.json, checkpoints); configs written before the
        multi-view objectives existed have neither of their sections."""
        d = dict(d)
        d["ernie_vil2"] = ErnieVil2Config(**d.get("ernie_vil2", {}))
        d["cookie"] = CookieConfig(**d.get("cookie", {}))
        return ObjectiveConfig(**d)

    def momentum_at(self, step: int, max_steps: int) -> float:
        if self.momentum_start is None or max_steps <= 1:
            return self.momentum
        progress = min(step / (max_steps - 1), 1.0)
        return self.momentum - (self.momentum - self.momentum_start) * (math.cos(math.pi * progress) + 1) / 2

    def logits_flops_per_sample(self, embed_dim: int, micro_batch: int, data_parallel_size: int) -> int:
        """Matmul FLOPs of the logits per sample (forward and backward, both directions), once the queue
        is in use. ``brivl``: each query against the micro-batch's keys and the queue (keys and queue
        take no gradient): 2 directions x (forward + query gradient) x 2 E (B + K). ``clip``: each
        embedding against the gathered global batch G, gradients to both sides: 2 x 3 x 2 E G.
        ``ernie-vil2`` and ``cookie``: clip's count for each weighted view pair; with queues, each
        query's queue logits too (forward and query gradient, 2 x 2 E K per query and direction)."""
        if self.name == "clip":
            return 12 * embed_dim * micro_batch * data_parallel_size
        if self.spec.views:
            pairs = sum(1 for weight in self.view_pairs().values() if weight)
            queue = pairs * 2 * 4 * embed_dim * self.queue_size if self.uses_momentum else 0
            return pairs * 12 * embed_dim * micro_batch * data_parallel_size + queue
        return 8 * embed_dim * (micro_batch + self.queue_size)

    def validate(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"--objective: unknown objective {self.name!r}; use one of {', '.join(OBJECTIVES)}")
        if self.spec.views and not any(self.view_pairs().values()):
            raise ValueError(f"--objective {self.name}: every pair weight in objective.{self.name.replace('-', '_')} "
                             "is 0; give at least one pair a weight")
        if self.name == "ernie-vil2" and self.ernie_vil2.queue and self.queue_mode != "replicated":
            raise ValueError(f"objective.queue_mode={self.queue_mode!r} with ernie-vil2's queue: its queues are "
                             "replicated only; use --queue-mode replicated")
        if self.name == "cookie" and self.cookie.shared_layers < 1:
            raise ValueError(f"objective.cookie.shared_layers={self.cookie.shared_layers}: COOKIE's shared "
                             "transformer needs at least 1 layer (--shared-layers)")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"objective.momentum={self.momentum} must be in [0, 1)")
        if self.temperature <= 0 or self.min_temperature <= 0:
            raise ValueError("objective.temperature and objective.min_temperature must be > 0")
        if self.queue_warmup_steps is not None and self.queue_warmup_steps < 0:
            raise ValueError(f"objective.queue_warmup_steps={self.queue_warmup_steps} must be >= 0 (or None: the "
                             "learning-rate warm-up's length)")
        if self.queue_mode not in ("replicated", "sharded"):
            raise ValueError(f"objective.queue_mode={self.queue_mode!r}: use replicated or sharded")

    def validate_batch(self, global_batch: int, data_parallel_size: int) -> None:
        """Queue size against the batch arithmetic (global batch = micro batch x grad accumulation x
        data-parallel size), before any process group starts."""
        if not self.uses_momentum:
            return
        k, g = self.queue_size, global_batch
        if k % g:
            raise ValueError(
                f"objective.queue_size={k} is not a multiple of the global batch {g} (= micro batch x grad "
                f"accumulation x data-parallel size {data_parallel_size}); use --queue-size {max(g, k // g * g)} "
                "or change the DeepSpeed config's batch")
        if k < g:
            raise ValueError(f"objective.queue_size={k} is smaller than the global batch {g}; use "
                             f"--queue-size {g} or more")
        if self.queue_mode == "sharded" and k % data_parallel_size:
            step = math.lcm(g, data_parallel_size)
            raise ValueError(
                f"objective.queue_mode='sharded' splits objective.queue_size={k} over {data_parallel_size} "
                "data-parallel ranks, "
                f"which does not divide it; use --queue-size {max(step, k // step * step)} or "
                "objective.queue_mode='replicated'")


class ContrastivePretraining(nn.Module):
    """BriVL towers + queues + temperature: the module handed to the DeepSpeed engine (the last stage's
    layer in a pipeline, ``model=None``).

    ``group``: the data-parallel process group (default: the world). In sharded mode this rank holds
    queue shard ``rank`` of ``world size`` when a process group is initialised, the whole queue when not.

    Per micro-batch it keeps, without reading anything back to the host: the momentum keys for the
    queue (``gather``, all-gathered once per optimizer step) and the running sums of loss, accuracy and
    temperature (``take_totals``), which the trainer reads at log steps only.
    """

    def __init__(self, model: "BriVL | None", cfg: ObjectiveConfig, group=None, embed_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.model = model
        self.group = group
        embed_dim = model.cfg.embed_dim if model is not None else embed_dim
        self.log_scale = nn.Parameter(torch.full((1,), math.log(1.0 / cfg.temperature)),
                                      requires_grad=cfg.learnable_temperature)
        # The temperature's fp32 value when the parameter is bf16 (``set_log_scale_master``): a bf16
        # log(1/T) ~ 2.7-4.6 moves in steps of 1/64-1/32, i.e. the scale in 0.8-1.6% jumps.
        self.register_buffer("log_scale_master", torch.empty(0), persistent=False)
        self.queues = self.gather = None
        if cfg.uses_momentum:
            shard, num_shards = 0, 1
            if cfg.queue_mode == "sharded" and dist.is_available() and dist.is_initialized():
                shard, num_shards = dist.get_rank(group), dist.get_world_size(group)
            self.queues = KeyQueues(cfg.queue_size, embed_dim, shard, num_shards)
            self.gather = KeyGather(group)
        self._totals = None  # (TOTALS,) on the device: sums of loss, its two directions, accuracy, temperature, micro-batches

    def scale(self) -> torch.Tensor:
        """1/T in fp32. With an fp32 master set, the forward uses the master's value and the gradient
        flows to the (bf16) parameter unchanged: x + (m - x) is exactly m in fp32."""
        log_scale = self.log_scale.float()
        if self.log_scale_master.numel():
            log_scale = log_scale + (self.log_scale_master - log_scale).detach()
        return log_scale.clamp(max=math.log(1.0 / self.cfg.min_temperature)).exp()

    @torch.no_grad()
    def set_log_scale_master(self, value: torch.Tensor | None) -> None:
        """The optimizer's fp32 value of ``log_scale`` (None: the parameter is fp32 itself)."""
        self.log_scale_master = torch.empty(0, device=self.log_scale.device) if value is None else \
            value.detach().float().reshape(1).to(self.log_scale.device)

    def forward(self, images, input_ids, attention_mask, ids, use_queue: bool = True, views=None) -> torch.Tensor:
        """This rank's loss for one micro-batch. The queues change only after the step's last
        backward (``KeyQueues.enqueue``): the loss graph still reads them. ``views``: the second image
        and text views (images2, input_ids2, attention_mask2) of a multi-view objective."""
        if self.cfg.spec.views:
            embeddings = self.model.encode_views(images, views[0], input_ids, attention_mask, *views[1:])
            queues = None
            if self.queues is not None:
                with torch.no_grad():  # the keys of the first views enter the queues after the step
                    img_k = self.model.momentum_image_tower(images)  # (B, E)
                    txt_k = self.model.momentum_text_tower(input_ids, attention_mask)  # (B, E)
                self.gather.add(img_k, txt_k, ids)
                if use_queue:
                    image_queue, text_queue, queue_ids = self.queues.live()  # (n, E), (n, E), (n,)
                    dup = (queue_ids, ids) if self.cfg.mask_duplicates else (None, None)
                    queues = (image_queue, text_queue, *dup)
            loss, stats = multiview_objective(dict(zip(VIEWS, embeddings)),
                                              self.cfg.view_pairs(), self.scale(), self.group, queues)
            return self._count(loss, stats)
        embeddings = self.model(images, input_ids, attention_mask, with_keys=self.cfg.spec.momentum)
        return self.objective(*embeddings, ids, use_queue)

    def objective(self, img_q, txt_q, img_k, txt_k, ids, use_queue: bool = True) -> torch.Tensor:
        """The loss of this rank's queries (B, E) against keys (B, E; None for clip); the keys go to
        ``gather`` and the statistics to the running totals."""
        if self.cfg.name == "clip":
            loss, stats = clip_objective(img_q, txt_q, self.scale(), self.group)
        else:
            loss, stats = queue_objective(img_q, txt_q, img_k, txt_k, ids, self.queues, self.scale(), self.cfg,
                                          use_queue, self.group)
            self.gather.add(img_k, txt_k, ids)
        return self._count(loss, stats)

    def _count(self, loss: torch.Tensor, stats: dict) -> torch.Tensor:
        sums = torch.stack([loss.detach().float(), stats["loss_i2t"].float(), stats["loss_t2i"].float(),
                            stats["acc_i2t"].float(), stats["temperature"].float().reshape(()),
                            torch.ones((), device=loss.device)])
        self._totals = sums if self._totals is None else self._totals + sums
        return loss

    def peek_totals(self) -> torch.Tensor:
        """(TOTALS,) sums since the last ``take_totals`` (``TOTALS_FIELDS``), on the device (zeros if
        nothing ran)."""
        return self._totals if self._totals is not None else torch.zeros(TOTALS, device=self.log_scale.device)

    def take_totals(self) -> torch.Tensor:
        """``peek_totals``, then reset them."""
        totals = self.peek_totals()
        self._totals = None
        return totals


def queue_objective(img_q, txt_q, img_k, txt_k, ids, queues: KeyQueues, scale, cfg: ObjectiveConfig,
                    use_queue: bool, group=None) -> tuple[torch.Tensor, dict]:
    """BriVL's loss for this rank's B pairs: InfoNCE(image -> text keys) + InfoNCE(text -> image keys).

    Queries (B, E) carry gradient; keys (B, E) and ids (B,) do not. The same for both queue modes: a
    sharded queue is scored by every rank on its own shard (``queue_scores``).
    """
    B = ids.shape[0]
    excluded = batch_exclusion(ids, cfg.in_batch_negatives, cfg.mask_duplicates)  # (B, B)
    if use_queue:
        lse, best = queue_scores(img_q, txt_q, ids, queues, scale, cfg.mask_duplicates, group)  # (B, S, 2), (B, 2)
    else:
        # Queue warm-up: no queue negatives. The step decides it, identically on every rank, so skipping
        # the sharded collectives keeps the ranks in step.
        lse = torch.empty(B, 0, 2, device=ids.device)
        best = torch.full((B, 2), float("-inf"), device=ids.device)
    loss_i2t, acc_i2t = info_nce(img_q, txt_k, scale, excluded, lse[..., 0], best[:, 0])
    loss_t2i, acc_t2i = info_nce(txt_q, img_k, scale, excluded, lse[..., 1], best[:, 1])
    stats = dict(loss_i2t=loss_i2t.detach(), loss_t2i=loss_t2i.detach(), acc_i2t=acc_i2t, acc_t2i=acc_t2i,
                 temperature=1.0 / scale.detach())
    return loss_i2t + loss_t2i, stats


def queue_scores(img_q, txt_q, ids, queues: KeyQueues, scale, mask_duplicates: bool, group=None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The queue's part of the softmax normaliser of each of this rank's queries: log-sum-exp per
    shard (B, S, 2) and best queue logit (B, 2), for i2t (text queue) and t2i (image queue).

    Replicated (S = 1): the local queue is the whole queue; nothing to communicate.
    Sharded (S = N): rank t scores all N*B queries (gathered WITH gradient) against its K/N slots,
    lse_t (N*B,); these are gathered back WITH gradient, rank r keeps its own B rows of every shard,
    and info_nce's log-sum-exp over [in-batch logits, lse_1 .. lse_N] is that of the whole queue.

    Gradients, L_r being rank r's loss (the backward of an all-gather sums over ranks):
    - lse_t[j] feeds only L_owner(j), so rank t receives dL_owner(j)/dlse_t[j] once: none double counted;
    - query j feeds lse_t[j] on every rank t, and the query gather's backward hands its owner r
      sum_t dL_r/dlse_t[j] * dlse_t[j]/dq_j = dL_r/dq_j, replicated mode's gradient: none lost;
    - rank t's temperature gets shard t's part of every rank's loss: per rank that differs from
      replicated mode, the sum over ranks (what the data-parallel gradient reduction applies) does not.
    """
    E = img_q.shape[1]
    image_queue, text_queue, queue_ids = queues.live()  # this rank's filled slots: (n, E), (n, E), (n,)
    queries = torch.cat([img_q, txt_q], dim=1)  # (B, 2E)
    if queues.num_shards > 1:
        if dist.get_world_size(group) != queues.num_shards:
            raise RuntimeError(f"queue has {queues.num_shards} shards but the process group "
                               f"{dist.get_world_size(group)} ranks")
        all_ids = ids.new_empty(queues.num_shards * ids.shape[0])  # (N*B,)
        ids_gathered = all_gather_single(all_ids, ids.contiguous(), group=group, async_op=True)  # no gradient
        queries = gather_with_grad(queries, group)  # (N*B, 2E), WITH gradient
        ids_gathered.wait()  # launched first so that the two gathers' latencies overlap
        ids = all_ids
    dup = (ids, queue_ids) if mask_duplicates else (None, None)
    lse_i2t, best_i2t = queue_logsumexp(queries[:, :E], text_queue, scale, *dup)  # (N*B,) each
    lse_t2i, best_t2i = queue_logsumexp(queries[:, E:], image_queue, scale, *dup)  # (N*B,) each
    scores = torch.stack([lse_i2t, lse_t2i, best_i2t, best_t2i], dim=1)  # (N*B, 4); best_* have no grad
    if queues.num_shards == 1:
        scores = scores[:, None]  # (B, 1, 4)
    else:
        B, N = img_q.shape[0], queues.num_shards
        scores = gather_with_grad(scores, group).view(N, N * B, 4)  # (shard, query, 4), WITH gradient
        scores = scores[:, queues.shard * B:(queues.shard + 1) * B].transpose(0, 1)  # (B, N, 4): own queries
    # The best over shards is a max of maxima: no extra collective for the accuracy.
    return scores[..., :2], scores[..., 2:].amax(dim=1)


def clip_objective(img, txt, scale, group=None) -> tuple[torch.Tensor, dict]:
    """open_clip's ClipLoss (local_loss=True, gather_with_grad=True) for this rank's (B, E) pairs."""
    all_img, all_txt, offset = img, txt, 0
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        # All-gather WITH gradient: each rank's loss also pulls on the other ranks' embeddings, whose
        # owners receive it in this gather's backward (a sum over ranks).
        both = gather_with_grad(torch.cat([img, txt], dim=1), group)  # (N*B, 2E)
        all_img, all_txt = both[:, :img.shape[1]], both[:, img.shape[1]:]
        offset = dist.get_rank(group) * img.shape[0]
    loss, acc, (loss_i2t, loss_t2i) = clip_loss(img, txt, all_img, all_txt, offset, scale)
    return loss, dict(acc_i2t=acc, loss_i2t=loss_i2t, loss_t2i=loss_t2i, temperature=1.0 / scale.detach())


@functools.lru_cache(maxsize=8)
def _hash_weights(length: int) -> torch.Tensor:
    return torch.randint(1, 2**62, (length,), generator=torch.Generator().manual_seed(0))


def caption_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) token ids -> (B,) int64 ids equal exactly for identical captions; a fixed random linear
    hash (wrapping int64 arithmetic), the same on every rank and run. Called every micro-step, so the
    weights are drawn once per length."""
    weights = _hash_weights(input_ids.shape[1]).to(input_ids.device)
    return (input_ids.long() * weights).sum(dim=1)
