"""The collectives the losses and the queue use: all-gather and reduce-scatter of one tensor, and an
all-gather that carries gradients (open_clip's gather_with_grad)."""

import torch
import torch.distributed as dist

# torch 2.14 renamed all_gather_into_tensor / reduce_scatter_tensor (the old names still work, with a warning).
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherWithGrad(torch.autograd.Function):
    """All-gather along dim 0 that carries gradients back: rank r's rows receive the SUM over ranks of
    the gradients every rank's loss puts on them (a reduce-scatter), as open_clip's gather_with_grad."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
        all_gather_single(out, x.contiguous(), group=group)  # forward of a WITH-gradient gather
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:]))
        reduce_scatter_single(out, grad.contiguous(), group=ctx.group)  # SUM: the gather's gradient
        return out, None


def gather_with_grad(x: torch.Tensor, group=None) -> torch.Tensor:
    """(B, ...) on each rank -> (world * B, ...) in rank order, differentiable (see _GatherWithGrad)."""
    return _GatherWithGrad.apply(x, group)
