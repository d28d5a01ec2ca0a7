"""Step time of the tiny preset: DeepSpeed engine (1 rank, ZeRO-0) vs a plain PyTorch loop.

Same model, objective, batch and optimizer (AdamW); batches are synthetic and held in memory so that
only the training step is timed. The two loops alternate in rounds so that machine noise hits both.
Prints the ratio engine / plain (target <= 1.10).

    DS_ACCELERATOR=cpu python bench/engine_overhead.py [--steps 20] [--rounds 3] [--batch 64]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402

from wenlan.losses.objective import ContrastivePretraining, ObjectiveConfig, caption_ids  # noqa: E402
from wenlan.models import BriVL, get_preset  # noqa: E402
from wenlan.parallel.momentum import MomentumEMA  # noqa: E402


def build(seed: int) -> ContrastivePretraining:
    torch.manual_seed(seed)
    model = BriVL(get_preset("tiny"))
    module = ContrastivePretraining(model, ObjectiveConfig(queue_size=4096))
    module.ema = MomentumEMA(list(model.named_momentum_pairs()))  # a plain attribute: not part of the state
    module.ema.update(0.0)
    return module


def batches(n: int, batch: int):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(5, 70, (batch, 32), generator=g)
        out.append((torch.randn(batch, 3, 64, 64, generator=g), ids, torch.ones_like(ids), caption_ids(ids)))
    return out


def train_step(forward, backward, step, module, batch):
    loss = forward(*batch)
    module.gather.launch()  # the trainer's order: keys gathered while the backward runs
    backward(loss)
    step()
    module.ema.update(0.99)
    module.queues.enqueue(*module.gather.wait())
    module.take_totals()


def time_steps(fn, data) -> float:
    t0 = time.perf_counter()
    for batch in data:
        fn(batch)
    return (time.perf_counter() - t0) / len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"),
                      RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    import deepspeed

    from wenlan.parallel.engine import init_distributed, param_groups

    init_distributed()
    data = batches(args.steps, args.batch)
    lr = dict(lr=1e-4, betas=(0.9, 0.98), eps=1e-6)

    plain = build(0)
    opt = torch.optim.AdamW(param_groups(plain, 0.05), **lr)

    def plain_step(batch):
        def step():
            opt.step()
            opt.zero_grad(set_to_none=True)
        train_step(plain, lambda loss: loss.backward(), step, plain, batch)

    ds_config = {"train_micro_batch_size_per_gpu": args.batch, "zero_optimization": {"stage": 0},
                 "optimizer": {"type": "AdamW", "params": {**lr, "weight_decay": 0.05, "torch_adam": True}},
                 "steps_per_print": 10**9}
    module = build(0)
    engine, *_ = deepspeed.initialize(model=module, model_parameters=param_groups(module, 0.05), config=ds_config)

    def engine_step(batch):
        train_step(engine, engine.backward, engine.step, module, batch)

    for fn in (plain_step, engine_step):  # warm-up: allocator, autograd graph caches
        time_steps(fn, data[:3])
    plain_times, engine_times = [], []
    for _ in range(args.rounds):
        plain_times.append(time_steps(plain_step, data))
        engine_times.append(time_steps(engine_step, data))
    p, e = statistics.median(plain_times), statistics.median(engine_times)
    print(f"tiny preset, batch {args.batch}, {args.steps} steps x {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")
    print(f"plain PyTorch loop : {1000 * p:8.1f} ms/step")
    print(f"DeepSpeed ZeRO-0   : {1000 * e:8.1f} ms/step")
    print(f"ratio engine/plain : {e / p:8.3f}   (target <= 1.10)")


if __name__ == "__main__":
    main()
