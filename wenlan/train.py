"""Pre-train BriVL: ``deepspeed [--num_accelerators N] wenlan/train.py --deepspeed_config FILE --preset ...``

Thin wiring: config -> model -> engine -> loop. The algorithm lives in wenlan/models (towers, momentum
update) and wenlan/losses (queues, InfoNCE); everything DeepSpeed-specific in wenlan/parallel.
"""

import argparse
import logging
import math
import sys
import time
import warnings
from collections import Counter
from functools import partial
from pathlib import Path

if __package__ in (None, ""):  # run as a script by the deepspeed launcher
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from wenlan.config import TrainConfig, resolve

log = logging.getLogger("wenlan.train")
DIVERGED_EXIT = 3
"""Exit status of a run stopped by a non-finite loss; not the pre-emption status, so Slurm does not requeue it."""


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
    p.add_argument("--objective", default="brivl", choices=["brivl", "clip", "ernie-vil2", "cookie"])
    p.add_argument("--mlflow-uri", default=None, help="tracking URI (default: sqlite next to --output-dir)")
    p.add_argument("--mlflow-experiment", default="wenlan")
    p.add_argument("--log-model", action="store_true",
                   help="at the end, export the online towers (wenlan.export) and log the file to the MLflow run")
    # Knobs beyond the command contract, with defaults from the preset.
    p.add_argument("--queue-size", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--momentum", type=float, default=None)
    p.add_argument("--queue-warmup-steps", type=int, default=None)
    p.add_argument("--queue-mode", choices=["replicated", "sharded"], default=None,
                   help="replicated: the whole queue on every rank (MoCo); sharded: K/N slots per rank")
    p.add_argument("--data-streams", type=int, default=None,
                   help="logical data streams, fixed for a run (default: a multiple of lcm(world size, 8) with a "
                        "stream per worker of every rank); the same samples "
                        "in the same order at any world size dividing it")
    p.add_argument("--warmup-steps", type=int, default=None, help="LR warm-up steps (default: 10%% of --max-steps)")
    p.add_argument("--log-every", type=int, default=20)
    p.add_argument("--num-workers", type=int, default=1, help="data loader workers per rank")
    p.add_argument("--no-color-augment", action="store_true",
                   help="drop colour jitter and grayscale (for captions that name colours, e.g. the demo)")
    p.add_argument("--activation-checkpointing", type=int, default=0, metavar="K",
                   help="recompute every K-th block of each tower in the backward (0: off, 1: every block)")
    p.add_argument("--init-from", default=None, metavar="FILE",
                   help="start the towers from a wenlan.export / wenlan.convert .safetensors (a fresh run only)")
    p.add_argument("--freeze", nargs="+", default=None, metavar="PATTERN",
                   help="freeze online parameters whose names match these globs, e.g. 'text_tower.bert.*'")
    p.add_argument("--keep-checkpoints", type=int, default=None, metavar="N",
                   help="after each save keep the N newest complete checkpoints, delete older ones (default: all)")
    p.add_argument("--image-views", type=int, default=None, choices=[1, 2],
                   help="image views per sample (default: 2 for ernie-vil2 and cookie, 1 otherwise)")
    p.add_argument("--shared-layers", type=int, default=None,
                   help="cookie: layers of the transformer shared by both towers (default 1)")
    p.add_argument("--multiview-queue", action="store_true",
                   help="ernie-vil2: momentum towers and negative queues as extra negatives (--queue-size etc.)")
    p.add_argument("--cut-depth", type=int, default=None, metavar="N",
                   help="the preset's widths with N ViT blocks and N BERT layers: a smoke run of a big preset's "
                        "shapes on a few devices (ViT presets)")
    p.add_argument("--attention-layers", type=int, default=None, metavar="M",
                   help="self-attention layers per tower on the backbone's tokens (default: the preset's)")
    p.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    return p.parse_args(argv)


class StepLog:
    """The step line and its MLflow metrics. Host-side counters per log window (time, data wait,
    samples, skipped) and the strategy's phase times (``wenlan.throughput``); the loss totals stay on
    the device until a log step, where one all-reduce over every rank (no gradient) gives the
    data-parallel means."""

    def __init__(self, cfg, strategy, tracker, flops_per_sample: float, peak_tflops: float | None):
        self.cfg, self.strategy, self.tracker = cfg, strategy, tracker
        self.flops_per_sample, self.peak_tflops = flops_per_sample, peak_tflops
        self._reset()

    def _reset(self) -> None:
        self.start, self.data_wait, self.samples, self.skipped = time.perf_counter(), 0.0, 0, 0
        self.skip_reasons: Counter = Counter()

    def losses_finite(self) -> bool:
        """Whether every loss since the last log line was finite, agreed by every rank (a one-element
        all-reduce, no gradient; the totals stay for the log line)."""
        import torch.distributed as dist

        totals = self.strategy.peek_totals()
        bad = (~torch.isfinite(totals[:1])).float()
        dist.all_reduce(bad)
        return bad.item() == 0

    def count(self, batch: dict | None, data_wait: float) -> None:
        self.data_wait += data_wait
        self.samples += self.cfg.batch.global_batch
        if self.strategy.stage == 0 and batch is not None:  # the last stage reads the same samples: once
            self.skipped += sum(batch["skipped"].values())
            self.skip_reasons.update(batch["skipped"])

    def log(self, step: int) -> bool:
        """The step line and metrics; False if a loss since the last log line was not finite."""
        import torch.distributed as dist

        from wenlan.throughput import SHORT, peak_memory_bytes, throughput

        engine = self.strategy.engine
        phases = self.strategy.timer.take()  # this rank's; synchronises the device once on GPUs
        peak_memory = peak_memory_bytes(engine.device)
        totals = torch.cat([self.strategy.take_totals().double(),
                            torch.tensor([self.skipped], dtype=torch.float64, device=engine.device)])
        dist.all_reduce(totals)  # the objective's sums (TOTALS_FIELDS; last stage), skipped samples; no gradient
        loss, loss_i2t, loss_t2i, acc, temperature, n, skipped = totals.tolist()
        if peak_memory is not None:  # the fullest device is the one that matters; no gradient
            peak = torch.tensor([peak_memory], dtype=torch.float64, device=engine.device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            peak_memory = peak.item()
        self.strategy.check_queues(step)
        elapsed = time.perf_counter() - self.start
        logged = dict(loss=loss / n, loss_i2t=loss_i2t / n, loss_t2i=loss_t2i / n, acc_i2t=acc / n,
                      lr=engine.get_lr()[0], temperature=temperature / n,
                      samples_per_s=self.samples / elapsed, data_wait=self.data_wait / elapsed,
                      skipped_samples=int(skipped),
                      **throughput(self.flops_per_sample, self.samples, elapsed, dist.get_world_size(),
                                   self.peak_tflops),
                      **{f"time/{name}": seconds / elapsed for name, seconds in phases.items()})
        if peak_memory is not None:
            logged["peak_memory_gb"] = peak_memory / 2**30
        if skipped:  # rare: then every rank's reasons as host objects (no gradient), logged as skipped/<reason>
            per_rank = [None] * dist.get_world_size()
            dist.all_gather_object(per_rank, dict(self.skip_reasons))
            reasons = sum(map(Counter, per_rank), Counter())
            logged.update({f"skipped/{reason.replace(' ', '_')}": n for reason, n in reasons.items()})
        queues = self.strategy.queues  # None without queues, and on pipeline stages without the loss
        if queues is not None:  # host-side counters, the same on every rank
            logged["queue_fill"] = min(queues.filled, queues.size) / queues.size
        grad_norm = self.strategy.grad_norm()  # before clipping
        if grad_norm is not None:
            logged["grad_norm"] = float(grad_norm)
        if dist.get_rank() == 0:
            grad = f"grad-norm {logged['grad_norm']:.3g}  " if "grad_norm" in logged else ""
            rate = logged["samples_per_s"]
            rate = f"{rate:.0f}" if rate >= 10 else f"{rate:.2g}"  # a 10B step on few GPUs takes seconds
            speed = f"{logged['tflops_per_device']:.3g} TFLOP/s/device" \
                + (f"  MFU {100 * logged['mfu']:.1f}%" if "mfu" in logged else "")
            shares = [("data_wait", logged["data_wait"])] + [(name, logged[f"time/{name}"]) for name in phases
                                                             if phases[name] or name == "forward_backward"]
            time_line = " ".join(f"{SHORT[name]} {100 * share:.0f}%" for name, share in shares)
            memory = f"  peak-mem {logged['peak_memory_gb']:.1f} GiB" if "peak_memory_gb" in logged else ""
            print(f"step {step:>6}/{self.cfg.max_steps}  loss {logged['loss']:.4f}  acc {logged['acc_i2t']:.3f}  "
                  f"lr {logged['lr']:.2e}  {grad}T {logged['temperature']:.4f}  "
                  f"{rate} samples/s  {speed}  time: {time_line}{memory}"
                  + (f"  skipped {logged['skipped_samples']}" if logged["skipped_samples"] else ""), flush=True)
            self.tracker.log_metrics(logged, step=step)
        self._reset()
        return math.isfinite(loss)


def train_batches(cfg: TrainConfig, tokenizer, strategy, position: dict | None):
    """This rank's step batches: its contiguous slice of every global batch, the same samples at any
    world size; a resumed run continues at the exact position its checkpoint recorded."""
    from wenlan.data.pipeline import DataConfig, make_train_loader

    data = DataConfig(shards=cfg.train_shards, image_size=cfg.model.image.image_size,
                      max_text_len=cfg.model.text.max_len, num_workers=cfg.num_workers, seed=cfg.seed,
                      color_augment=cfg.color_augment, streams=cfg.data_streams, views=cfg.image_views == 2,
                      pin_memory=strategy.device.type == "cuda")
    return iter(make_train_loader(data, tokenizer, rank=strategy.data_parallel_rank,
                                  world_size=cfg.batch.data_parallel_size, global_batch=cfg.batch.global_batch,
                                  position=position))


def run_tags(cfg: TrainConfig, world_size: int) -> dict:
    """What ran where, as MLflow tags: what groups the runs of an ablation (preset, objective, seed,
    strategy) and what tells them apart (code version, world size, Slurm job)."""
    import os
    import subprocess

    from wenlan.parallel.engine import zero_stage

    batch = cfg.batch
    strategy = (f"pipeline {batch.pipeline_stages} stages x {batch.data_parallel_size} data-parallel"
                if batch.pipeline_stages > 1 else f"ZeRO-{zero_stage(cfg.deepspeed_config)}")
    tags = {"wenlan.preset": cfg.preset + shape_change(cfg), "wenlan.objective": cfg.objective.name, "wenlan.seed": cfg.seed,
            "wenlan.strategy": strategy, "wenlan.world_size": world_size, "wenlan.global_batch": batch.global_batch}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):  # no git here: the tag is left out
        pass
    for env, tag in (("SLURM_JOB_ID", "slurm.job_id"), ("SLURM_ARRAY_JOB_ID", "slurm.array_job_id"),
                     ("SLURM_ARRAY_TASK_ID", "slurm.array_task_id"), ("SLURM_RESTART_COUNT", "slurm.restart_count")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def shape_change(cfg: TrainConfig) -> str:
    """What --cut-depth / --attention-layers changed in the preset, for the log and the run's tags."""
    changes = ([f"depth {cfg.cut_depth}"] if cfg.cut_depth is not None else []) + \
        ([f"{cfg.attention_layers} attention layers"] if cfg.attention_layers is not None else [])
    return f" ({', '.join(changes)})" if changes else ""


def describe(cfg: TrainConfig, world_size: int) -> str:
    from wenlan.parallel.engine import zero_stage

    batch = cfg.batch
    layout = f" ({batch.pipeline_stages} pipeline stages x {batch.data_parallel_size} data-parallel)" \
        if batch.pipeline_stages > 1 else ""
    k = cfg.activation_checkpointing
    checkpointing = "" if not k else f", activation checkpointing every {'' if k == 1 else f'{k}-th '}block"
    return (f"preset {cfg.preset}{shape_change(cfg)}, objective {cfg.objective.name}, ZeRO-{zero_stage(cfg.deepspeed_config)}, "
            f"{world_size} ranks{layout}, global batch {batch.global_batch}, {cfg.max_steps} steps{checkpointing}")


def describe_weights(cfg: TrainConfig, resumed: bool) -> str:
    """Where the weights start and what trains (counted on the meta device)."""
    from transformers.initialization import no_init_weights

    from wenlan.models.brivl import BriVL, frozen_summary

    with torch.device("meta"), no_init_weights():
        model = BriVL(cfg.model, momentum=False)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if resumed:
        start = "weights from the checkpoint" + (f" (--init-from {cfg.init_from} not used: resuming)"
                                                 if cfg.init_from else "")
    else:
        start = f"towers from --init-from {cfg.init_from}" if cfg.init_from else f"towers initialised from seed {cfg.seed}"
    return (f"{start}; {trainable / 1e6:.2f} M of {total / 1e6:.2f} M online parameters train; "
            f"frozen: {frozen_summary(model)}")


def training_flops(cfg: TrainConfig, device, log_it: bool) -> tuple[float, float | None]:
    """FLOPs of one training sample of this run (its objective at its batch layout) and the device's
    peak bf16 TFLOP/s (None: unknown, MFU is not reported)."""
    from wenlan.models.flops import peak_tflops, train_flops_per_sample
    from wenlan.throughput import device_name

    flops = train_flops_per_sample(cfg.model, cfg.objective, cfg.batch.micro_batch, cfg.batch.data_parallel_size)
    name = device_name(device)
    peak = peak_tflops(name)
    if log_it:
        log.info("%.4g GFLOP per training sample; %s: %s", flops / 1e9, name,
                 f"peak {peak:g} bf16 TFLOP/s for MFU" if peak else "no peak known, MFU not reported")
    return flops, peak


def run(cfg: TrainConfig) -> dict:
    import torch.distributed as dist

    from wenlan.data.pipeline import start_worker_server
    from wenlan.data.tokenizer import load_tokenizer
    from wenlan.eval_picture import retrieval_picture
    from wenlan.evaluate import format_table
    from wenlan.parallel import checkpoint as ckpt
    from wenlan.parallel.engine import init_distributed
    from wenlan.parallel.preemption import Preemption
    from wenlan.parallel.strategy import build_strategy
    from wenlan.tracking import Tracker

    init_distributed()
    control = dist.new_group(backend="gloo")  # host-side decisions and agreements: never wait on the device
    rank, out = dist.get_rank(), Path(cfg.output_dir)
    preemption = Preemption(control)  # USR1/SIGTERM: stop after a step (before any DataLoader fork)
    tokenizer = load_tokenizer(cfg.tokenizer, vocab_size=None if cfg.model.text.pretrained_path else
                               cfg.model.text.vocab_size)
    checkpointer = ckpt.Checkpointer(cfg, control)  # rank 0 decides whether and from where to resume
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(out / "config.json", cfg.to_dict())
    if cfg.num_workers:
        start_worker_server()  # the train loader's workers fork from it, not from this process once it is big
    ckpt.seed_everything(cfg.seed)  # the same seed on every rank: identical initial weights everywhere
    strategy = build_strategy(cfg, checkpointer.portable_weights)
    ckpt.seed_everything(cfg.seed * 100003 + rank * 1009)  # dropout etc. differ between ranks
    progress = checkpointer.restore(strategy)
    batches = train_batches(cfg, tokenizer, strategy, progress.data_position) if strategy.reads_data else None
    tracker = Tracker(rank == 0, out, cfg.mlflow_uri, cfg.mlflow_experiment, run_name=out.name)
    tracker.start(cfg, progress.restarts, progress.step, run_tags(cfg, dist.get_world_size()))
    if rank == 0:
        log.info(describe(cfg, dist.get_world_size()))
        log.info(describe_weights(cfg, resumed=progress.step > 0))

    def evaluate() -> dict:
        examples = [] if rank == 0 else None  # the picture's images and their top captions (rank 0 logs it)
        with strategy.timer.phase("eval"):
            metrics = strategy.evaluate(tokenizer, examples)
        if rank == 0:
            ckpt.write_json(out / "eval.json", metrics)
            table = format_table(metrics)
            print(f"[eval step {progress.step}]\n{table}", flush=True)
            tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=progress.step)
            tracker.log_artifact(out / "eval.json")
            tracker.log_dict(metrics, f"eval/step-{progress.step:08d}.json")  # every evaluation's, kept
            tracker.log_text(table + "\n", f"eval/step-{progress.step:08d}.txt")
            if examples:  # drawn on the tracker's thread
                tracker.log_image(partial(retrieval_picture, examples, progress.step), "retrieval", progress.step)
        return metrics

    steps = StepLog(cfg, strategy, tracker, *training_flops(cfg, strategy.device, rank == 0))

    def stop_if_diverged(healthy: bool) -> None:
        """A non-finite loss (NaN sums stay NaN, so no step of the window escapes) stops the run on every
        rank before anything is saved: no checkpoint holds weights that already gave one."""
        if healthy:
            return
        if rank == 0:
            newest = f"step {checkpointer.last_saved_step}" if checkpointer.last_saved_step else "none"
            print(f"error: non-finite loss at step {progress.step} or in a step since the last log line; stopping "
                  f"without saving. The newest checkpoint ({newest}) was saved before it: resume from it, or from an "
                  "earlier one (--resume PATH) if the weights were already diverging, with a lower learning rate "
                  "or other data.", flush=True)
            tracker.close(status="FAILED")
        preemption.finish()
        dist.barrier()  # no gradient; every rank has stopped training
        sys.exit(DIVERGED_EXIT)

    def train_and_evaluate() -> dict:
        strategy.engine.train()
        while progress.step < cfg.max_steps:
            t0 = time.perf_counter()
            batch = next(batches) if batches is not None else None  # this rank's grad_accum micro-batches
            data_wait = time.perf_counter() - t0
            strategy.train_step(batch, use_queue=progress.step >= cfg.objective.queue_warmup_steps)
            progress.advance(batch, cfg.batch.global_batch)
            strategy.after_step(cfg.objective.momentum_at(progress.step, cfg.max_steps))
            steps.count(batch, data_wait)
            if progress.step % cfg.log_every == 0 or progress.step == cfg.max_steps:
                stop_if_diverged(steps.log(progress.step))
            if cfg.eval_every and progress.step % cfg.eval_every == 0 and progress.step < cfg.max_steps:
                evaluate()
            if cfg.save_every and progress.step % cfg.save_every == 0 and progress.step < cfg.max_steps:
                stop_if_diverged(steps.losses_finite())
                checkpointer.save(strategy, progress)
            if progress.step < cfg.max_steps and preemption.should_stop():  # all ranks stop after the same step
                break
        preemption.finish()
        if checkpointer.last_saved_step != progress.step:
            stop_if_diverged(steps.losses_finite())
            checkpointer.save(strategy, progress)
        if progress.step < cfg.max_steps:  # pre-empted: saved; the batch script requeues the job
            tracker.close(status="KILLED")
            preemption.exit(progress.step)
        metrics = evaluate()
        if cfg.log_model and rank == 0:
            from wenlan.export import export

            model_file = out / "model.safetensors"
            export(out / "checkpoints", model_file)
            tracker.log_file(model_file, "model")
            tracker.log_file(model_file.with_suffix(".json"), "model")
        tracker.close(timeout=1800 if cfg.log_model else None)  # an upload of the model may take minutes
        dist.barrier()
        return metrics

    try:
        return train_and_evaluate()
    except Exception:
        tracker.close(status="FAILED")  # the run's end in MLflow; the exception still ends the process
        raise


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    # DeepSpeed 0.19 calls torch's old collective names every step; torch 2.14 warns each time.
    for old in ("all_gather_into_tensor", "reduce_scatter_tensor"):
        warnings.filterwarnings("ignore", message=rf"`torch\.distributed\.{old}` is deprecated", category=FutureWarning)
    args = parse_args(argv)
    try:
        cfg = resolve(args)  # fails fast, before any process group starts
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    run(cfg)


if __name__ == "__main__":
    main()
