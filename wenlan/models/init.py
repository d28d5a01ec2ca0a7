"""Explicit weight initialisation, run once on a built model (torchtitan's ``init_weights`` rule).

Each module's own parameters are drawn from a generator seeded by (seed, module name), so initial
weights do not depend on construction order, on which library built a module, or on how the model is
partitioned. That matters under ZeRO-3: a third-party constructor that initialises its children after
building them (timm's EfficientNet and ViT, transformers' ``post_init``) finds them already partitioned
into empty tensors, and its init silently does nothing or fails. Here a caller can gather one module
at a time around ``init_module_`` and get exactly the weights a plain run gets.
"""

import contextlib
import hashlib
import math

import torch
import torch.nn as nn

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)
LINEAR_STD = 0.02  # BERT / ViT / CLIP's choice for linear layers and embeddings


def _generator(seed: int, name: str, device: torch.device) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _trunc_normal(shape, std: float, g: torch.Generator, device) -> torch.Tensor:
    return torch.empty(shape, device=device).normal_(0.0, std, generator=g).clamp_(-2 * std, 2 * std)


@torch.no_grad()
def init_module_(module: nn.Module, name: str, seed: int) -> None:
    """Initialise the parameters ``module`` owns directly (not its children's)."""
    params = dict(module.named_parameters(recurse=False))
    if not params:
        return
    device = next(iter(params.values())).device
    g = _generator(seed, name, device)
    for pname, p in params.items():
        if isinstance(module, NORM_TYPES) or "norm" in type(module).__name__.lower():
            value = torch.ones(p.shape, device=device) if pname == "weight" else torch.zeros(p.shape, device=device)
        elif pname == "bias":
            value = torch.zeros(p.shape, device=device)
        elif isinstance(module, nn.Conv2d):  # EfficientNet's (TF) init: normal with std sqrt(2 / fan_out)
            fan_out = p.shape[0] // module.groups * math.prod(p.shape[2:])
            value = torch.empty(p.shape, device=device).normal_(0.0, math.sqrt(2.0 / fan_out), generator=g)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            value = _trunc_normal(p.shape, LINEAR_STD, g, device)
            if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                value[module.padding_idx] = 0
        elif p.ndim >= 2:  # free tensors: position embeddings, class/register tokens
            value = _trunc_normal(p.shape, LINEAR_STD, g, device)
        else:  # 1-D free parameters (the temperature, layer scales) keep their constructed constants
            continue
        p.copy_(value.to(p.dtype))


def init_weights(model: nn.Module, seed: int, module_context=None, skip_prefixes: tuple[str, ...] = ()) -> None:
    """``init_module_`` over every module of ``model`` except those under ``skip_prefixes``.

    module_context(module) -> context manager entered around each module's init (e.g. gathering its
    ZeRO-3 partitions); by default none.
    """
    for name, module in model.named_modules():
        if name.startswith(skip_prefixes):
            continue
        with (module_context(module) if module_context else contextlib.nullcontext()):
            init_module_(module, name, seed)


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory) while their buffers,
    architecture constants such as BERT's position ids or the region sampling grid, keep their values."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
