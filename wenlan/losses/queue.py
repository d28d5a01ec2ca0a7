"""The negative queues: momentum keys of past batches, one queue per modality, plus a pointer.

Every data-parallel rank enqueues the keys of the whole global batch (gathered from all ranks), so the
queues are identical on every rank.
"""

import torch
import torch.distributed as dist
import torch.nn as nn


def gather_keys(x: torch.Tensor) -> torch.Tensor:
    """(B, ...) on each rank -> (world * B, ...) in rank order. No gradient: keys come from the
    momentum towers and the queue is a constant to the loss."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    out = torch.empty((dist.get_world_size() * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous())  # no gradient
    return out


class KeyQueues(nn.Module):
    """Image-key and text-key queues of ``size`` entries with a shared write pointer.

    ``ids`` tags each entry with the id of the sample it came from, so that copies of a query's own
    positive can be masked out of its negatives. ``filled`` counts valid entries until the queue is
    full once; the unfilled rest is masked rather than holding random vectors as in MoCo.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        self.register_buffer("image", torch.zeros(size, dim))  # (K, E)
        self.register_buffer("text", torch.zeros(size, dim))  # (K, E)
        self.register_buffer("ids", torch.full((size,), -1, dtype=torch.long))  # (K,)
        # Shape (1,), not (): DeepSpeed's broadcast of module state cannot view 0-dim tensors as bytes.
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("filled", torch.zeros(1, dtype=torch.long))

    def valid(self) -> torch.Tensor:
        """(K,) True where the entry holds a real key."""
        return torch.arange(self.size, device=self.ids.device) < self.filled

    @torch.no_grad()
    def enqueue(self, image_keys: torch.Tensor, text_keys: torch.Tensor, ids: torch.Tensor) -> None:
        """Write (N, E) keys at the pointer, wrapping around; the oldest entries are overwritten."""
        n = image_keys.shape[0]
        if n > self.size:
            raise ValueError(f"cannot enqueue {n} keys into a queue of {self.size}")
        slots = (self.ptr + torch.arange(n, device=self.ids.device)) % self.size  # (N,)
        self.image[slots] = image_keys.to(self.image.dtype)
        self.text[slots] = text_keys.to(self.text.dtype)
        self.ids[slots] = ids.to(self.ids.device)
        self.ptr.copy_((self.ptr + n) % self.size)
        self.filled.copy_(torch.clamp(self.filled + n, max=self.size))
