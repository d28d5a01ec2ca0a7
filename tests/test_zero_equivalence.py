"""The parallel strategies against one reference, on real DeepSpeed engines (CPU, gloo).

The same seed, data and global batch must give the same model whatever the ZeRO stage and world size:
2-rank ZeRO-1/2/3 runs (ZeRO-2 with sharded queues) end with the weights, momentum towers and queues of a
1-rank ZeRO-0 run that accumulates two micro-batches per step. Every run logs every step, and the
trainer compares the replicated queues across ranks at each log step (it stops if they differ). A run
killed with SIGKILL at random steps and resumed with ``--resume auto`` ends bit for bit where the
uninterrupted run ends, and a checkpoint converted with ``wenlan.parallel.reshard`` resumes on another
world size and ZeRO stage and ends where the reference ends.
"""

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch

from data_tools.make_demo_data import write_demo_shards
from tests.helpers import (ROOT, assert_close_per_tensor, equivalence_args, exported, launch, metric_history,
                           run_until_killed)

STEPS = 10
GLOBAL_BATCH = 32
QUEUE = 128  # full after 4 steps, then every slot is overwritten once more


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("equiv-data")
    write_demo_shards(root, n_train=800, n_val=32, seed=3, image_size=64, shard_size=100, quiet=True)
    return root


def ds_config(tmp: Path, stage: int, micro: int, accum: int, bf16: bool = False, offload: bool = False) -> str:
    cfg = json.loads((ROOT / "ds_configs" / "cpu_tiny.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=micro, gradient_accumulation_steps=accum)
    # A gentle LR: contrastive training of a random model at 1e-3 is chaotic enough to grow a 1e-7
    # difference in summation order (an all-reduce vs accumulation) into 1e-3 within ten steps. At 1e-4
    # what it grows into depends on the CPU's summation order: on an AMD EPYC the stem's GroupNorm bias
    # ended at 5.5e-7 against the 5.0e-7 floor of the per-tensor bound (1.2e-7 where the bound was set).
    cfg["optimizer"]["params"]["lr"] = 3e-5
    cfg["zero_optimization"] = {"stage": stage}
    if stage == 3:
        # Small enough that biases and norms stay whole (persistent) while matrices are partitioned.
        cfg["zero_optimization"].update(stage3_param_persistence_threshold=1000, reduce_bucket_size=100_000,
                                        stage3_prefetch_bucket_size=100_000)
    if offload:  # the fp32 masters and Adam's moments on the host (here torch's AdamW: torch_adam is set)
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    if bf16:
        cfg["bf16"] = {"enabled": True}
        if stage > 0:  # the shipped GPU configs' reduction and accumulation dtypes
            shipped = json.loads((ROOT / "ds_configs" / "zero3_10b.json").read_text())
            cfg.update(communication_data_type=shipped["communication_data_type"], data_types=shipped["data_types"])
    path = tmp / f"ds_zero{stage}_{micro}x{accum}{'_bf16' if bf16 else ''}{'_offload' if offload else ''}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def train_args(data: Path, out: Path, ds: str) -> list[str]:
    return equivalence_args(data, out, ds, STEPS, QUEUE)


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("equiv")
    outs = {"zero0-1rank": tmp / "zero0"}
    launch(1, train_args(data, outs["zero0-1rank"], ds_config(tmp, 0, GLOBAL_BATCH // 2, 2)))
    for stage in (1, 2, 3):
        outs[f"zero{stage}-2rank"] = out = tmp / f"zero{stage}"
        # ZeRO-2 also shards the queues (K/2 slots per rank, distributed log-sum-exp): same result.
        extra = ["--queue-mode", "sharded"] if stage == 2 else []
        proc = launch(2, train_args(data, out, ds_config(tmp, stage, GLOBAL_BATCH // 2, 1)) + extra)
        assert f"step {STEPS:>6}/{STEPS}" in proc.stdout
    return outs


@pytest.mark.parametrize("strategy", ["zero1-2rank", "zero2-2rank", "zero3-2rank"])
def test_two_ranks_equal_one_rank_zero0(runs, strategy):
    reference, other = exported(runs["zero0-1rank"]), exported(runs[strategy])
    assert any(k.startswith("momentum.image_tower.") for k in reference)
    assert {"queue.image", "queue.text", "queue.ids", "queue.ptr", "queue.filled"} <= set(reference)
    assert_close_per_tensor(reference, other, strategy)
    # The run really trained: the online towers left their momentum copies behind.
    w = "image_tower.head.fc1.weight"
    assert (reference[w] - reference["momentum." + w]).abs().max() > 1e-5
    assert reference["queue.filled"].item() == QUEUE and reference["queue.ptr"].item() == (STEPS * GLOBAL_BATCH) % QUEUE


@pytest.mark.parametrize("strategy", ["zero1-2rank", "zero2-2rank", "zero3-2rank"])
def test_gradient_norm_before_clipping_equals_one_rank_every_step(runs, strategy):
    """AdamW is blind to the gradients' scale and clipping caps it, so the weights alone would pass a
    missing 1/accumulation or 1/world factor; the norm of the averaged gradients, before clipping,
    would be off by that factor at every step."""
    reference, other = metric_history(runs["zero0-1rank"], "grad_norm"), metric_history(runs[strategy], "grad_norm")
    assert sorted(reference) == sorted(other) == list(range(1, STEPS + 1))
    assert reference[1] > 1.0  # clipped (gradient_clipping 1.0): the weights could not tell a scale error
    for step, norm in reference.items():
        assert other[step] == pytest.approx(norm, rel=1e-5), f"step {step}"


BF16_ROUNDOFF = 2.0 ** -8
"""bf16's unit roundoff: 8 significant bits, so one rounding changes a value by at most 2^-8 of it."""


def test_bf16_zero3_two_ranks_follow_one_rank(data, tmp_path):
    """bf16 weights, ZeRO-3 on 2 ranks against one rank accumulating two micro-batches, for 10 steps,
    both with the shipped GPU configs' fp32 gradient reduction and accumulation. The one-rank run is
    ZeRO-1, which on one rank shards nothing: DeepSpeed 0.19's ZeRO-0 runs bf16 weights through its fp16
    optimizer (FP16_UnfusedOptimizer), which on these same gradients takes first steps 0.74x as long as
    ZeRO-1/2/3 do (measured), and it cannot accumulate in fp32; ``wenlan.config`` refuses bf16 with ZeRO-0.

    Per step, a derived bound: both runs start from the same bf16 weights and fp32 masters, see the same
    micro-batches and run the same bf16 forward; they differ only in the order of fp32 gradient sums
    (accumulation vs reduce-scatter), ~2^-24 relatively. That reaches the forward only where it makes a
    master round to the other bf16 neighbour, a change of at most one bf16 rounding, u = 2^-8 relatively.
    So each step adds at most u of relative difference to the scalars it produces, and to first order
    these add up: loss and gradient norm agree within t * u after step t.

    The weights after 10 steps: Adam turns a gradient that is at the level of that noise (biases next to
    normalisation layers, BERT's key biases) into full +-lr steps in either direction, so no first-order
    bound holds per element. What must hold is that the two bf16 strategies are closer to each other than
    bf16 is to fp32: the same one-rank run in fp32 measures what bf16 rounding alone does to these weights,
    and a strategy error (a gradient scale, an EMA source, the temperature) would add to it."""
    outs = {}
    for name, ranks, stage, accum, bf16 in (("zero1-1rank", 1, 1, 2, True), ("zero3-2rank", 2, 3, 1, True),
                                           ("fp32-1rank", 1, 1, 2, False)):
        outs[name] = tmp_path / name
        ds = ds_config(tmp_path, stage, GLOBAL_BATCH // 2, accum, bf16=bf16)
        launch(ranks, equivalence_args(data, outs[name], ds, STEPS, QUEUE))
    for key in ("loss", "grad_norm"):
        reference, other = metric_history(outs["zero1-1rank"], key), metric_history(outs["zero3-2rank"], key)
        assert sorted(reference) == sorted(other) == list(range(1, STEPS + 1)), key
        for step, value in reference.items():
            assert abs(other[step] - value) <= step * BF16_ROUNDOFF * abs(value), f"{key} at step {step}"
    reference, other, fp32 = (exported(outs[name]) for name in ("zero1-1rank", "zero3-2rank", "fp32-1rank"))
    assert set(reference) == set(other) == set(fp32)
    groups = {"online towers": [n for n in reference if n.startswith(("image_tower.", "text_tower."))],
              "momentum towers": [n for n in reference if n.startswith("momentum.")],
              "queues": ["queue.image", "queue.text"], "temperature": ["log_scale"]}
    assert len(groups["online towers"]) == len(groups["momentum towers"]) > 100

    def distance(a: dict, b: dict, names: list[str]) -> float:
        return sum(((a[n] - b[n]).double() ** 2).sum() for n in names).sqrt().item()

    for what, names in groups.items():
        between_strategies, bf16_rounding = distance(other, reference, names), distance(fp32, reference, names)
        assert between_strategies < bf16_rounding, f"{what}: {between_strategies:.3e} vs bf16 {bf16_rounding:.3e}"
    for name in ("queue.ids", "queue.ptr", "queue.filled"):
        assert torch.equal(other[name], reference[name]), name

    # bf16 ZeRO-3 keeps fp32 masters of the momentum towers as per-rank partitions: the converter reads them
    from tests.reshard_reference import assert_conversion_is_exact
    from wenlan.parallel.reshard import reshard

    saved_tag = outs["zero3-2rank"] / "checkpoints" / f"step{STEPS:08d}"
    reshard(saved_tag, tmp_path / "converted")
    assert_conversion_is_exact(saved_tag, tmp_path / "converted")


def test_zero3_partitions_the_momentum_towers(runs):
    """ZeRO-3 checkpoints hold each momentum parameter as per-rank partitions, not whole tensors."""
    tag = runs["zero3-2rank"] / "checkpoints" / f"step{STEPS:08d}"
    states = [torch.load(tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
              for r in range(2)]
    name = "model.momentum_text_tower.bert.encoder.layer.0.intermediate.dense.weight"  # 256 x 128, partitioned
    shapes = [s["frozen_param_fragments"][name].numel() for s in states]
    assert shapes == [256 * 128 // 2] * 2


def test_activation_checkpointing_under_zero3_changes_nothing(runs, data, tmp_path):
    """The 2-rank ZeRO-3 run again with every block of the online towers recomputed in the backward
    (parameters re-gathered for the recompute): the same loss and gradient norm at every step and the
    same weights, momentum towers and queues, bit for bit."""
    out = tmp_path / "zero3-checkpointed"
    proc = launch(2, train_args(data, out, ds_config(tmp_path, 3, GLOBAL_BATCH // 2, 1)) +
                  ["--activation-checkpointing", "1"])
    assert "activation checkpointing every block" in proc.stdout + proc.stderr
    reference = runs["zero3-2rank"]
    for key in ("loss", "grad_norm"):
        assert metric_history(out, key) == metric_history(reference, key), key
    expected, got = exported(reference), exported(out)
    assert expected.keys() == got.keys()
    for name, tensor in expected.items():
        assert torch.equal(tensor, got[name]), name


def test_kill9_at_random_steps_then_resume_auto_is_bitwise_equal(runs, data, tmp_path):
    """Three SIGKILLs of all ranks at random steps (with a checkpoint every 2 steps, so some land right
    after a save, some mid-way), each followed by --resume auto; the final weights are bit for bit the
    uninterrupted run's, momentum towers and queues included."""
    rng = random.Random(os.environ.get("WENLAN_KILL_SEED", "kill"))
    kill_points = sorted(rng.sample(range(2, STEPS), 3))
    out = tmp_path / "killed"
    args = train_args(data, out, ds_config(tmp_path, 3, GLOBAL_BATCH // 2, 1))
    for kill_at in kill_points:
        run_until_killed(args, kill_at)
    launch(2, args)
    reference, resumed = exported(runs["zero3-2rank"]), exported(out)
    for name, ref in reference.items():
        assert torch.equal(resumed[name], ref), f"{name} differs after kills at steps {kill_points}"


@pytest.mark.parametrize("source, ranks, stage, offload", [("zero3-2rank", 1, 1, False), ("zero1-2rank", 1, 0, False),
                                                     ("zero0-1rank", 2, 3, True), ("zero3-2rank", 2, 2, False)],
                         ids=["zero3-to-1rank-zero1", "zero1-to-1rank-zero0", "zero0-to-2rank-zero3-offload",
                              "zero3-to-2rank-zero2"])
def test_reshard_then_resume_on_another_world_size(runs, data, tmp_path, source, ranks, stage, offload):
    """2 ranks -> convert -> 1 rank, and 1 -> 2, across ZeRO stages (into ZeRO-3 with the optimizer offloaded,
    whose partitions are restored through DeepSpeed's setters; into 2-rank ZeRO-2, where each rank restores
    only its fragments of the flat partitions): the converted checkpoint holds the saved momentum towers,
    queues and weights, and Adam's moments as DeepSpeed's in-memory reassembly gives them (bit for bit:
    the converter streams them by byte range instead), and the resumed run ends where the uninterrupted
    reference ends."""
    from tests.reshard_reference import assert_conversion_is_exact
    from wenlan.parallel.reshard import reshard

    saved_tag = runs[source] / "checkpoints" / "step00000006"
    converted = tmp_path / "converted" / "checkpoints"
    reshard(saved_tag, converted)
    assert_conversion_is_exact(saved_tag, converted)

    out = tmp_path / "resumed"
    micro = GLOBAL_BATCH // 2
    args = train_args(data, out, ds_config(tmp_path, stage, micro, 2 // ranks, offload=offload)) + ["--resume", str(converted)]
    proc = launch(ranks, args)
    assert "resumed from converted checkpoint" in proc.stdout + proc.stderr
    assert "step      7/10" in proc.stdout and "step      6/10" not in proc.stdout
    assert_close_per_tensor(exported(runs["zero0-1rank"]), exported(out), f"{source} -> {ranks} rank(s)")


def test_vit_backbone_under_zero3_equals_one_rank(data, tmp_path):
    """The 1b/10b presets' image path (a timm ViT, whose class token and position embedding are
    parameters of the timm model itself, not of a submodule) at tiny size: 2-rank ZeRO-3 ends where
    1-rank ZeRO-0 ends."""
    outs = {}
    for name, ranks, stage, accum in (("zero0", 1, 0, 2), ("zero3", 2, 3, 1)):
        outs[name] = tmp_path / name
        launch(ranks, equivalence_args(data, outs[name], ds_config(tmp_path, stage, GLOBAL_BATCH // 2, accum), 4, QUEUE,
                                       preset="tiny-vit"))
    reference = exported(outs["zero0"])
    assert reference["image_tower.backbone.net.pos_embed"].shape == (1, 17, 64)  # 4 x 4 patches + class token
    assert_close_per_tensor(reference, exported(outs["zero3"]), "ViT under ZeRO-3")


@pytest.mark.parametrize("objective, extra", [("ernie-vil2", []), ("cookie", []),
                                              ("ernie-vil2", ["--multiview-queue"])],
                         ids=["ernie-vil2", "cookie", "ernie-vil2-queue"])
def test_multi_view_objectives_under_zero3_equal_one_rank(data, tmp_path, objective, extra):
    """The in-batch multi-view objectives, 2-rank ZeRO-3 against 1-rank ZeRO-0 on the same global batch:
    the same weights (cookie's shared transformer included; with ernie-vil2's queues, its momentum towers
    and queues too) and gradient norms at every step. The one-rank run takes the global batch as one
    micro-batch: in-batch InfoNCE contrasts a micro-batch's gathered global batch, so splitting it into
    accumulated micro-batches would change the negatives. Both runs read their second views from the
    loader, so they also agree on those draws."""
    steps, outs = 4, {}
    for name, ranks, stage, micro in (("zero0", 1, 0, GLOBAL_BATCH), ("zero3", 2, 3, GLOBAL_BATCH // 2)):
        outs[name] = tmp_path / name
        launch(ranks, equivalence_args(data, outs[name], ds_config(tmp_path, stage, micro, 1), steps, QUEUE)
               + ["--objective", objective, *extra])
    reference, other = exported(outs["zero0"]), exported(outs["zero3"])
    assert any(k.startswith("shared_encoder.") for k in reference) == (objective == "cookie")
    assert any(k.startswith(("momentum.", "queue.")) for k in reference) == bool(extra)
    if extra:  # every step's first-view keys entered the queue
        assert reference["queue.filled"].item() == steps * GLOBAL_BATCH
        assert (reference["queue.image"][:steps * GLOBAL_BATCH].norm(dim=1) - 1).abs().max() < 1e-5
    assert_close_per_tensor(reference, other, f"{objective} {' '.join(extra)} under ZeRO-3")
    norms = {name: metric_history(out, "grad_norm") for name, out in outs.items()}
    assert sorted(norms["zero0"]) == sorted(norms["zero3"]) == list(range(1, steps + 1))
    for step, norm in norms["zero0"].items():
        assert norms["zero3"][step] == pytest.approx(norm, rel=1e-5), f"step {step}"
    assert abs(reference["log_scale"].item() - math.log(1 / 0.07)) > 1e-5  # the run trained (lr 3e-5, 4 steps)
