"""BriVL's two towers. Each is an explicit sequence of stages:

image: backbone -> region pooling -> self-attention layers -> masked mean -> MLP head -> L2 norm
text:  BERT encoder -> self-attention layers -> masked mean -> MLP head -> L2 norm

``blocks()`` lists the same forward as a sequence of ``Block``s (the third-party backbone and BERT
written out stage by stage); a pipeline expresses the model as those blocks.

Parameters are only touched inside ``forward`` (under ZeRO-3 they are partitioned everywhere else).
``__init__`` only builds the architecture; ``pretrained_state()`` returns the pretrained weights to
load afterwards (module by module with gathered parameters under ZeRO-3).
"""

from collections.abc import Callable
from dataclasses import dataclass, field

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

from wenlan.models.layers import ProjectionHead, SelfAttentionLayer, masked_mean


@dataclass
class ImageTowerConfig:
    """Image tower: a timm backbone, region features from a grid of boxes, attention, MLP head."""

    backbone: str = "test_efficientnet_gn"
    """timm model name; CNNs give a feature map, ViTs give patch tokens reshaped to a map."""
    backbone_kwargs: dict = field(default_factory=dict)
    """Extra ``timm.create_model`` arguments (``output_stride``, ViT ``embed_dim``/``depth``...)."""
    pretrained_path: str | None = None
    """Optional local checkpoint (``.safetensors``/``.pth``) for the backbone; random init otherwise."""
    trainable_prefixes: tuple[str, ...] | None = None
    """If set, only backbone parameters whose names start with one of these train (BriVL-1.0: blocks 3-6)."""
    image_size: int = 64
    grid: int = 3
    """Boxes form a grid x grid tiling plus the whole image (BriVL's detector-free variant: 6x6 + 1)."""
    box_samples: int = 4
    """Each box is bilinearly sampled at box_samples x box_samples points, projected, then averaged."""
    region_sampling: str = "centred"
    """Where a box's samples sit (see ``RegionPool``): ``centred``, at the centres of the box's
    box_samples x box_samples cells; ``brivl``, where BriVL's released code samples (its affine grid is
    normalised by W - 1 but sampled with align_corners=False), for presets that load BriVL's weights."""
    dim: int = 128
    layers: int = 2
    heads: int = 4
    ffn_dim: int = 256
    dropout: float = 0.1
    norm_first: bool = True
    l2_regions: bool = True
    """BriVL L2-normalises region features before the attention layers."""
    region_position: bool = True
    """Add a learned embedding per box before attention. Attention + mean is permutation invariant,
    so without it "where" is only what the backbone's padding leaks; BriVL-1.0 had none."""


@dataclass
class TextTowerConfig:
    """Text tower: a BERT/RoBERTa encoder, attention layers on its tokens, MLP head."""

    pretrained_path: str | None = None
    """Local transformers directory loaded with ``from_pretrained``; else built from the fields below."""
    vocab_size: int = 2048
    hidden: int = 128
    bert_layers: int = 2
    bert_heads: int = 2
    bert_ffn: int = 256
    max_len: int = 32
    trainable_bert_layers: int | None = None
    """If set, the embeddings and all but the last N BERT layers are frozen (BriVL-1.0: 4)."""
    layers: int = 2
    heads: int = 4
    ffn_dim: int = 256
    dropout: float = 0.1
    """Dropout in BERT (built from config) and in the attention layers."""
    norm_first: bool = True
    l2_tokens: bool = True
    """BriVL L2-normalises token features before the attention layers (their width is BERT's hidden)."""


@dataclass(frozen=True)
class Block:
    """A contiguous piece of a tower's forward: the modules and parameters it reads (dotted names inside
    the tower) and how to run it. Image blocks run ``run(x)``, text blocks ``run(x, input_ids,
    attention_mask)`` (x is None for the first). A tower's ``blocks()`` in order compute its forward;
    a pipeline cuts the model between blocks."""

    owns: tuple[str, ...]
    run: Callable[..., torch.Tensor]


def grid_boxes(grid: int) -> torch.Tensor:
    """(grid*grid + 1, 4) boxes (x0, y0, x1, y1) in [-1, 1]: the grid cells, then the whole image."""
    edges = torch.linspace(-1.0, 1.0, grid + 1)
    cells = [(edges[c], edges[r], edges[c + 1], edges[r + 1]) for r in range(grid) for c in range(grid)]
    return torch.tensor(cells + [(-1.0, -1.0, 1.0, 1.0)])


REGION_SAMPLINGS = ("centred", "brivl")


class RegionPool(nn.Module):
    """Region features from a fixed set of boxes: bilinear samples per box, 1x1 conv, average.

    The 1x1 conv is a per-position linear map, so averaging first and projecting after gives the same
    result as BriVL's conv-then-avgpool at box_samples^2 times less compute.

    Sample positions, in feature-pixel coordinates u in [0, W] (the map's edges; pixel i covers
    [i, i + 1]), for a box with centre c and half-size h and q = (2k + 1) / box_samples - 1:
    - ``centred``: u = c + h q, the centres of the box's cells; the whole image is sampled
      symmetrically and every sample lies on the map.
    - ``brivl``: u = W / (W - 1) (c + h q), BriVL-1.0's ``roi_grid_pool``, which builds its affine grid
      with the align_corners=True normalisation (W - 1) and samples it with align_corners=False. The
      samples are stretched away from the origin: on BriVL's 12x12 map the last cells' samples reach
      past the last pixel and read zero padding. Only right for weights trained that way, and it
      depends on W, so the map size (``map_size``) is fixed when the pool is built.
    """

    def __init__(self, in_channels: int, dim: int, grid: int, box_samples: int, sampling: str = "centred",
                 map_size: int | None = None):
        super().__init__()
        if sampling not in REGION_SAMPLINGS:
            raise ValueError(f"image.region_sampling={sampling!r}: use one of {', '.join(REGION_SAMPLINGS)}")
        if sampling == "brivl" and (map_size is None or map_size < 2):
            raise ValueError(f"image.region_sampling='brivl' needs the backbone's feature map size (>= 2), got {map_size}")
        self.proj = nn.Linear(in_channels, dim)
        boxes = grid_boxes(grid)  # (R, 4) in [-1, 1]
        t = (torch.arange(box_samples, dtype=torch.float64) + 0.5) / box_samples  # sample centres inside a box, in (0, 1)
        xs = boxes[:, 0:1].double() + (boxes[:, 2:3] - boxes[:, 0:1]).double() * t  # (R, S)
        ys = boxes[:, 1:2].double() + (boxes[:, 3:4] - boxes[:, 1:2]).double() * t  # (R, S)
        if sampling == "brivl":  # grid_sample's x = 2u / W - 1 becomes 2u / (W - 1) - 1
            xs, ys = ((v + 1) * map_size / (map_size - 1) - 1 for v in (xs, ys))
        sample_grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)  # (R, S, S, 2)
        # A constant of the architecture, not state: kept out of checkpoints.
        self.register_buffer("sample_grid", sample_grid.flatten(0, 1).float(), persistent=False)  # (R*S, S, 2)
        self.num_regions = boxes.shape[0]
        self.sampling, self.map_size = sampling, map_size

    def _apply(self, fn, recurse=True):
        # .to(device) moves the sample grid; .bfloat16() and the like must not round it (see forward).
        grid = self.sample_grid
        super()._apply(fn, recurse)
        self.sample_grid = grid.to(self.sample_grid.device)
        return self

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        B, C = fmap.shape[:2]
        if self.sampling == "brivl" and tuple(fmap.shape[2:]) != (self.map_size, self.map_size):
            raise ValueError(f"region_sampling='brivl' was built for a {self.map_size}x{self.map_size} feature map, "
                             f"got {tuple(fmap.shape[2:])}: feed images of image.image_size")
        grid = self.sample_grid.expand(B, -1, -1, -1)  # (B, R*S, S, 2), fp32
        # Sampled in fp32: bf16 coordinates would move the points by up to 2^-9 of the map (the map is
        # small next to the backbone's activations: 12x12 for BriVL-1.0).
        samples = F.grid_sample(fmap.float(), grid, mode="bilinear", align_corners=False)  # (B, C, R*S, S)
        samples = samples.to(fmap.dtype)
        regions = samples.view(B, C, self.num_regions, -1).mean(-1).transpose(1, 2)  # (B, R, C)
        return self.proj(regions)  # (B, R, dim)


class ImageBackbone(nn.Module):
    """A timm model as a feature-map extractor: CNN maps as they are, ViT patch tokens as a map."""

    def __init__(self, cfg: ImageTowerConfig):
        super().__init__()
        kwargs = dict(cfg.backbone_kwargs)
        if cfg.backbone.startswith(("vit", "deit", "eva")):
            kwargs.setdefault("img_size", cfg.image_size)
        self.net = timm.create_model(cfg.backbone, pretrained=False, num_classes=0, global_pool="", **kwargs)
        self.num_features = self.net.num_features
        # Side of the feature map at image_size: "same"-padded stride-2 stages each round up.
        reduction = self.net.feature_info[-1]["reduction"] if hasattr(self.net, "feature_info") else None
        self.map_size = -(-cfg.image_size // reduction) if reduction else None
        self.prefix_tokens = getattr(self.net, "num_prefix_tokens", 0)
        self.pretrained_path = cfg.pretrained_path
        if cfg.trainable_prefixes is not None:
            for name, p in self.net.named_parameters():
                p.requires_grad_(name.startswith(tuple(cfg.trainable_prefixes)))

    def pretrained_state(self) -> dict[str, torch.Tensor]:
        """The local timm checkpoint of ``pretrained_path`` (.safetensors/.pth) as this module's state,
        empty if none. Its classifier is dropped (this backbone has none); any other mismatch is an
        error rather than a silently half-loaded backbone."""
        if not self.pretrained_path:
            return {}
        state = timm.models.load_state_dict(self.pretrained_path)
        state = {k: v for k, v in state.items() if not k.startswith(("classifier.", "head.", "fc."))}
        expected = {k for k, _ in self.net.named_parameters()} | set(self.net.state_dict().keys())
        missing = sorted(expected - set(state))
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"image.pretrained_path={self.pretrained_path!r} does not fit backbone "
                             f"{type(self.net).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        return {"net." + k: v for k, v in state.items()}

    def _to_map(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # ViT: (B, prefix + h*w, D) -> (B, D, h, w)
            tokens = x[:, self.prefix_tokens:]
            side = int(tokens.shape[1] ** 0.5)
            x = tokens.transpose(1, 2).reshape(x.shape[0], -1, side, side)
        return x  # (B, C, h, w)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._to_map(self.net.forward_features(images))

    def blocks(self) -> list[Block]:
        """``forward`` as stem, each stage of ``net.blocks``, final layers: timm's EfficientNet and ViT
        ``forward_features`` written out (no masks, no gradient checkpointing). Any other backbone is
        one block."""
        net = self.net
        if hasattr(net, "conv_stem") and hasattr(net, "conv_head"):  # EfficientNet family
            stem, head = (lambda x: net.bn1(net.conv_stem(x))), (lambda x: net.bn2(net.conv_head(x)))
            final = ("net.conv_head", "net.bn2")
        elif hasattr(net, "patch_embed") and hasattr(net, "_pos_embed"):  # VisionTransformer
            stem = lambda x: net.norm_pre(net.patch_drop(net._pos_embed(net.patch_embed(x))))  # noqa: E731
            head, final = (lambda x: net.norm(x)), ("net.norm",)
        else:
            return [Block(("net",), self.forward)]
        # The stem owns everything of the backbone that is neither a block nor a final layer (for a ViT
        # that includes the position embedding and class token, parameters of ``net`` itself).
        stem_owns = tuple(f"net.{n}" for n, _ in [*net.named_children(), *net.named_parameters(recurse=False)]
                          if n != "blocks" and f"net.{n}" not in final)
        return [Block(stem_owns, stem),
                *[Block((f"net.blocks.{i}",), stage) for i, stage in enumerate(net.blocks)],
                Block(final, lambda x: self._to_map(head(x)))]


class ImageTower(nn.Module):
    def __init__(self, cfg: ImageTowerConfig, embed_dim: int):
        super().__init__()
        self.l2_regions = cfg.l2_regions
        self.backbone = ImageBackbone(cfg)
        self.region_pool = RegionPool(self.backbone.num_features, cfg.dim, cfg.grid, cfg.box_samples,
                                      cfg.region_sampling, self.backbone.map_size)
        self.region_position = None
        if cfg.region_position:
            self.region_position = nn.Parameter(torch.randn(self.region_pool.num_regions, cfg.dim) * 0.02)
        self.encoder = nn.ModuleList(
            SelfAttentionLayer(cfg.dim, cfg.heads, cfg.ffn_dim, cfg.dropout, cfg.norm_first) for _ in range(cfg.layers))
        self.head = ProjectionHead(cfg.dim, embed_dim, embed_dim)

    def _regions(self, fmap: torch.Tensor) -> torch.Tensor:
        regions = self.region_pool(fmap)  # (B, R, dim)
        if self.l2_regions:
            regions = F.normalize(regions, dim=-1)
        if self.region_position is not None:
            regions = regions + self.region_position  # (B, R, dim) + (R, dim)
        return regions

    def _embed(self, regions: torch.Tensor) -> torch.Tensor:
        pooled = regions.mean(1)  # every region is valid: the masked mean with an all-ones mask
        return F.normalize(self.head(pooled), dim=-1)  # (B, E)

    def _own_blocks(self) -> list[Block]:
        """Everything after the backbone: region pooling, each attention layer, the head."""
        pool_owns = ("region_pool", "region_position") if self.region_position is not None else ("region_pool",)
        return [Block(pool_owns, self._regions),
                *[Block((f"encoder.{i}",), layer) for i, layer in enumerate(self.encoder)],
                Block(("head",), self._embed)]

    def blocks(self) -> list[Block]:
        return [Block(tuple(f"backbone.{o}" for o in b.owns), b.run) for b in self.backbone.blocks()] + self._own_blocks()

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The region features after the tower's attention layers, before pooling: (B, R, dim)."""
        x = self.backbone(images)  # (B, C, h, w)
        for block in self._own_blocks()[:-1]:
            x = block.run(x)
        return x  # (B, R, dim)

    def embed(self, regions: torch.Tensor) -> torch.Tensor:
        """Pooled, projected and L2-normalised region features: (B, R, dim) -> (B, E)."""
        return self._embed(regions)

    def forward(self, images: torch.Tensor, shared: Callable | None = None) -> torch.Tensor:
        """``shared``: layers run on the region features before pooling (COOKIE's shared transformer).
        Called inside this forward, which under ZeRO-3 is where the tower's own parameters (the region
        position embedding) are gathered."""
        regions = self.tokens(images)  # (B, R, dim)
        return self.embed(shared(regions) if shared is not None else regions)  # (B, E)


class TextTower(nn.Module):
    def __init__(self, cfg: TextTowerConfig, embed_dim: int):
        super().__init__()
        self.l2_tokens = cfg.l2_tokens
        self.pretrained_path = cfg.pretrained_path
        if cfg.pretrained_path:  # the architecture now, the weights from pretrained_state()
            self.bert = transformers.AutoModel.from_config(transformers.AutoConfig.from_pretrained(cfg.pretrained_path),
                                                           add_pooling_layer=False)
        else:
            bert_cfg = transformers.BertConfig(
                vocab_size=cfg.vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.bert_layers,
                num_attention_heads=cfg.bert_heads, intermediate_size=cfg.bert_ffn,
                max_position_embeddings=max(512, cfg.max_len), hidden_dropout_prob=cfg.dropout,
                attention_probs_dropout_prob=cfg.dropout)
            self.bert = transformers.BertModel(bert_cfg, add_pooling_layer=False)
        if cfg.trainable_bert_layers is not None:
            layers = self.bert.encoder.layer
            frozen = [self.bert.embeddings, *layers[: len(layers) - cfg.trainable_bert_layers]]
            for module in frozen:
                module.requires_grad_(False)
        hidden = self.bert.config.hidden_size
        self.encoder = nn.ModuleList(
            SelfAttentionLayer(hidden, cfg.heads, cfg.ffn_dim, cfg.dropout, cfg.norm_first) for _ in range(cfg.layers))
        self.head = ProjectionHead(hidden, embed_dim, embed_dim)

    def pretrained_state(self) -> dict[str, torch.Tensor]:
        """The encoder weights of the ``save_pretrained`` directory ``pretrained_path`` as this module's
        state, empty if none."""
        if not self.pretrained_path:
            return {}
        pretrained = transformers.AutoModel.from_pretrained(self.pretrained_path, add_pooling_layer=False)
        return {"bert." + k: v for k, v in pretrained.state_dict().items()}

    def _bert_blocks(self) -> list[Block]:
        """BERT's forward written out: embeddings, then each layer with the padding mask BertModel builds."""
        from transformers.masking_utils import create_bidirectional_mask

        bert = self.bert
        if not (hasattr(bert, "embeddings") and hasattr(getattr(bert, "encoder", None), "layer")):
            raise ValueError(f"text encoder {type(bert).__name__} is not BERT-shaped (embeddings + encoder.layer); "
                             "it cannot be split into pipeline blocks")

        def layer_block(layer):
            def run(x, input_ids, attention_mask):
                # On the meta device (counting FLOPs) there are no mask values for the no-padding shortcut to read.
                mask = create_bidirectional_mask(config=bert.config, inputs_embeds=x, attention_mask=attention_mask,
                                                 allow_is_bidirectional_skip=not x.is_meta)
                return layer(x, mask)
            return run

        return [Block(("bert.embeddings",), lambda x, input_ids, attention_mask: bert.embeddings(input_ids=input_ids)),
                *[Block((f"bert.encoder.layer.{i}",), layer_block(layer)) for i, layer in enumerate(bert.encoder.layer)]]

    def _own_blocks(self) -> list[Block]:
        """Everything after BERT: each attention layer (the first also L2-normalises BERT's tokens), head."""
        def layer_block(layer, first: bool):
            def run(tokens, input_ids, attention_mask):
                if first and self.l2_tokens:
                    tokens = F.normalize(tokens, dim=-1)
                return layer(tokens, key_padding_mask=attention_mask == 0)  # (B, L, H)
            return run

        def embed(tokens, input_ids, attention_mask):
            if not self.encoder and self.l2_tokens:
                tokens = F.normalize(tokens, dim=-1)
            return F.normalize(self.head(masked_mean(tokens, attention_mask)), dim=-1)  # (B, E)

        return [*[Block((f"encoder.{i}",), layer_block(layer, i == 0)) for i, layer in enumerate(self.encoder)],
                Block(("head",), embed)]

    def blocks(self) -> list[Block]:
        return self._bert_blocks() + self._own_blocks()

    def tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The token features after the tower's attention layers, before pooling: (B, L, H)."""
        # BriVL-1.0 gives BERT no attention mask, so padding tokens are attended; here padding is masked
        # in BERT, in the attention layers and in the mean.
        tokens = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, H)
        for block in self._own_blocks()[:-1]:
            tokens = block.run(tokens, input_ids, attention_mask)
        return tokens  # (B, L, H)

    def embed(self, tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Masked mean, projection and L2 norm: (B, L, H) -> (B, E)."""
        return self._own_blocks()[-1].run(tokens, input_ids, attention_mask)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, shared: Callable | None = None
                ) -> torch.Tensor:
        """``shared``: layers run on the token features before pooling, called with (tokens, mask)."""
        tokens = self.tokens(input_ids, attention_mask)  # (B, L, H)
        if shared is not None:
            tokens = shared(tokens, attention_mask)
        return self.embed(tokens, input_ids, attention_mask)  # (B, E)
