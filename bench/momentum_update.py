"""The momentum (EMA) update's share of a training step under ZeRO-3 on 2 ranks, for the ~47M-parameter
model of bench/zero3_memory.py: the multi-tensor update (wenlan.parallel.momentum.MomentumEMA) next to
the per-parameter loop it replaced, timed in alternation in one run.

    DS_ACCELERATOR=cpu .venv/bin/python bench/momentum_update.py [--steps 6] [--micro-batch 8] [--bf16]

Launches itself with `deepspeed --num_accelerators 2`. Each measured step is forward + backward +
optimizer step on synthetic batches; each EMA update is timed alone right after it. Prints the median
times, the EMA's share of a step (target <= 2%) and the speed-up over the loop.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def loop_update(ema, m: float) -> None:
    """The update as it was: one accessor call and two small kernels per parameter pair, then
    DeepSpeed's partition + all-gather of the whole-kept keys."""
    import torch

    with torch.no_grad():
        for (online, key), master in zip(ema.pairs, ema.masters):
            source = ema._online_fp32(online).view(-1)
            target = ema._local(key).view(-1)
            if master is None:
                target.mul_(m).add_(source.to(target.dtype), alpha=1.0 - m)
            else:
                master.view(-1).mul_(m).add_(source.float(), alpha=1.0 - m)
                target.copy_(master.view(-1))
        if ema.persistent:  # DeepSpeed's re-gather: a collective per parameter
            ema.persistent[0].partition(ema.persistent)
            ema.persistent[0].all_gather(ema.persistent)


def measure(out_file: str, steps: int, micro: int, bf16: bool) -> None:
    import torch
    import torch.distributed as dist

    from zero3_memory import model_config
    from wenlan.config import BatchConfig, TrainConfig
    from wenlan.losses.objective import ObjectiveConfig
    from wenlan.parallel.engine import build_engine, build_module, init_distributed
    from wenlan.parallel.momentum import MomentumEMA

    init_distributed()
    world = dist.get_world_size()
    ds = json.loads((ROOT / "ds_configs" / "cpu_tiny_zero3.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = micro
    if bf16:
        ds["bf16"] = {"enabled": True}
    cfg = TrainConfig(preset="bench", model=model_config(), objective=ObjectiveConfig(queue_size=64),
                      batch=BatchConfig(micro, 1, world), deepspeed_config=ds, tokenizer="", train_shards=[],
                      val_shards=[], output_dir="", max_steps=steps, seed=0)
    module = build_module(cfg)
    engine = build_engine(module, cfg)
    dtype = next(engine.module.parameters()).dtype
    ema = MomentumEMA([("model." + n, p, q) for n, p, q in module.model.named_momentum_pairs()])
    ema.update(0.0)
    g = torch.Generator().manual_seed(dist.get_rank())
    images = torch.randn(micro, 3, 64, 64, generator=g).to(dtype)
    ids = torch.randint(5, 60, (micro, 16), generator=g)

    def step() -> float:
        began = time.perf_counter()
        loss = engine(images, ids, torch.ones_like(ids), ids[:, 0].clone(), use_queue=False)
        engine.backward(loss)
        engine.step()
        return time.perf_counter() - began

    def timed(update) -> float:
        dist.barrier()  # no gradient; both ranks start the update together
        began = time.perf_counter()
        update(0.99)
        return time.perf_counter() - began

    step()  # warm-up: the first step allocates
    times = dict(step=[], foreach=[], loop=[], regather=[])
    for i in range(steps):
        times["step"].append(step())
        # alternate which update runs first, so that cache effects hit both
        order = (("foreach", ema.update), ("loop", lambda m: loop_update(ema, m)))
        for name, update in order if i % 2 == 0 else order[::-1]:
            times[name].append(timed(update))
        times["regather"].append(timed(lambda m: ema._regather_persistent()))
    medians = torch.tensor([statistics.median(times[k]) for k in ("step", "foreach", "loop", "regather")], dtype=torch.float64)
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)  # the slower rank sets the pace; no gradient
    if dist.get_rank() == 0:
        pairs = len(ema.pairs)
        local = sum(ema._local(k).numel() for _, k in ema.pairs)
        Path(out_file).write_text(json.dumps(dict(zip(("step", "foreach", "loop", "regather"), medians.tolist()),
                                                  pairs=pairs, local_elements=local, world=world,
                                                  persistent=len(ema.persistent))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="bf16 weights (the EMA then runs on fp32 masters)")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    args = parser.parse_args()
    if os.environ.get("WENLAN_BENCH_OUT"):
        measure(os.environ["WENLAN_BENCH_OUT"], args.steps, args.micro_batch, args.bf16)
        return
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, DS_ACCELERATOR="cpu", WENLAN_BENCH_OUT=str(out))
        proc = subprocess.run([deepspeed, "--num_accelerators", "2", "--master_port", "29641", __file__,
                               *sys.argv[1:]], env=env, capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
        r = json.loads(out.read_text())
    print(f"EMA under ZeRO-3, 2 ranks, {'bf16 weights + fp32 masters' if args.bf16 else 'fp32'}: {r['pairs']} key "
          f"parameters, {r['local_elements'] / 1e6:.1f}M elements per rank; micro-batch {args.micro_batch}, "
          f"median of {args.steps} steps")
    print(f"  step (forward + backward + optimizer): {1000 * r['step']:8.1f} ms")
    print(f"  EMA, multi-tensor:                     {1000 * r['foreach']:8.1f} ms  "
          f"= {100 * r['foreach'] / r['step']:.2f}% of the step (target <= 2%)")
    print(f"  EMA, per-parameter loop (before):      {1000 * r['loop']:8.1f} ms  "
          f"= {100 * r['loop'] / r['step']:.2f}% of the step")
    print(f"  of each, re-gathering the {r['persistent']} persistent (whole-kept) keys: {1000 * r['regather']:.1f} ms")
    print(f"  speed-up of the update: {r['loop'] / r['foreach']:.2f}x")


if __name__ == "__main__":
    main()
