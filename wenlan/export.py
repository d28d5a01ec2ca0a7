"""Consolidated weights from any checkpoint, and loading them for use.

``python -m wenlan.export --checkpoint DIR/checkpoints --out FILE.safetensors [--full]``

The file holds the online towers (``image_tower.*``, ``text_tower.*``, ``log_scale``); ``--full`` adds
the momentum towers (``momentum.`` prefix) and the queues (``queue.`` prefix). The same names come out
of every strategy and world size. The model config and the tokenizer files travel in the safetensors
metadata, so ``wenlan.load(FILE)`` needs nothing else.
"""

import argparse
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from wenlan.models.brivl import BriVL, ModelConfig, model_config_from_dict

# checkpoint (module) name prefix -> exported name prefix
ONLINE = {"model.image_tower.": "image_tower.", "model.text_tower.": "text_tower.",
          "model.shared_encoder.": "shared_encoder.", "log_scale": "log_scale"}
TOWER_PREFIXES = ("image_tower.", "text_tower.", "shared_encoder.")
"""The online model's tensors in an exported file (``shared_encoder.``: cookie's shared transformer)."""
MOMENTUM = {"model.momentum_image_tower.": "momentum.image_tower.",
            "model.momentum_text_tower.": "momentum.text_tower.", "queues.": "queue."}


def export_names(state: dict[str, torch.Tensor], full: bool) -> dict[str, torch.Tensor]:
    mapping = {**ONLINE, **(MOMENTUM if full else {})}
    out = {}
    for name, tensor in state.items():
        for src, dst in mapping.items():
            if name.startswith(src):
                out[dst + name[len(src):]] = tensor.contiguous()
    return out


def tokenizer_files(tokenizer_dir: str | None) -> dict[str, str]:
    if not tokenizer_dir or not Path(tokenizer_dir).is_dir():
        return {}
    return {p.name: p.read_text() for p in Path(tokenizer_dir).iterdir()
            if p.is_file() and p.suffix in (".json", ".txt")}


def export(checkpoint: Path, out: Path, full: bool = False) -> dict[str, torch.Tensor]:
    from wenlan.parallel.checkpoint import read_consolidated

    state, run_state = read_consolidated(checkpoint)
    tensors = export_names(state, full)
    config = run_state["config"]
    metadata = {"wenlan_model": json.dumps(config["model"]),
                "wenlan_tokenizer": json.dumps(tokenizer_files(config.get("tokenizer"))),
                "wenlan_step": str(run_state["step"])}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    out.with_suffix(".json").write_text(json.dumps({"model": config["model"], "step": run_state["step"],
                                                   "preset": config["preset"]}, indent=2))
    return tensors


def load_model_from_checkpoint(checkpoint: Path) -> tuple[BriVL, ModelConfig]:
    """The online towers of a checkpoint as a plain BriVL in eval mode (for evaluation)."""
    from wenlan.parallel.checkpoint import read_consolidated

    state, run_state = read_consolidated(checkpoint)
    model_cfg = model_config_from_dict(run_state["config"]["model"])
    model = BriVL(model_cfg, momentum=False)
    model.load_state_dict(tower_weights(export_names(state, full=False)), strict=True)
    return model.eval(), model_cfg


def tower_weights(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The online towers of exported tensors, named as in BriVL's state dict."""
    return {k: v for k, v in tensors.items() if k.startswith(TOWER_PREFIXES)}


class TowerFile(Mapping):
    """The online towers (``image_tower.*``, ``text_tower.*``) of a file written by ``wenlan.export`` or
    ``wenlan.convert``, named as in BriVL's state dict and read one tensor at a time, so starting a
    10B run from a file never holds the whole file in memory. ``log_scale`` is the file's learned
    log(1/T), if it has one."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        with safe_open(self.path, framework="pt") as f:
            self.metadata = f.metadata() or {}
            names = list(f.keys())
            self.log_scale = f.get_tensor("log_scale").float().item() if "log_scale" in names else None
            self.shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names
                           if n.startswith(TOWER_PREFIXES)}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.shapes:
            raise KeyError(name)
        with safe_open(self.path, framework="pt") as f:
            return f.get_tensor(name)

    def __contains__(self, name) -> bool:  # Mapping's default would read the tensor to find out
        return name in self.shapes

    def shape(self, name: str) -> tuple:
        return self.shapes[name]

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def check_fits(self, model: torch.nn.Module) -> None:
        """Every online tensor of ``model`` (a BriVL without momentum towers, on the meta device) is in
        the file with its shape, and nothing else."""
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        missing = sorted(set(expected) - set(self.shapes))
        extra = sorted(set(self.shapes) - set(expected))
        wrong = [f"{n} {self.shapes[n]} vs {expected[n]}" for n in expected if n in self.shapes and
                 self.shapes[n] != expected[n]]
        if missing or extra or wrong:
            preset = json.loads(self.metadata.get("wenlan_model", "null"))
            raise ValueError(f"--init-from {self.path}: does not fit the preset's towers ({len(missing)} tensors "
                             f"missing {missing[:3]}, {len(extra)} unexpected {extra[:3]}, {len(wrong)} shapes "
                             f"differ {wrong[:3]}); the file was written for model config "
                             f"{'(none recorded)' if preset is None else 'with embed_dim ' + str(preset.get('embed_dim'))}"
                             ": use the --preset it was trained with")


class WenLanModel(torch.nn.Module):
    """A loaded BriVL for use: ``encode_image(images)``, ``encode_text(texts)``."""

    def __init__(self, model: BriVL, tokenizer):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = model.cfg

    @torch.no_grad()
    def encode_image(self, images) -> torch.Tensor:
        """images: PIL images, or a float (B, 3, H, W) tensor normalised as the model's input
        (wenlan.data.model_images of an eval batch)."""
        if not torch.is_tensor(images):
            from wenlan.data.transforms import NORMALISE, eval_transform, model_images

            tf = eval_transform(self.cfg.image.image_size)
            pixels = torch.stack([tf(im.convert("RGB")) for im in images])  # (B, 3, S, S) uint8
            images = model_images(pixels, NORMALISE.expand(len(pixels), 3, 7))
        return self.model.encode_image(images)  # (B, E)

    @torch.no_grad()
    def encode_text(self, texts) -> torch.Tensor:
        """texts: a list of strings (tokenised like training), or a dict with input_ids/attention_mask."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, dict):
            texts = self.tokenizer(list(texts), padding="max_length", truncation=True,
                                   max_length=self.cfg.text.max_len, return_tensors="pt")
        return self.model.encode_text(texts["input_ids"], texts["attention_mask"])  # (B, E)


def load(path: str | Path) -> WenLanModel:
    """Rebuild the model saved by ``wenlan.export`` and load its online towers."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    model_cfg = model_config_from_dict(json.loads(metadata["wenlan_model"]))
    model = BriVL(model_cfg, momentum=False)
    model.load_state_dict(tower_weights(load_file(str(path))), strict=True)
    tokenizer = None
    files = json.loads(metadata.get("wenlan_tokenizer", "{}"))
    if files:
        from transformers import AutoTokenizer

        with tempfile.TemporaryDirectory() as tmp:
            for name, text in files.items():
                (Path(tmp) / name).write_text(text)
            tokenizer = AutoTokenizer.from_pretrained(tmp)
    return WenLanModel(model, tokenizer)


def main() -> None:
    parser = argparse.ArgumentParser(description="Export consolidated weights from a checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="DIR/checkpoints (latest) or one tag directory")
    parser.add_argument("--out", required=True, help="FILE.safetensors")
    parser.add_argument("--full", action="store_true", help="also the momentum towers and the queues")
    args = parser.parse_args()
    tensors = export(Path(args.checkpoint), Path(args.out), args.full)
    n = sum(t.numel() for t in tensors.values())
    print(f"wrote {args.out}: {len(tensors)} tensors, {n:,} values")


if __name__ == "__main__":
    main()
