"""BriVL-1.0 as its released inference code builds and runs it (BAAI-WuDao/BriVL,
``BriVL-code-inference/models/vl_model.py``, MIT), written out for the tests: the module tree whose state
dict the released checkpoints hold, and the forward those weights were trained under. Only what the
tests compare against; the stack never imports this.

Released structure: ``VL_model.learnable`` = {imgencoder, imgencoder_mom, textencoder, textencoder_mom}.
- Image encoder: ``backbone`` = timm ``tf_efficientnet_b5`` (with its classifier), ``learnable`` =
  {imgFC: Linear-ReLU-Linear 2048-2048-2048, imgAtt: 4 x nn.TransformerEncoderLayer(2048, 4 heads),
  max_pool: Conv2d(2048, 2048, 1) + AvgPool2d(4, stride=1)}.
- Text encoder: ``backbone.bert`` = transformers AutoModel of chinese-roberta-wwm-ext (a BertModel with
  its pooler), ``learnable`` = {textFC: 768-2048-2048, textAtt: 4 x TransformerEncoderLayer(768, 4)}.
"""

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

IMAGE_SIZE, GRID_SAMPLES, FEATURE_DIM, HEADS, LAYERS = 380, 4, 2048, 4, 4


class FakeTransformer(nn.Module):  # the released name of the MLP head
    def __init__(self, input_dim, hidden_dim, output_dim):
        super().__init__()
        self.fc1, self.relu, self.fc2 = nn.Linear(input_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, output_dim)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


def _attention(dim: int) -> nn.TransformerEncoder:
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model=dim, nhead=HEADS), num_layers=LAYERS,
                                 enable_nested_tensor=False)


class ImageEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = timm.create_model("tf_efficientnet_b5", pretrained=False)
        self.learnable = nn.ModuleDict(dict(
            imgFC=FakeTransformer(FEATURE_DIM, FEATURE_DIM, FEATURE_DIM), imgAtt=_attention(FEATURE_DIM),
            max_pool=nn.Sequential(nn.Conv2d(FEATURE_DIM, FEATURE_DIM, kernel_size=1),
                                   nn.AvgPool2d(GRID_SAMPLES, stride=1))))

    def forward(self, images, boxes_px):
        """images (B, 3, 380, 380); boxes_px (R, 4) x1, y1, x2, y2 in input pixels, every box valid."""
        fmap = self.backbone.forward_features(images)
        regions = torch.stack([roi_grid_pool(f, boxes_px, IMAGE_SIZE, GRID_SAMPLES, self.learnable["max_pool"])
                               for f in fmap])  # (B, R, D)
        regions = F.normalize(regions, dim=-1)
        mask = torch.zeros(regions.shape[:2], dtype=torch.bool)  # src_key_padding_mask: nothing padded
        regions = self.learnable["imgAtt"](regions.transpose(0, 1), src_key_padding_mask=mask).transpose(0, 1)
        return self.learnable["imgFC"](regions.mean(dim=1))


class BertHolder(nn.Module):  # the released ``Bert`` wrapper: ``self.bert = AutoModel.from_pretrained(...)``
    def __init__(self):
        super().__init__()
        self.bert = transformers.BertModel(transformers.BertConfig(
            vocab_size=21128, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
            intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2))  # with the pooler


class TextEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = BertHolder()
        self.learnable = nn.ModuleDict(dict(textFC=FakeTransformer(768, FEATURE_DIM, FEATURE_DIM),
                                            textAtt=_attention(768)))

    def forward(self, input_ids, mask):
        tokens = self.backbone.bert(input_ids, return_dict=True).last_hidden_state  # no attention mask
        tokens = F.normalize(tokens, dim=-1)
        tokens = self.learnable["textAtt"](tokens.transpose(0, 1), src_key_padding_mask=mask == 0).transpose(0, 1)
        m = mask.float()[..., None]
        return self.learnable["textFC"]((tokens * m).sum(1) / m.sum(1))


def roi_grid_pool(fmap, boxes_px, image_size, samples, conv):
    """``roi_grid_pool`` for one image (C, H, W): boxes in input pixels divided by input size / map
    size, an affine grid normalised by (W - 1), sampled with the defaults (align_corners=False, zero
    padding), then ``conv`` on every sample and the average over a box's samples. (R, D)."""
    C, H, W = fmap.shape
    x1, y1, x2, y2 = (boxes_px * H / image_size).unbind(1)
    zero = torch.zeros_like(x1)
    theta = torch.stack([(x2 - x1) / (W - 1), zero, (x1 + x2 - W + 1) / (W - 1),
                         zero, (y2 - y1) / (H - 1), (y1 + y2 - H + 1) / (H - 1)], dim=1).view(-1, 2, 3)
    R = boxes_px.shape[0]
    grid = F.affine_grid(theta, [R, C, samples, samples], align_corners=False)
    pooled = F.grid_sample(fmap.expand(R, C, H, W), grid, align_corners=False)  # (R, C, S, S)
    return conv(pooled).mean(dim=(2, 3))  # (R, D)


def grid_boxes_px(grid: int = 6, size: int = IMAGE_SIZE) -> torch.Tensor:
    """BriVL's detector-free boxes: the grid x grid cells row by row, then the whole image. (R, 4)."""
    edges = [size * k / grid for k in range(grid + 1)]
    cells = [(edges[c], edges[r], edges[c + 1], edges[r + 1]) for r in range(grid) for c in range(grid)]
    return torch.tensor(cells + [(0.0, 0.0, float(size), float(size))])


def released_learnable(seed: int = 0) -> tuple[dict[str, torch.Tensor], ImageEncoder, TextEncoder]:
    """A state dict laid out as a released checkpoint's ``learnable`` entry, random values (BatchNorm
    statistics included), and the online towers that hold them. The momentum towers get other values."""
    torch.manual_seed(seed)
    image, text = ImageEncoder(), TextEncoder().eval()
    # BatchNorm statistics of random images, as a trained backbone has of real ones: with the
    # constructor's (0, 1) a random EfficientNet's features shrink to ~1e-4 and the 1x1 conv's bias
    # makes every image's regions the same.
    with torch.no_grad():
        for module in image.backbone.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.reset_running_stats()
                module.momentum = None  # a plain average over the calibration batches
        image.backbone.train()
        image.backbone.forward_features(torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE))
    image.eval()
    state = {}
    for prefix, tower in (("imgencoder.", image), ("textencoder.", text)):
        for name, tensor in tower.state_dict().items():
            state[prefix + name] = tensor
            momentum = tensor + 1 if tensor.is_floating_point() else tensor.clone()
            state[prefix.replace("encoder.", "encoder_mom.") + name] = momentum
    return state, image, text
