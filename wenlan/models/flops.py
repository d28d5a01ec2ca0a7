"""FLOPs of one training sample, counted once, for the step line's TFLOPs/MFU, the presets table and the
planner.

The towers are counted by ``torch.utils.flop_counter.FlopCounterMode`` on the meta device (nothing is
allocated, so the 10b preset counts in seconds): the online forward, the backward that autograd actually
runs (no weight gradient for frozen parameters, no input gradient below the lowest trainable layer),
and the momentum forward. FLOPs are matmul, convolution and attention FLOPs (2 per multiply-add), the
convention MFU is quoted in; normalisation, activations and the region sampling are memory-bound and
not counted. A caption is counted at the full text length: batches are padded to it.

The objective's logits (in-batch and queue) are the objective's own count
(``ObjectiveConfig.logits_flops_per_sample``), added here.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from wenlan.losses.objective import ObjectiveConfig
    from wenlan.models.brivl import ModelConfig


@dataclass(frozen=True)
class TowerFlops:
    """Per sample, both towers."""

    online_forward: int
    online_backward: int
    momentum_forward: int
    """0 when the objective has no momentum towers (clip)."""

    @property
    def total(self) -> int:
        return self.online_forward + self.online_backward + self.momentum_forward


def _conv_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                         _output_padding, _groups, output_mask, out_shape=None, **kwargs) -> int:
    """A (non-transposed) convolution's backward: the input gradient and the weight gradient each cost
    the forward's FLOPs. torch's own formula counts the weight gradient of a grouped convolution as if
    it were dense, ``groups`` times too many: an EfficientNet's depthwise layers would make the backward
    ~10x the forward instead of ~2x."""
    from torch.utils.flop_counter import conv_flop_count

    if transposed:
        raise NotImplementedError("no transposed convolutions in the towers")
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape)  # w_shape is (C_out, C_in / groups, k, k)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def tower_flops(cfg: "ModelConfig", momentum: bool = True) -> TowerFlops:
    """FLOPs of one (image, caption) pair through the towers of ``cfg``, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers.initialization import no_init_weights

    from wenlan.models.brivl import BriVL

    with torch.device("meta"), no_init_weights():
        model = BriVL(cfg, momentum=False).train()
    size, length = cfg.image.image_size, cfg.text.max_len
    images = torch.zeros(1, 3, size, size, device="meta")
    input_ids = torch.zeros(1, length, dtype=torch.long, device="meta")
    mask = torch.ones(1, length, dtype=torch.long, device="meta")
    shared = model.shared_encoder
    with FlopCounterMode(display=False) as counter:
        # The towers' blocks compute their forward and, unlike BERT's own forward, read no mask value
        # (there are none on the meta device). A shared transformer runs before each tower's last block
        # (its pooling and head), as in BriVL.encode_image / encode_text.
        image, blocks = images, model.image_tower.blocks()
        for block in blocks[:-1]:
            image = block.run(image)  # ends (1, R, dim)
        image = blocks[-1].run(shared.image(image) if shared is not None else image)  # (1, E)
        text, blocks = None, model.text_tower.blocks()
        for block in blocks[:-1]:
            text = block.run(text, input_ids, mask)  # ends (1, L, H)
        text = blocks[-1].run(shared.text(text, mask) if shared is not None else text, input_ids, mask)  # (1, E)
    forward = counter.get_total_flops()
    backward = 0
    loss = image.sum() + text.sum()
    if loss.requires_grad:  # else every parameter is frozen: no backward
        with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.convolution_backward: _conv_backward_flops}) \
                as counter:
            loss.backward()
        backward = counter.get_total_flops()
    # The momentum towers are copies of the online ones: the same forward (eval-mode dropout and
    # no-grad change no matmul).
    return TowerFlops(forward, backward, forward if momentum else 0)


def train_flops_per_sample(cfg: "ModelConfig", objective: "ObjectiveConfig", micro_batch: int,
                           data_parallel_size: int) -> int:
    """Everything one training sample costs: the towers' forward and backward (twice for the multi-view
    objectives: two image views and two textual views per sample; cookie's shared transformer is part
    of ``cfg``), the momentum forward, and the objective's logits at this batch layout (in-batch
    candidates depend on it)."""
    towers = tower_flops(cfg, momentum=objective.uses_momentum)
    views = 2 if objective.spec.views else 1  # the momentum towers embed the first views only
    online = towers.online_forward + towers.online_backward
    return views * online + towers.momentum_forward + objective.logits_flops_per_sample(cfg.embed_dim, micro_batch, data_parallel_size)


PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    # (a substring of torch.cuda.get_device_name(), dense bf16 tensor-core TFLOP/s), most specific first.
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0),
    ("H20", 148.0), ("GH200", 989.0), ("B200", 2250.0), ("B100", 1750.0),
    ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
    ("MI300X", 1307.0), ("MI250X", 383.0),
)
"""Vendor peak dense bf16 TFLOP/s per device, for MFU. No entry for a device: MFU is not reported."""


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device by its name (e.g. "NVIDIA H100 80GB HBM3": 989), None if unknown."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key in device_name:
            return peak
    return None
