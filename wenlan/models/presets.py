"""Model presets, and ``python -m wenlan.models.presets [--json]`` to count their parameters and the
FLOPs of one training sample.

Counts are taken on the meta device, so the 10B preset is counted without allocating it.
"""

import argparse
import dataclasses
import json

import torch

from wenlan.models.brivl import BriVL, ModelConfig
from wenlan.models.towers import ImageTowerConfig, TextTowerConfig


def _vit(dim: int, depth: int, heads: int) -> dict:
    return dict(embed_dim=dim, depth=depth, num_heads=heads)


PRESETS: dict[str, ModelConfig] = {
    # CPU demo and tests: a few M parameters, 64 px images, GroupNorm backbone (no batch statistics,
    # so results do not depend on how a global batch is split across ranks).
    "tiny": ModelConfig(
        image=ImageTowerConfig(backbone="test_efficientnet_gn", backbone_kwargs=dict(output_stride=16),
                               image_size=64, grid=3, dim=128, layers=2, heads=4, ffn_dim=256, dropout=0.0),
        text=TextTowerConfig(vocab_size=2048, hidden=128, bert_layers=2, bert_heads=2, bert_ffn=256,
                             max_len=32, layers=2, heads=4, ffn_dim=256, dropout=0.0),
        embed_dim=128),
    # The tiny preset with a ViT backbone: the 1b/10b image path (patch tokens, class token and position
    # embedding as parameters of the timm model itself) at CPU-test size.
    "tiny-vit": ModelConfig(
        image=ImageTowerConfig(backbone="vit_base_patch16_224", backbone_kwargs=_vit(64, 2, 2),
                               image_size=64, grid=3, dim=128, layers=2, heads=4, ffn_dim=256, dropout=0.0),
        text=TextTowerConfig(vocab_size=2048, hidden=128, bert_layers=2, bert_heads=2, bert_ffn=256,
                             max_len=32, layers=2, heads=4, ffn_dim=256, dropout=0.0),
        embed_dim=128),
    "base": ModelConfig(
        image=ImageTowerConfig(backbone="tf_efficientnet_b3", image_size=300, grid=6, dim=1024, layers=2,
                               heads=8, ffn_dim=2048),
        text=TextTowerConfig(vocab_size=21128, hidden=768, bert_layers=12, bert_heads=12, bert_ffn=3072,
                             max_len=80, layers=2, heads=8, ffn_dim=2048),
        embed_dim=1024),
    # Scaled-up BriVL: ViT image backbones (patch tokens pooled into the same 6x6+1 regions) and wider,
    # deeper BERT-style text encoders.
    "1b": ModelConfig(
        image=ImageTowerConfig(backbone="vit_base_patch16_224", backbone_kwargs=_vit(1280, 32, 16),
                               image_size=224, grid=6, dim=1280, layers=2, heads=16, ffn_dim=5120),
        text=TextTowerConfig(vocab_size=21128, hidden=1024, bert_layers=24, bert_heads=16, bert_ffn=4096,
                             max_len=80, layers=2, heads=16, ffn_dim=4096),
        embed_dim=2048),
    "10b": ModelConfig(
        image=ImageTowerConfig(backbone="vit_base_patch16_224", backbone_kwargs=_vit(2560, 48, 32),
                               image_size=224, grid=6, dim=2560, layers=4, heads=32, ffn_dim=10240),
        text=TextTowerConfig(vocab_size=21128, hidden=4096, bert_layers=27, bert_heads=32, bert_ffn=16384,
                             max_len=80, layers=4, heads=32, ffn_dim=16384),
        embed_dim=2048),
    # The released BriVL-1.0: EfficientNet-B5 (blocks 3-6 trainable), 6x6+1 regions, 4 post-norm
    # attention layers per tower, chinese-roberta-wwm-ext-shaped BERT with its last 4 layers trainable.
    # Its regions are sampled where BriVL's own code samples them (region_sampling="brivl"), so BriVL's
    # weights compute what they computed; every other preset trains from scratch and keeps the
    # symmetric cell-centre sampling.
    "brivl-1.0": ModelConfig(
        image=ImageTowerConfig(backbone="tf_efficientnet_b5", image_size=380, grid=6, box_samples=4,
                               region_sampling="brivl",
                               trainable_prefixes=("blocks.3", "blocks.4", "blocks.5", "blocks.6"),
                               dim=2048, layers=4, heads=4, ffn_dim=2048, norm_first=False,
                               region_position=False),
        text=TextTowerConfig(vocab_size=21128, hidden=768, bert_layers=12, bert_heads=12, bert_ffn=3072,
                             max_len=80, trainable_bert_layers=4, layers=4, heads=4, ffn_dim=2048,
                             norm_first=False),
        embed_dim=2048),
}


def get_preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"--preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dataclasses.replace(PRESETS[name])


def cut_depth(cfg: ModelConfig, vit_blocks: int | None = None, bert_layers: int | None = None,
              attention_layers: int | None = None) -> ModelConfig:
    """``cfg``'s widths with its depth cut: ``vit_blocks`` ViT blocks, ``bert_layers`` BERT layers,
    ``attention_layers`` self-attention layers per tower (None keeps the preset's). A big preset's
    tensor shapes (and so every per-tensor ZeRO decision: buckets, partitions, persistence) at a few of
    its layers' memory: a smoke run of the 10b shapes fits 2 CPU processes, and the planner's
    activation counts are checked against it."""
    if vit_blocks is not None and not cfg.image.backbone.startswith("vit_"):
        raise ValueError(f"--cut-depth: the image backbone {cfg.image.backbone!r} is not a ViT, whose depth is one "
                         "number; cut the depth of the 1b, 10b or tiny-vit preset")
    for flag, value, least in (("--cut-depth", vit_blocks, 1), ("--cut-depth", bert_layers, 1),
                               ("--attention-layers", attention_layers, 0)):
        if value is not None and value < least:
            raise ValueError(f"{flag} {value}: must be >= {least}")
    image, text = cfg.image, cfg.text
    if vit_blocks is not None:
        image = dataclasses.replace(image, backbone_kwargs=dict(image.backbone_kwargs, depth=vit_blocks))
    if bert_layers is not None:
        text = dataclasses.replace(text, bert_layers=bert_layers)
    if attention_layers is not None:
        image = dataclasses.replace(image, layers=attention_layers)
        text = dataclasses.replace(text, layers=attention_layers)
    return dataclasses.replace(cfg, image=image, text=text)


def count_parameters(cfg: ModelConfig) -> dict[str, int]:
    with torch.device("meta"):
        model = BriVL(cfg)
    online = [p for m in (model.image_tower, model.text_tower) for p in m.parameters()]
    momentum = sum(p.numel() for m in (model.momentum_image_tower, model.momentum_text_tower)
                   for p in m.parameters())
    trainable = sum(p.numel() for p in online if p.requires_grad)
    frozen = sum(p.numel() for p in online if not p.requires_grad)
    return dict(online_trainable=trainable, frozen=frozen, momentum=momentum,
                total=trainable + frozen + momentum)


PRESET_FLOPS_MICRO_BATCH = 64
"""The micro-batch at which the presets table counts the objective's in-batch logits."""


def main() -> None:
    from wenlan.losses.objective import ObjectiveConfig
    from wenlan.models.flops import train_flops_per_sample

    parser = argparse.ArgumentParser(
        description="Parameter counts of every preset and the FLOPs of one training sample (meta device): "
                    "online forward + backward, momentum forward, and the default objective's logits (brivl, "
                    f"queue {ObjectiveConfig().queue_size}, micro-batch {PRESET_FLOPS_MICRO_BATCH}), at the "
                    "preset's image size and text length.")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    counts = {}
    for name, cfg in PRESETS.items():
        counts[name] = count_parameters(cfg)
        counts[name]["train_flops_per_sample"] = train_flops_per_sample(cfg, ObjectiveConfig(),
                                                                        PRESET_FLOPS_MICRO_BATCH, 1)
    if args.json:
        print(json.dumps(counts, indent=2))
        return
    cols = ["online_trainable", "frozen", "momentum", "total"]
    print(f"{'preset':<10}" + "".join(f"{c:>18}" for c in cols) + f"{'train GFLOP/sample':>20}")
    for name, c in counts.items():
        print(f"{name:<10}" + "".join(f"{c[k]:>18,}" for k in cols)
              + f"{c['train_flops_per_sample'] / 1e9:>20,.1f}")


if __name__ == "__main__":
    main()
