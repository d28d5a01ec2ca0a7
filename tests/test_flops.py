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
