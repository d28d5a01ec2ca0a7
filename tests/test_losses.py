"""Queue InfoNCE against a plain reference, queue pointer arithmetic, EMA, CLIP loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from wenlan.losses import KeyQueues, caption_ids, clip_loss, exclusion_mask, info_nce
from wenlan.losses.objective import ObjectiveConfig
from wenlan.models import BriVL, get_preset, momentum_update

E = 8


def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


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


@pytest.mark.parametrize("state", ["partly_filled", "wrapped"])
@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("mask_dup", [True, False])
def test_queue_infonce_matches_reference_both_directions(state, in_batch, mask_dup):
    B, K = 4, 12
    queues = KeyQueues(K, E)
    fill(queues, 2 if state == "partly_filled" else 5, 3, seed=1)  # 6 of 12, or wrapped past the end
    img_q, txt_q = unit(B, E, seed=10).requires_grad_(), unit(B, E, seed=11).requires_grad_()
    img_k, txt_k = unit(B, E, seed=12), unit(B, E, seed=13)
    ids = torch.tensor([7, 8, 7, 9])  # samples 0 and 2 are the same caption
    queues.ids[0] = 8  # a copy of sample 1's positive sits in the queue
    scale = torch.tensor(1 / 0.07)
    excluded = exclusion_mask(ids, queues.ids, queues.valid(), in_batch, True, mask_dup)
    for q, k, queue in ((img_q, txt_k, queues.text), (txt_q, img_k, queues.image)):
        loss, _ = info_nce(q, k, queue, scale, excluded)
        ref = reference_loss(q, k, queue, queues.valid(), ids, queues.ids, scale, in_batch, True, mask_dup)
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        grad, = torch.autograd.grad(loss, q)
        ref_grad, = torch.autograd.grad(ref, q)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_queue_warmup_uses_no_queue_negatives():
    queues = KeyQueues(6, E)
    fill(queues, 2, 3, seed=3)
    q, k, ids = unit(3, E, seed=4), unit(3, E, seed=5), torch.tensor([1, 2, 3])
    excluded = exclusion_mask(ids, queues.ids, queues.valid(), True, False, True)
    loss, _ = info_nce(q, k, queues.text, torch.tensor(10.0), excluded)
    in_batch_only = F.cross_entropy(10.0 * q @ k.t(), torch.arange(3))
    torch.testing.assert_close(loss, in_batch_only)


def test_queue_pointer_wraps_and_overwrites_oldest():
    queues = KeyQueues(5, 2)
    for n, start in ((2, 0), (2, 2), (2, 4)):
        keys = torch.full((n, 2), float(start))
        queues.enqueue(keys, -keys, torch.arange(start, start + n))
    assert queues.ptr.item() == 1 and queues.filled.item() == 5
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


def test_momentum_update_equals_ema_formula():
    torch.manual_seed(0)
    model = BriVL(get_preset("tiny"))
    momentum_update(model, 0.0)  # initial copy
    for online, key in model.online_momentum_pairs():
        assert torch.equal(online, key) and not key.requires_grad
    with torch.no_grad():
        for p in list(model.image_tower.parameters()) + list(model.text_tower.parameters()):
            p.add_(torch.randn_like(p))
    before = [(o.detach().clone(), k.detach().clone()) for o, k in model.online_momentum_pairs()]
    momentum_update(model, 0.9)
    for (online, key_before), (_, key) in zip(before, model.online_momentum_pairs()):
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
    loss, _ = clip_loss(img, txt, img, txt, 0, scale)
    logits = scale * img @ txt.t()
    expected = (F.cross_entropy(logits, torch.arange(5)) + F.cross_entropy(logits.t(), torch.arange(5))) / 2
    torch.testing.assert_close(loss, expected)


def test_caption_ids_identify_identical_captions():
    ids = caption_ids(torch.tensor([[2, 5, 9, 3, 0], [2, 5, 9, 3, 0], [2, 9, 5, 3, 0]]))
    assert ids[0] == ids[1] and ids[0] != ids[2]
