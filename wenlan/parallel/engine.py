"""DeepSpeed engine construction for a built ContrastivePretraining module."""

import math

import deepspeed
import torch

from wenlan.config import TrainConfig

NO_DECAY_NAMES = ("bias", "norm", "log_scale", "embeddings")


def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: biases, norms, embeddings and the temperature get no decay."""
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or any(k in name for k in NO_DECAY_NAMES) else decay).append(p)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)]


def warmup_cosine(warmup_steps: int, max_steps: int, min_ratio: float):
    """LR multiplier: linear warm-up, then cosine decay to ``min_ratio`` at ``max_steps``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min((step - warmup_steps) / max(max_steps - warmup_steps, 1), 1.0)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


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
