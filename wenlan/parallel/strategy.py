"""Training strategies: the part of an optimizer step that differs between plain data parallel (ZeRO
0-3, ``PlainStrategy``) and pipeline x data parallel (``PipelineStrategy``). The loop in
``wenlan/train.py`` is the same for both:

    strategy.train_step(batch, use_queue)   # forward + backward + optimizer step of one global batch
    strategy.after_step(momentum)           # EMA of the momentum towers, enqueue the step's keys, and
                                            # keep what must stay equal on every rank equal

A strategy also evaluates, reads its running loss totals, and says what it adds to a checkpoint
(``rank_state``). The objective (``ContrastivePretraining``) is the same module on both paths: it keeps
the step's momentum keys and loss totals itself, so neither path reads anything back to the host per
micro-batch.
"""

import itertools
import math

import torch
import torch.distributed as dist

from wenlan.data.transforms import model_images
from wenlan.losses.objective import TOTALS, caption_ids
from wenlan.losses.gather import all_gather_single
from wenlan.parallel import checkpoint as ckpt
from wenlan.parallel.momentum import MomentumEMA
from wenlan.throughput import PhaseTimer


def micro_batches(batch: dict, micro: int, image_dtype, device):
    """One step's batch of this data-parallel rank -> its micro-batches ((images, input_ids,
    attention_mask), caption ids), on ``device``, images in the weights' dtype."""
    for i in range(batch["images"].shape[0] // micro):
        part = slice(i * micro, (i + 1) * micro)
        # non_blocking: from the loader's pinned memory on GPUs, the copy overlaps the device's work
        input_ids = batch["input_ids"][part].to(device, non_blocking=True)
        images = model_images(batch["images"][part], batch["colour_maps"][part], device, image_dtype)
        attention_mask = batch["attention_mask"][part].to(device, non_blocking=True)
        yield (images, input_ids, attention_mask), caption_ids(input_ids)


def second_views(batch: dict, micro: int, image_dtype, device):
    """The multi-view objectives' second views of each micro-batch, (images2, input_ids2,
    attention_mask2), on ``device``; None for every micro-batch when the batch has none."""
    if "images2" not in batch:
        return itertools.repeat(None)
    parts = (slice(i * micro, (i + 1) * micro) for i in range(batch["images"].shape[0] // micro))
    return ((model_images(batch["images2"][part], batch["colour_maps2"][part], device, image_dtype),
             batch["input_ids2"][part].to(device, non_blocking=True),
             batch["attention_mask2"][part].to(device, non_blocking=True)) for part in parts)


@torch.no_grad()
def fp32_master(engine, param: torch.nn.Parameter, group=None, value: torch.Tensor | None = None) -> torch.Tensor:
    """The optimizer's fp32 master of a low-precision trainable parameter, whole (``value``: write it
    first). One place for DeepSpeed's three layouts:

    - ZeRO-3: flat partitions, rank r holding [r*P, (r+1)*P); gathered here (its safe_get_full_fp32_param
      fails on a parameter smaller than the data-parallel group, whose last ranks hold only padding);
    - ZeRO-1/2 and the bf16 optimizer: fragments behind ``_hp_mapping`` (DeepSpeed's safe_get/set);
    - ZeRO-0 (FP16_Optimizer / FP16_UnfusedOptimizer, bf16 too): a flat fp32 tensor per parameter group,
      or one per parameter; DeepSpeed has no API to reach them.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param, safe_set_full_fp32_param

    from wenlan.parallel.momentum import zero3_partition

    if hasattr(param, "ds_id"):
        local = safe_get_local_fp32_param(param)  # (partition,) fp32
        if value is not None:
            local.copy_(zero3_partition(value, local))
        parts = local.new_empty(dist.get_world_size(group) * local.numel())
        all_gather_single(parts, local, group=group)  # no gradient
        return parts[:param.ds_numel].view(param.ds_shape)
    if hasattr(param, "_hp_mapping"):
        if value is not None:
            safe_set_full_fp32_param(param, value)
        return safe_get_full_fp32_param(param)
    optimizer, master = engine.optimizer, None
    if hasattr(optimizer, "fp32_groups_flat"):  # FP16_Optimizer (fused Adam): flat per group
        for params, flat in zip(optimizer.fp16_groups, optimizer.fp32_groups_flat):
            for p, start in zip(params, itertools.accumulate((p.numel() for p in params), initial=0)):
                if p is param:
                    master = flat[start:start + p.numel()].view(p.shape)
    elif hasattr(optimizer, "fp32_groups"):  # FP16_UnfusedOptimizer (torch Adam): one tensor per parameter
        for params, masters in zip(optimizer.fp16_groups, optimizer.fp32_groups):
            master = next((m for p, m in zip(params, masters) if p is param), master)
    if master is None:
        raise RuntimeError(f"no fp32 master for a {param.dtype} parameter in {type(optimizer).__name__}")
    if value is not None:
        master.copy_(value.view(master.shape))
    return master


def running_stats(module: torch.nn.Module) -> list[torch.Tensor]:
    """The BatchNorm running means and variances of ``module`` (base, brivl-1.0; none in tiny, 1b, 10b)."""
    return [b for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats for b in (m.running_mean, m.running_var)]


@torch.no_grad()
def average_running_stats(buffers: list[torch.Tensor], group=None) -> None:
    """Replace each rank's running statistics by their mean over ``group`` (one all-reduce, no gradient).

    Training normalises with each rank's own batch statistics (as DDP without SyncBatchNorm and MoCo's
    key encoder do), so the running statistics drift apart per rank; averaged after every step they stay
    identical on every rank, which makes evaluation and checkpoints (written by one rank) rank-independent
    and resume exact. The running mean then follows the global batch's mean, the running variance the
    mean of the ranks' variances."""
    if not buffers or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([b.reshape(-1).float() for b in buffers])
    dist.all_reduce(flat, group=group)  # no gradient
    flat /= dist.get_world_size(group)
    offset = 0
    for b in buffers:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


class Strategy:
    """What both strategies share. Subclasses build the engine and set ``objective`` (None on the
    pipeline stages that do not hold the loss) and the momentum pairs."""

    def __init__(self, cfg, engine, objective, momentum_pairs, stage: int = 0, data_parallel_group=None):
        from wenlan.parallel.engine import zero_stage

        self.cfg, self.engine, self.objective = cfg, engine, objective
        self.device = engine.device
        self.stage, self.stages = stage, cfg.batch.pipeline_stages
        self.reads_data = stage in (0, self.stages - 1)  # DeepSpeed feeds inputs to the first, labels to the last
        self.data_parallel_group = data_parallel_group
        self.data_parallel_rank = dist.get_rank(data_parallel_group)
        self.zero3 = zero_stage(cfg.deepspeed_config) == 3
        # bf16 configs cast the weights; images follow (token ids stay integers).
        self.image_dtype = next(engine.module.parameters()).dtype
        self.queues = objective.queues if objective is not None else None
        if self.queues is not None:
            self.queues.float()  # keys in fp32 whatever the weights' dtype (zero.Init creates bf16 buffers)
        self.running_stats = running_stats(engine.module)
        self.timer = PhaseTimer(self.device)  # the step line's time breakdown (wenlan.throughput)
        self.ema = MomentumEMA(momentum_pairs) if momentum_pairs else None
        if self.ema is not None:
            self.ema.update(0.0)  # the momentum towers start as copies of the online towers
        self._init_temperature()

    def train_step(self, batch: dict | None, use_queue: bool) -> None:
        raise NotImplementedError

    def evaluate(self, tokenizer, examples: list | None = None) -> dict:
        """Retrieval metrics on every rank; ``examples`` extended with ``wenlan.evaluate``'s retrieval
        examples where the strategy has them (not through a pipeline)."""
        raise NotImplementedError

    def after_step(self, momentum: float) -> None:
        """After the optimizer step: the EMA reads the new online weights, then the step's keys (gathered
        during the backward) enter the queue, which the step's loss graph read before."""
        if self.ema is not None:
            with self.timer.phase("ema"):
                self.ema.update(momentum)
        if self.queues is not None:
            with self.timer.phase("enqueue"):
                self.queues.enqueue(*self.objective.gather.wait())
        self.refresh_temperature()
        average_running_stats(self.running_stats, self.data_parallel_group)

    def grad_norm(self):
        """The global gradient norm of the last step, before clipping (a device tensor or a float)."""
        return self.engine.get_global_grad_norm()

    def take_totals(self) -> torch.Tensor:
        """(4,) device sums since the last call: loss, accuracy, temperature, micro-batches (zeros on
        stages without the loss)."""
        return self.objective.take_totals() if self.objective is not None else torch.zeros(TOTALS, device=self.device)

    def peek_totals(self) -> torch.Tensor:
        """``take_totals`` without resetting them."""
        return self.objective.peek_totals() if self.objective is not None else torch.zeros(TOTALS, device=self.device)

    # -- the temperature's fp32 value in bf16 runs -------------------------------------------------
    def _low_precision_temperature(self) -> bool:
        return self.objective is not None and self.objective.log_scale.dtype != torch.float32

    @torch.no_grad()
    def _init_temperature(self) -> None:
        """bf16 runs: the optimizer's fp32 master of log(1/T) starts at the configured value itself, not
        at its bf16 rounding (which is where DeepSpeed starts it); a fixed temperature is that value."""
        if not self._low_precision_temperature():
            return
        value = torch.full((1,), math.log(1.0 / self.cfg.objective.temperature), device=self.device)
        if self.objective.log_scale.requires_grad:
            fp32_master(self.engine, self.objective.log_scale, self.data_parallel_group, value)
        self.objective.set_log_scale_master(value)

    @torch.no_grad()
    def refresh_temperature(self) -> None:
        """bf16 runs with a learnable temperature: the forward reads the optimizer's fp32 master (at most
        a one-element collective over the data-parallel group, no gradient, no host sync)."""
        if self._low_precision_temperature() and self.objective.log_scale.requires_grad:
            self.objective.set_log_scale_master(fp32_master(self.engine, self.objective.log_scale,
                                                            self.data_parallel_group))

    # -- checkpoints ---------------------------------------------------------------------------------
    def rank_state(self) -> dict:
        """What this rank adds to a checkpoint beyond DeepSpeed's files. State equal on the data-parallel
        ranks of a stage (whole momentum masters, a replicated queue) is written by the stage's first
        rank only; the others store None and read it from there (``shared_from``)."""
        first = self.data_parallel_rank == 0
        replicated = self.queues is not None and self.queues.num_shards == 1
        return dict(rng=ckpt.capture_rng(), shared_from=dist.get_rank() - self.data_parallel_rank,
                    # ZeRO-3: this rank's partitions; otherwise whole tensors of this rank's layers.
                    momentum_masters=(self.ema.state_dict() if self.ema else {}) if self.zero3 or first else None,
                    queues=self.queues.state() if self.queues is not None and (first or not replicated) else None)

    def load_rank_state(self, rank_state: dict) -> None:
        ckpt.restore_rng(rank_state["rng"])
        if self.ema is not None:
            self.ema.load_state_dict(rank_state["momentum_masters"])
        if self.queues is not None:
            self.queues.load_state(rank_state["queues"])

    def check_queues(self, step: int) -> None:
        """Replicated queues must be identical on every data-parallel rank: compare a fingerprint (two
        all-reduces of one number, no gradient) and stop loudly if they diverged, rather than train on
        inconsistent negatives. Called at log steps only (it reads back to the host)."""
        queues = self.queues
        if queues is None or queues.num_shards != 1:
            return
        fingerprint = (queues.image.double().sum() + 3 * queues.text.double().sum()
                       + (queues.ids % 1000003).double().sum() + queues.ptr + queues.filled).reshape(1)
        low, high = fingerprint.clone(), fingerprint.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.data_parallel_group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.data_parallel_group)
        if low.item() != high.item():
            raise RuntimeError(f"step {step}: the replicated negative queues differ between ranks "
                               f"(fingerprints {low.item()!r} .. {high.item()!r})")


class PlainStrategy(Strategy):
    """One engine around the whole model: ZeRO-0/1/2/3 data parallel. ``weights``: a converted
    checkpoint's whole tensors to build from (``wenlan.parallel.reshard``)."""

    def __init__(self, cfg, weights: dict | None = None):
        from wenlan.parallel.engine import build_engine, build_module, low_precision, zero_stage

        module = build_module(cfg, weights)
        engine = build_engine(module, cfg)
        pairs = [("model." + name, p, q) for name, p, q in module.model.named_momentum_pairs()] \
            if module.model.momentum_image_tower is not None else []
        super().__init__(cfg, engine, module, pairs)
        # DeepSpeed records the gradient norm in its ZeRO and mixed-precision optimizers, not in the plain
        # fp32 one of ZeRO-0: there it is computed here, from the whole averaged gradients.
        ds = cfg.deepspeed_config
        self._own_grad_norm = zero_stage(ds) == 0 and not low_precision(ds)
        self._grad_norm = None

    def train_step(self, batch: dict, use_queue: bool) -> None:
        accum = self.cfg.batch.grad_accum
        views = second_views(batch, self.cfg.batch.micro_batch, self.image_dtype, self.device)
        for i, (inputs, ids) in enumerate(micro_batches(batch, self.cfg.batch.micro_batch, self.image_dtype,
                                                        self.device)):
            last = i == accum - 1
            with self.timer.phase("forward_backward"):
                loss = self.engine(*inputs, ids, use_queue=use_queue, views=next(views))
                if last and self.objective.gather is not None:
                    self.objective.gather.launch()  # the step's keys are all-gathered during the last backward
                self.engine.backward(loss)
            if last and self._own_grad_norm:  # before the step clips them; stays on the device
                grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
                self._grad_norm = torch.nn.utils.get_total_norm(grads)
            with self.timer.phase("optimizer"):
                self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only

    def grad_norm(self):
        return self._grad_norm if self._own_grad_norm else super().grad_norm()

    def evaluate(self, tokenizer, examples: list | None = None) -> dict:
        from wenlan.evaluate import evaluate

        image, text = self.cfg.model.image, self.cfg.model.text
        return evaluate(self.objective.model, self.cfg.val_shards, tokenizer, image.image_size, text.max_len,
                        unimodal=self.cfg.objective.spec.unimodal, color_augment=self.cfg.color_augment,
                        examples=examples)


class PipelineStrategy(Strategy):
    """DeepSpeed's pipeline engine (ZeRO-0/1): this rank holds one stage's layers; the objective, the
    queues and the temperature live on the last stage (``wenlan.parallel.pipeline``)."""

    def __init__(self, cfg):
        from wenlan.parallel.engine import build_engine
        from wenlan.parallel.pipeline import build_pipeline

        pipe, objective, pairs, (stage, _, group) = build_pipeline(cfg, cfg.batch.pipeline_stages)
        super().__init__(cfg, build_engine(pipe, cfg), objective, pairs, stage=stage, data_parallel_group=group)

    def train_step(self, batch: dict | None, use_queue: bool) -> None:
        if self.objective is not None:
            self.objective.use_queue = use_queue
        inputs = micro_batches(batch, self.cfg.batch.micro_batch, self.image_dtype, self.device) \
            if self.reads_data else None
        with self.timer.phase("forward_backward"):  # and the optimizer step: train_batch interleaves them
            self.engine.train_batch(inputs)
        if self.objective is not None and self.objective.gather is not None:
            self.objective.gather.launch()

    def evaluate(self, tokenizer, examples: list | None = None) -> dict:
        from wenlan.parallel.pipeline import evaluate_pipeline

        return evaluate_pipeline(self.engine, self.cfg, tokenizer, self.image_dtype)


def build_strategy(cfg, weights: dict | None = None) -> Strategy:
    if cfg.batch.pipeline_stages > 1:
        if weights is not None:
            raise ValueError("a converted checkpoint cannot be loaded into a pipeline; resume it with a ZeRO config "
                             "(no pipeline section)")
        return PipelineStrategy(cfg)
    return PlainStrategy(cfg, weights)
