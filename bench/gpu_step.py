"""One GPU, the real training step: samples/s, TFLOP/s, MFU and peak memory of a preset in bf16 through
the DeepSpeed engine (ZeRO-1 on 1 rank), with and without activation checkpointing, next to the same
model's plain PyTorch step (engine overhead ratio), each in its own process, measured in one run.

    python bench/gpu_step.py [--preset 1b] [--micro-batch 64] [--steps 20] [--write]

Rows (``--write``: also appended to bench/RESULTS.md with the device name and date):

- ``engine``: ``PlainStrategy.train_step`` + ``after_step``, as wenlan/train.py runs them: forward,
  backward, optimizer step (bf16 weights, fp32 masters, FusedAdam as in ds_configs/zero3_1b.json),
  EMA, enqueue; the batch comes as the loader ships it (uint8 images in pinned memory).
- ``engine+ckpt``: the same with --activation-checkpointing 1 (MFU counts model FLOPs, not recompute).
- ``plain``: the same modules in plain PyTorch, bf16 weights and torch's fused AdamW on them (no fp32
  masters: a lower bound on the step's cost), the same EMA and queue.
- ``--compile``: adds ``engine+compile`` (``torch.compile`` on each tower block).
- ``--cut-10b N``: adds the 10b preset's widths with N ViT blocks, N // 2 BERT and attention layers, checkpointed.

A model FLOP is counted once (``wenlan.models.flops``: online forward + backward, momentum forward,
logits). On a CPU (``--device cpu``, small presets) the script runs end to end for debugging; MFU needs
a GPU in the peak table.
"""

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ROWS = ("engine", "engine+ckpt", "plain")


def model_config(args):
    from wenlan.models.presets import cut_depth, get_preset

    if not args.cut_10b or args.row_preset != "10b-cut":
        return get_preset(args.preset)
    return cut_depth(get_preset("10b"), vit_blocks=args.cut_10b, bert_layers=max(1, args.cut_10b // 2),
                     attention_layers=max(1, args.cut_10b // 2))


def train_config(args, checkpointing: int):
    from wenlan.config import BatchConfig, TrainConfig
    from wenlan.losses.objective import ObjectiveConfig

    ds = json.loads((ROOT / "ds_configs" / "zero3_1b.json").read_text())
    ds["zero_optimization"] = {"stage": 1}
    ds["train_micro_batch_size_per_gpu"] = args.micro_batch
    if args.device == "cpu" or args.torch_adam:  # FusedAdam JIT-compiles on first use (nvcc on GPUs)
        ds["optimizer"]["params"]["torch_adam"] = True
    queue = max(4096 // args.micro_batch, 1) * args.micro_batch
    return TrainConfig(preset=args.row_preset, model=model_config(args), objective=ObjectiveConfig(queue_size=queue),
                       batch=BatchConfig(args.micro_batch, 1, 1), deepspeed_config=ds, tokenizer="",
                       train_shards=[], val_shards=[], output_dir="", max_steps=10**6, seed=0, lr_warmup_steps=0,
                       activation_checkpointing=checkpointing)


def loader_batch(cfg, pin: bool) -> dict:
    """A step's batch as the train loader ships it: uint8 images, colour maps, padded token ids."""
    import torch

    from wenlan.data.transforms import NORMALISE

    g = torch.Generator().manual_seed(0)
    b, size, length = cfg.batch.micro_batch, cfg.model.image.image_size, cfg.model.text.max_len
    batch = dict(images=torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g),
                 colour_maps=NORMALISE.expand(b, 3, 7).clone(),
                 input_ids=torch.randint(5, min(cfg.model.text.vocab_size, 20000), (b, length), generator=g),
                 attention_mask=torch.ones(b, length, dtype=torch.long))
    return {k: v.pin_memory() if pin else v for k, v in batch.items()}


def measure_engine(args, checkpointing: int) -> dict:
    from wenlan.parallel.engine import init_distributed
    from wenlan.parallel.strategy import PlainStrategy

    init_distributed()
    cfg = train_config(args, checkpointing)
    strategy = PlainStrategy(cfg)
    if args.compile:
        compile_blocks(strategy.objective.model)
    batch = loader_batch(cfg, pin=args.device == "cuda")

    def step(i: int) -> None:
        strategy.train_step(batch, use_queue=True)
        strategy.after_step(0.99)

    return timed(args, cfg, step)


def measure_plain(args) -> dict:
    import torch

    from wenlan.data.transforms import model_images
    from wenlan.losses.objective import ContrastivePretraining, caption_ids
    from wenlan.models.brivl import BriVL
    from wenlan.parallel.momentum import MomentumEMA

    cfg = train_config(args, 0)
    device = torch.device(args.device)
    torch.manual_seed(0)
    with device:
        model = BriVL(cfg.model)
        module = ContrastivePretraining(model, cfg.objective).to(torch.bfloat16)
    module.queues.float()
    ema = MomentumEMA(list(model.named_momentum_pairs()))
    ema.update(0.0)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05, fused=args.device == "cuda")
    batch = loader_batch(cfg, pin=args.device == "cuda")

    def step(i: int) -> None:
        images = model_images(batch["images"], batch["colour_maps"], device, torch.bfloat16)
        ids = batch["input_ids"].to(device, non_blocking=True)
        loss = module(images, ids, batch["attention_mask"].to(device, non_blocking=True), caption_ids(ids))
        module.gather.launch()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.update(0.99)
        module.queues.enqueue(*module.gather.wait())

    return timed(args, cfg, step, module)


def compile_blocks(model) -> None:
    """torch.compile on every attention block of both online towers (the blocks that hold the FLOPs)."""
    for tower in (model.image_tower, model.text_tower):
        for module in tower.modules():
            if type(module).__name__ in ("Block", "BertLayer", "SelfAttentionLayer"):
                module.compile()


def timed(args, cfg, step, module=None) -> dict:
    import torch

    from wenlan.models.flops import peak_tflops, train_flops_per_sample
    from wenlan.throughput import device_name

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(args.warmup):
        step(i)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    began = time.perf_counter()
    for i in range(args.steps):
        step(i)
    sync()
    seconds = (time.perf_counter() - began) / args.steps
    flops = train_flops_per_sample(cfg.model, cfg.objective, cfg.batch.micro_batch, 1)
    samples = cfg.batch.micro_batch / seconds
    tflops = flops * samples / 1e12
    peak = peak_tflops(device_name(device))
    return dict(step_s=seconds, samples_per_s=samples, tflops=tflops, mfu=tflops / peak if peak else None,
                peak_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
                device=device_name(device), flops_per_sample=flops)


def child(args) -> None:
    row = args.row
    if row == "plain":
        result = measure_plain(args)
    else:
        result = measure_engine(args, checkpointing=1 if "ckpt" in row else 0)
    Path(os.environ["WENLAN_BENCH_OUT"]).write_text(json.dumps(result))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="1b")
    p.add_argument("--micro-batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--torch-adam", action="store_true",
                   help="torch's AdamW in the engine instead of DeepSpeed's FusedAdam (no JIT build)")
    p.add_argument("--compile", action="store_true", help="also a row with torch.compile on the tower blocks")
    p.add_argument("--cut-10b", type=int, default=0, metavar="N",
                   help="also a row of the 10b widths with N ViT blocks, N // 2 BERT and attention layers, checkpointed")
    p.add_argument("--rows", default=",".join(ROWS), help="which rows, comma-separated")
    p.add_argument("--timeout", type=int, default=900, help="seconds per row")
    p.add_argument("--write", action="store_true", help="append the rows to bench/RESULTS.md")
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--row-preset", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.row:
        child(args)
        return
    rows = [(r, args.preset) for r in args.rows.split(",")]
    if args.compile:
        rows.append(("engine+compile", args.preset))
    if args.cut_10b:
        rows.append(("engine+ckpt", "10b-cut"))
    results = []
    for row, preset in rows:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "row.json"
            env = dict(os.environ, WENLAN_BENCH_OUT=str(out), RANK="0", LOCAL_RANK="0", WORLD_SIZE="1",
                       LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
            if args.device == "cpu":
                env["DS_ACCELERATOR"] = "cpu"
            cmd = [sys.executable, __file__, *sys.argv[1:], "--row", row, "--row-preset", preset]
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
                failed = proc.returncode != 0
                reason = (proc.stdout + proc.stderr).strip().splitlines()[-1:] if failed else []
            except subprocess.TimeoutExpired:
                failed, reason = True, [f"timed out after {args.timeout} s"]
            result = {"failed": " ".join(reason)[:200] or "failed"} if failed else json.loads(out.read_text())
        micro = args.micro_batch
        results.append(dict(row=row, preset=preset, micro_batch=micro, **result))
        print(json.dumps(results[-1]), flush=True)
    table = format_table(results)
    print(table)
    if args.write:
        device = next((r["device"] for r in results if "device" in r), args.device)
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n### bench/gpu_step.py, {device}, {datetime.date.today().isoformat()}\n\n{table}\n")


def format_table(results: list[dict]) -> str:
    plain = next((r for r in results if r["row"] == "plain" and "step_s" in r), None)
    lines = ["| row | preset | micro-batch | step s | samples/s | TFLOP/s | MFU | peak GiB | vs plain |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "step_s" not in r:
            lines.append(f"| {r['row']} | {r['preset']} | {r['micro_batch']} | failed: {r['failed']} | | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        ratio = f"{r['step_s'] / plain['step_s']:.2f}x" if plain and r["preset"] == plain["preset"] else "-"
        lines.append(f"| {r['row']} | {r['preset']} | {r['micro_batch']} | {r['step_s']:.3f} | "
                     f"{r['samples_per_s']:.1f} | {r['tflops']:.1f} | {mfu} | {memory} | {ratio} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
