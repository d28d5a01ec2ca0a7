"""The FLOPs of a training sample (wenlan.models.flops), counted by torch's dispatcher on the meta device,
against a count written from the layers' shapes here: a real forward on CPU with a hook per layer."""

import pytest
import timm.layers
import torch
import torch.nn as nn
from transformers.models.bert.modeling_bert import BertSelfAttention

from wenlan.losses.objective import ObjectiveConfig
from wenlan.models.brivl import BriVL
from wenlan.models.flops import tower_flops, train_flops_per_sample
from wenlan.models.layers import SelfAttentionLayer
from wenlan.models.presets import get_preset


def analytic_forward_flops(model: BriVL, cfg) -> tuple[int, int]:
    """(forward FLOPs of one pair through the online towers, FLOPs of the first layer that reads the
    image) from each layer's shapes: 2 per multiply-add of every Linear and Conv2d, and the two
    (N, N) attention products, 4 N^2 D, of every attention layer."""
    counted, first = [], []

    def layer(module, args, kwargs, out):
        if isinstance(module, nn.Linear):
            counted.append(2 * out.numel() * module.in_features)
        elif isinstance(module, nn.Conv2d):
            counted.append(2 * out.numel() * (module.in_channels // module.groups) * module.kernel_size[0]
                           * module.kernel_size[1])
            if not first:
                first.append(counted[-1])
        else:  # attention: x (1, N, D)
            x = args[0] if args else kwargs["hidden_states"]
            counted.append(4 * x.shape[1] ** 2 * x.shape[2])

    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, SelfAttentionLayer, BertSelfAttention, timm.layers.Attention)):
            module.register_forward_hook(layer, with_kwargs=True)
    size, length = cfg.image.image_size, cfg.text.max_len
    with torch.no_grad():
        model.encode_image(torch.randn(1, 3, size, size))
        model.encode_text(torch.randint(5, 100, (1, length)), torch.ones(1, length, dtype=torch.long))
    return sum(counted), first[0]


@pytest.mark.parametrize("preset", ["tiny", "tiny-vit", "base"])
def test_flops_per_sample_match_the_layer_shapes(preset):
    cfg = get_preset(preset)
    torch.manual_seed(0)
    model = BriVL(cfg, momentum=False).eval()
    assert all(p.requires_grad for p in model.parameters())  # every layer's backward is 2x its forward...
    forward, image_input_layer = analytic_forward_flops(model, cfg)
    backward = 2 * forward - image_input_layer  # ...but the first layer's: no gradient for the images
    counted = tower_flops(cfg)
    assert counted.online_forward == pytest.approx(forward, rel=0.05)
    assert counted.online_backward == pytest.approx(backward, rel=0.05)
    assert counted.momentum_forward == counted.online_forward
    assert tower_flops(cfg, momentum=False).momentum_forward == 0

    objective = ObjectiveConfig(queue_size=1024)
    logits = 8 * cfg.embed_dim * (32 + 1024)  # 2 directions x (forward + query gradient) x 2 E (B + K)
    assert train_flops_per_sample(cfg, objective, 32, 4) == counted.total + logits
    clip = ObjectiveConfig(name="clip")
    assert train_flops_per_sample(cfg, clip, 32, 4) == counted.online_forward + counted.online_backward \
        + 12 * cfg.embed_dim * 128


def test_frozen_layers_cost_no_weight_gradient():
    """brivl-1.0 freezes the backbone's early blocks and BERT's first 8 layers: the backward runs no
    weight gradient there and no input gradient below the lowest trainable layer."""
    cfg = get_preset("brivl-1.0")
    counted = tower_flops(cfg)
    assert counted.online_backward < 1.5 * counted.online_forward
    cfg.freeze = ("image_tower.*", "text_tower.*")  # nothing trains: no backward at all
    assert tower_flops(cfg).online_backward == 0


def test_peak_table_reads_device_names():
    from wenlan.models.flops import peak_tflops

    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops("NVIDIA H100 PCIe") == 756.0  # not the SXM part's peak
    assert peak_tflops("NVIDIA H200") == 989.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert peak_tflops("NVIDIA A10G") == 70.0
    assert peak_tflops("cpu") is None


def test_multi_view_objectives_count_both_views_and_the_shared_transformer():
    """ernie-vil2 and cookie run two image views and two textual views through the towers, and cookie's
    shared transformer over both towers' tokens: per sample, twice the towers (the shared layers
    counted from their shapes by the same hooks) and clip's logits once per weighted view pair."""
    from dataclasses import replace

    from wenlan.losses.multiview import CookieConfig

    plain = get_preset("tiny")
    cookie_cfg = replace(plain, shared_layers=2)
    torch.manual_seed(0)
    shared_forward, _ = analytic_forward_flops(BriVL(cookie_cfg, momentum=False).eval(), cookie_cfg)
    plain_forward, _ = analytic_forward_flops(BriVL(plain, momentum=False).eval(), plain)
    dim, regions, length = plain.image.dim, plain.image.grid ** 2 + 1, plain.text.max_len
    per_token = 2 * (3 * dim * dim + dim * dim + 2 * dim * plain.image.ffn_dim)  # qkv, proj, feed-forward
    expected = 2 * sum(n * per_token + 4 * n * n * dim for n in (regions, length))  # 2 layers, both modalities
    assert shared_forward - plain_forward == expected  # the hooks see exactly the shared layers added

    with_shared, without = tower_flops(cookie_cfg, momentum=False), tower_flops(plain, momentum=False)
    assert with_shared.online_forward - without.online_forward == pytest.approx(expected, rel=0.05)
    E, G = plain.embed_dim, 32 * 4
    cookie = ObjectiveConfig(name="cookie", cookie=CookieConfig(shared_layers=2))
    assert train_flops_per_sample(cookie_cfg, cookie, 32, 4) == 2 * with_shared.total + 3 * 12 * E * G
    ernie = ObjectiveConfig(name="ernie-vil2")
    assert train_flops_per_sample(plain, ernie, 32, 4) == 2 * without.total + 6 * 12 * E * G
    ernie.ernie_vil2.image_image_weight = 0.0  # a pair without weight is not computed
    assert train_flops_per_sample(plain, ernie, 32, 4) == 2 * without.total + 5 * 12 * E * G
    ernie.ernie_vil2.queue, ernie.queue_size = True, 1024  # + the momentum forward of the first views only
    momentum = tower_flops(plain).momentum_forward
    assert train_flops_per_sample(plain, ernie, 32, 4) == 2 * without.total + momentum + 5 * 12 * E * G \
        + 5 * 2 * 4 * E * 1024  # each pair's two directions against a queue: forward + query gradient
