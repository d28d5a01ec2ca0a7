"""The queue manager, the distributed objectives and the trainer's collective decisions on real gloo
process groups (2 and 4 ranks).

One spawn per world size runs every check below (process start-up dominates on 2 cores); each check
records its own outcome and the test functions report them one by one. References are computed in
each process from the whole global batch, which every rank can rebuild from the seeds.
"""

import faulthandler
import gc
import json
import math
import os
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from tests.helpers import free_port
from wenlan.losses.objective import ContrastivePretraining, ObjectiveConfig, clip_objective, queue_objective
from wenlan.losses.gather import all_gather_single
from wenlan.losses.queue import KeyGather, KeyQueues, consolidate, shard

E = 8
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def step_keys(step: int, rank: int, micro: int, batch: int):
    """Momentum keys of one rank's micro-batch: (image (B, E), text (B, E), ids (B,)), distinct everywhere."""
    tag = 1000 * step + 100 * rank + 10 * micro
    return unit(batch, E, seed=tag), unit(batch, E, seed=tag + 5), torch.arange(batch) + tag


def gather_keys(x: torch.Tensor) -> torch.Tensor:
    """The blocking reference gather: (B, ...) on each rank -> (world * B, ...) in rank order."""
    out = x.new_empty((dist.get_world_size() * x.shape[0], *x.shape[1:]))
    all_gather_single(out, x.contiguous())  # no gradient
    return out


def all_equal_across_ranks(t: torch.Tensor) -> bool:
    everyone = gather_keys(t[None])  # (world, ...), no gradient
    return all(torch.equal(everyone[0], other) for other in everyone[1:])


@check
def replicated_queue(rank, world):
    """Several steps of 2 micro-batches per rank: gathered asynchronously while another collective runs
    (the backward's gradient all-reduce), enqueued; every rank ends with the queue a single process
    builds from all keys in [rank][micro][sample] order, which is also what one rank with grad
    accumulation 2 * world writes."""
    M, B, steps = 2, 3, 5
    K = 3 * world * M * B  # 5 steps wrap around
    queues, reference, gather = KeyQueues(K, E), KeyQueues(K, E), KeyGather()
    for step in range(steps):
        for micro in range(M):
            gather.add(*step_keys(step, rank, micro, B))
            if micro == M - 1:
                gather.launch()
            busy = torch.ones(4096)
            dist.all_reduce(busy)  # no gradient; stands in for the gradient reduction of the backward
            assert busy[0].item() == world
        queues.enqueue(*gather.wait())
        parts = [step_keys(step, r, m, B) for r in range(world) for m in range(M)]
        reference.enqueue(*(torch.cat(p) for p in zip(*parts)))
    for name in ("image", "text", "ids"):
        assert torch.equal(getattr(queues, name), getattr(reference, name)), name
        assert all_equal_across_ranks(getattr(queues, name)), name
    assert (queues.ptr, queues.filled) == (reference.ptr, reference.filled) == ((steps * world * M * B) % K, K)


@check
def async_gather_equals_blocking(rank, world):
    parts = [step_keys(7, rank, m, 4) for m in range(3)]
    outs = []
    for async_op in (True, False):
        gather = KeyGather()
        for p in parts:
            gather.add(*p)
        gather.launch(async_op=async_op)
        outs.append(gather.wait())
    blocking = [gather_keys(torch.cat(p)) for p in zip(*parts)]
    for a, b, c in zip(*outs, blocking):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert outs[0][0].shape == (world * 12, E) and outs[0][2].dtype == torch.long


def global_queue_state(K: int, state: str, world: int, B: int) -> dict:
    """The same global queue on every rank: partly filled (whole shards still empty) or wrapped, with
    copies of some queries' positives (by id), one shard holding nothing but one query's copies."""
    queues = KeyQueues(K, E)
    n, times = (K // 2 - 1, 1) if state == "partly" else (5, 7)
    for t in range(times):
        queues.enqueue(unit(n, E, seed=500 + t), unit(n, E, seed=600 + t), torch.arange(n) + 10_000 * (t + 1))
    L = K // world
    if state == "wrapped":
        queues.ids[L:2 * L] = query_ids(0, B)[1]  # shard 1 is all duplicates of rank 0's query 1
    queues.ids[0] = query_ids(world - 1, B)[2]
    queues.ids[K // 2 - 2] = query_ids(0, B)[0]
    return queues.state()


def query_ids(rank: int, B: int) -> torch.Tensor:
    ids = torch.arange(B) + 100 * rank
    ids[B - 1] = ids[0]  # a duplicate caption inside the batch
    return ids


def objective_grads(mode, rank, world, K, B, state, cfg, use_queue):
    queues = KeyQueues(K, E, rank, world) if mode == "sharded" else KeyQueues(K, E)
    queues.load_state(global_queue_state(K, state, world, B))
    img_q, txt_q = unit(B, E, seed=10 + rank).requires_grad_(), unit(B, E, seed=20 + rank).requires_grad_()
    img_k, txt_k = unit(B, E, seed=30 + rank), unit(B, E, seed=40 + rank)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss, stats = queue_objective(img_q, txt_q, img_k, txt_k, query_ids(rank, B), queues, log_scale.exp(), cfg,
                                  use_queue)
    loss.backward()
    scale_grad = log_scale.grad.clone()
    dist.all_reduce(scale_grad)  # no gradient; the data-parallel reduction the optimizer sees
    return loss.detach(), stats, img_q.grad, txt_q.grad, scale_grad


@check
def sharded_matches_replicated(rank, world):
    """Loss, accuracy and gradients (queries per rank; temperature summed over ranks) of a sharded
    queue equal those of the replicated one, for every masking case."""
    B, K = 4, 6 * world
    failures = []
    for state in ("partly", "wrapped"):
        for in_batch in (True, False):
            for mask_dup in (True, False):
                for use_queue in (True, False):
                    case = f"{state} in_batch={in_batch} mask_dup={mask_dup} use_queue={use_queue}"
                    cfg = ObjectiveConfig(in_batch_negatives=in_batch, mask_duplicates=mask_dup)
                    rep = objective_grads("replicated", rank, world, K, B, state, cfg, use_queue)
                    sha = objective_grads("sharded", rank, world, K, B, state, cfg, use_queue)
                    try:  # record, do not raise: the other ranks still need this rank in the next case
                        torch.testing.assert_close(sha[0], rep[0], rtol=1e-5, atol=1e-5)
                        for key in ("acc_i2t", "acc_t2i", "loss_i2t"):
                            torch.testing.assert_close(sha[1][key], rep[1][key], rtol=1e-5, atol=1e-5)
                        for a, b in zip(sha[2:], rep[2:]):  # fp32 sums in another order: ulps of |grad| ~ 4
                            assert torch.isfinite(a).all()
                            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
                    except AssertionError as err:
                        failures.append(f"{case}: {err}")
    assert not failures, "\n".join(failures)


@check
def contrastive_pretraining_module(rank, world):
    """The trainer's module in sharded mode takes its shard from the process group, and a step of it
    (forward, backward, gather, enqueue) matches replicated mode on the same model."""
    from wenlan.models import BriVL, get_preset
    from wenlan.parallel.momentum import MomentumEMA

    torch.manual_seed(0)
    model = BriVL(get_preset("tiny"))
    MomentumEMA(list(model.named_momentum_pairs())).update(0.0)  # key towers start as copies
    modules = {mode: ContrastivePretraining(model, ObjectiveConfig(queue_size=8 * world, queue_mode=mode))
               for mode in ("replicated", "sharded")}
    assert (modules["sharded"].queues.shard, modules["sharded"].queues.num_shards) == (rank, world)
    assert modules["sharded"].queues.image.shape == (8, 128)
    assert modules["replicated"].queues.image.shape == (8 * world, 128)
    g = torch.Generator().manual_seed(rank)
    B, failures = 2, []
    for step in range(2):  # an empty queue, then one holding the first step's keys
        images = torch.randn(B, 3, 64, 64, generator=g)
        input_ids = torch.randint(5, 70, (B, 8), generator=g)
        ids = input_ids[:, 0].clone()
        results = {}
        for mode, module in modules.items():
            model.zero_grad(set_to_none=True)
            module.log_scale.grad = None
            loss = module(images, input_ids, torch.ones_like(input_ids), ids)
            module.gather.launch()  # the step's keys, gathered by the objective while the backward runs
            loss.backward()
            module.queues.enqueue(*module.gather.wait())
            scale_grad = module.log_scale.grad.clone()
            dist.all_reduce(scale_grad)  # no gradient
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            results[mode] = (loss.detach(), grads, scale_grad)
        for a, b in zip(results["sharded"], results["replicated"]):
            try:  # record, do not raise: the other ranks still need this rank in the next step
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
            except AssertionError as err:
                failures.append(f"step {step}: {err}")
    assert not failures, "\n".join(failures)
    assert modules["sharded"].queues.filled == 2 * B * world


@check
def checkpoint_round_trip(rank, world):
    """Per-rank shard states -> one global queue (equal to the replicated queue) -> shards of another
    world size -> global again, and loadable in either mode."""
    K, B = 4 * 4 * 3, 3  # divisible by 2 and 4 shards
    sharded, replicated, gather = KeyQueues(K, E, rank, world), KeyQueues(K, E), KeyGather()
    for step in range(5):  # 5 * world * B keys: partly filled at 2 ranks, wrapped at 4
        for queues in (sharded, replicated):
            gather.add(*step_keys(step, rank, 0, B))
            gather.launch()
            queues.enqueue(*gather.wait())
    states = [None] * world
    dist.all_gather_object(states, sharded.state())  # no gradient; what a per-rank checkpoint file holds
    merged = consolidate(states)
    for name in ("image", "text", "ids"):
        assert torch.equal(merged[name], replicated.state()[name]), name
    assert (merged["ptr"], merged["filled"]) == (replicated.ptr, replicated.filled)
    other = 4 if world == 2 else 2
    again = consolidate([shard(consolidate(states), s, other) for s in range(other)])
    for name in ("image", "text", "ids"):
        assert torch.equal(again[name], merged[name]), name
    resumed = KeyQueues(K, E, rank, world)
    resumed.load_state(again)  # a resume at this world size from any other
    assert torch.equal(resumed.image, sharded.image) and resumed.ptr == sharded.ptr


def clip_reference(img_all, txt_all, scale):
    """open_clip's ClipLoss formula over the whole global batch in one process: per-sample loss (G,)."""
    logits = scale * img_all @ txt_all.t()  # (G, G)
    labels = torch.arange(img_all.shape[0])
    i2t = F.cross_entropy(logits, labels, reduction="none")
    t2i = F.cross_entropy(logits.t(), labels, reduction="none")
    return (i2t + t2i) / 2


@check
def clip_matches_global_formula(rank, world):
    """Each rank's loss is the mean over its own samples of the global-batch formula; its embedding
    gradients are those of sum_r loss_r (the gather's backward brings other ranks' pulls home), and the
    temperature's gradients summed over ranks are that sum's too."""
    B = 3
    img_all, txt_all = unit(world * B, E, seed=70), unit(world * B, E, seed=71)
    own = slice(rank * B, (rank + 1) * B)
    img, txt = img_all[own].clone().requires_grad_(), txt_all[own].clone().requires_grad_()
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss, stats = clip_objective(img, txt, log_scale.exp())
    loss.backward()
    scale_grad = log_scale.grad.clone()
    dist.all_reduce(scale_grad)  # no gradient

    ref_img, ref_txt = img_all.clone().requires_grad_(), txt_all.clone().requires_grad_()
    ref_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    per_sample = clip_reference(ref_img, ref_txt, ref_scale.exp())  # (G,)
    torch.testing.assert_close(loss.detach(), per_sample[own].mean().detach())
    per_sample.view(world, B).mean(dim=1).sum().backward()  # sum over ranks of each rank's loss
    torch.testing.assert_close(img.grad, ref_img.grad[own])
    torch.testing.assert_close(txt.grad, ref_txt.grad[own])
    torch.testing.assert_close(scale_grad, ref_scale.grad)
    logits = ref_scale.exp() * img_all[own] @ txt_all.t()
    assert stats["acc_i2t"].item() == (logits.argmax(1) == torch.arange(B) + rank * B).float().mean().item()


@check
def running_stats_averaged(rank, world):
    """BatchNorm layers trained on each rank's own batches end a step with their running statistics
    replaced by the mean over the ranks: identical everywhere, the mean of what each rank had."""
    from wenlan.parallel.strategy import average_running_stats, running_stats

    nn = torch.nn
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.BatchNorm1d(6))
    every_rank = []
    for r in range(world):  # each rank's own update, rebuilt on every rank for the reference
        torch.manual_seed(0)
        replica = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6), torch.nn.ReLU(),
                                      torch.nn.BatchNorm1d(6)).train()
        replica(torch.randn(16, 4, generator=torch.Generator().manual_seed(r)) * (r + 1))
        every_rank.append([b.clone() for b in running_stats(replica)])
        if r == rank:
            model.load_state_dict(replica.state_dict())
    buffers = running_stats(model)
    assert len(buffers) == 4 and not torch.equal(buffers[0], every_rank[(rank + 1) % world][0])
    average_running_stats(buffers)
    for mine, parts in zip(buffers, zip(*every_rank)):
        torch.testing.assert_close(mine, torch.stack(parts).mean(0))
        assert all_equal_across_ranks(mine)


@check
def resume_decided_by_rank0(rank, world):
    """Whether and from where a run resumes is rank 0's decision, whatever the other ranks would see:
    here rank 0's output directory holds a complete checkpoint and the others' hold none (a shared file
    system seen differently), and every rank resumes from rank 0's tag. A bad --resume fails on every rank
    with rank 0's message instead of leaving the others waiting in a collective."""
    import tempfile
    from types import SimpleNamespace

    from wenlan.parallel.checkpoint import COMPLETE, Checkpointer, decided_by_rank0

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"run-seen-by-rank{rank}"
        if rank == 0:
            (out / "checkpoints" / "step00000004").mkdir(parents=True)
            (out / "checkpoints" / "step00000004" / COMPLETE).write_text(json.dumps({"data_streams": 8}))
        cfg = SimpleNamespace(output_dir=str(out), resume="auto", data_streams=8 * (rank + 1))
        checkpointer = Checkpointer(cfg)
        assert checkpointer.where[1] == "step00000004" and str(checkpointer.where[0]).endswith("rank0/checkpoints")
        assert cfg.data_streams == 8  # rank 0's stream count
        bad = SimpleNamespace(output_dir=str(out), resume=str(Path(tmp) / "nowhere"), data_streams=8)
        try:
            Checkpointer(bad)
        except ValueError as err:
            assert str(err).startswith("rank 0: ValueError: --resume:"), err
        else:
            raise AssertionError("a bad --resume on rank 0 must fail on every rank")
        assert decided_by_rank0(lambda: rank) == 0


def _worker(rank: int, world: int, port: int, out: str) -> None:
    faulthandler.enable()  # a native abort then prints where each Python thread was
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    results = {}
    for name, fn in CHECKS.items():
        try:
            fn(rank, world)
            results[name] = "ok"
        except Exception:  # recorded per check; a desynchronised rank then fails on the timeout
            results[name] = traceback.format_exc()
    Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    # Teardown: no rank closes its connections (rank 0 also hosts the store) while another may still
    # be finishing its last collective, and no in-flight work object outlives the group.
    gc.collect()
    dist.barrier()  # no gradient
    dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"{w}ranks")
def ranks(request, tmp_path_factory) -> dict:
    world = request.param
    out = tmp_path_factory.mktemp(f"ranks{world}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        mp.spawn(_worker, args=(world, free_port(), str(out)), nprocs=world, join=True)
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as err:
        done = sorted(int(p.stem[4:]) for p in out.glob("rank*.json"))
        raise AssertionError(f"{err}; ranks {done} had recorded every check's outcome (a rank listed here died "
                             "in process-group teardown, after its checks)") from err
    return {rank: json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)}


def outcome(ranks: dict, name: str) -> None:
    failures = {rank: results[name] for rank, results in ranks.items() if results[name] != "ok"}
    assert not failures, "\n".join(f"rank {rank}:\n{tb}" for rank, tb in failures.items())


def test_replicated_queues_identical_on_every_rank_in_rank_micro_sample_order(ranks):
    outcome(ranks, "replicated_queue")


def test_async_gather_returns_the_blocking_gather(ranks):
    outcome(ranks, "async_gather_equals_blocking")


def test_sharded_loss_accuracy_and_gradients_equal_replicated(ranks):
    outcome(ranks, "sharded_matches_replicated")


def test_contrastive_pretraining_sharded_step_equals_replicated(ranks):
    outcome(ranks, "contrastive_pretraining_module")


def test_queue_checkpoint_consolidate_and_reshard(ranks):
    outcome(ranks, "checkpoint_round_trip")


def test_clip_loss_and_gradients_equal_the_global_batch_formula(ranks):
    outcome(ranks, "clip_matches_global_formula")


def test_batchnorm_running_statistics_averaged_over_ranks(ranks):
    outcome(ranks, "running_stats_averaged")


def test_resume_is_decided_by_rank0_for_every_rank(ranks):
    outcome(ranks, "resume_decided_by_rank0")
