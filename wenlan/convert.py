"""Import a released BriVL-1.0 checkpoint into the ``brivl-1.0`` preset.

``python -m wenlan.convert brivl --checkpoint BriVL-1.0-5500w.pth --tokenizer DIR --out brivl-1.0.safetensors``

The released file (BAAI-WuDao/BriVL, ``BriVL-code-inference/models/vl_model.py``) is a dict whose
``learnable`` entry is the state dict of ``VL_model.learnable``: the online towers ``imgencoder`` and
``textencoder`` and their momentum copies ``imgencoder_mom`` and ``textencoder_mom``. Every tensor is
mapped onto the preset (online towers, and the momentum towers under the ``momentum.`` prefix, as
``wenlan.export --full`` writes them); a tensor that maps nowhere, a preset tensor left unfilled, or a
shape that differs is an error. The output is what ``wenlan.load`` and ``--init-from`` read.

Left out on purpose, each checked to be what BriVL's forward never reads: the image backbone's
ImageNet classifier (``backbone.classifier.*``), BERT's pooler (``pooler.*``, BriVL reads the token
features) and BERT's ``position_ids`` constant (checked to be 0..n-1). BriVL's queues live outside
``learnable`` and are not imported; its temperature was the fixed 0.07, written as ``log_scale``.
"""

import argparse
import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from wenlan.models.presets import get_preset

# released tower prefix -> exported prefix (wenlan.export's names; momentum towers as with --full)
TOWERS = {"imgencoder.": "image_tower.", "imgencoder_mom.": "momentum.image_tower.",
          "textencoder.": "text_tower.", "textencoder_mom.": "momentum.text_tower."}
# nn.TransformerEncoderLayer's names -> SelfAttentionLayer's (same [q; k; v] row layout of the input
# projection, and the same head split inside each of q, k and v)
ATTENTION = {"self_attn.in_proj_weight": "qkv.weight", "self_attn.in_proj_bias": "qkv.bias",
             "self_attn.out_proj.weight": "proj.weight", "self_attn.out_proj.bias": "proj.bias",
             "linear1.weight": "ffn_in.weight", "linear1.bias": "ffn_in.bias",
             "linear2.weight": "ffn_out.weight", "linear2.bias": "ffn_out.bias",
             "norm1.weight": "norm_attn.weight", "norm1.bias": "norm_attn.bias",
             "norm2.weight": "norm_ffn.weight", "norm2.bias": "norm_ffn.bias"}
DROPPED = re.compile(r"^(backbone\.classifier\.|backbone\.bert\.pooler\.)")
POSITION_IDS = "backbone.bert.embeddings.position_ids"
RELEASED_TEMPERATURE = 0.07
"""BriVL-1.0's fixed softmax temperature (``TEMPERATURE`` in its config; not in the checkpoint)."""


def _tower_name(name: str) -> str | None:
    """A name inside one released tower -> our name inside the tower; None if it maps nowhere."""
    rules = [(r"backbone\.bert\.(.+)", r"bert.\1"),
             (r"backbone\.(.+)", r"backbone.net.\1"),
             (r"learnable\.(?:imgFC|textFC)\.(fc[12]\.(?:weight|bias))", r"head.\1"),
             (r"learnable\.max_pool\.0\.(weight|bias)", r"region_pool.proj.\1")]
    for pattern, replacement in rules:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, replacement, name)
    layer = re.fullmatch(r"learnable\.(?:imgAtt|textAtt)\.layers\.(\d+)\.(.+)", name)
    if layer and layer.group(2) in ATTENTION:
        return f"encoder.{layer.group(1)}.{ATTENTION[layer.group(2)]}"
    return None


def released_to_wenlan(released: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The released ``learnable`` state dict under our exported names. Raises on anything unplaced."""
    out, unplaced = {}, []
    for name, tensor in released.items():
        tower = next((t for t in TOWERS if name.startswith(t)), None)  # each prefix ends at its dot: one fits
        inner = name[len(tower):] if tower else name
        if tower and DROPPED.match(inner):
            continue
        if tower and inner == POSITION_IDS:
            if not torch.equal(tensor.reshape(-1), torch.arange(tensor.numel(), dtype=tensor.dtype)):
                raise ValueError(f"{name} is not 0..{tensor.numel() - 1}: BERT's positions were changed, "
                                 "which the brivl-1.0 preset cannot express")
            continue
        ours = _tower_name(inner) if tower else None
        if ours is None:
            unplaced.append(name)
            continue
        if ours.startswith("region_pool.proj.weight"):
            tensor = tensor.flatten(1)  # (D, C, 1, 1) 1x1 conv -> (D, C) linear: the same map
        out[TOWERS[tower] + ours] = tensor
    if unplaced:
        raise ValueError(f"{len(unplaced)} tensors of the checkpoint have no place in the brivl-1.0 preset, "
                         f"e.g. {unplaced[:5]}; is this a BriVL-1.0 checkpoint?")
    return out


def wenlan_to_released(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``released_to_wenlan`` on the tensors it produced (the round trip is exact)."""
    inverse_towers = {v: k for k, v in TOWERS.items()}
    inverse_attention = {v: k for k, v in ATTENTION.items()}
    out = {}
    for name, tensor in tensors.items():
        tower = next((t for t in inverse_towers if name.startswith(t)), None)
        if tower is None:
            continue  # log_scale
        inner, image = name[len(tower):], tower.endswith("image_tower.")
        if inner.startswith("bert."):
            released = "backbone.bert." + inner[len("bert."):]
        elif inner.startswith("backbone.net."):
            released = "backbone." + inner[len("backbone.net."):]
        elif inner.startswith("head."):
            released = f"learnable.{'imgFC' if image else 'textFC'}." + inner[len("head."):]
        elif inner.startswith("region_pool.proj."):
            released = "learnable.max_pool.0." + inner.rsplit(".", 1)[1]
            tensor = tensor[:, :, None, None] if tensor.ndim == 2 else tensor
        else:
            i, rest = re.fullmatch(r"encoder\.(\d+)\.(.+)", inner).groups()
            released = f"learnable.{'imgAtt' if image else 'textAtt'}.layers.{i}.{inverse_attention[rest]}"
        out[inverse_towers[tower] + released] = tensor
    return out


def preset_shapes() -> dict[str, torch.Size]:
    """Every tensor the brivl-1.0 preset's state dict holds (online and momentum, exported names),
    with its shape, taken on the meta device."""
    from transformers.initialization import no_init_weights

    from wenlan.models.brivl import BriVL

    with torch.device("meta"), no_init_weights():
        model = BriVL(get_preset("brivl-1.0"))
    shapes = {}
    for name, tensor in model.state_dict().items():
        name = "momentum." + name[len("momentum_"):] if name.startswith("momentum_") else name
        shapes[name] = tensor.shape
    return shapes


def check_against_preset(tensors: dict[str, torch.Tensor]) -> None:
    expected = preset_shapes()
    missing = sorted(set(expected) - set(tensors))
    wrong = [f"{n}: checkpoint {tuple(t.shape)}, preset {tuple(expected[n])}"
             for n, t in tensors.items() if n in expected and t.shape != expected[n]]
    extra = sorted(set(tensors) - set(expected) - {"log_scale"})
    if missing or wrong or extra:
        raise ValueError("the checkpoint does not fit the brivl-1.0 preset: "
                         f"{len(missing)} preset tensors not in it {missing[:5]}, "
                         f"{len(wrong)} shapes differ {wrong[:5]}, {len(extra)} unexpected {extra[:5]}")


def read_released(path: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The ``learnable`` state dict of a released checkpoint, read without running pickled code
    unless ``allow_pickle``."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except Exception as err:  # noqa: BLE001 - the unpickler raises many types
        if allow_pickle:
            raise
        raise ValueError(f"--checkpoint {path}: not loadable as tensors only ({type(err).__name__}: "
                         f"{str(err).splitlines()[0]}). The file holds pickled Python objects besides "
                         "tensors; loading it runs code from the file. If you trust its source, pass "
                         "--allow-pickle.") from None
    state = checkpoint.get("learnable", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"--checkpoint {path}: expected a dict with a 'learnable' state dict (BriVL-1.0's "
                         "layout), found " + (f"keys {list(checkpoint)[:5]}" if isinstance(checkpoint, dict)
                                              else type(checkpoint).__name__))
    return state


def convert_brivl(checkpoint: Path, tokenizer: str, out: Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    from wenlan.export import tokenizer_files

    if not Path(tokenizer).is_dir():
        raise ValueError(f"--tokenizer {tokenizer}: not a directory (the chinese-roberta-wwm-ext tokenizer "
                         "files BriVL was trained with)")
    tensors = released_to_wenlan(read_released(checkpoint, allow_pickle))
    tensors["log_scale"] = torch.full((1,), math.log(1.0 / RELEASED_TEMPERATURE))
    check_against_preset(tensors)
    tensors = {k: v.float().contiguous() for k, v in tensors.items()}
    metadata = {"wenlan_model": json.dumps(asdict(get_preset("brivl-1.0"))),
                "wenlan_tokenizer": json.dumps(tokenizer_files(tokenizer)),
                "wenlan_step": "0", "wenlan_source": f"BriVL-1.0 checkpoint {checkpoint.name}"}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    return tensors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="source", required=True)
    brivl = sub.add_parser("brivl", help="a released BriVL-1.0 checkpoint (.pth)")
    brivl.add_argument("--checkpoint", required=True, type=Path)
    brivl.add_argument("--tokenizer", required=True, help="the chinese-roberta-wwm-ext tokenizer directory")
    brivl.add_argument("--out", required=True, type=Path, help="FILE.safetensors")
    brivl.add_argument("--allow-pickle", action="store_true",
                       help="load a checkpoint that holds pickled objects besides tensors (runs its code)")
    args = parser.parse_args()
    try:
        tensors = convert_brivl(args.checkpoint, args.tokenizer, args.out, args.allow_pickle)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    online = sum(t.numel() for n, t in tensors.items() if not n.startswith("momentum."))
    print(f"wrote {args.out}: {len(tensors)} tensors, {online / 1e6:.1f} M online parameters and buffers "
          "(brivl-1.0 preset, momentum towers included)")


if __name__ == "__main__":
    main()
