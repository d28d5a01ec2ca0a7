"""The pipeline bubble: step time of a 2-stage BriVL pipeline against its stages' compute.

    DS_ACCELERATOR=cpu .venv/bin/python bench/pipeline_bubble.py [--micro-batch 16] [--repeats 5]

Launches itself with `deepspeed --num_accelerators 2` (2 stages, 1 data-parallel rank). Each stage first
times its own layers alone, forward + backward of one micro-batch on inputs captured from the pipeline
(T_s); then the whole pipeline's train_batch is timed at m = 1, 4 and 8 micro-batches. With p stages a
step holds m * sum(T_s) of compute, which p stages could at best do in m * sum(T_s) / p; the
measured/that ratio is printed next to the schedule's ideal (m + p - 1) / m (balanced stages) and next
to the ideal given the measured stage imbalance, (m + p - 1) * max(T_s) / (m * mean(T_s)). The step
also holds the optimizer step, which the stage compute does not.
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

STAGES = 2
MICRO_BATCHES = (1, 4, 8)


def measure(out_file: str, micro: int, repeats: int) -> None:
    import torch
    import torch.distributed as dist

    from wenlan.config import BatchConfig, TrainConfig
    from wenlan.losses.objective import ObjectiveConfig, caption_ids
    from wenlan.models.presets import get_preset
    from wenlan.parallel.engine import build_engine, init_distributed
    from wenlan.parallel.pipeline import build_pipeline

    init_distributed()
    torch.manual_seed(0)
    ds = json.loads((ROOT / "ds_configs" / "cpu_tiny_pipe.json").read_text())
    cfg = TrainConfig(preset="bench", model=get_preset("tiny"), objective=ObjectiveConfig(queue_size=1024),
                      batch=BatchConfig(micro, max(MICRO_BATCHES), 1, STAGES), deepspeed_config=ds, tokenizer="",
                      train_shards=[], val_shards=[], output_dir="", max_steps=1000, seed=0)
    pipe, objective, _, (stage, _, _) = build_pipeline(cfg, STAGES)
    engine = build_engine(pipe, cfg)
    images = torch.randn(micro, 3, 64, 64)
    input_ids = torch.randint(5, 2000, (micro, cfg.model.text.max_len))
    batch = ((images, input_ids, torch.ones_like(input_ids)), caption_ids(input_ids))

    def reset_objective():
        if objective is not None:  # the bench never enqueues: drop the keys and totals the loss kept
            objective.gather.clear()
            objective.take_totals()

    # This stage's input, as the pipeline delivers it.
    captured = []
    hook = pipe.register_forward_pre_hook(lambda module, args: captured.append(args[0]) if not captured else None)
    engine.set_train_batch_size(micro)
    engine.train_batch(iter([batch]))
    hook.remove()
    reset_objective()

    def stage_compute() -> float:
        x = tuple(t.detach().clone().requires_grad_(t.is_floating_point() and stage > 0) for t in captured[0])
        start = time.perf_counter()
        out = pipe(x)
        if objective is not None:
            objective.loss(out, caption_ids(out[2])).backward()
        else:
            floats = [t for t in out if t.requires_grad]
            torch.autograd.backward(floats, [torch.ones_like(t) for t in floats])
        elapsed = time.perf_counter() - start
        pipe.zero_grad(set_to_none=True)
        reset_objective()
        return elapsed

    stage_compute()  # warm-up
    compute = torch.zeros(STAGES, dtype=torch.float64)
    compute[stage] = statistics.median(stage_compute() for _ in range(repeats))
    dist.all_reduce(compute)  # each rank fills its stage's slot; no gradient

    step_times = {}
    for m in MICRO_BATCHES:
        engine.set_train_batch_size(micro * m)
        times = []
        for i in range(repeats + 1):  # the first is a warm-up
            dist.barrier()
            start = time.perf_counter()
            engine.train_batch(iter([batch] * m))
            times.append(time.perf_counter() - start)
            reset_objective()
        step_times[m] = statistics.median(times[1:])
    if dist.get_rank() == 0:
        Path(out_file).write_text(json.dumps(dict(compute=compute.tolist(), step_times=step_times, micro=micro)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)  # set by the launcher
    args = parser.parse_args()
    if os.environ.get("WENLAN_BENCH_OUT"):
        measure(os.environ["WENLAN_BENCH_OUT"], args.micro_batch, args.repeats)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bubble.json"
        env = dict(os.environ, DS_ACCELERATOR="cpu", WENLAN_BENCH_OUT=str(out), OMP_NUM_THREADS="1")
        subprocess.run([str(Path(sys.executable).parent / "deepspeed"), "--num_accelerators", str(STAGES),
                        "--master_port", "29641", __file__, "--micro-batch", str(args.micro_batch),
                        "--repeats", str(args.repeats)], env=env, check=True, capture_output=True, text=True)
        result = json.loads(out.read_text())
    compute, p = result["compute"], STAGES
    total = sum(compute)
    print(f"tiny BriVL, {p} pipeline stages, micro-batch {result['micro']}: stage compute (forward + backward "
          "of one micro-batch) " + " / ".join(f"{1e3 * t:.1f}" for t in compute) + " ms")
    print(f"{'m':>3} {'step ms':>9} {'m*sum(T)/p ms':>14} {'measured':>9} {'ideal':>7} {'ideal|imbalance':>16} "
          f"{'measured/ideal':>15}")
    for m, step in sorted((int(k), v) for k, v in result["step_times"].items()):
        floor = m * total / p
        ideal = (m + p - 1) / m
        ideal_imbalanced = (m + p - 1) * max(compute) / (m * total / p)
        print(f"{m:>3} {1e3 * step:>9.1f} {1e3 * floor:>14.1f} {step / floor:>9.3f} {ideal:>7.3f} "
              f"{ideal_imbalanced:>16.3f} {step / floor / ideal:>15.3f}")
    print("target: measured within 10% of the ideal (m + p - 1) / m at m = 8")


if __name__ == "__main__":
    main()
