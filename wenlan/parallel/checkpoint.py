"""Checkpoints: DeepSpeed save/load with the run state, and consolidated weights from any checkpoint."""

import json
from pathlib import Path

import torch

STATE_KEY = "wenlan"  # the client_state entry holding the run state


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def save(engine, checkpoint_dir: Path, step: int, run_state: dict) -> None:
    """Every rank calls this (ZeRO shards are written by their owners)."""
    engine.save_checkpoint(str(checkpoint_dir), tag=tag_for(step), client_state={STATE_KEY: run_state})


def resolve_resume(resume: str, checkpoint_dir: Path) -> tuple[Path, str] | None:
    """--resume auto|none|PATH -> (checkpoint dir, tag) to load, or None for a fresh start."""
    if resume == "none":
        return None
    if resume == "auto":
        latest = checkpoint_dir / "latest"
        return (checkpoint_dir, latest.read_text().strip()) if latest.is_file() else None
    path = Path(resume)
    if (path / "latest").is_file():
        return path, (path / "latest").read_text().strip()
    if path.is_dir() and any(path.glob("mp_rank_*_model_states.pt")):
        return path.parent, path.name
    raise ValueError(f"--resume: {resume!r} is neither a checkpoints directory (with a 'latest' file) "
                     "nor a checkpoint tag directory; use auto, none or such a path")


def load(engine, where: tuple[Path, str]) -> dict:
    """Restore engine (weights, buffers incl. queues, optimizer, LR schedule); return the run state."""
    directory, tag = where
    path, client_state = engine.load_checkpoint(str(directory), tag=tag)
    if path is None:
        raise RuntimeError(f"could not load checkpoint {tag} from {directory}")
    return client_state[STATE_KEY]


def _tag_dir(checkpoint: Path) -> Path:
    checkpoint = Path(checkpoint)
    if (checkpoint / "latest").is_file():
        return checkpoint / (checkpoint / "latest").read_text().strip()
    if any(checkpoint.glob("mp_rank_*_model_states.pt")):
        return checkpoint
    raise FileNotFoundError(f"{checkpoint} is neither a checkpoints directory with a 'latest' file nor a "
                            "checkpoint tag directory")


def read_consolidated(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Whole fp32 tensors of every parameter and buffer of the trained module, plus the run state, from
    a checkpoint of any ZeRO stage and world size, on CPU and without a process group."""
    tag_dir = _tag_dir(checkpoint)
    model_states = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
    run_state = model_states[STATE_KEY]
    module = model_states["module"]
    if any(tag_dir.glob("*optim_states.pt")) and run_state["zero_stage"] > 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # The optimizer shards hold the fp32 master of every trainable parameter; the module file may
        # hold only low-precision copies (bf16) or, under ZeRO-3, placeholders.
        fp32 = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        module = {**module, **fp32}
    state = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    return state, run_state


def write_json(path: Path, data: dict) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
