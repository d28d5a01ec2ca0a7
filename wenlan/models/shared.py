"""COOKIE's weight-sharing transformer: the same attention layers run over image region features and
text token features, after each tower's own layers and before its pooling, so both modalities are
mapped by one function into one space (COOKIE, arXiv 2207.00733, Sec. 3.1).

Its width is the image tower's attention width; text tokens of another width are projected in before
the shared layers and back out after them (COOKIE projects both modalities to one width; which side
keeps its own width is not specified, and the image side has no pretrained encoder to disturb).
"""

import torch
import torch.nn as nn

from wenlan.models.layers import SelfAttentionLayer
from wenlan.models.towers import ImageTowerConfig, TextTowerConfig


class SharedEncoder(nn.Module):
    def __init__(self, image: ImageTowerConfig, text: TextTowerConfig, layers: int):
        super().__init__()
        dim, hidden = image.dim, text.hidden
        self.layers = nn.ModuleList(SelfAttentionLayer(dim, image.heads, image.ffn_dim, image.dropout, image.norm_first)
                                    for _ in range(layers))
        self.text_in = nn.Linear(hidden, dim) if hidden != dim else nn.Identity()
        self.text_out = nn.Linear(dim, hidden) if hidden != dim else nn.Identity()

    def _run(self, x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, key_padding_mask=padding)
        return x

    def image(self, regions: torch.Tensor) -> torch.Tensor:
        """(B, R, dim) -> (B, R, dim); every region is valid."""
        return self._run(regions, None)

    def text(self, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L, H) -> (B, L, H); padding is masked as in the text tower's own layers."""
        return self.text_out(self._run(self.text_in(tokens), attention_mask == 0))
