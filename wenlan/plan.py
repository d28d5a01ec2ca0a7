"""Memory and time planner: ``python -m wenlan.plan --preset P --deepspeed_config FILE --gpus N
--gpu-memory-gb G [--json]``.

Per GPU, for a preset x DeepSpeed config x GPU count, without a GPU (everything on the meta device):

- model states: parameters, gradients and optimizer states as DeepSpeed's ZeRO stage keeps them
  (bf16/fp16 weights with fp32 masters and Adam moments, or fp32 throughout), plus the momentum towers
  DeepSpeed does not know about: their weights and, under bf16/fp16, an fp32 master per key partition
  (``wenlan.parallel.momentum``), partitioned like the online weights under ZeRO-3, whole otherwise;
- the negative queues (fp32 image and text keys, int64 ids; replicated or sharded by ``queue_mode``)
  and the keys all-gathered each step;
- activations: the bytes autograd saves for the backward, counted by running the online towers and
  the objective on the meta device at the micro-batch (``SavedTensorCounter``), with attention saving
  what a fused kernel saves (q, k, v, output, log-sum-exp; a GPU runs flash or memory-efficient
  attention). With activation checkpointing a checkpointed block keeps its input only, and its
  backward recomputes it: the largest checkpointed block's saved bytes are added once;
- DeepSpeed's working buffers from the config's ``zero_optimization`` section (DeepSpeed's defaults
  where absent): ZeRO-3's live parameters, prefetch bucket and the largest layer's gathered weight and
  gradient; the reduce buckets (doubled with ``overlap_comm``, plus their fp32 copy with
  ``communication_data_type: fp32``).

Not counted: the CUDA context, allocator fragmentation, the momentum forward's and the backward's
transient tensors (a layer's worth), which ``--headroom`` (a fraction of the GPU kept free) covers.

A pipeline config is planned per stage with the pipeline's own layer partition
(``wenlan.parallel.pipeline``): the stage's model states (ZeRO-1 over its data-parallel group), the
activations of the micro-batches in flight on it under DeepSpeed's 1F1B schedule (stage s of S holds
up to S - s, at least 2 buffers), checkpointed per ``pipeline.activation_checkpoint_interval`` layers;
the worst stage is reported.

Time: FLOPs per sample (``wenlan.models.flops``) over an assumed MFU of the GPU's bf16 peak.
"""

import argparse
import dataclasses
import json
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

GB = 1e9
MOMENTS_BYTES = 8
"""Adam's two fp32 moments per trainable parameter."""


@dataclass
class PlanConfig:
    """What the planner is asked about."""

    preset: str
    deepspeed_config: str
    gpus: int
    gpu_memory_gb: float
    activation_checkpointing: int = 0
    """Plain/ZeRO path: as train.py's --activation-checkpointing (every k-th block; 0 off)."""
    gpu_name: str = "H100"
    """Picks the bf16 peak from ``wenlan.models.flops.PEAK_BF16_TFLOPS``."""
    mfu: float = 0.35
    """Assumed model FLOPs utilisation (model FLOPs: the recompute of checkpointing is not counted)."""
    pairs: float = 500e6
    """Pairs in one epoch."""
    headroom: float = 0.10
    """Fraction of GPU memory kept free for what is not counted (CUDA context, fragmentation)."""


@dataclass
class MemoryBreakdown:
    """Bytes per GPU."""

    parameters: int
    gradients: int
    optimizer: int
    momentum: int
    queues: int
    activations: int
    buffers: int

    @property
    def total(self) -> int:
        return (self.parameters + self.gradients + self.optimizer + self.momentum + self.queues
                + self.activations + self.buffers)

    def as_dict(self) -> dict[str, int]:
        return {**dataclasses.asdict(self), "total": self.total}


# --- activations: what autograd saves, counted on the meta device ---------------------------------


class SavedTensorCounter:
    """Bytes of the distinct storages autograd saves for the backward while active, leaving out the
    storages of ``exclude`` (parameters and buffers: counted as model states). Works for real and meta
    tensors; views of one storage count once."""

    def __init__(self, exclude=()):
        self.excluded = {t.untyped_storage()._cdata for t in exclude}
        self.storages: dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @property
    def bytes(self) -> int:
        return sum(self.storages.values())

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in self.excluded:
            self.storages[storage._cdata] = storage.nbytes()
        return tensor

    def __enter__(self) -> "SavedTensorCounter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class FusedAttention(TorchFunctionMode):
    """``F.scaled_dot_product_attention`` as a fused kernel: the meta device would otherwise pick the
    math backend, which saves the (B, H, N, N) attention matrix that flash and memory-efficient
    attention on a GPU never hold. Dropout inside attention is dropped: fused kernels replay it from the
    RNG state instead of saving a mask."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]  # (B, H, N, Dh) each
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        if mask is not None and mask.dtype == torch.bool:  # True = attend -> an additive mask
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
        out, _ = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, kwargs.get("is_causal", False), attn_mask=mask, scale=kwargs.get("scale"))
        return out


@dataclass
class ActivationBytes:
    """One micro-batch's activations: what the forward leaves saved, and the recompute of the largest
    checkpointed piece, live during its backward."""

    saved: int
    recompute: int

    @property
    def peak(self) -> int:
        return self.saved + self.recompute


def _meta_batch(model_cfg, micro_batch: int, dtype: torch.dtype):
    size, length = model_cfg.image.image_size, model_cfg.text.max_len
    images = torch.zeros(micro_batch, 3, size, size, device="meta", dtype=dtype)  # (B, 3, S, S)
    input_ids = torch.zeros(micro_batch, length, dtype=torch.long, device="meta")  # (B, L)
    mask = torch.ones(micro_batch, length, dtype=torch.long, device="meta")  # (B, L)
    return images, input_ids, mask


def _meta_objective(model_cfg, objective_cfg, dtype: torch.dtype, momentum: bool):
    """BriVL + objective on the meta device in the run's dtype, queues full (their logits are saved)."""
    from transformers.initialization import no_init_weights

    from wenlan.losses.objective import ContrastivePretraining
    from wenlan.models.brivl import BriVL

    with torch.device("meta"), no_init_weights():
        module = ContrastivePretraining(BriVL(model_cfg, momentum=momentum), objective_cfg)
    module.to(dtype).train()
    if module.queues is not None:
        module.queues.float()  # the keys stay fp32 whatever the weights' dtype
        module.queues.filled = module.queues.size
    return module


def _online_step(module, micro_batch: int, dtype: torch.dtype) -> None:
    """The forward whose saved tensors the backward reads: online towers (as ``blocks()``, which read no
    mask values, so they run on the meta device) and the loss. The momentum forward saves nothing."""
    model = module.model
    images, input_ids, mask = _meta_batch(model.cfg, micro_batch, dtype)
    image = images
    for block in model.image_tower.blocks():
        image = block.run(image)  # ends (B, E)
    text = None
    for block in model.text_tower.blocks():
        text = block.run(text, input_ids, mask)  # ends (B, E)
    keys = [torch.zeros(micro_batch, model.cfg.embed_dim, device="meta", dtype=dtype) for _ in range(2)]  # (B, E)
    if module.cfg.name == "brivl":
        module.objective(image, text, *keys, torch.arange(micro_batch, device="meta"))
    else:
        module.objective(image, text, None, None, torch.arange(micro_batch, device="meta"))


class ActivationCounter:
    """Activations of one micro-batch in the plain/ZeRO path with every ``every``-th block checkpointed
    (0: none), counted on the meta device; the model is built once and run at any micro-batch."""

    def __init__(self, model_cfg, objective_cfg, dtype: torch.dtype, every: int):
        from wenlan.parallel.activation import apply_activation_checkpointing, checkpointed_blocks

        self.dtype, self.every = dtype, every
        self.module = _meta_objective(model_cfg, objective_cfg, dtype, momentum=False)
        self.blocks: dict[str, int] = {}  # each checkpointed block's own saved bytes in the last count
        self._counter = None
        if every:  # blocks measured uncheckpointed in their own model: the recompute's size
            self.reference = _meta_objective(model_cfg, objective_cfg, dtype, momentum=False)
            for name, block in checkpointed_blocks(self.reference.model):
                if int(name.rsplit(".", 1)[1]) % every == 0:
                    block.register_forward_pre_hook(lambda m, a, n=name: self._block_starts(n))
                    block.register_forward_hook(lambda m, a, o, n=name: self._block_ends(n))
            apply_activation_checkpointing(self.module.model, every)

    def _block_starts(self, name: str) -> None:
        self.blocks[name] = -self._counter.bytes

    def _block_ends(self, name: str) -> None:
        self.blocks[name] += self._counter.bytes

    def _count(self, module, micro_batch: int) -> int:
        self._counter = SavedTensorCounter([*module.parameters(), *module.buffers()])
        with torch.enable_grad(), self._counter, FusedAttention():
            _online_step(module, micro_batch, self.dtype)
        return self._counter.bytes

    def __call__(self, micro_batch: int) -> ActivationBytes:
        recompute = 0
        if self.every:
            self.blocks.clear()
            self._count(self.reference, micro_batch)
            recompute = max(self.blocks.values(), default=0)
        return ActivationBytes(saved=self._count(self.module, micro_batch), recompute=recompute)


def activation_bytes(model_cfg, objective_cfg, micro_batch: int, dtype: torch.dtype, every: int) -> ActivationBytes:
    """``ActivationCounter`` once."""
    return ActivationCounter(model_cfg, objective_cfg, dtype, every)(micro_batch)


# --- model states ----------------------------------------------------------------------------------


@dataclass
class ParameterCounts:
    """Parameters of what one GPU's engine holds (the whole model, or a pipeline stage)."""

    trainable: int
    frozen: int
    momentum: int
    largest_layer: int
    """Most parameters any one module owns directly (DeepSpeed's ``model_to_params``): the ZeRO-3
    gather unit."""
    persistent: int = 0
    """Online parameters at most ``stage3_param_persistence_threshold`` in size: whole on every rank."""
    persistent_momentum: int = 0


def parameter_counts(params: list[tuple[str, nn.Parameter]], modules: list[nn.Module],
                     persistence_threshold: int = 0) -> ParameterCounts:
    """Counts from (name, parameter) pairs; a name containing ``momentum_`` is a key-tower parameter."""
    from wenlan.models.brivl import KEY_TOWER

    online = [p for n, p in params if KEY_TOWER not in n]
    key = [p for n, p in params if KEY_TOWER in n]
    largest = max((sum(p.numel() for p in m.parameters(recurse=False)) for m in modules), default=0)
    return ParameterCounts(
        trainable=sum(p.numel() for p in online if p.requires_grad),
        frozen=sum(p.numel() for p in online if not p.requires_grad),
        momentum=sum(p.numel() for p in key), largest_layer=largest,
        persistent=sum(p.numel() for p in online if p.numel() <= persistence_threshold),
        persistent_momentum=sum(p.numel() for p in key if p.numel() <= persistence_threshold))


@dataclass
class Precision:
    weight_bytes: int
    """2 for bf16/fp16 weights, 4 for fp32."""
    grad_accum_bytes: int
    """Bytes per element of the gradient DeepSpeed accumulates (``data_types.grad_accum_dtype``)."""
    comm_fp32: bool
    """``communication_data_type: fp32`` with low-precision gradients: reductions run on an fp32 copy."""

    @property
    def low(self) -> bool:
        return self.weight_bytes < 4


def precision_of(ds: dict) -> Precision:
    from wenlan.parallel.engine import low_precision

    weight = 2 if low_precision(ds) else 4
    accum = {"fp32": 4, "float32": 4, "bf16": 2, "fp16": 2}.get(ds.get("data_types", {}).get("grad_accum_dtype"), weight)
    return Precision(weight, accum, comm_fp32=weight < 4 and ds.get("communication_data_type") in ("fp32", "float32"))


@dataclass
class ModelStates:
    parameters: int
    gradients: int
    optimizer: int
    momentum: int


def model_state_bytes(counts: ParameterCounts, stage: int, precision: Precision, dp: int, zero: dict) -> ModelStates:
    """Per GPU, DeepSpeed's layout of each ZeRO stage over ``dp`` data-parallel ranks.

    Low precision: fp32 master + Adam moments (12 bytes per trainable parameter) partitioned from
    ZeRO-1 on; gradients in the accumulation dtype, whole (ZeRO-0/1) or partitioned (ZeRO-2/3), plus
    the fp32 copy of a partition's gradient the optimizer steps on (ZeRO-3 makes it one
    ``sub_group_size`` group at a time; none when accumulating in fp32 already). DeepSpeed's bf16
    optimizer (ZeRO-1, bf16, fp32 accumulation) accumulates whole fp32 gradients.
    """
    w, P, F, M = precision.weight_bytes, counts.trainable, counts.frozen, counts.momentum
    optimizer_per_param = MOMENTS_BYTES + (4 if precision.low else 0)  # moments (+ fp32 master)
    shard = dp if stage >= 1 else 1
    optimizer = optimizer_per_param * P // shard
    fp32_step_copy = 4 if precision.low and precision.grad_accum_bytes < 4 else 0
    if stage == 3:
        persistent_extra = counts.persistent - counts.persistent // dp  # whole on every rank, not 1/dp
        parameters = w * ((P + F) // dp + persistent_extra)
        gradients = precision.grad_accum_bytes * P // dp + fp32_step_copy * min(P // dp, int(zero["sub_group_size"]))
        momentum_params = M // dp + counts.persistent_momentum - counts.persistent_momentum // dp
    else:
        parameters = w * (P + F)
        momentum_params = M
        if stage == 2:
            gradients = (precision.grad_accum_bytes + fp32_step_copy) * P // dp
        else:
            gradients = precision.grad_accum_bytes * P + fp32_step_copy * P // shard
    momentum = (w + (4 if precision.low else 0)) * momentum_params  # weights + fp32 masters
    return ModelStates(parameters, gradients, optimizer, momentum)


def zero_section(ds: dict) -> dict:
    """The config's ``zero_optimization`` with DeepSpeed's own defaults filled in."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    resolved = DeepSpeedZeroConfig(**ds.get("zero_optimization", {}))
    return dict(stage=int(resolved.stage), reduce_bucket_size=int(resolved.reduce_bucket_size),
                allgather_bucket_size=int(resolved.allgather_bucket_size),
                prefetch_bucket_size=int(resolved.prefetch_bucket_size),
                max_live_parameters=int(resolved.max_live_parameters),
                param_persistence_threshold=int(resolved.param_persistence_threshold),
                sub_group_size=int(resolved.sub_group_size), overlap_comm=bool(resolved.overlap_comm))


def buffer_bytes(counts: ParameterCounts, stage: int, precision: Precision, zero: dict) -> int:
    """DeepSpeed's working buffers. Reduce buckets: one bucket of gradients in the accumulation dtype,
    two with ``overlap_comm`` (one reducing while the next fills), plus an fp32 copy of the one being
    reduced with fp32 communication. ZeRO-3: the gathered parameters it keeps live (at most
    ``stage3_max_live_parameters``, online and momentum towers together), the prefetch bucket, and
    the largest layer's gathered weight and whole gradient (DeepSpeed's estimator's 4 bytes per
    parameter of it)."""
    w = precision.weight_bytes
    bucket = zero["reduce_bucket_size"] if stage >= 1 else 0
    reduce = bucket * precision.grad_accum_bytes * (2 if zero["overlap_comm"] else 1)
    reduce += bucket * 4 if precision.comm_fp32 and precision.grad_accum_bytes < 4 else 0
    if stage != 3:
        return reduce
    gathered = counts.trainable + counts.frozen + counts.momentum
    live = w * min(zero["max_live_parameters"], gathered)
    prefetch = w * min(zero["prefetch_bucket_size"], gathered)
    return reduce + live + prefetch + largest_layer_bytes(counts, precision)


def largest_layer_bytes(counts: ParameterCounts, precision: Precision) -> int:
    """ZeRO-3's largest layer gathered whole, weight and gradient (the 4 bytes per parameter of it that
    DeepSpeed's estimator adds)."""
    return 2 * precision.weight_bytes * counts.largest_layer


def queue_bytes(objective_cfg, embed_dim: int, global_batch: int, dp: int) -> int:
    """The two fp32 key queues and their int64 ids (1/dp of them when sharded), and one step's
    all-gathered keys (G, 2E) fp32 with their ids."""
    if objective_cfg.name != "brivl":
        return 0
    queue = objective_cfg.queue_size * (2 * embed_dim * 4 + 8)
    if objective_cfg.queue_mode == "sharded":
        queue //= dp
    return queue + global_batch * (2 * embed_dim * 4 + 8)


# --- the plan -----------------------------------------------------------------------------------------


@dataclass
class StagePlan:
    """One pipeline stage (the whole model without a pipeline)."""

    name: str
    memory: MemoryBreakdown
    counts: ParameterCounts
    activations_off: int
    """Activations without any checkpointing."""
    activations_on: int
    """Activations with the configured checkpointing (every block when none is configured)."""


@dataclass
class Plan:
    config: PlanConfig
    layout: str
    micro_batch: int
    grad_accum: int
    data_parallel: int
    stages: list[StagePlan]
    checkpointing: str
    max_micro_batch: int
    train_flops_per_sample: int
    peak_tflops: float

    @property
    def worst(self) -> StagePlan:
        return max(self.stages, key=lambda s: s.memory.total)

    @property
    def budget(self) -> float:
        return self.config.gpu_memory_gb * GB * (1 - self.config.headroom)

    @property
    def fits(self) -> bool:
        return self.worst.memory.total <= self.budget

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.data_parallel

    @property
    def step_seconds(self) -> float:
        return self.train_flops_per_sample * self.global_batch / self._cluster_flops

    @property
    def epoch_hours(self) -> float:
        return self.config.pairs * self.train_flops_per_sample / self._cluster_flops / 3600

    @property
    def _cluster_flops(self) -> float:
        return self.config.gpus * self.peak_tflops * 1e12 * self.config.mfu

    def as_json(self) -> dict:
        return {"fits": self.fits, "max_micro_batch": self.max_micro_batch,
                "per_gpu_bytes": self.worst.memory.as_dict(),
                "train_flops_per_sample": self.train_flops_per_sample, "epoch_hours": self.epoch_hours}


class _Planner:
    """Memory of one layout at any micro-batch; activations per micro-batch counted once."""

    def __init__(self, cfg: PlanConfig):
        from wenlan.config import PRESET_OBJECTIVES, batch_from_deepspeed, check_pipeline, read_deepspeed_config
        from wenlan.losses.objective import ObjectiveConfig
        from wenlan.models.flops import peak_tflops
        from wenlan.models.presets import get_preset
        from wenlan.parallel.engine import zero_stage

        _check_numbers(cfg)
        self.cfg = cfg
        self.model_cfg = get_preset(cfg.preset)
        self.objective = ObjectiveConfig(**PRESET_OBJECTIVES.get(cfg.preset, {}))
        self.ds = read_deepspeed_config(cfg.deepspeed_config)
        self.zero = zero_section(self.ds)
        self.stage = zero_stage(self.ds)
        try:
            self.pipeline_stages = check_pipeline(self.ds, self.stage, cfg.gpus)
        except ValueError as err:
            raise ValueError(f"--gpus {cfg.gpus} / --deepspeed_config: {err}") from None
        if self.pipeline_stages > 1 and cfg.activation_checkpointing:
            raise ValueError("--activation-checkpointing applies to the ZeRO path; a pipeline config checkpoints "
                             "with its pipeline.activation_checkpoint_interval")
        self.dp = cfg.gpus // self.pipeline_stages
        self.batch = batch_from_deepspeed(self.ds, self.dp)
        try:  # a layout train.py refuses is no plan
            self.objective.validate_batch(self.batch.global_batch, self.dp)
        except ValueError as err:
            raise ValueError(f"--gpus {cfg.gpus}: {err}") from None
        self.precision = precision_of(self.ds)
        self.dtype = torch.bfloat16 if self.ds.get("bf16", {}).get("enabled") else \
            torch.float16 if self.ds.get("fp16", {}).get("enabled") else torch.float32
        self.peak = peak_tflops(cfg.gpu_name)
        if self.peak is None:
            from wenlan.models.flops import PEAK_BF16_TFLOPS

            raise ValueError(f"--gpu-name {cfg.gpu_name!r}: no bf16 peak known; use one of "
                             f"{', '.join(k for k, _ in PEAK_BF16_TFLOPS)}")
        self._cache: dict = {}

    def _interval(self) -> int:
        if self.pipeline_stages > 1:
            return int(self.ds.get("pipeline", {}).get("activation_checkpoint_interval", 0))
        return self.cfg.activation_checkpointing

    def stages_at(self, micro_batch: int, details: bool = False) -> list[StagePlan]:
        """Every stage's memory at ``micro_batch``; with ``details``, the activations with checkpointing
        off and on as well (else both 0)."""
        if self.pipeline_stages > 1:
            return self._pipeline_stages(micro_batch, self._interval(), details)
        return [self._plain(micro_batch, self._interval(), details)]

    def _activations(self, micro_batch: int, every: int) -> ActivationBytes:
        key = ("plain", micro_batch, every)
        if key not in self._cache:
            if ("counter", every) not in self._cache:
                self._cache["counter", every] = ActivationCounter(self.model_cfg, self.objective, self.dtype, every)
            self._cache[key] = self._cache["counter", every](micro_batch)
        return self._cache[key]

    def _plain(self, micro_batch: int, every: int, details: bool) -> StagePlan:
        from transformers.initialization import no_init_weights

        from wenlan.models.brivl import BriVL

        if "counts" not in self._cache:
            with torch.device("meta"), no_init_weights():
                model = BriVL(self.model_cfg, momentum=self.objective.uses_momentum)
            online = [m for name, m in model.named_modules() if not name.startswith("momentum_")]
            threshold = self.zero["param_persistence_threshold"] if self.stage == 3 else 0
            self._cache["counts"] = parameter_counts(list(model.named_parameters()), online, threshold)
        counts = self._cache["counts"]
        counts = dataclasses.replace(counts, trainable=counts.trainable + int(self.objective.learnable_temperature))
        states = model_state_bytes(counts, self.stage, self.precision, self.dp, self.zero)
        acts = self._activations(micro_batch, every)
        global_batch = micro_batch * self.batch.grad_accum * self.dp
        memory = MemoryBreakdown(states.parameters, states.gradients, states.optimizer, states.momentum,
                                 queue_bytes(self.objective, self.model_cfg.embed_dim, global_batch, self.dp),
                                 acts.peak, buffer_bytes(counts, self.stage, self.precision, self.zero))
        if not details:
            return StagePlan("all", memory, counts, 0, 0)
        return StagePlan("all", memory, counts, self._activations(micro_batch, 0).peak,
                         self._activations(micro_batch, every or 1).peak)

    def _pipeline_stages(self, micro_batch: int, interval: int, details: bool) -> list[StagePlan]:
        layers = self._pipeline_layers()
        parts = self._cache["parts"]
        per_layer = self._layer_activations(micro_batch)
        plans = []
        S = self.pipeline_stages
        for s in range(S):
            lo, hi = parts[s], parts[s + 1]
            params = [(n, p) for layer in layers[lo:hi] for n, p in layer.named_parameters()]
            counts = parameter_counts(params, [m for layer in layers[lo:hi] for m in layer.modules()])
            states = model_state_bytes(counts, self.stage, self.precision, self.dp, self.zero)
            # DeepSpeed's TrainSchedule.num_pipe_buffers: 1F1B keeps up to S - s forwards in flight on
            # stage s, and never allocates fewer than 2 buffers.
            in_flight = max(2, min(S - s, self.batch.grad_accum))
            acts = {k: _stage_activations(per_layer[lo:hi], k) for k in (interval, 0, interval or 1)}
            global_batch = micro_batch * self.batch.grad_accum * self.dp
            queues = queue_bytes(self.objective, self.model_cfg.embed_dim, global_batch, self.dp) if s == S - 1 else 0
            memory = MemoryBreakdown(states.parameters, states.gradients, states.optimizer, states.momentum, queues,
                                     in_flight * acts[interval][0] + acts[interval][1],
                                     buffer_bytes(counts, self.stage, self.precision, self.zero))
            plans.append(StagePlan(f"stage {s} (layers {lo}-{hi - 1})", memory, counts,
                                   in_flight * acts[0][0] + acts[0][1],
                                   in_flight * acts[interval or 1][0] + acts[interval or 1][1]))
        return plans

    def _pipeline_layers(self) -> list[nn.Module]:
        if "layers" not in self._cache:
            from transformers.initialization import no_init_weights

            from wenlan.models.brivl import BriVL
            from wenlan.parallel.pipeline import ObjectiveLayer, check_stages, partition_method, pipeline_layers

            with torch.device("meta"), no_init_weights():
                model = BriVL(self.model_cfg, momentum=self.objective.uses_momentum)
                objective = ObjectiveLayer(self.objective, self.model_cfg.embed_dim)
            model.to(self.dtype).train()
            objective.to(self.dtype).train()
            if objective.queues is not None:
                objective.queues.float()
                objective.queues.filled = objective.queues.size
            self._cache["layers"] = pipeline_layers(model, objective)
            self._cache["parts"] = check_stages(self.model_cfg, self.objective, self.pipeline_stages,
                                                partition_method(self.ds))[0]
        return self._cache["layers"]

    def _layer_activations(self, micro_batch: int) -> list["LayerActivations"]:
        key = ("layers", micro_batch)
        if key not in self._cache:
            self._cache[key] = pipeline_layer_activations(self._pipeline_layers(), self.model_cfg, micro_batch,
                                                          self.dtype)
        return self._cache[key]


@dataclass
class LayerActivations:
    """One pipeline layer at one micro-batch: its input (what a checkpoint keeps), its own saved
    tensors, its output (the buffer a stage sends)."""

    input: int
    saved: int
    output: int


def _nbytes(acts) -> int:
    tensors = acts if isinstance(acts, tuple) else (acts,)
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def pipeline_layer_activations(layers: list[nn.Module], model_cfg, micro_batch: int,
                               dtype: torch.dtype) -> list[LayerActivations]:
    """Each pipeline layer's activations at ``micro_batch``, the layers run in order on the meta device
    (the objective layer's loss included)."""
    exclude = [t for layer in layers for t in (*layer.parameters(), *layer.buffers())]
    acts = _meta_batch(model_cfg, micro_batch, dtype)
    ids = torch.arange(micro_batch, device="meta")
    out = []
    for i, layer in enumerate(layers):
        counter = SavedTensorCounter(exclude)
        before = _nbytes(acts)
        with torch.enable_grad(), counter, FusedAttention():
            acts = layer(acts)
            if i == len(layers) - 1:
                layer.loss(acts, ids)
        out.append(LayerActivations(before, counter.bytes, _nbytes(acts)))
    return out


def _stage_activations(layers: list[LayerActivations], interval: int) -> tuple[int, int]:
    """(bytes per micro-batch in flight, recompute peak) of a stage's layers: without checkpointing all
    they save and their output; checkpointed in chunks of ``interval`` layers (DeepSpeed's
    PipelineModule), each chunk's input, the output, and the largest chunk recomputed once."""
    output = layers[-1].output
    if interval == 0:
        return sum(la.saved for la in layers) + output, 0
    chunks = [layers[i:i + interval] for i in range(0, len(layers), interval)]
    return sum(c[0].input for c in chunks) + output, max(sum(la.saved for la in c) for c in chunks)


def _check_numbers(cfg: PlanConfig) -> None:
    checks = [(cfg.gpus >= 1, f"--gpus {cfg.gpus}: must be >= 1"),
              (cfg.gpu_memory_gb > 0, f"--gpu-memory-gb {cfg.gpu_memory_gb}: must be > 0 (e.g. 80)"),
              (cfg.activation_checkpointing >= 0,
               f"--activation-checkpointing {cfg.activation_checkpointing}: use 0 (off), 1 (every block) or k"),
              (0 < cfg.mfu <= 1, f"--mfu {cfg.mfu}: must be in (0, 1], e.g. 0.35"),
              (cfg.pairs >= 1, f"--pairs {cfg.pairs}: must be >= 1"),
              (0 <= cfg.headroom < 1, f"--headroom {cfg.headroom}: must be in [0, 1), e.g. 0.1")]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def _max_micro_batch(planner: _Planner, budget: float) -> int:
    """The largest micro-batch whose worst stage fits ``budget``. Memory is affine in the micro-batch
    (every activation has a batch dimension; the in-batch logits' B x B are negligible): the answer
    from micro-batches 1 and 2, checked by counting at it and one above, bisected if it is off."""
    def fits(b: int) -> bool:
        return max(s.memory.total for s in planner.stages_at(b)) <= budget

    one = max(s.memory.total for s in planner.stages_at(1))
    if one > budget:
        return 0
    per_sample = max(max(s.memory.total for s in planner.stages_at(2)) - one, 1)
    guess = 1 + int((budget - one) // per_sample)
    if fits(guess) and not fits(guess + 1):
        return guess
    low, high = 1, guess + 1  # fits(low); widen ``high`` until it does not fit, then bisect
    while fits(high):
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def make_plan(cfg: PlanConfig, full: bool = True) -> Plan:
    """Raises ValueError naming the flag for bad input. ``full=False``: the configured layout only, a
    few meta-device forwards fewer (no largest micro-batch, left 0; no activations with checkpointing
    off and on, left 0)."""
    from wenlan.models.flops import train_flops_per_sample

    planner = _Planner(cfg)
    micro = planner.batch.micro_batch
    every = planner._interval()
    checkpointing = (f"pipeline.activation_checkpoint_interval={every}" if planner.pipeline_stages > 1
                     else f"--activation-checkpointing {every}")
    stages = planner.stages_at(micro, details=full)
    layout = (f"ZeRO-{planner.stage}" + (f", pipeline {planner.pipeline_stages} stages x {planner.dp} replicas"
                                          if planner.pipeline_stages > 1 else f" over {planner.dp} ranks")
              + f", {str(planner.dtype).removeprefix('torch.')}")
    plan = Plan(cfg, layout, micro, planner.batch.grad_accum, planner.dp, stages, checkpointing, 0,
                train_flops_per_sample(planner.model_cfg, planner.objective, micro, planner.dp), planner.peak)
    if full:
        plan.max_micro_batch = _max_micro_batch(planner, plan.budget)
    return plan


# --- what the planner is checked against (tests/test_plan.py, bench/plan_agreement.py) ----------------


def deepspeed_model_states(preset: str, deepspeed_config: str, gpus: int) -> tuple[int, int]:
    """(DeepSpeed's estimator for the online towers extended by the momentum towers, the planner's same
    model states) in bytes per GPU, for a ZeRO-2 or ZeRO-3 config. The estimators assume bf16/fp16
    weights; the momentum towers cost their weights and fp32 masters (6 bytes per parameter),
    partitioned under ZeRO-3; ZeRO-3's largest-layer term is one of the planner's buffers."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from wenlan.config import read_deepspeed_config
    from wenlan.models.brivl import BriVL
    from wenlan.models.presets import get_preset

    plan = make_plan(PlanConfig(preset=preset, deepspeed_config=deepspeed_config, gpus=gpus, gpu_memory_gb=80),
                     full=False)
    with torch.device("meta"):
        model = BriVL(get_preset(preset))
    online = [model.image_tower, model.text_tower]
    total = sum(p.numel() for tower in online for p in tower.parameters()) + 1  # + the temperature
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for tower in online for m in tower.modules())
    momentum = sum(p.numel() for t in (model.momentum_image_tower, model.momentum_text_tower) for p in t.parameters())
    nodes, per_node = max(gpus // 8, 1), min(gpus, 8)
    ds = read_deepspeed_config(deepspeed_config)
    memory = plan.worst.memory
    planned = memory.parameters + memory.gradients + memory.optimizer + memory.momentum
    if ds["zero_optimization"]["stage"] == 3:
        _, estimate, _ = estimate_zero3_model_states_mem_needs(total, largest, per_node, nodes, cpu_offload=False,
                                                               cpu_offload_params=False)
        return estimate + 6 * momentum // gpus, planned + largest_layer_bytes(plan.worst.counts, precision_of(ds))
    _, estimate = estimate_zero2_model_states_mem_needs(total, per_node, nodes, cpu_offload=False)
    return estimate + 6 * momentum, planned


def without_dropout(model_cfg):
    """CPU attention with dropout falls back to the math kernel, which saves the (B, H, N, N)
    probabilities and a mask; GPU fused kernels (and the planner) save neither."""
    return dataclasses.replace(model_cfg, image=dataclasses.replace(model_cfg.image, dropout=0.0),
                               text=dataclasses.replace(model_cfg.text, dropout=0.0))


def measured_saved_bytes(module, micro_batch: int) -> int:
    """Bytes autograd saves in a real forward of ``module`` (a ContrastivePretraining on CPU, without
    momentum towers) through the training path: BERT's own forward with a padded mask, the loss against
    its queue (the online embeddings stand in for the keys). Distinct storages, parameters and buffers
    left out."""
    cfg = module.model.cfg
    generator = torch.Generator().manual_seed(0)
    size, length = cfg.image.image_size, cfg.text.max_len
    images = torch.randn(micro_batch, 3, size, size, generator=generator)  # (B, 3, S, S)
    input_ids = torch.randint(1, cfg.text.vocab_size, (micro_batch, length), generator=generator)  # (B, L)
    mask = torch.ones(micro_batch, length, dtype=torch.long)  # (B, L)
    mask[0, length // 2:] = 0
    with torch.enable_grad(), SavedTensorCounter([*module.parameters(), *module.buffers()]) as counter:
        image, text, _, _ = module.model(images, input_ids, mask, with_keys=False)  # (B, E) each
        module.objective(image, text, image.detach(), text.detach(), torch.arange(micro_batch))
    return counter.bytes


def activation_agreement(model_cfg, objective_cfg, micro_batch: int = 2) -> list[tuple[int, int, int]]:
    """(checkpointing every, planner's saved bytes, measured saved bytes) with checkpointing off and on
    every block, fp32 on CPU, the queue full."""
    from transformers.initialization import no_init_weights

    from wenlan.losses.objective import ContrastivePretraining
    from wenlan.models.brivl import BriVL
    from wenlan.parallel.activation import apply_activation_checkpointing

    with no_init_weights():  # the bytes do not depend on the values
        module = ContrastivePretraining(BriVL(model_cfg, momentum=False), objective_cfg).train()
    if module.queues is not None:
        module.queues.filled = module.queues.size
    rows = []
    for every in (0, 1):  # the same model, checkpointed for the second count
        apply_activation_checkpointing(module.model, every)
        planned = activation_bytes(model_cfg, objective_cfg, micro_batch, torch.float32, every).saved
        rows.append((every, planned, measured_saved_bytes(module, micro_batch)))
    return rows


def format_plan(plan: Plan) -> str:
    cfg = plan.config

    def gb(b: int) -> str:
        return f"{b / GB:8.2f} GB"

    lines = [f"{cfg.preset} with {cfg.deepspeed_config} on {cfg.gpus} GPUs of {cfg.gpu_memory_gb:g} GB: "
             f"{plan.layout}",
             f"micro-batch {plan.micro_batch} x grad accumulation {plan.grad_accum} x data parallel "
             f"{plan.data_parallel} = global batch {plan.global_batch}; checkpointing {plan.checkpointing}", ""]
    names = ["parameters", "gradients", "optimizer", "momentum", "queues", "activations", "buffers", "total"]
    shown = plan.stages if len(plan.stages) <= 1 else [plan.worst]
    for stage in shown:
        if len(plan.stages) > 1:
            lines.append(f"worst pipeline stage: {stage.name}")
        memory = stage.memory.as_dict()
        lines += [f"  {name:<12}{gb(memory[name])}" for name in names]
        lines.append(f"  activations without checkpointing {gb(stage.activations_off).strip()}, "
                     f"checkpointing every block {gb(stage.activations_on).strip()}")
    if len(plan.stages) > 1:
        lines.append("  per stage total: " + ", ".join(f"{s.memory.total / GB:.1f}" for s in plan.stages) + " GB")
    lines += ["",
              f"fits: {'yes' if plan.fits else 'NO'} (budget {plan.budget / GB:.1f} GB = {cfg.gpu_memory_gb:g} GB less "
              f"{cfg.headroom:.0%} headroom; margin {(plan.budget - plan.worst.memory.total) / GB:+.1f} GB)",
              f"largest micro-batch that fits: {plan.max_micro_batch} (memory only: the queue and the learning rate "
              "may want less)",
              f"train FLOPs per sample: {plan.train_flops_per_sample / 1e12:.3f} TFLOP",
              f"assuming {cfg.mfu:.0%} MFU of {cfg.gpu_name}'s {plan.peak_tflops:g} TFLOP/s bf16 peak: step "
              f"{plan.step_seconds:.2f} s, one epoch of {cfg.pairs:,.0f} pairs {plan.epoch_hours:.1f} h "
              f"({plan.epoch_hours / 24:.1f} days)"]
    return "\n".join(lines)


def parse_args(argv=None) -> tuple[PlanConfig, bool, argparse.ArgumentParser]:
    parser = argparse.ArgumentParser(
        prog="python -m wenlan.plan",
        description="Per-GPU memory (model states, momentum towers, queues, activations, DeepSpeed buffers), "
                    "whether it fits, the largest micro-batch, and the epoch time at an assumed MFU. Counted on "
                    "the meta device: no GPU needed.")
    parser.add_argument("--preset", required=True)
    parser.add_argument("--deepspeed_config", required=True)
    parser.add_argument("--gpus", type=int, required=True, help="GPUs in the run (world size)")
    parser.add_argument("--gpu-memory-gb", type=float, required=True, help="memory per GPU, e.g. 80")
    parser.add_argument("--activation-checkpointing", type=int, default=0, metavar="K",
                        help="as train.py: checkpoint every K-th tower block (0 off)")
    parser.add_argument("--gpu-name", default=PlanConfig.gpu_name, help="picks the bf16 peak (default H100)")
    parser.add_argument("--mfu", type=float, default=PlanConfig.mfu, help="assumed MFU (default 0.35)")
    parser.add_argument("--pairs", type=float, default=PlanConfig.pairs, help="pairs per epoch (default 500M)")
    parser.add_argument("--headroom", type=float, default=PlanConfig.headroom,
                        help="fraction of GPU memory kept free for what is not counted (default 0.1)")
    parser.add_argument("--json", action="store_true", help="print JSON for machines")
    args = parser.parse_args(argv)
    cfg = PlanConfig(preset=args.preset, deepspeed_config=args.deepspeed_config, gpus=args.gpus,
                     gpu_memory_gb=args.gpu_memory_gb, activation_checkpointing=args.activation_checkpointing,
                     gpu_name=args.gpu_name, mfu=args.mfu, pairs=args.pairs, headroom=args.headroom)
    return cfg, args.json, parser


def main(argv=None) -> None:
    cfg, as_json, parser = parse_args(argv)
    try:
        plan = make_plan(cfg)
    except ValueError as err:
        parser.error(str(err))
    print(json.dumps(plan.as_json()) if as_json else format_plan(plan))


if __name__ == "__main__":
    main()
