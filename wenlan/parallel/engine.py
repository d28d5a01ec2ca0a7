"""Model and DeepSpeed engine construction.

Under ZeRO-3 the model is built inside ``deepspeed.zero.Init``: every parameter, online and momentum,
is partitioned across the data-parallel ranks as soon as its module is constructed, so no rank ever
holds a whole model. The momentum towers have no gradient and are not handed to the optimizer, so they
cost their partition only (no gradient, no optimizer state).
"""

import contextlib
import math
import os
from collections.abc import Mapping

import deepspeed
import torch
import torch.distributed as dist

from wenlan.config import TrainConfig
from wenlan.losses.objective import ContrastivePretraining
from wenlan.models.brivl import BriVL
from wenlan.models.init import init_weights
from wenlan.parallel.activation import apply_activation_checkpointing

NO_DECAY_NAMES = ("bias", "norm", "log_scale", "embeddings")


def init_distributed() -> None:
    """``deepspeed.init_distributed()``; on CPU, also unlink this rank's shared-memory all-reduce segment
    once every rank has mapped it. DeepSpeed never unlinks them, so each CPU run would leave 69 MB per
    rank in /dev/shm (memory) behind; unlinked, the segment lives exactly as long as the processes."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed()
    if get_accelerator().device_name() != "cpu" or "MASTER_PORT" not in os.environ:
        return
    dist.barrier()  # no gradient: every rank has opened every rank's segment
    segment = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
               f"{os.environ['MASTER_PORT']}_{dist.get_rank()}")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(segment)


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def low_precision(ds_config: dict) -> bool:
    """bf16 or fp16 weights (DeepSpeed keeps fp32 masters in its optimizer)."""
    return any(ds_config.get(k, {}).get("enabled") for k in ("bf16", "fp16"))


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: biases, norms, embeddings and the temperature get no decay."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partition is a flat placeholder
            (no_decay if ndim < 2 or any(k in name for k in NO_DECAY_NAMES) else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def warmup_cosine(warmup_steps: int, max_steps: int, min_ratio: float):
    """LR multiplier: linear warm-up, then cosine decay to ``min_ratio`` at ``max_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(max_steps - warmup_steps, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def _gathered(module: torch.nn.Module):
    """One module's own ZeRO-3 partitions gathered; rank 0's edits are re-partitioned to every rank on
    exit (edits inside ``GatheredParameters`` without ``modifier_rank`` are silently dropped)."""
    params = [p for p in module.parameters(recurse=False) if hasattr(p, "ds_id")]
    return deepspeed.zero.GatheredParameters(params, modifier_rank=0, enabled=bool(params))


def build_module(cfg: TrainConfig, weights: dict[str, torch.Tensor] | None = None) -> ContrastivePretraining:
    """BriVL + objective, initialised from ``cfg.seed`` and the configured pretrained weights, or, given
    ``weights`` (a converted checkpoint's whole tensors), from those.

    Under ZeRO-3 it is built inside ``zero.Init``, so each module is partitioned as soon as it is
    constructed. Third-party constructor inits are switched off (they run after their children are
    partitioned, where they fail or do nothing); ``init_weights`` then initialises every module with
    its partitions gathered one module at a time, giving the weights a plain build gets.
    """
    from transformers.initialization import no_init_weights

    zero3 = zero_stage(cfg.deepspeed_config) == 3
    build = deepspeed.zero.Init(config_dict_or_path=cfg.deepspeed_config) if zero3 else contextlib.nullcontext()
    with build, no_init_weights():
        model = BriVL(cfg.model, momentum=cfg.objective.uses_momentum)
        module = ContrastivePretraining(model, cfg.objective)
    if zero3 and low_precision(cfg.deepspeed_config):
        _float_buffers_in_fp32(model, cfg)
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if weights is not None:
        copy_state(module, weights, "converted checkpoint")
        return module
    # The momentum towers are not initialised here: they start as a copy of the online towers.
    init_weights(module, cfg.seed, module_context=_gathered, skip_prefixes=("model.momentum_",))
    copy_state(model, model.pretrained_state(), "pretrained weights")
    if cfg.init_from:
        from wenlan.export import TowerFile

        copy_state(model, TowerFile(cfg.init_from), "--init-from")
    return module


@torch.no_grad()
def _float_buffers_in_fp32(model: BriVL, cfg: TrainConfig) -> None:
    """zero.Init creates every floating tensor in the run's dtype, the intermediate ones of a constructor
    included, so a buffer computed in a constructor (the region pooling's sampling grid) holds bf16
    roundings even where it is stored in fp32. Recompute them as every other strategy has them
    (DeepSpeed casts parameters only), from a copy of the model whose parameters live on the meta device."""
    from transformers.initialization import no_init_weights

    from wenlan.models.init import parameters_on_meta

    with parameters_on_meta(), no_init_weights():
        reference = dict(BriVL(cfg.model, momentum=model.momentum_image_tower is not None).named_buffers())
    for name, buffer in list(model.named_buffers()):
        if buffer.is_floating_point():
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = reference[name].to(buffer.device)


@torch.no_grad()
def copy_state(module: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    """Copy named tensors into ``module``'s parameters and buffers; under ZeRO-3 one module at a time
    is gathered, never the whole model, and a partitioned parameter is read on rank 0 only (its edit is
    the one re-partitioned to every rank): at 10B, every rank reading every tensor of a converted
    checkpoint would pull the whole model from the file system once per GPU. ``state`` may be a lazy
    mapping (one read per lookup) with a ``shape(name)`` from its file's header."""
    reads_partitioned = not dist.is_initialized() or dist.get_rank() == 0
    for module_name, sub in module.named_modules():
        prefix = module_name + "." if module_name else ""
        own = {n: t for n, t in [*sub.named_parameters(recurse=False), *sub.named_buffers(recurse=False)]
               if prefix + n in state}
        if not own:
            continue
        with _gathered(sub):
            for name, tensor in own.items():
                key = prefix + name
                needed = reads_partitioned or not hasattr(tensor, "ds_id")  # buffers are whole on every rank
                value = state[key] if needed or not hasattr(state, "shape") else None
                shape = tuple(value.shape) if value is not None else tuple(state.shape(key))
                if shape != tuple(tensor.shape):
                    raise ValueError(f"{what}: {key} has shape {shape}, the model expects {tuple(tensor.shape)}: check "
                                     "the preset against the checkpoint")
                if needed:
                    tensor.copy_(value)


def build_engine(module: torch.nn.Module, cfg: TrainConfig):
    ds = dict(cfg.deepspeed_config)
    ds["train_micro_batch_size_per_gpu"] = cfg.batch.micro_batch
    ds["gradient_accumulation_steps"] = cfg.batch.grad_accum
    ds.pop("train_batch_size", None)
    weight_decay = ds.get("optimizer", {}).get("params", {}).get("weight_decay", 0.0)
    schedule = warmup_cosine(cfg.lr_warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    engine, _, _, _ = deepspeed.initialize(
        model=module, model_parameters=param_groups(module, weight_decay), config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    return engine
