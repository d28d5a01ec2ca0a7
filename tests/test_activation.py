"""Activation checkpointing of the online towers: the same loss and gradients, fewer saved activations.
The 2-rank ZeRO-3 run against the same run without it is in test_zero_equivalence.py."""

import copy

import pytest
import torch

from wenlan.models import BriVL, get_preset
from wenlan.models.init import init_weights
from wenlan.parallel.activation import apply_activation_checkpointing, checkpointed_blocks


def batch(B=4, L=12):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[0, 7:] = 0
    return torch.randn(B, 3, 64, 64, generator=g), ids, mask


def step(model):
    """Loss and gradients of one forward/backward through both online towers (and the keys, without
    gradient); the bytes autograd saved for the backward."""
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        img_q, txt_q, img_k, txt_k = model(*batch())
        loss = -(img_q * txt_k).sum() - (txt_q * img_k).sum() + (img_q @ txt_q.t()).logsumexp(1).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved)


@pytest.mark.parametrize("preset", ["tiny", "tiny-vit"])
def test_checkpointing_keeps_loss_and_gradients_and_saves_less(preset):
    cfg = get_preset(preset)
    plain = BriVL(cfg)
    init_weights(plain, seed=0)
    plain.train()
    checkpointed = copy.deepcopy(plain)
    names = apply_activation_checkpointing(checkpointed, every=1)
    assert names == [n for n, _ in checkpointed_blocks(checkpointed)] and len(names) >= 6
    loss, grads, saved = step(plain)
    loss_ckpt, grads_ckpt, saved_ckpt = step(checkpointed)
    assert torch.equal(loss, loss_ckpt)
    assert grads.keys() == grads_ckpt.keys() and len(grads) > 50
    for name, grad in grads.items():
        assert torch.equal(grad, grads_ckpt[name]), name
    assert saved_ckpt < 0.6 * saved, (saved_ckpt, saved)  # the blocks' insides were not kept


def test_every_kth_block_and_never_the_key_towers():
    model = BriVL(get_preset("tiny"))
    names = apply_activation_checkpointing(model, every=2)
    assert names and all(int(n.rsplit(".", 1)[1]) % 2 == 0 for n in names)
    assert "text_tower.bert.encoder.layer.0" in names and "text_tower.bert.encoder.layer.1" not in names
    patched = [m for m in model.modules() if "forward" in vars(m)]
    assert len(patched) == len(names)
    assert not any("forward" in vars(m) for m in model.momentum_image_tower.modules())
    assert not any("forward" in vars(m) for m in model.momentum_text_tower.modules())
    assert apply_activation_checkpointing(BriVL(get_preset("tiny")), every=0) == []
    with pytest.raises(ValueError, match="--activation-checkpointing -1"):
        apply_activation_checkpointing(model, every=-1)
