"""The resolved run configuration: command line + preset + DeepSpeed config, validated before any
process group starts. Saved as ``DIR/config.json`` and inside every checkpoint, so export and
evaluation rebuild exactly the trained model."""

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from wenlan.data.index import shard_counts
from wenlan.data.pipeline import check_train_layout, default_streams, expand_shards, missing_local_shards
from wenlan.losses.objective import ObjectiveConfig
from wenlan.models.brivl import ModelConfig
from wenlan.models.presets import cut_depth, get_preset

# Objective settings that belong to a preset (queue sized to the batch a preset is run with).
PRESET_OBJECTIVES = {
    "tiny": dict(queue_size=4096, momentum=0.99, in_batch_negatives=True, learnable_temperature=True),
    "base": dict(queue_size=65536, momentum=0.999, momentum_start=0.99),
    "1b": dict(queue_size=65536, momentum=0.999, momentum_start=0.99),
    "10b": dict(queue_size=65536, momentum=0.999, momentum_start=0.99),
    "brivl-1.0": dict(queue_size=9600, momentum=0.99, temperature=0.07, in_batch_negatives=False,
                      learnable_temperature=False, queue_warmup_steps=0),
}


@dataclass
class BatchConfig:
    """Batch arithmetic read from the DeepSpeed config and the launcher's world size."""

    micro_batch: int
    grad_accum: int
    data_parallel_size: int
    """Data-parallel ranks: all ranks, or the ranks of one pipeline stage (world size / stages)."""
    pipeline_stages: int = 1

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.data_parallel_size


@dataclass
class TrainConfig:
    """Everything one training run needs, resolved."""

    preset: str
    model: ModelConfig
    objective: ObjectiveConfig
    batch: BatchConfig
    deepspeed_config: dict
    tokenizer: str
    train_shards: list[str]
    val_shards: list[str]
    output_dir: str
    max_steps: int
    seed: int = 0
    lr_warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak learning rate."""
    eval_every: int = 0
    save_every: int = 0
    log_every: int = 20
    num_workers: int = 1
    data_streams: int = 8
    """Logical data streams (see wenlan.data.pipeline): fixed for a run; any world size dividing it
    trains on the same samples in the same order."""
    color_augment: bool = True
    resume: str = "auto"
    mlflow_uri: str | None = None
    mlflow_experiment: str = "wenlan"
    log_model: bool = False
    """At the end of the run, export the online towers and log the file to the MLflow run."""
    activation_checkpointing: int = 0
    """Plain/ZeRO path: recompute every k-th block of each online tower in the backward (0: off, 1:
    every block; ``wenlan.parallel.activation``). A pipeline uses ``pipeline.activation_checkpoint_interval``."""
    keep_checkpoints: int | None = None
    """After each save, keep this many complete checkpoints (the one just written and the newest older
    ones) and delete the rest (``wenlan.parallel.checkpoint.prune``); None keeps all."""
    image_views: int = 1
    """Image views per sample from the train loader (2: a second augmented view and a second textual
    view, for ``ernie-vil2`` and ``cookie``)."""
    cut_depth: int | None = None
    """The preset's widths at this many ViT blocks and BERT layers (``wenlan.models.presets.cut_depth``);
    the model config a checkpoint records is the cut one."""
    attention_layers: int | None = None
    """Self-attention layers per tower instead of the preset's (``model`` holds the result)."""
    init_from: str | None = None
    """A file of ``wenlan.export`` or ``wenlan.convert``: a fresh run starts its online towers (and,
    unless --temperature is given, its temperature) from it; the momentum towers start as their copy
    and the queues empty. A run that resumes from a checkpoint ignores it."""

    def __post_init__(self):
        if self.objective.queue_warmup_steps is None:  # the queue's negatives wait for the LR warm-up
            self.objective.queue_warmup_steps = self.lr_warmup_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_deepspeed_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--deepspeed_config: no such file {path!r}; see ds_configs/ for examples")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--deepspeed_config: {path} is not valid JSON ({err})") from None


def batch_from_deepspeed(ds: dict, data_parallel_size: int) -> BatchConfig:
    """DeepSpeed accepts any two of (train_batch_size, micro batch, grad accumulation); resolve the third
    here so a mismatch fails now with a clear message instead of inside deepspeed.initialize."""
    micro = ds.get("train_micro_batch_size_per_gpu")
    accum = ds.get("gradient_accumulation_steps")
    total = ds.get("train_batch_size")
    if micro is None and total is None:
        raise ValueError("DeepSpeed config: set train_micro_batch_size_per_gpu (and optionally "
                         "gradient_accumulation_steps or train_batch_size)")
    if micro is None:
        accum = accum or 1
        micro, rem = divmod(total, accum * data_parallel_size)
        if rem or micro == 0:
            raise ValueError(f"DeepSpeed config: train_batch_size={total} is not divisible by "
                             f"gradient_accumulation_steps={accum} x data-parallel size {data_parallel_size}")
    elif accum is None:
        accum = 1 if total is None else total // (micro * data_parallel_size)
    if total is not None and total != micro * accum * data_parallel_size:
        raise ValueError(f"DeepSpeed config: train_batch_size={total} != train_micro_batch_size_per_gpu={micro} x "
                         f"gradient_accumulation_steps={accum} x data-parallel size {data_parallel_size}; fix one of "
                         "them or drop train_batch_size")
    return BatchConfig(micro_batch=micro, grad_accum=accum, data_parallel_size=data_parallel_size)


def check_pipeline(ds: dict, zero_stage: int, world_size: int) -> int:
    """``pipeline.stages`` of a DeepSpeed config, checked against ZeRO and the world size."""
    from wenlan.parallel.pipeline import PARTITION_METHODS, partition_method, pipeline_stages

    try:
        stages = pipeline_stages(ds)
    except (TypeError, ValueError):
        raise ValueError(f"DeepSpeed config: pipeline.stages={ds['pipeline'].get('stages')!r} is not a number of "
                         "stages; use an integer >= 1") from None
    if stages < 1:
        raise ValueError(f"DeepSpeed config: pipeline.stages={stages} must be >= 1")
    if stages > 1 and zero_stage > 1:
        raise ValueError(f"DeepSpeed config: pipeline.stages={stages} with zero_optimization.stage={zero_stage}: "
                         "DeepSpeed's pipeline engine supports ZeRO-0/1 only; use stage 1, or drop the pipeline "
                         "section and use ZeRO-3 (ds_configs/zero3_10b.json)")
    if partition_method(ds) not in PARTITION_METHODS:
        raise ValueError(f"DeepSpeed config: pipeline.partition_method={partition_method(ds)!r} is not one of "
                         f"{', '.join(PARTITION_METHODS)}; use \"parameters\" or \"flops\" (forward FLOPs per layer)")
    if world_size % stages:
        raise ValueError(f"DeepSpeed config: pipeline.stages={stages} does not divide the {world_size} ranks; "
                         f"launch a multiple of {stages} processes")
    return stages


def _check_shards(flag: str, shards: list[str]) -> None:
    missing = missing_local_shards(shards)
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ValueError(f"{flag}: shard not found: {', '.join(missing[:3])}{more}. "
                         "Create demo shards with `make demo-data` or point at existing .tar shards")


def _resumed_streams(args) -> int | None:
    """A resumed run keeps the data stream count it started with, at any world size."""
    from wenlan.parallel.checkpoint import COMPLETE, resolve_resume

    where = resolve_resume(args.resume, Path(args.output_dir) / "checkpoints")
    if where is None:
        return None
    return json.loads((where[0] / where[1] / COMPLETE).read_text()).get("data_streams")


def _check_mlflow_uri(uri: str | None) -> None:
    """MLflow 3 refuses a file store (a ``file:`` URI or a bare path) unless MLFLOW_ALLOW_FILE_STORE=true;
    found here rather than on rank 0 after every process group has started."""
    if uri is None or os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() == "true":
        return
    looks_like_path = ":" not in uri and (uri.startswith((".", "/", "~")) or "/" in uri)
    if uri.startswith("file:") or looks_like_path:
        raise ValueError(f"--mlflow-uri {uri!r} is a file store, which MLflow 3 refuses; use "
                         f"sqlite:///{uri.removeprefix('file://').removeprefix('file:').rstrip('/') or 'mlruns'}"
                         ".db, an http(s):// tracking server, or set MLFLOW_ALLOW_FILE_STORE=true")


def _check_init_from(path: str, model, objective: ObjectiveConfig, temperature_given: bool) -> None:
    """The --init-from file exists, fits ``model``'s towers (a BriVL on the meta device) exactly, and
    lends its temperature."""
    from wenlan.export import TowerFile

    if not Path(path).is_file():
        raise ValueError(f"--init-from: no such file {path!r} (a .safetensors of wenlan.export or wenlan.convert)")
    try:
        towers = TowerFile(path)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"--init-from {path}: not a safetensors file ({err})") from None
    towers.check_fits(model)
    if towers.log_scale is not None and not temperature_given:
        objective.temperature = math.exp(-towers.log_scale)


def _check_views(args, objective: ObjectiveConfig) -> int:
    """--image-views against what the objective contrasts (default: exactly that)."""
    needed = 2 if objective.spec.views else 1
    views = getattr(args, "image_views", None)
    if views is None or views == needed:
        return needed
    if needed == 2:
        raise ValueError(f"--image-views {views}: --objective {objective.name} contrasts two augmented views of each "
                         "image (and a second textual view); use --image-views 2 (the default for it)")
    raise ValueError(f"--image-views {views}: --objective {objective.name} reads one view per image; the second "
                     "would be decoded and never used. Drop --image-views or use --objective ernie-vil2|cookie")


def resolve(args) -> TrainConfig:
    """Command line -> validated TrainConfig. Raises ValueError naming the flag/field and the fix."""
    model = get_preset(args.preset)
    depth, attention = getattr(args, "cut_depth", None), getattr(args, "attention_layers", None)
    if depth is not None or attention is not None:
        model = cut_depth(model, vit_blocks=depth, bert_layers=depth, attention_layers=attention)
    objective = ObjectiveConfig(name=args.objective, **PRESET_OBJECTIVES.get(args.preset, {}))
    for key in ("queue_size", "temperature", "momentum", "queue_warmup_steps", "queue_mode"):
        value = getattr(args, key, None)
        if value is not None:
            setattr(objective, key, value)
    if getattr(args, "multiview_queue", False):
        if objective.name != "ernie-vil2":
            raise ValueError(f"--multiview-queue: only --objective ernie-vil2 takes queues as extra negatives (brivl "
                             f"always has them); drop the flag for --objective {objective.name}")
        objective.ernie_vil2.queue = True
    image_views = _check_views(args, objective)
    shared_layers = getattr(args, "shared_layers", None)
    if shared_layers is not None and objective.name != "cookie":
        raise ValueError(f"--shared-layers {shared_layers}: only --objective cookie has a transformer shared by both "
                         f"towers; drop the flag for --objective {objective.name}")
    if objective.name == "cookie":
        if shared_layers is not None:
            objective.cookie.shared_layers = shared_layers
        model = dataclasses.replace(model, shared_layers=objective.cookie.shared_layers)
    freeze = tuple(getattr(args, "freeze", None) or ())
    if freeze:
        model = dataclasses.replace(model, freeze=model.freeze + freeze)
    init_from = getattr(args, "init_from", None)
    if freeze or init_from:
        from transformers.initialization import no_init_weights

        from wenlan.models.brivl import BriVL

        with torch.device("meta"), no_init_weights():
            towers = BriVL(model, momentum=False)  # a --freeze pattern that matches nothing fails here
        if init_from:
            _check_init_from(init_from, towers, objective, temperature_given=args.temperature is not None)
    objective.validate()
    _check_mlflow_uri(args.mlflow_uri)
    if args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1 (got {args.max_steps})")
    ds = read_deepspeed_config(args.deepspeed_config)
    stage = int(ds.get("zero_optimization", {}).get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"DeepSpeed config: zero_optimization.stage={stage} is not a ZeRO stage; use 0, 1, 2 or 3")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    stages = check_pipeline(ds, stage, world_size)
    if stage == 0 and stages == 1 and ds.get("bf16", {}).get("enabled"):
        raise ValueError("DeepSpeed config: bf16 with zero_optimization.stage=0: DeepSpeed runs it through its fp16 "
                         "optimizer, which accumulates gradients in bf16 and steps differently from every other "
                         "stage (0.74x the first step, measured); use stage 1, which on one GPU shards nothing")
    if stages > 1 and ds.get("bf16", {}).get("enabled") and objective.learnable_temperature and \
            ds.get("data_types", {}).get("grad_accum_dtype") == "fp32":
        raise ValueError("DeepSpeed config: pipeline.stages with bf16 and data_types.grad_accum_dtype=fp32 makes "
                         "DeepSpeed use its bf16 optimizer, which never updates the learnable temperature (a "
                         "parameter of the loss on the last stage; measured with DeepSpeed 0.19); drop "
                         "data_types.grad_accum_dtype (ZeRO-1 then accumulates in bf16) or fix the temperature")
    checkpointing = getattr(args, "activation_checkpointing", 0) or 0
    if checkpointing < 0:
        raise ValueError(f"--activation-checkpointing {checkpointing}: use 0 (off), 1 (every block) or k (every k-th "
                         "block)")
    keep = getattr(args, "keep_checkpoints", None)
    if keep is not None and keep < 1:
        raise ValueError(f"--keep-checkpoints {keep}: must be >= 1 (the checkpoint just saved is always kept); "
                         "leave it out to keep every checkpoint")
    if stages > 1 and checkpointing:
        raise ValueError("--activation-checkpointing applies to the ZeRO path; a pipeline checkpoints its layers with "
                         "the DeepSpeed config's pipeline.activation_checkpoint_interval")
    if stages > 1 and not objective.spec.pipeline:
        raise ValueError(f"--objective {objective.name} with pipeline.stages={stages}: the pipeline engine passes one "
                         "image and one caption batch through the towers' stages, and this objective needs two views "
                         "per modality" + (" and layers shared by both towers" if objective.name == "cookie" else "") +
                         "; drop the DeepSpeed config's pipeline section (ZeRO-3 scales it) or use --objective brivl|clip")
    if stages > 1:
        from wenlan.parallel.pipeline import check_stages, partition_method

        check_stages(model, objective, stages, partition_method(ds))
    data_parallel_size = world_size // stages  # each pipeline holds one model replica
    batch = batch_from_deepspeed(ds, data_parallel_size)
    batch.pipeline_stages = stages
    if objective.uses_momentum:
        objective.validate_batch(batch.global_batch, data_parallel_size)
    if not (Path(args.tokenizer) / "tokenizer_config.json").is_file():
        raise ValueError(f"--tokenizer: {args.tokenizer!r} is not a Hugging Face tokenizer directory "
                         "(no tokenizer_config.json); `make demo-data` writes data/demo/tokenizer")
    _check_shards("--train-shards", args.train_shards)
    _check_shards("--val-shards", args.val_shards)
    streams = args.data_streams or _resumed_streams(args) or \
        default_streams(data_parallel_size, args.num_workers, batch.global_batch)
    try:
        urls = expand_shards(args.train_shards)
        counts = shard_counts(urls)  # the index beside the shards, if any: checked before any process starts
        check_train_layout(len(urls), streams, data_parallel_size, batch.global_batch,
                           nonempty=sum(n > 0 for n in counts.samples) if counts is not None else None)
    except ValueError as err:
        raise ValueError(f"--train-shards / --data-streams: {err}") from None
    # Proportional: a 200,000-step run at global batch 4,096 warms up over 20,000 steps, as large
    # contrastive runs do; the demo's 800 steps over 80.
    lr_warmup_steps = args.max_steps // 10 if args.warmup_steps is None else args.warmup_steps
    return TrainConfig(
        preset=args.preset, model=model, objective=objective, batch=batch, deepspeed_config=ds,
        tokenizer=args.tokenizer, train_shards=list(args.train_shards), val_shards=list(args.val_shards),
        output_dir=args.output_dir, max_steps=args.max_steps, seed=args.seed,
        lr_warmup_steps=lr_warmup_steps,
        eval_every=args.eval_every, save_every=args.save_every, log_every=args.log_every,
        num_workers=args.num_workers, data_streams=streams, color_augment=not args.no_color_augment, resume=args.resume,
        mlflow_uri=args.mlflow_uri, mlflow_experiment=args.mlflow_experiment, init_from=init_from,
        log_model=getattr(args, "log_model", False),
        activation_checkpointing=checkpointing, keep_checkpoints=keep, image_views=image_views,
        cut_depth=depth, attention_layers=attention)
