"""Activation checkpointing of the online towers in the plain/ZeRO path, applied to a built model.

The repeated blocks of each online tower (the backbone's stages or ViT blocks, BERT's layers, the
attention layers) keep only their inputs in the forward and recompute their insides in the backward:
``torch.utils.checkpoint`` non-reentrant, dropout replayed with the forward's RNG state. Every k-th
block of a tower is checkpointed (k = 1: all). The momentum towers run without gradient and are never
checkpointed; neither are the cheap stems, region pooling and heads.

Under ZeRO-3 the recompute reads gathered parameters: the recompute runs when the backward first
needs a block's saved tensors, after DeepSpeed's pre-backward hook on the block's output has gathered
its parameters, and the block's children run through their own hooks as in the forward. The pipeline
has its own knob (``pipeline.activation_checkpoint_interval``, DeepSpeed's).
"""

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint


def checkpointed_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The repeated blocks of the online towers of a BriVL, by name, each tower's in forward order."""
    image, text = model.image_tower, model.text_tower
    lists = [("image_tower.backbone.net.blocks", getattr(image.backbone.net, "blocks", None)),
             ("image_tower.encoder", image.encoder),
             ("text_tower.bert.encoder.layer", getattr(getattr(text.bert, "encoder", None), "layer", None)),
             ("text_tower.encoder", text.encoder)]
    return [(f"{prefix}.{i}", block) for prefix, blocks in lists if blocks is not None
            for i, block in enumerate(blocks)]


def apply_activation_checkpointing(model: nn.Module, every: int) -> list[str]:
    """Checkpoint every ``every``-th block of each online block list (0: none). Returns their names."""
    if every < 0:
        raise ValueError(f"--activation-checkpointing {every}: use 0 (off), 1 (every block) or k (every k-th)")
    if every == 0:
        return []
    chosen = []
    for name, block in checkpointed_blocks(model):
        if int(name.rsplit(".", 1)[1]) % every == 0:
            _checkpoint_forward(block)
            chosen.append(name)
    return chosen


def _checkpoint_forward(module: nn.Module) -> None:
    forward = module.forward  # the bound method; nn.Module.__call__ reads the instance attribute

    def checkpointed(*args, **kwargs):
        if not (module.training and torch.is_grad_enabled()):  # evaluation: nothing to recompute
            return forward(*args, **kwargs)
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    module.forward = checkpointed
