"""Cost of the queue manager, measured side by side in one run on 2 gloo CPU processes.

1. Queue manager time per step (key gather + enqueue + queue logits forward and backward) as a share of
   the tiny preset's step (forward + backward of ContrastivePretraining at micro-batch 64), both queue
   modes (target <= 3%).
2. The asynchronous key gather: how long the step waits for it when it is launched before the backward
   vs a blocking gather after it.
3. Queue-logits throughput as a fraction of a plain ``torch.mm`` of the same shape: the matmul as the
   loss issues it (target >= 0.9), and the whole queue scoring (matmul + duplicate mask + log-sum-exp +
   best logit).

Measurements that are compared are taken in turn within each round, and the ratio is the median over
rounds of the in-round ratio, so load that drifts between rounds cancels. Each rank runs one thread;
every number is the slower rank's.

    python bench/queue_manager.py [--rounds 8]
"""

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from wenlan.losses.infonce import queue_logsumexp  # noqa: E402
from wenlan.losses.objective import ContrastivePretraining, ObjectiveConfig, caption_ids, queue_scores  # noqa: E402
from wenlan.losses.queue import KeyGather, KeyQueues  # noqa: E402

WORLD, MICRO, QUEUE = 2, 64, 4096  # the tiny preset's queue (wenlan/config.py) at micro-batch 64


def seconds(fn, calls: int = 1) -> float:
    """Median seconds of ``calls`` calls of ``fn``."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rounds(fns: dict, n: int, calls: int = 1) -> list[dict]:
    """Each function timed in turn (median of ``calls``), ``n`` rounds after a warm-up round. The ranks
    meet before each timing, so a collective inside does not also time the other rank's lag."""
    def timed(fn):
        dist.barrier()  # no gradient; not timed
        return seconds(fn, calls)

    for fn in fns.values():
        fn()
    return [{name: timed(fn) for name, fn in fns.items()} for _ in range(n)]


def slowest(x: float) -> float:
    """The slowest rank's value: a step is as slow as its slowest rank."""
    t = torch.tensor([x])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a timing, no gradient
    return t.item()


def med(rows: list[dict], fn) -> float:
    return slowest(statistics.median(fn(row) for row in rows))


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def full_queue(mode: str, rank: int, E: int) -> KeyQueues:
    queues = KeyQueues(QUEUE, E, rank, WORLD) if mode == "sharded" else KeyQueues(QUEUE, E)
    G = WORLD * MICRO
    for step in range(QUEUE // G):
        queues.enqueue(unit(G, E, seed=step), unit(G, E, seed=10_000 + step), torch.arange(G) + G * step)
    return queues


def step_share(rank: int, n: int, out: list) -> None:
    from wenlan.models import BriVL, get_preset
    from wenlan.parallel.momentum import MomentumEMA

    torch.manual_seed(0)
    model = BriVL(get_preset("tiny"))
    MomentumEMA(list(model.named_momentum_pairs())).update(0.0)  # key towers start as copies
    E = model.cfg.embed_dim
    g = torch.Generator().manual_seed(rank)
    input_ids = torch.randint(5, 70, (MICRO, 32), generator=g)
    batch = (torch.randn(MICRO, 3, 64, 64, generator=g), input_ids, torch.ones_like(input_ids), caption_ids(input_ids))
    keys = (unit(MICRO, E, seed=3), unit(MICRO, E, seed=4), batch[3])
    img_q, txt_q = (unit(MICRO, E, seed=s).requires_grad_() for s in (1, 2))
    for mode in ("replicated", "sharded"):
        module = ContrastivePretraining(model, ObjectiveConfig(queue_size=QUEUE, queue_mode=mode))
        module.queues.load_state(full_queue(mode, rank, E).state())  # a full queue: the most logits
        scale = module.scale().detach().requires_grad_()
        queues = full_queue(mode, rank, E)

        def train_step():
            module(*batch).backward()
            module.gather.clear()  # keys are enqueued by gather_enqueue below, timed on their own

        def queue_logits():  # both directions, forward and backward, as inside the step
            lse, _ = queue_scores(img_q, txt_q, batch[3], module.queues, scale, True)
            lse.sum().backward()

        def gather_enqueue():
            gather = KeyGather()
            gather.add(*keys)
            gather.launch()
            queues.enqueue(*gather.wait())

        rows = rounds(dict(step=train_step, logits=queue_logits, manager=gather_enqueue), n, calls=1)
        step, logits, manager = (med(rows, lambda r, k=k: r[k]) for k in ("step", "logits", "manager"))
        share = med(rows, lambda r: (r["logits"] + r["manager"]) / r["step"])
        out.append(f"{mode:<10}  step {1000 * step:7.1f} ms   queue logits fwd+bwd {1000 * logits:6.2f} ms   "
                   f"gather+enqueue {1000 * manager:5.2f} ms   share {100 * share:4.1f}%   (target <= 3%)")


def overlap(rank: int, n: int, out: list) -> None:
    """A stand-in step: forward + backward of an MLP that takes tens of ms, then the gradient
    all-reduce; the keys' gather is launched before the backward (async) or run after it (blocking)."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.GELU(), torch.nn.Linear(2048, 1024))
    x = torch.randn(256, 1024)
    for E in (128, 2048):  # tiny; the 1b/10b presets' joint embedding
        keys = (unit(MICRO, E, seed=5), unit(MICRO, E, seed=6), torch.arange(MICRO))
        waits = {True: [], False: []}

        def step(async_op: bool) -> None:
            gather = KeyGather()
            loss = mlp(x).square().mean()
            gather.add(*keys)
            if async_op:
                gather.launch()
            loss.backward()
            for p in mlp.parameters():
                dist.all_reduce(p.grad)  # no gradient through it: the data-parallel reduction
            t0 = time.perf_counter()
            if not async_op:
                gather.launch(async_op=False)
            gather.wait()
            waits[async_op].append(time.perf_counter() - t0)

        rows = rounds(dict(async_=lambda: step(True), blocking=lambda: step(False)), n, calls=3)
        wait_async, wait_blocking = (slowest(statistics.median(w[1:])) for w in (waits[True], waits[False]))
        step_async, step_blocking = (med(rows, lambda r, k=k: r[k]) for k in ("async_", "blocking"))
        out.append(f"E={E:<5} keys {MICRO}x{E} x2 per rank: the step waits {1e3 * wait_async:6.3f} ms for the "
                   f"async gather vs {1e3 * wait_blocking:6.3f} ms for a blocking one "
                   f"(step {1e3 * step_async:.0f} vs {1e3 * step_blocking:.0f} ms)")


def throughput(rank: int, n: int, out: list) -> None:
    for E, K in ((128, QUEUE), (2048, 8192)):  # tiny; the 1b/10b joint embedding
        for mode in ("replicated", "sharded"):
            R, slots = (MICRO, K) if mode == "replicated" else (WORLD * MICRO, K // WORLD)
            q, queue = unit(R, E, seed=7), unit(slots, E, seed=8)
            ids, queue_ids = torch.arange(R), torch.arange(slots) + 10 * slots
            scale = torch.tensor(14.3)
            rows = rounds(dict(mm=lambda: torch.mm(q, queue.t()),
                               issued=lambda: torch.mm(scale * q, queue.t()),  # as _QueueLogSumExp issues it
                               scoring=lambda: queue_logsumexp(q, queue, scale, ids, queue_ids)),
                          n, calls=5 if E == 128 else 1)
            mm = med(rows, lambda r: r["mm"])
            out.append(f"{mode:<10} ({R}, {E}) x ({slots}, {E})^T: torch.mm {1e3 * mm:6.2f} ms"
                       f"   loss matmul {med(rows, lambda r: r['mm'] / r['issued']):5.3f} (target >= 0.9)"
                       f"   whole queue scoring {med(rows, lambda r: r['mm'] / r['scoring']):5.3f}")


def worker(rank: int, port: int, n: int) -> None:
    torch.set_num_threads(1)  # one core per rank
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    out = [f"== 1. queue manager share of a tiny-preset step (micro-batch {MICRO}, queue {QUEUE}, {WORLD} ranks "
           "x 1 thread) =="]
    step_share(rank, n, out)
    out.append("== 2. async key gather (launched before the backward) vs blocking (after it) ==")
    overlap(rank, n, out)
    out.append("== 3. queue-logits throughput as a fraction of torch.mm of the same shape (1.0 = as fast) ==")
    throughput(rank, n, out)
    if rank == 0:
        print("\n".join(out), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds per measurement")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with socket.socket() as s:  # a free port for the process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.perf_counter()
    mp.spawn(worker, args=(port, args.rounds), nprocs=WORLD, join=True)
    print(f"({time.perf_counter() - t0:.0f} s in all, torch {torch.__version__}, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
