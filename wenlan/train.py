"""Pre-train BriVL: ``deepspeed [--num_accelerators N] wenlan/train.py --deepspeed_config FILE --preset ...``

Thin wiring: config -> model -> engine -> loop. The algorithm lives in wenlan/models (towers, momentum
update) and wenlan/losses (queues, InfoNCE); everything DeepSpeed-specific in wenlan/parallel.
"""

import argparse
import logging
import os
import random
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
import torch

from wenlan.config import TrainConfig, resolve

log = logging.getLogger("wenlan.train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Pre-train BriVL with DeepSpeed.")
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (see ds_configs/)")
    p.add_argument("--preset", required=True, help="tiny | tiny-vit | base | 1b | 10b | brivl-1.0")
    p.add_argument("--tokenizer", required=True, help="Hugging Face tokenizer directory")
    p.add_argument("--train-shards", nargs="+", required=True, help="webdataset shards (brace notation ok)")
    p.add_argument("--val-shards", nargs="+", required=True)
    p.add_argument("--max-steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--resume", default="auto", help="auto (newest checkpoint in DIR), none, or a path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: only at the end)")
    p.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--objective", default="brivl", choices=["brivl", "clip"])
    p.add_argument("--mlflow-uri", default=None, help="tracking URI (default: sqlite next to --output-dir)")
    p.add_argument("--mlflow-experiment", default="wenlan")
    # Knobs beyond the command contract, with defaults from the preset.
    p.add_argument("--queue-size", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--queue-warmup-steps", type=int, default=None)
    p.add_argument("--queue-mode", choices=["replicated", "sharded"], default=None,
                   help="replicated: the whole queue on every rank (MoCo); sharded: K/N slots per rank")
    p.add_argument("--data-streams", type=int, default=None,
                   help="logical data streams, fixed for a run (default lcm(world size, 8)); the same samples "
                        "in the same order at any world size dividing it")
    p.add_argument("--warmup-steps", type=int, default=None, help="LR warm-up (default: 10%% of the run, <= 100)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--num-workers", type=int, default=1, help="data loader workers per rank")
    p.add_argument("--no-color-augment", action="store_true",
                   help="drop colour jitter and grayscale (for captions that name colours, e.g. the demo)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    return p.parse_args(argv)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_replicated(queues, step: int, group=None) -> None:
    """Replicated queues must be identical on every rank of ``group``; compare a fingerprint (two
    all-reduces of one number, no gradient) and stop loudly if they diverged, rather than train on
    inconsistent negatives."""
    import torch.distributed as dist

    fingerprint = (queues.image.double().sum() + 3 * queues.text.double().sum()
                   + (queues.ids % 1000003).double().sum() + queues.ptr + queues.filled).reshape(1)
    low, high = fingerprint.clone(), fingerprint.clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    if low.item() != high.item():
        raise RuntimeError(f"step {step}: the replicated negative queues differ between ranks "
                           f"(fingerprints {low.item()!r} .. {high.item()!r})")


def run(cfg: TrainConfig) -> dict:
    import torch.distributed as dist

    from wenlan.data.pipeline import DataConfig, make_train_loader, merge_positions
    from wenlan.data.tokenizer import load_tokenizer
    from wenlan.data.transforms import model_images
    from wenlan.evaluate import evaluate, format_table
    from wenlan.losses.objective import caption_ids
    from wenlan.losses.queue import KeyGather
    from wenlan.parallel import checkpoint as ckpt
    from wenlan.parallel.engine import build_engine, build_module, init_distributed, zero_stage
    from wenlan.parallel.momentum import MomentumEMA
    from wenlan.parallel.pipeline import build_pipeline, evaluate_pipeline, micro_batches
    from wenlan.parallel.preemption import Preemption
    from wenlan.parallel.reshard import load_portable
    from wenlan.tracking import Tracker

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    preemption = Preemption()  # USR1/SIGTERM: stop after the current step (before any DataLoader fork)
    is_main = rank == 0
    zero3 = zero_stage(cfg.deepspeed_config) == 3
    out = Path(cfg.output_dir)
    checkpoint_dir = out / "checkpoints"
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(out / "config.json", cfg.to_dict())

    tokenizer = load_tokenizer(cfg.tokenizer)
    if len(tokenizer) > cfg.model.text.vocab_size and not cfg.model.text.pretrained_path:
        raise ValueError(f"--tokenizer has {len(tokenizer)} tokens but preset {cfg.preset!r} has "
                         f"text.vocab_size={cfg.model.text.vocab_size}; use a smaller vocabulary or a larger preset")

    where = ckpt.resolve_resume(cfg.resume, checkpoint_dir)
    portable = None
    stages = cfg.batch.pipeline_stages
    if ckpt.is_portable(where):  # converted by wenlan.parallel.reshard: whole tensors, any world size
        if stages > 1:
            raise ValueError(f"--resume {where[0]}/{where[1]}: a converted checkpoint cannot be loaded into a "
                             "pipeline; resume it with a ZeRO config (no pipeline section)")
        portable = torch.load(Path(where[0]) / where[1] / ckpt.PORTABLE, map_location="cpu", weights_only=False)
    # The same seed on every rank: identical initial weights everywhere.
    seed_everything(cfg.seed)
    pipe_stage, dp_rank, dp_group = 0, rank, None
    if stages > 1:
        # Pipeline: this rank holds one stage's layers; the queues and loss live on the last stage.
        pipe, objective, pairs, (pipe_stage, dp_rank, dp_group) = build_pipeline(cfg, stages)
        engine = build_engine(pipe, cfg)
        queues = objective.queues if objective is not None else None
    else:
        module = build_module(cfg, portable["weights"] if portable else None)
        engine = build_engine(module, cfg)
        queues = module.queues
        pairs = [("model." + name, p, q) for name, p, q in module.model.named_momentum_pairs()] \
            if module.model.momentum_image_tower is not None else []
    last_stage = pipe_stage == stages - 1
    reads_data = pipe_stage in (0, stages - 1)  # DeepSpeed feeds inputs to the first stage, labels to the last
    dp_world = cfg.batch.world_size
    # The queues hold keys in fp32 whatever the weights' dtype (zero.Init creates bf16 tensors in bf16 runs).
    if queues is not None:
        queues.float()
    ema = None
    if pairs:
        ema = MomentumEMA(pairs)
        ema.update(0.0)  # momentum towers start as copies of the online towers
    gather = KeyGather()
    device = engine.device
    # bf16 configs cast the module's weights; images must follow (token ids stay integers).
    image_dtype = next(engine.module.parameters()).dtype

    step, samples_seen, restarts, data_position = 0, 0, 0, None
    seed_everything(cfg.seed * 100003 + rank * 1009)  # dropout etc. differ between ranks
    state = None
    if portable is not None:
        state = load_portable(engine, module, ema, portable)
        # per-rank RNG states do not carry over to another world size: reseed them by the step
        seed_everything(cfg.seed * 100003 + rank * 1009 + state["step"])
    elif where is not None:
        state, rank_state = ckpt.load(engine, where, stages)
        ckpt.restore_rng(rank_state["rng"])
        if ema is not None:
            ema.load_state_dict(rank_state["momentum_masters"])
        if queues is not None:
            queues.load_state(rank_state["queues"])
    if state is not None:
        step, samples_seen, restarts = state["step"], state["samples_seen"], state.get("restarts", 0) + 1
        data_position = state.get("data_position")  # older checkpoints: the streams start over
        if is_main:
            log.info("resumed from %s%s/%s at step %d on %d ranks", "converted checkpoint " if portable else "",
                     where[0], where[1], step, world)

    data_cfg = DataConfig(shards=cfg.train_shards, image_size=cfg.model.image.image_size,
                          max_text_len=cfg.model.text.max_len, num_workers=cfg.num_workers, seed=cfg.seed,
                          color_augment=cfg.color_augment, streams=cfg.data_streams)
    # Each step's batch is this rank's contiguous slice of the global batch, the same samples at any
    # world size; a resumed run continues at the exact position the checkpoint recorded.
    batches = iter(make_train_loader(data_cfg, tokenizer, rank=dp_rank, world_size=dp_world,
                                     global_batch=cfg.batch.global_batch, position=data_position)) \
        if reads_data else None

    tracker = Tracker(is_main, out, cfg.mlflow_uri, cfg.mlflow_experiment, run_name=out.name)
    tracker.log_params(cfg.to_dict())
    tracker.log_metrics({"restarts": restarts}, step=step)
    if is_main:
        tracker.log_dict(cfg.deepspeed_config, "deepspeed_config.json")
        layout = f" ({stages} pipeline stages x {dp_world} data-parallel)" if stages > 1 else ""
        log.info("preset %s, objective %s, ZeRO-%d, %d ranks%s, global batch %d, %d steps", cfg.preset,
                 cfg.objective.name, zero_stage(cfg.deepspeed_config), world, layout, cfg.batch.global_batch,
                 cfg.max_steps)

    def save() -> None:
        positions = [None] * world
        dist.all_gather_object(positions, data_position or {})  # a small dict per rank, no gradient
        run_state = dict(step=step, samples_seen=samples_seen, restarts=restarts, config=cfg.to_dict(),
                         zero_stage=zero_stage(cfg.deepspeed_config), world_size=world,
                         pipeline_stages=stages, data_position=merge_positions(positions))
        # State equal on the data-parallel ranks of a stage is written by the stage's first rank only.
        replicated = queues is not None and queues.num_shards == 1
        rank_state = dict(rng=ckpt.capture_rng(), shared_from=rank - dp_rank,
                          # ZeRO-3: this rank's partitions; otherwise whole tensors of this rank's layers.
                          momentum_masters=(ema.state_dict() if ema else {}) if zero3 or dp_rank == 0 else None,
                          queues=queues.state() if queues is not None and (dp_rank == 0 or not replicated)
                          else None)
        ckpt.save(engine, checkpoint_dir, step, run_state, rank_state)

    def run_eval() -> dict:
        if stages > 1:
            metrics = evaluate_pipeline(engine, cfg, tokenizer, image_dtype)
        else:
            metrics = evaluate(module.model, cfg.val_shards, tokenizer, cfg.model.image.image_size,
                               cfg.model.text.max_len)
        if is_main:
            ckpt.write_json(out / "eval.json", metrics)
            print(f"[eval step {step}]\n{format_table(metrics)}", flush=True)
            tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=step)
            tracker.log_artifact(out / "eval.json")
        return metrics

    window = dict(time=time.perf_counter(), data=0.0, samples=0, skipped=0, loss=0.0, acc=0.0, n=0)
    metrics = {}
    engine.train()
    micro = cfg.batch.micro_batch
    while step < cfg.max_steps:
        t0 = time.perf_counter()
        batch = next(batches) if reads_data else None  # this rank's share of the step: grad_accum micro-batches
        window["data"] += time.perf_counter() - t0
        if pipe_stage == 0:  # the last stage reads the same samples: count them once
            window["skipped"] += sum(batch["skipped"].values())
        use_queue = step >= cfg.objective.queue_warmup_steps
        if stages > 1:
            if objective is not None:
                objective.use_queue = use_queue
            loss = engine.train_batch(micro_batches(batch, micro, image_dtype, device) if reads_data else None)
            window["loss"] += loss.item() * cfg.batch.grad_accum  # the mean over the step's micro-batches
            window["n"] += cfg.batch.grad_accum
            if objective is not None:
                window["acc"] += sum(float(s["acc_i2t"]) for s in objective.stats)
                stats = dict(temperature=objective.stats[-1]["temperature"])
                objective.stats.clear()
                if cfg.objective.name == "brivl":
                    objective.gather.launch()
        for i in range(cfg.batch.grad_accum if stages == 1 else 0):
            part = slice(i * micro, (i + 1) * micro)
            images = model_images(batch["images"][part], batch["colour_maps"][part], device, image_dtype)
            input_ids, mask = batch["input_ids"][part].to(device), batch["attention_mask"][part].to(device)
            ids = caption_ids(input_ids)
            loss, stats, keys = engine(images, input_ids, mask, ids, use_queue=use_queue)
            if keys is not None:
                gather.add(*keys)
                if i == cfg.batch.grad_accum - 1:
                    gather.launch()  # all-gather of the step's keys runs during the last backward
            engine.backward(loss)
            engine.step()
            window["loss"] += loss.item()
            window["acc"] += float(stats["acc_i2t"])
            window["n"] += 1
        window["samples"] += cfg.batch.global_batch
        step += 1
        samples_seen += cfg.batch.global_batch
        data_position = batch["position"] if reads_data else None
        if ema is not None:
            ema.update(cfg.objective.momentum_at(step, cfg.max_steps))
        if queues is not None:  # after the optimizer step: the loss graph used the old queue
            queues.enqueue(*(objective.gather if stages > 1 else gather).wait())

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            # Counts and the last stage's accuracy and temperature to every rank (no gradient).
            totals = torch.tensor([window["skipped"], window["acc"] if last_stage else 0.0,
                                   float(stats["temperature"]) if last_stage else 0.0, float(last_stage)],
                                  dtype=torch.float64, device=device)
            dist.all_reduce(totals)
            if queues is not None and queues.num_shards == 1:
                check_replicated(queues, step, dp_group)
            elapsed = time.perf_counter() - window["time"]
            last_ranks = totals[3].item()
            logged = dict(loss=window["loss"] / window["n"], acc_i2t=totals[1].item() / last_ranks / window["n"],
                          lr=engine.get_lr()[0], temperature=totals[2].item() / last_ranks,
                          samples_per_s=window["samples"] / elapsed, data_wait=window["data"] / elapsed,
                          skipped_samples=int(totals[0].item()))
            grad_norm = engine.get_global_grad_norm()  # before clipping; ZeRO-0 engines do not record it
            if grad_norm is not None:
                logged["grad_norm"] = float(grad_norm)
            if is_main:
                grad = f"grad-norm {logged['grad_norm']:.3g}  " if "grad_norm" in logged else ""
                print(f"step {step:>6}/{cfg.max_steps}  loss {logged['loss']:.4f}  acc {logged['acc_i2t']:.3f}  "
                      f"lr {logged['lr']:.2e}  {grad}T {logged['temperature']:.4f}  "
                      f"{logged['samples_per_s']:.0f} samples/s  data-wait {100 * logged['data_wait']:.0f}%"
                      + (f"  skipped {logged['skipped_samples']}" if logged["skipped_samples"] else ""),
                      flush=True)
                tracker.log_metrics(logged, step=step)
            window = dict(time=time.perf_counter(), data=0.0, samples=0, skipped=0, loss=0.0, acc=0.0, n=0)

        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            metrics = run_eval()
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            save()
        if step < cfg.max_steps and preemption.should_stop(device):  # all ranks stop after the same step
            break

    if ckpt.tag_for(step) not in ckpt.complete_tags(checkpoint_dir):
        save()
    if step < cfg.max_steps:  # pre-empted: saved; the batch script requeues the job
        tracker.close()
        preemption.exit(step)
    metrics = run_eval()
    tracker.close()
    dist.barrier()
    return metrics


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        cfg = resolve(args)  # fails fast, before any process group starts
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    run(cfg)


if __name__ == "__main__":
    main()
