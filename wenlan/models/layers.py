"""Building blocks shared by both towers: a self-attention encoder layer, masked mean, MLP head.

The encoder layer is written out rather than taken from ``nn.TransformerEncoderLayer`` because the
latter reads ``self_attn.out_proj.weight`` from its parent's forward (a parameter of a module whose own
forward never runs), which ZeRO-3's per-module parameter gathering does not see.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class SelfAttentionLayer(nn.Module):
    """One transformer encoder layer (multi-head self-attention + ReLU feed-forward).

    ``norm_first=False`` is the post-norm layout of ``nn.TransformerEncoderLayer`` that BriVL uses;
    ``norm_first=True`` (pre-norm) trains more easily from scratch.
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float = 0.1, norm_first: bool = False):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention width {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.norm_first = norm_first
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ffn_in = nn.Linear(dim, ffn_dim)
        self.ffn_out = nn.Linear(ffn_dim, dim)
        self.norm_attn = nn.LayerNorm(dim)
        self.norm_ffn = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def _attention(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, H, N, Dh)
        attn_mask = None
        if key_padding_mask is not None:  # (B, N), True = padding
            attn_mask = ~key_padding_mask[:, None, None, :]  # (B, 1, 1, N), True = attend
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.dropout.p if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn_out(self.dropout(F.relu(self.ffn_in(x))))

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.norm_first:
            x = x + self.dropout(self._attention(self.norm_attn(x), key_padding_mask))
            return x + self.dropout(self._feed_forward(self.norm_ffn(x)))
        x = self.norm_attn(x + self.dropout(self._attention(x, key_padding_mask)))
        return self.norm_ffn(x + self.dropout(self._feed_forward(x)))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the sequence of ``x`` (B, N, D), counting only positions where ``mask`` (B, N) is 1."""
    mask = mask.to(x.dtype).unsqueeze(-1)  # (B, N, 1)
    return (x * mask).sum(1) / mask.sum(1).clamp_min(1.0)


class ProjectionHead(nn.Module):
    """BriVL's 2-layer MLP (Linear, ReLU, Linear) into the joint embedding space."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)))
