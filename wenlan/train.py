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
    p.add_argument("--preset", required=True, help="tiny | base | 1b | 10b | brivl-1.0")
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


def run(cfg: TrainConfig) -> dict:
    import deepspeed
    import torch.distributed as dist

    from wenlan.data.pipeline import DataConfig, make_train_loader
    from wenlan.data.tokenizer import load_tokenizer
    from wenlan.evaluate import evaluate, format_table
    from wenlan.losses.objective import ContrastivePretraining, caption_ids
    from wenlan.losses.queue import gather_keys
    from wenlan.models.brivl import BriVL, momentum_update
    from wenlan.parallel import checkpoint as ckpt
    from wenlan.parallel.engine import build_engine, zero_stage
    from wenlan.tracking import Tracker

    deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    out = Path(cfg.output_dir)
    checkpoint_dir = out / "checkpoints"
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(out / "config.json", cfg.to_dict())

    tokenizer = load_tokenizer(cfg.tokenizer)
    if len(tokenizer) > cfg.model.text.vocab_size and not cfg.model.text.pretrained_path:
        raise ValueError(f"--tokenizer has {len(tokenizer)} tokens but preset {cfg.preset!r} has "
                         f"text.vocab_size={cfg.model.text.vocab_size}; use a smaller vocabulary or a larger preset")

    # The same seed on every rank: identical initial weights everywhere.
    seed_everything(cfg.seed)
    model = BriVL(cfg.model, momentum=cfg.objective.name == "brivl")
    if model.momentum_image_tower is not None:
        momentum_update(model, 0.0)  # momentum towers start as copies of the online towers
    module = ContrastivePretraining(model, cfg.objective)
    engine = build_engine(module, cfg)
    device = engine.device
    # bf16 configs cast the module's weights; images must follow (token ids stay integers).
    image_dtype = next(module.model.image_tower.parameters()).dtype

    step, samples_seen, restarts = 0, 0, 0
    where = ckpt.resolve_resume(cfg.resume, checkpoint_dir)
    if where is not None:
        state = ckpt.load(engine, where)
        step, samples_seen, restarts = state["step"], state["samples_seen"], state.get("restarts", 0) + 1
        if is_main:
            log.info("resumed from %s/%s at step %d", where[0], where[1], step)
    # Each rank augments differently; a resumed run draws a fresh (still seeded) sequence.
    seed_everything(cfg.seed * 100003 + rank * 1009 + step)

    data_cfg = DataConfig(shards=cfg.train_shards, batch_size=cfg.batch.micro_batch,
                          image_size=cfg.model.image.image_size, max_text_len=cfg.model.text.max_len,
                          num_workers=cfg.num_workers, seed=cfg.seed, color_augment=cfg.color_augment)
    # Data position: the stream restarts at an epoch numbered by the step, so a resumed run does not
    # replay the batches it already trained on.
    batches = iter(make_train_loader(data_cfg, tokenizer, rank=rank, world_size=world, epoch_offset=step))

    tracker = Tracker(is_main, out, cfg.mlflow_uri, cfg.mlflow_experiment, run_name=out.name)
    tracker.log_params(cfg.to_dict())
    tracker.log_metrics({"restarts": restarts}, step=step)
    if is_main:
        tracker.log_dict(cfg.deepspeed_config, "deepspeed_config.json")
        log.info("preset %s, objective %s, ZeRO-%d, %d ranks, global batch %d, %d steps",
                 cfg.preset, cfg.objective.name, zero_stage(cfg.deepspeed_config), world,
                 cfg.batch.global_batch, cfg.max_steps)

    def run_state() -> dict:
        return dict(step=step, samples_seen=samples_seen, restarts=restarts, config=cfg.to_dict(),
                    zero_stage=zero_stage(cfg.deepspeed_config), world_size=world)

    def run_eval() -> dict:
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
    while step < cfg.max_steps:
        pending = []  # gathered keys of this step's micro-batches, enqueued after the optimizer step
        for _ in range(cfg.batch.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)
            window["data"] += time.perf_counter() - t0
            window["skipped"] += int(batch["skipped"])
            images = batch["images"].to(device, image_dtype)
            input_ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            ids = caption_ids(input_ids)
            use_queue = step >= cfg.objective.queue_warmup_steps
            loss, stats, keys = engine(images, input_ids, mask, ids, use_queue=use_queue)
            engine.backward(loss)
            engine.step()
            if keys is not None:
                pending.append(tuple(gather_keys(k) for k in keys))
            window["loss"] += loss.item()
            window["acc"] += float(stats["acc_i2t"])
            window["n"] += 1
            window["samples"] += images.shape[0] * world
        step += 1
        samples_seen += cfg.batch.global_batch
        if pending:
            momentum_update(module.model, cfg.objective.momentum_at(step, cfg.max_steps))
            module.queues.enqueue(*(torch.cat(parts) for parts in zip(*pending)))

        if step % cfg.log_every == 0 or step == cfg.max_steps:
            skipped = torch.tensor(window["skipped"], device=device)
            dist.all_reduce(skipped)  # a count, no gradient
            elapsed = time.perf_counter() - window["time"]
            logged = dict(loss=window["loss"] / window["n"], acc_i2t=window["acc"] / window["n"],
                          lr=engine.get_lr()[0], temperature=float(stats["temperature"]),
                          samples_per_s=window["samples"] / elapsed, data_wait=window["data"] / elapsed,
                          skipped_samples=int(skipped))
            if is_main:
                print(f"step {step:>6}/{cfg.max_steps}  loss {logged['loss']:.4f}  acc {logged['acc_i2t']:.3f}  "
                      f"lr {logged['lr']:.2e}  T {logged['temperature']:.4f}  "
                      f"{logged['samples_per_s']:.0f} samples/s  data-wait {100 * logged['data_wait']:.0f}%"
                      + (f"  skipped {logged['skipped_samples']}" if logged["skipped_samples"] else ""),
                      flush=True)
                tracker.log_metrics(logged, step=step)
            window = dict(time=time.perf_counter(), data=0.0, samples=0, skipped=0, loss=0.0, acc=0.0, n=0)

        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            metrics = run_eval()
        if cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps:
            ckpt.save(engine, checkpoint_dir, step, run_state())

    if not (checkpoint_dir / ckpt.tag_for(step)).exists():
        ckpt.save(engine, checkpoint_dir, step, run_state())
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
