"""Per-rank model-state memory under ZeRO-3 at 1 vs 2 ranks, for a ~50M-parameter BriVL (online towers).

    DS_ACCELERATOR=cpu .venv/bin/python bench/zero3_memory.py

Launches itself with `deepspeed --num_accelerators 1` and `2`; each rank builds the model under
zero.Init, takes one optimizer step, and counts the bytes it holds: parameter partitions (online and
momentum) plus the whole copies of persistent small parameters, the optimizer's fp32 partitions and Adam
moments, and the momentum fp32 masters. Prints both and the ratio (ideal 0.5; target <= 0.55).
"""

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def model_config():
    from wenlan.models.presets import get_preset

    tiny = get_preset("tiny")
    text = dataclasses.replace(tiny.text, hidden=512, bert_layers=12, bert_heads=8, bert_ffn=2048, vocab_size=8192,
                               ffn_dim=1024)
    return dataclasses.replace(tiny, text=text)


def measure(out_file: str) -> None:
    import torch
    import torch.distributed as dist

    from wenlan.config import BatchConfig, TrainConfig
    from wenlan.losses.objective import ObjectiveConfig
    from wenlan.models.presets import count_parameters
    from wenlan.parallel.engine import build_engine, build_module, init_distributed
    from wenlan.parallel.momentum import MomentumEMA

    init_distributed()
    world = dist.get_world_size()
    ds = json.loads((ROOT / "ds_configs" / "cpu_tiny_zero3.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 4
    cfg = TrainConfig(preset="bench", model=model_config(), objective=ObjectiveConfig(queue_size=64),
                      batch=BatchConfig(4, 1, world), deepspeed_config=ds, tokenizer="", train_shards=[],
                      val_shards=[], output_dir="", max_steps=10, seed=0)
    module = build_module(cfg)
    engine = build_engine(module, cfg)
    ema = MomentumEMA([("model." + n, p, q) for n, p, q in module.model.named_momentum_pairs()])
    ema.update(0.0)
    images = torch.randn(4, 3, 64, 64)
    ids = torch.randint(5, 60, (4, 16))
    loss, _, _ = engine(images, ids, torch.ones_like(ids), ids[:, 0].clone(), use_queue=False)
    engine.backward(loss)
    engine.step()

    def nbytes(t):
        return t.numel() * t.element_size()

    params = sum(nbytes(p.ds_tensor) + (nbytes(p.data) if p.ds_persist else 0) for p in module.parameters())
    zero = engine.optimizer
    optimizer = sum(nbytes(t) for t in zero.fp32_partitioned_groups_flat)
    optimizer += sum(nbytes(v) for state in zero.optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    masters = sum(nbytes(m) for m in ema.masters if m is not None)
    total = torch.tensor([params + optimizer + masters], dtype=torch.float64)
    dist.all_reduce(total, op=dist.ReduceOp.MAX)  # the largest rank, no gradient
    if dist.get_rank() == 0:
        online = count_parameters(cfg.model)["online_trainable"]
        Path(out_file).write_text(json.dumps(dict(world=world, per_rank_bytes=total.item(), online_params=online,
                                                  params=params, optimizer=optimizer, masters=masters)))


def main() -> None:
    if os.environ.get("WENLAN_BENCH_OUT"):
        measure(os.environ["WENLAN_BENCH_OUT"])
        return
    deepspeed = str(Path(sys.executable).parent / "deepspeed")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, 2):
            out = Path(tmp) / f"{world}.json"
            env = dict(os.environ, DS_ACCELERATOR="cpu", WENLAN_BENCH_OUT=str(out), OMP_NUM_THREADS="1")
            subprocess.run([deepspeed, "--num_accelerators", str(world), "--master_port", str(29620 + world),
                            __file__], env=env, check=True, capture_output=True, text=True)
            results[world] = json.loads(out.read_text())
    one, two = results[1], results[2]
    print(f"ZeRO-3 model-state memory per rank, BriVL with {one['online_params'] / 1e6:.1f}M online parameters "
          "(+ the same again as momentum towers):")
    for r in (one, two):
        print(f"  {r['world']} rank(s): {r['per_rank_bytes'] / 2**20:8.1f} MiB  (parameters {r['params'] / 2**20:.1f}, "
              f"optimizer {r['optimizer'] / 2**20:.1f}, momentum masters {r['masters'] / 2**20:.1f})")
    print(f"  ratio 2 ranks / 1 rank: {two['per_rank_bytes'] / one['per_rank_bytes']:.3f}  (ideal 0.5, target <= 0.55)")


if __name__ == "__main__":
    main()
