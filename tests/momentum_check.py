"""Run by tests/test_momentum_partitioned.py under `deepspeed --num_accelerators 2`: the partition-local
EMA against the whole-tensor formula on real engines (ZeRO-3 fp32, ZeRO-3 bf16 + fp32 masters, ZeRO-1
bf16), for every parameter, small persistent ones included; and in bf16, the temperature the loss uses
is the optimizer's fp32 value, not its bf16 weight. Prints one line per checked case."""

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from wenlan.config import resolve  # noqa: E402
from wenlan.parallel.engine import init_distributed  # noqa: E402
from wenlan.parallel.momentum import MomentumEMA  # noqa: E402
from wenlan.parallel.strategy import PlainStrategy  # noqa: E402
from wenlan.train import parse_args  # noqa: E402


def whole_masters(ema: MomentumEMA) -> dict[str, torch.Tensor]:
    """Every key parameter's fp32 value as a whole tensor (masters where kept, else the weights)."""
    out = {}
    for name, (_, key), master in zip(ema.names, ema.pairs, ema.masters):
        local = (master if master is not None else ema._local(key)).reshape(-1).float()
        if ema.zero3:
            parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, local)  # test read-back, no gradient
            local = torch.cat(parts)[: key.ds_numel]
        out[name] = local.view(key.ds_shape if ema.zero3 else key.shape).clone()
    return out


def whole_weights(params) -> list[torch.Tensor]:
    with deepspeed.zero.GatheredParameters(params, enabled=hasattr(params[0], "ds_id")):
        return [p.detach().clone() for p in params]


def check(ds_path: str, label: str, argv: list[str]) -> None:
    cfg = resolve(parse_args(argv + ["--deepspeed_config", ds_path]))
    torch.manual_seed(0)
    strategy = PlainStrategy(cfg)
    module, engine, ema = strategy.objective, strategy.engine, strategy.ema
    bf16 = module.log_scale.dtype == torch.bfloat16
    configured = torch.tensor([math.log(1.0 / cfg.objective.temperature)])  # fp32
    def scale() -> torch.Tensor:  # what the loss uses (a ZeRO-3 parameter is whole only when gathered)
        with deepspeed.zero.GatheredParameters([module.log_scale], enabled=hasattr(module.log_scale, "ds_id")):
            return module.scale().cpu(), module.log_scale.float().cpu()

    if bf16:  # the loss starts at the configured temperature, not at its bf16 rounding
        used, weight = scale()
        assert torch.equal(used, configured.exp()), f"{label}: initial temperature {used} {configured.exp()}"
        assert not torch.equal(weight, configured)
    # one real optimizer step so that online and momentum weights differ
    images = torch.randn(cfg.batch.micro_batch, 3, 64, 64, dtype=next(module.parameters()).dtype)
    ids = torch.randint(5, 60, (cfg.batch.micro_batch, 12))
    loss = engine(images, ids, torch.ones_like(ids), ids[:, 0].clone(), use_queue=False)
    module.gather.clear()  # not enqueued here
    engine.backward(loss)
    engine.step()

    from deepspeed.utils import safe_get_full_fp32_param

    if bf16:  # after the step: the optimizer's fp32 value, which bf16 cannot represent
        strategy.refresh_temperature()
        master = safe_get_full_fp32_param(module.log_scale).float().reshape(1)
        assert torch.equal(scale()[0], master.cpu().clamp(max=math.log(100.0)).exp()), f"{label}: temperature"
        assert not torch.equal(master.bfloat16().float(), master) and not torch.equal(master, configured)

    onlines = [p for p, _ in ema.pairs]
    online_fp32 = [safe_get_full_fp32_param(p) if hasattr(p, "ds_id") or hasattr(p, "_hp_mapping") else None
                   for p in onlines]
    online_whole = whole_weights(onlines)
    before = whole_masters(ema)
    m = 0.9
    if ema.persistent:  # after a forward: the update rebuilds their whole copies with its own gather
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        assert all(k.ds_status == ZeroParamStatus.AVAILABLE for k in ema.persistent), label
    ema.update(m)
    # the whole copies forward reads, before anything else gathers or releases them
    whole_copies = {name: key.data.clone() for name, (_, key) in zip(ema.names, ema.pairs)
                    if getattr(key, "ds_persist", False)}
    after = whole_masters(ema)
    keys = whole_weights([k for _, k in ema.pairs])
    persistent = 0
    for i, (name, (online, key)) in enumerate(zip(ema.names, ema.pairs)):
        # ZeRO-3 reads the online fp32 master; ZeRO-0/1/2 the online working weights (whole tensors).
        source = online_fp32[i] if ema.zero3 and online_fp32[i] is not None else online_whole[i]
        expected = before[name] * m + source.float().view_as(before[name]) * (1 - m)
        torch.testing.assert_close(after[name], expected, rtol=1e-6, atol=1e-9,
                                   msg=lambda e: f"{label}: EMA of {name}: {e}")
        # the weight forward reads is exactly the master's rounding
        assert torch.equal(keys[i], after[name].to(keys[i].dtype)), f"{label}: key weight {name} differs"
        if name in whole_copies:
            persistent += 1
            assert torch.equal(whole_copies[name], after[name].to(key.dtype)), f"{label}: whole copy of {name} stale"
    if dist.get_rank() == 0:
        print(f"OK {label}: {len(ema.pairs)} parameters, {persistent} persistent, "
              f"masters {'fp32' if any(x is not None for x in ema.masters) else 'none (fp32 weights)'}"
              + (", temperature from its fp32 master" if bf16 else ""), flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--configs", nargs="+", required=True, help="LABEL=ds_config.json")
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args()
    init_distributed()
    data = Path(args.data)
    argv = ["--preset", "tiny", "--tokenizer", str(data / "tokenizer"), "--train-shards",
            str(data / "train-{000000..000003}.tar"), "--val-shards", str(data / "val-000000.tar"),
            "--max-steps", "1", "--output-dir", str(data / "unused"), "--queue-size", "256", "--data-streams", "2",
            "--resume", "none"]
    for item in args.configs:
        label, path = item.split("=", 1)
        check(path, label, argv)


if __name__ == "__main__":
    main()
