"""Queue InfoNCE against a plain reference, queue pointer arithmetic and sharding, checkpoint state,
batch validation, EMA, CLIP loss (single process; tests/test_queue_distributed.py covers the ranks)."""

import math

import pytest
import torch
import torch.nn.functional as F

from wenlan.losses.infonce import batch_exclusion, clip_loss, queue_logsumexp
from wenlan.losses.objective import ContrastivePretraining, ObjectiveConfig, caption_ids, queue_objective
from wenlan.losses.queue import KeyQueues, consolidate, shard
from wenlan.models import BriVL, get_preset
from wenlan.parallel.momentum import MomentumEMA

E = 8


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def exclusion_mask(batch_ids: torch.Tensor, queue_ids: torch.Tensor, queue_valid: torch.Tensor,
                   in_batch_negatives: bool, use_queue: bool, mask_duplicates: bool) -> torch.Tensor:
    """(B, B + K) candidates [this batch's keys; a whole queue] that are not negatives for each query:
    ``batch_exclusion``, then the queue while ``use_queue`` is off (warm-up), its unfilled slots, and
    with ``mask_duplicates`` its slots carrying the query's id. The dense form of what
    ``queue_objective`` applies piecewise (it skips unfilled slots rather than masking them)."""
    in_queue = (~queue_valid).expand(batch_ids.shape[0], -1)  # (B, K)
    if not use_queue:
        in_queue = torch.ones_like(in_queue)
    if mask_duplicates:
        in_queue = in_queue | (batch_ids[:, None] == queue_ids[None, :])
    return torch.cat([batch_exclusion(batch_ids, in_batch_negatives, mask_duplicates), in_queue], dim=1)


def reference_loss(query, keys, queue, valid, ids, queue_ids, scale, in_batch, use_queue, mask_dup):
    """One query at a time, the InfoNCE of the papers: -log(e^{s q.k+} / sum over kept candidates)."""
    losses = []
    for i in range(query.shape[0]):
        pos = scale * query[i] @ keys[i]
        negs = []
        for j in range(keys.shape[0]):
            if j != i and in_batch and not (mask_dup and ids[j] == ids[i]):
                negs.append(scale * query[i] @ keys[j])
        for j in range(queue.shape[0]):
            if use_queue and valid[j] and not (mask_dup and queue_ids[j] == ids[i]):
                negs.append(scale * query[i] @ queue[j])
        denominator = torch.logsumexp(torch.stack([pos] + negs), dim=0)
        losses.append(denominator - pos)
    return torch.stack(losses).mean()


def fill(queues: KeyQueues, batches: int, batch: int, seed: int) -> None:
    for b in range(batches):
        queues.enqueue(unit(batch, E, seed=seed + b), unit(batch, E, seed=seed + 100 + b),
                       torch.arange(batch) + 1000 * (b + 1))


def scored(queues, img_q, txt_q, img_k, txt_k, ids, log_scale, cfg, use_queue=True):
    return queue_objective(img_q, txt_q, img_k, txt_k, ids, queues, log_scale.exp(), cfg, use_queue)


@pytest.mark.parametrize("state", ["empty", "partly_filled", "wrapped"])
@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("mask_dup", [True, False])
@pytest.mark.parametrize("use_queue", [True, False])
def test_queue_objective_matches_reference_both_directions(state, in_batch, mask_dup, use_queue):
    B, K = 4, 12
    queues = KeyQueues(K, E)
    fill(queues, {"empty": 0, "partly_filled": 2, "wrapped": 5}[state], 3, seed=1)  # 0 or 6 of 12, or wrapped
    img_q, txt_q = unit(B, E, seed=10).requires_grad_(), unit(B, E, seed=11).requires_grad_()
    img_k, txt_k = unit(B, E, seed=12), unit(B, E, seed=13)
    ids = torch.tensor([7, 8, 7, 9])  # samples 0 and 2 are the same caption
    queues.ids[0] = 8  # a copy of sample 1's positive sits in the queue
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    cfg = ObjectiveConfig(in_batch_negatives=in_batch, mask_duplicates=mask_dup)
    loss, stats = scored(queues, img_q, txt_q, img_k, txt_k, ids, log_scale, cfg, use_queue)
    scale = log_scale.exp()
    ref = sum(reference_loss(q, k, queue, queues.valid(), ids, queues.ids, scale, in_batch, use_queue, mask_dup)
              for q, k, queue in ((img_q, txt_k, queues.text), (txt_q, img_k, queues.image)))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss, (img_q, txt_q, log_scale))
    ref_grads = torch.autograd.grad(ref, (img_q, txt_q, log_scale))
    for grad, ref_grad in zip(grads, ref_grads):
        assert torch.isfinite(grad).all()
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    # accuracy: argmax over the dense [keys; queue] logits with excluded candidates at -inf
    excluded = exclusion_mask(ids, queues.ids, queues.valid(), in_batch, use_queue, mask_dup)
    for name, q, k, queue in (("acc_i2t", img_q, txt_k, queues.text), ("acc_t2i", txt_q, img_k, queues.image)):
        logits = (scale * q @ torch.cat([k, queue]).t()).masked_fill(excluded, float("-inf"))
        assert stats[name].item() == (logits.argmax(dim=1) == torch.arange(B)).float().mean().item()


def test_queue_warmup_uses_no_queue_negatives():
    """With use_queue off, a full queue (whose keys would change the loss) adds no negatives: the loss is
    in-batch InfoNCE in both directions."""
    queues = KeyQueues(6, E)
    fill(queues, 2, 3, seed=3)
    img_q, txt_q, img_k, txt_k = (unit(3, E, seed=s) for s in (4, 5, 6, 7))
    ids, log_scale, cfg = torch.tensor([1, 2, 3]), torch.tensor(math.log(10.0)), ObjectiveConfig()
    warm, _ = scored(queues, img_q, txt_q, img_k, txt_k, ids, log_scale, cfg, use_queue=False)
    in_batch_only = F.cross_entropy(10.0 * img_q @ txt_k.t(), torch.arange(3)) + \
        F.cross_entropy(10.0 * txt_q @ img_k.t(), torch.arange(3))
    torch.testing.assert_close(warm, in_batch_only)
    with_queue, _ = scored(queues, img_q, txt_q, img_k, txt_k, ids, log_scale, cfg, use_queue=True)
    assert with_queue > warm + 0.1  # the queue's keys are real negatives once it is on


def test_queue_logsumexp_splits_over_shards():
    """The normaliser of a queue is the log-sum-exp of its shards' log-sum-exps (what sharded mode
    relies on); a shard whose slots are all the query's duplicates adds nothing and no NaN."""
    q = unit(5, E, seed=30).requires_grad_()
    queue, queue_ids = unit(12, E, seed=31), torch.arange(12)
    ids = torch.tensor([0, 1, 2, 3, 100])
    queue_ids[4:8] = 3  # shard 1 of 3 holds only duplicates of query 3
    whole, best = queue_logsumexp(q, queue, torch.tensor(14.0), ids, queue_ids)
    parts = [queue_logsumexp(q, queue[s], torch.tensor(14.0), ids, queue_ids[s])
             for s in (slice(0, 4), slice(4, 8), slice(8, 12))]
    torch.testing.assert_close(torch.logsumexp(torch.stack([lse for lse, _ in parts], 1), 1), whole)
    torch.testing.assert_close(torch.stack([b for _, b in parts], 1).amax(1), best)  # BLAS blocking: ulps
    grad, = torch.autograd.grad(torch.logsumexp(torch.stack([lse for lse, _ in parts] + [q.sum(1)], 1), 1).sum(), q)
    assert torch.isfinite(grad).all()
    empty, empty_best = queue_logsumexp(q, queue[:0], torch.tensor(14.0), ids, queue_ids[:0])
    assert torch.isneginf(empty).all() and torch.isneginf(empty_best).all()


def test_queue_pointer_wraps_and_overwrites_oldest():
    queues = KeyQueues(5, 2)
    for n, start in ((2, 0), (2, 2), (2, 4)):
        keys = torch.full((n, 2), float(start))
        queues.enqueue(keys, -keys, torch.arange(start, start + n))
    assert queues.ptr == 1 and queues.filled == 5
    # slot 4 took id 4 and slot 0 took id 5 (wrapped); slots 1..3 still hold ids 1..3
    assert queues.ids.tolist() == [5, 1, 2, 3, 4]
    assert queues.image[:, 0].tolist() == [4.0, 0.0, 2.0, 2.0, 4.0]
    assert queues.valid().all()
    with pytest.raises(ValueError):
        queues.enqueue(torch.zeros(6, 2), torch.zeros(6, 2), torch.zeros(6))


def test_partly_filled_queue_masks_unfilled_slots():
    queues = KeyQueues(8, E)
    fill(queues, 1, 3, seed=9)
    assert queues.valid().tolist() == [True] * 3 + [False] * 5
    assert queues.num_live() == 3 and queues.live()[0].shape == (3, E)


@pytest.mark.parametrize("num_shards", [2, 3, 6])
def test_sharded_enqueue_writes_each_shard_its_part_of_the_global_queue(num_shards):
    """Every shard sees the same global keys and keeps its slots; together they are the replicated
    queue at every step (partly filled, wrapping past the end with a batch that does not divide K)."""
    K, G = 12, 5
    whole = KeyQueues(K, E)
    shards = [KeyQueues(K, E, s, num_shards) for s in range(num_shards)]
    for step in range(6):
        keys = (unit(G, E, seed=step), unit(G, E, seed=50 + step), torch.arange(G) + 10 * step)
        for q in (whole, *shards):
            q.enqueue(*keys)
        merged = consolidate([q.state() for q in reversed(shards)])
        for name in ("image", "text", "ids"):
            assert torch.equal(merged[name], whole.state()[name])
        assert (merged["ptr"], merged["filled"]) == (whole.ptr, whole.filled)
        live = torch.cat([q.valid() for q in shards])
        assert torch.equal(live, whole.valid())


def test_queue_state_round_trip_across_shard_counts_and_errors():
    whole = KeyQueues(12, E)
    fill(whole, 3, 3, seed=40)  # 9 of 12 filled
    two = [shard(whole.state(), s, 2) for s in range(2)]
    four = [shard(consolidate(two), s, 4) for s in range(4)]
    back = consolidate(four)
    for name in ("image", "text", "ids"):
        assert torch.equal(back[name], whole.state()[name])
    assert (back["ptr"], back["filled"], back["size"]) == (9, 9, 12)
    # a sharded module loads its own shard's state, or takes its part of a global state
    target = KeyQueues(12, E, shard=1, num_shards=4)
    target.load_state(four[1])
    assert torch.equal(target.image, whole.image[3:6]) and target.num_live() == 3
    other = KeyQueues(12, E, shard=2, num_shards=3)
    other.load_state(back)
    assert torch.equal(other.text, whole.text[8:12]) and other.ptr == 9 and other.num_live() == 1
    with pytest.raises(ValueError, match="consolidate"):
        other.load_state(four[2])
    with pytest.raises(ValueError, match="one state per shard"):
        consolidate(four[:3])
    with pytest.raises(ValueError, match="--queue-size"):
        KeyQueues(24, E).load_state(back)
    # the queue is not in the module state (rank 0's module file cannot hold per-rank shards)
    assert not any(k.startswith(("image", "text", "ids")) for k in whole.state_dict())


@pytest.mark.parametrize("cfg, global_batch, world, message", [
    (ObjectiveConfig(queue_size=100), 16, 2,
     "objective.queue_size=100 is not a multiple of the global batch 16 (= micro batch x grad accumulation x "
     "data-parallel size 2); use --queue-size 96"),
    (ObjectiveConfig(queue_size=0), 16, 2, "objective.queue_size=0 is smaller than the global batch 16"),
    (ObjectiveConfig(queue_size=100, queue_mode="sharded"), 20, 3,
     "objective.queue_mode='sharded' splits objective.queue_size=100 over 3 data-parallel ranks, which does not "
     "divide it; "
     "use --queue-size 60"),
])
def test_validate_batch_names_the_field_and_the_fix(cfg, global_batch, world, message):
    with pytest.raises(ValueError) as err:
        cfg.validate_batch(global_batch, world)
    assert message in str(err.value)


def test_validate_batch_accepts_consistent_sizes_and_ignores_clip():
    ObjectiveConfig(queue_size=96, queue_mode="sharded").validate_batch(32, 4)
    ObjectiveConfig(name="clip", queue_size=100).validate_batch(16, 2)
    with pytest.raises(ValueError, match="objective.queue_mode='ring'"):
        ObjectiveConfig(queue_mode="ring").validate()


def test_module_without_process_group_holds_the_whole_queue():
    torch.manual_seed(0)
    model = BriVL(get_preset("tiny"))
    module = ContrastivePretraining(model, ObjectiveConfig(queue_size=64, queue_mode="sharded"))
    assert (module.queues.shard, module.queues.num_shards) == (0, 1) and module.queues.image.shape == (64, 128)
    assert not any(k.startswith("queues.") for k in module.state_dict())  # saved via queues.state()
    input_ids = torch.randint(5, 70, (2, 8))
    loss = module(torch.randn(2, 3, 64, 64), input_ids, torch.ones_like(input_ids), caption_ids(input_ids))
    module.gather.launch()  # the momentum keys the objective kept for the queue
    image_keys, text_keys, ids = module.gather.wait()
    assert torch.isfinite(loss) and image_keys.shape == text_keys.shape == (2, 128) and not image_keys.requires_grad
    assert torch.equal(ids, caption_ids(input_ids))
    loss_sum, i2t_sum, t2i_sum, acc_sum, temperature_sum, micro_batches = module.take_totals().tolist()
    assert loss_sum == loss.item() and micro_batches == 1 and temperature_sum == pytest.approx(0.07)
    assert i2t_sum + t2i_sum == pytest.approx(loss_sum, rel=1e-6)  # brivl's loss: the sum of both directions


def test_momentum_update_equals_ema_formula():
    """Whole tensors (no ZeRO-3); the partitioned path is tested on real engines in
    test_momentum_partitioned.py."""
    torch.manual_seed(0)
    model = BriVL(get_preset("tiny"))
    pairs = list(model.named_momentum_pairs())
    ema = MomentumEMA(pairs)
    ema.update(0.0)  # initial copy
    for _, online, key in pairs:
        assert torch.equal(online, key) and not key.requires_grad
    with torch.no_grad():
        for p in list(model.image_tower.parameters()) + list(model.text_tower.parameters()):
            p.add_(torch.randn_like(p))
    before = [(o.detach().clone(), k.detach().clone()) for _, o, k in pairs]
    ema.update(0.9)
    for (online, key_before), (_, _, key) in zip(before, pairs):
        torch.testing.assert_close(key, 0.9 * key_before + 0.1 * online, rtol=0, atol=1e-6)


def test_momentum_schedule_rises_to_target():
    cfg = ObjectiveConfig(momentum=0.999, momentum_start=0.99)
    values = [cfg.momentum_at(s, 101) for s in range(101)]
    assert math.isclose(values[0], 0.99) and math.isclose(values[-1], 0.999)
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert ObjectiveConfig(momentum=0.99).momentum_at(50, 100) == 0.99


def test_clip_loss_matches_formula_single_rank():
    img, txt = unit(5, E, seed=20), unit(5, E, seed=21)
    scale = torch.tensor(1 / 0.07)
    loss, _, (loss_i2t, loss_t2i) = clip_loss(img, txt, img, txt, 0, scale)
    logits = scale * img @ txt.t()
    i2t, t2i = F.cross_entropy(logits, torch.arange(5)), F.cross_entropy(logits.t(), torch.arange(5))
    torch.testing.assert_close(loss, (i2t + t2i) / 2)
    torch.testing.assert_close((loss_i2t, loss_t2i), (i2t, t2i))  # the directions the log shows
    assert not torch.isclose(i2t, t2i)  # and they are told apart


def test_caption_ids_identify_identical_captions():
    ids = caption_ids(torch.tensor([[2, 5, 9, 3, 0], [2, 5, 9, 3, 0], [2, 9, 5, 3, 0]]))
    assert ids[0] == ids[1] and ids[0] != ids[2]


def test_ema_of_bf16_working_weights_is_within_half_a_bf16_ulp_of_the_fp32_ema():
    """Why ZeRO-0/1/2 may feed the EMA the online weights' bf16 working copy while ZeRO-3 feeds it their
    fp32 master: the EMA is a convex combination, so its error never exceeds the largest error of its
    inputs, which is half a bf16 ulp of the online weight (the working copy is the master's rounding).
    The key tower computes with bf16 weights, i.e. at that resolution (the key is an average of recent
    online values, of their magnitude). Checked elementwise over 3,000 Adam-sized steps of a drifting
    tensor, with the EMAs' own fp32 rounding (2^16 times smaller) accounted for."""
    g = torch.Generator().manual_seed(0)
    master = torch.randn(4096, generator=g) * 0.05  # the online tensor's fp32 master
    online = {"fp32": torch.nn.Parameter(master.clone()), "bf16": torch.nn.Parameter(master.bfloat16())}
    keys = {k: torch.nn.Parameter(master.bfloat16(), requires_grad=False) for k in online}
    emas = {k: MomentumEMA([(k, online[k], keys[k])]) for k in online}
    worst_input_error = (master - master.bfloat16().float()).abs()
    for step in range(3000):
        m = 0.0 if step == 0 else 0.999
        for k, ema in emas.items():
            ema.update(m)
        difference = (emas["fp32"].masters[0] - emas["bf16"].masters[0]).abs()
        # plus both EMAs' own fp32 rounding, at most one fp32 ulp per step, contracted by m: <= 2 eps |x| / (1 - m)
        fp32_rounding = 2 * torch.finfo(torch.float32).eps * emas["fp32"].masters[0].abs() / (1 - 0.999)
        assert (difference <= worst_input_error + fp32_rounding).all(), f"step {step}"
        master += 1e-4 * torch.randn(4096, generator=g).sign() * (step % 7 != 0)  # lr-sized, drifting
        with torch.no_grad():
            online["fp32"].copy_(master)
            online["bf16"].copy_(master.bfloat16())
        worst_input_error = torch.maximum(worst_input_error, (master - master.bfloat16().float()).abs())
    assert (emas["fp32"].masters[0] != emas["bf16"].masters[0]).any()  # the inputs really differed


def test_clip_logits_are_fp32_for_bf16_embeddings():
    """bf16 towers: the logits are formed in fp32 from the (exactly upcast) embeddings. At a scale of
    100, logits formed in bf16 would be rounded to 0.25-0.5 apart and the loss would move by ~1e-2."""
    img, txt = unit(64, 256, seed=30).bfloat16(), unit(64, 256, seed=31).bfloat16()
    scale = torch.tensor(100.0)
    loss, *_ = clip_loss(img, txt, img, txt, 0, scale)
    exact, *_ = clip_loss(img.float(), txt.float(), img.float(), txt.float(), 0, scale)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, exact, rtol=0, atol=0)
    rounded = (scale * img @ txt.t()).float()  # what bf16 logits would have been
    assert (rounded - (scale * img.float() @ txt.float().t())).abs().max() > 0.05
