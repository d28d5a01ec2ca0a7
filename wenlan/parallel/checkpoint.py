"""Checkpoints: DeepSpeed's engine state plus what it does not carry, written so that a crash mid-save
never leaves a checkpoint that looks usable.

A tag directory ``stepNNNNNNNN`` holds DeepSpeed's files (module, ZeRO optimizer partitions, LR
schedule; the momentum towers are frozen parameters, which DeepSpeed stores as partitions under
ZeRO-2/3), the run state in the client state (step, config, the data position of every stream), and
one ``wenlan_rank{r}.pt`` per rank with its RNG states, its fp32 masters of the momentum weights
(ZeRO-3: its partitions) and its queue shard; state equal on every rank (whole masters, a replicated
queue) is written by rank 0 only and stored as None by the others. ``complete.json`` is written by rank 0
only after every rank's files are on disk; ``--resume auto`` takes the newest tag that has it.
"""

import json
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("wenlan.train")

STATE_KEY = "wenlan"  # the client_state entry holding the run state
COMPLETE = "complete.json"
# A tag written by wenlan.parallel.reshard ("format": "portable" in complete.json): whole tensors, any world size.
PORTABLE_LAYOUT = 2  # complete.json's "layout": 2 = the three files below; absent = one PORTABLE file
PORTABLE_WEIGHTS = "weights.safetensors"  # every parameter, buffer and queues.* entry, fp32 where floating
PORTABLE_MOMENTS = "moments.safetensors"  # exp_avg.NAME, exp_avg_sq.NAME per trainable parameter
PORTABLE_STATE = "portable_state.pt"  # Adam step, LR schedule, engine counters, run state (small)
PORTABLE = "portable.pt"  # layout 1 (before streaming conversion): everything in one torch file
MOMENTS = ("exp_avg", "exp_avg_sq")  # Adam's state per trainable parameter
TAG = re.compile(r"^step(\d{8})$")


def tag_for(step: int) -> str:
    return f"step{step:08d}"


def rank_file(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / f"wenlan_rank{rank:05d}.pt"


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def capture_rng() -> dict:
    """This process's RNG states (dropout and anything else drawn in the training process; data
    augmentation is seeded per sample and needs none)."""
    import random

    import numpy as np

    return dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def restore_rng(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj, path: Path) -> None:
    tmp = Path(str(path) + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save(engine, checkpoint_dir: Path, step: int, run_state: dict, rank_state: dict) -> None:
    """Every rank calls this (ZeRO partitions are written by their owners)."""
    rank = dist.get_rank()
    tag_dir = Path(checkpoint_dir) / tag_for(step)
    if rank == 0 and (tag_dir / COMPLETE).exists():
        (tag_dir / COMPLETE).unlink()  # being overwritten: not complete until the end of this save
    dist.barrier()  # no gradient; nobody writes before the old marker is gone
    engine.save_checkpoint(str(checkpoint_dir), tag=tag_for(step), client_state={STATE_KEY: run_state},
                           save_latest=False)
    atomic_torch_save(rank_state, rank_file(tag_dir, rank))
    dist.barrier()  # no gradient; every rank's files are on disk
    if rank == 0:
        write_json(tag_dir / COMPLETE, {"step": step, "world_size": dist.get_world_size(),
                                        "zero_stage": run_state["zero_stage"],
                                        "pipeline_stages": run_state.get("pipeline_stages", 1),
                                        "data_streams": run_state["config"]["data_streams"]})
        write_text(Path(checkpoint_dir) / "latest", tag_for(step))
    dist.barrier()


def complete_tags(checkpoint_dir: Path) -> list[str]:
    """Tags with every rank's files written, oldest first."""
    if not Path(checkpoint_dir).is_dir():
        return []
    tags = [p.name for p in Path(checkpoint_dir).iterdir() if TAG.match(p.name) and (p / COMPLETE).is_file()]
    return sorted(tags)


def prune(checkpoint_dir: Path, saved_step: int, keep: int) -> list[str]:
    """Delete what a newer complete checkpoint makes redundant; returns the deleted tags. Rank 0 calls
    it after every rank's files of ``saved_step`` are on disk and its ``complete.json`` is written.

    Kept: the tag just saved, the ``keep - 1`` newest complete tags older than it, and every tag newer
    than it (left by an earlier attempt that got further; this run overwrites them when it gets there).
    Deleted: older complete tags beyond those, and older incomplete ones (saves cut short by a crash,
    which no resume reads). ``--resume auto`` reads the newest complete tag, which is never deleted;
    a deleted tag loses its ``complete.json`` first, so a deletion cut short leaves an incomplete tag,
    never a complete-looking one with files missing.
    """
    import shutil

    checkpoint_dir = Path(checkpoint_dir)
    older = sorted(p for p in checkpoint_dir.iterdir() if TAG.match(p.name) and int(TAG.match(p.name)[1]) < saved_step)
    complete = [p for p in older if (p / COMPLETE).is_file()]
    kept = set(complete[max(len(complete) - (keep - 1), 0):]) if keep > 1 else set()
    deleted = []
    for tag_dir in older:
        if tag_dir in kept:
            continue
        try:
            (tag_dir / COMPLETE).unlink(missing_ok=True)
            shutil.rmtree(tag_dir)
            deleted.append(tag_dir.name)
        except OSError as err:  # a checkpoint left on disk costs space, not the run
            log.warning("could not delete old checkpoint %s: %s", tag_dir, err)
    return deleted


def resolve_resume(resume: str, checkpoint_dir: Path) -> tuple[Path, str] | None:
    """--resume auto|none|PATH -> (checkpoints dir, tag) to load, or None for a fresh start.

    auto: the newest complete checkpoint in the run's own checkpoints dir (none: fresh start). PATH: a
    checkpoints dir (its newest complete tag) or one tag dir, which must be complete.
    """
    if resume == "none":
        return None
    if resume == "auto":
        tags = complete_tags(checkpoint_dir)
        return (Path(checkpoint_dir), tags[-1]) if tags else None
    path = Path(resume)
    if TAG.match(path.name) and path.is_dir():
        if not (path / COMPLETE).is_file():
            raise ValueError(f"--resume: {resume} is an incomplete checkpoint (no {COMPLETE}: its save was "
                             "interrupted); resume from an older tag or use --resume auto")
        return path.parent, path.name
    tags = complete_tags(path)
    if tags:
        return path, tags[-1]
    raise ValueError(f"--resume: {resume!r} is neither a checkpoints directory with a complete checkpoint nor a "
                     "complete checkpoint tag directory (stepNNNNNNNN); use auto, none or such a path")


def read_complete(tag_dir: Path) -> dict:
    return json.loads((Path(tag_dir) / COMPLETE).read_text())


def is_portable(where: tuple[Path, str] | None) -> bool:
    """A tag written by ``wenlan.parallel.reshard`` (whole tensors, any world size)."""
    return where is not None and read_complete(Path(where[0]) / where[1]).get("format") == "portable"


def load(engine, where: tuple[Path, str], pipeline_stages: int = 1) -> tuple[dict, dict]:
    """Restore the engine (weights, frozen momentum partitions, optimizer, LR schedule) and return
    (run state, this rank's extra state)."""
    directory, tag = where
    info = read_complete(Path(directory) / tag)
    world = dist.get_world_size()
    if info.get("pipeline_stages", 1) != pipeline_stages:
        raise ValueError(f"checkpoint {directory}/{tag} was written by {info.get('pipeline_stages', 1)} pipeline "
                         f"stage(s), this run has {pipeline_stages}: resume with the DeepSpeed config it was "
                         "trained with")
    if info["world_size"] != world:
        raise ValueError(
            f"checkpoint {directory}/{tag} was written by {info['world_size']} ranks, this run has {world}. "
            f"Convert it first: python -m wenlan.parallel.reshard --checkpoint {directory}/{tag} --out NEW_DIR, "
            "then --resume NEW_DIR")
    path, client_state = engine.load_checkpoint(str(directory), tag=tag)
    if path is None:
        raise RuntimeError(f"could not load checkpoint {tag} from {directory}")
    own = rank_file(Path(directory) / tag, dist.get_rank())
    rank_state = torch.load(own, map_location="cpu", weights_only=False)
    shared = [k for k, v in rank_state.items() if v is None]
    if shared:  # state equal on the ranks of a stage is written once, by the stage's first rank
        first = rank_file(Path(directory) / tag, rank_state.get("shared_from", 0))
        source = torch.load(first, map_location="cpu", weights_only=False)  # our own rank file, as above
        rank_state.update({k: source[k] for k in shared})
    return client_state[STATE_KEY], rank_state


def tag_dir_of(checkpoint: Path) -> Path:
    """The tag dir itself, or the newest complete tag of a checkpoints dir."""
    checkpoint = Path(checkpoint)
    if TAG.match(checkpoint.name) and (checkpoint / COMPLETE).is_file():
        return checkpoint
    tags = complete_tags(checkpoint)
    if tags:
        return checkpoint / tags[-1]
    raise FileNotFoundError(f"{checkpoint} is neither a checkpoints directory with a complete checkpoint nor a "
                            "complete checkpoint tag directory (stepNNNNNNNN with complete.json)")


def _whole(parts: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """A ZeRO-3 parameter from its ranks' flat partitions (the last one padded)."""
    return torch.cat([p.reshape(-1) for p in parts])[: like.numel()].view(like.shape)


def model_states_file(tag_dir: Path, stage: int) -> Path:
    """DeepSpeed's file with the module, LR schedule and client state (rank 0's under ZeRO-3)."""
    return Path(tag_dir) / ("zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3 else "mp_rank_00_model_states.pt")


def queue_entries(queue: dict) -> dict[str, torch.Tensor]:
    """A global queue state as the ``queues.*`` tensors of a consolidated state dict."""
    entries = {f"queues.{k}": queue[k] for k in ("image", "text", "ids")}
    entries.update({f"queues.{k}": torch.tensor([queue[k]]) for k in ("ptr", "filled")})
    return entries


def queue_from_entries(state: dict[str, torch.Tensor]) -> dict | None:
    """The inverse of ``queue_entries``: a global queue state (``num_shards=1``), or None if there is none."""
    if "queues.image" not in state:
        return None
    image = state["queues.image"]
    return dict(image=image, text=state["queues.text"], ids=state["queues.ids"], ptr=int(state["queues.ptr"]),
                filled=int(state["queues.filled"]), size=image.shape[0], shard=0, num_shards=1)


def optimizer_order(config: dict) -> list[str]:
    """Names of the trainable parameters in the optimizer's order, from the run's config (built on the
    meta device, so nothing is allocated)."""
    return [name for group in optimizer_groups(config) for name in group]


def optimizer_groups(config: dict) -> list[list[str]]:
    """The trainable parameters' names per optimizer parameter group, in order."""
    from wenlan.losses.objective import ContrastivePretraining, ObjectiveConfig
    from wenlan.models.brivl import BriVL, model_config_from_dict
    from wenlan.parallel.engine import param_groups

    objective = ObjectiveConfig.from_dict(config["objective"])
    with torch.device("meta"):
        module = ContrastivePretraining(BriVL(model_config_from_dict(config["model"]),
                                              momentum=objective.uses_momentum), objective)
    names = {id(p): n for n, p in module.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in param_groups(module, 0.0)]


def _split_masters(flats: list[torch.Tensor], config: dict, module: dict) -> dict[str, torch.Tensor]:
    """Flat fp32 masters, one per optimizer parameter group (trailing alignment padding allowed), back as
    named tensors shaped like the module's (which holds only their low-precision copies)."""
    masters = {}
    for names, flat in zip(optimizer_groups(config), flats, strict=True):
        offset = 0
        for name in names:
            n = module[name].numel()
            masters[name] = flat[offset:offset + n].float().view(module[name].shape).clone()
            offset += n
        if offset > flat.numel():
            raise ValueError(f"an fp32 master group holds {flat.numel()} values, its parameters {offset}")
    return masters


def _bf16_optimizer_files(tag_dir: Path) -> list[Path]:
    return sorted(Path(tag_dir).glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                  key=lambda f: int(f.name.split("_")[4]))


def _is_bf16_optimizer_state(optimizer_state: dict) -> bool:
    """DeepSpeed's bf16 optimizer's state (ZeRO-1, bf16 weights, fp32 gradient accumulation): unlike
    ZeRO's, it carries no ``zero_stage``."""
    return "zero_stage" not in optimizer_state


def is_bf16_optimizer(tag_dir: Path) -> bool:
    """Written by DeepSpeed's bf16 optimizer. Reads the structure of one rank's optimizer file, none of its
    tensors: ZeRO's files of bf16 runs carry the same ``bf16_`` name and hold a rank's whole optimizer state."""
    from wenlan.parallel.tensorfile import TorchFile

    files = _bf16_optimizer_files(tag_dir)
    return bool(files) and _is_bf16_optimizer_state(TorchFile(files[0]).obj["optimizer_state_dict"])


def _bf16_optimizer_masters(tag_dir: Path, config: dict, module: dict) -> dict[str, torch.Tensor] | None:
    """The fp32 masters of a checkpoint written by DeepSpeed's bf16 optimizer, or None for another
    optimizer: each rank holds a contiguous partition of every group's flat fp32 master, in rank order;
    DeepSpeed's zero_to_fp32 does not read it. Each rank's file is read once."""
    states = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
              for f in _bf16_optimizer_files(tag_dir)]
    if not states or not _is_bf16_optimizer_state(states[0]):
        return None
    parts = [state["single_partition_of_fp32_groups"] for state in states]
    return _split_masters([torch.cat(group) for group in zip(*parts)], config, module)


class _InMemory:
    """Whole tensors already in memory, with ``SafetensorsFile``'s reading interface (layout 1 tags)."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple:
        return tuple(self.tensors[name].shape)

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def read_flat(self, name: str, start: int = 0, end: int | None = None) -> torch.Tensor:
        return self.tensors[name].reshape(-1)[start:end]


class WeightMap(Mapping):
    """A portable tag's parameters and buffers (no queues) as a mapping read one tensor per lookup:
    ``build_module`` copies them in module by module, so no rank holds more than one whole tensor (and
    under ZeRO-3 only rank 0 reads a parameter; ``shape`` lets the others check it from the header)."""

    def __init__(self, tensors):
        self.tensors = tensors
        self.names = [n for n in tensors.keys() if not n.startswith("queues.")]
        self._names = set(self.names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._names:
            raise KeyError(name)
        return self.tensors.read(name)

    def __contains__(self, name) -> bool:  # Mapping's default would read the tensor to find out
        return name in self._names

    def shape(self, name: str) -> tuple:
        return tuple(self.tensors.shape(name))

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class PortableTag:
    """A tag written by ``wenlan.parallel.reshard``, opened without reading its tensors.

    ``weights`` / ``moments``: the tensor files (whole tensors, or flat ranges ``read_flat(name, start,
    end)`` that read only a rank's partition). ``small``: Adam step, LR schedule, engine counters and run
    state. A layout-1 tag (one ``portable.pt``, written before conversion streamed) is read whole into
    memory, as it was then; convert the original checkpoint again to get the streaming layout.
    """

    def __init__(self, tag_dir: Path):
        from wenlan.parallel.tensorfile import SafetensorsFile

        self.tag_dir = Path(tag_dir)
        layout = read_complete(self.tag_dir).get("layout", 1)
        if layout == PORTABLE_LAYOUT:
            self.weights = SafetensorsFile(self.tag_dir / PORTABLE_WEIGHTS)
            self.moments = SafetensorsFile(self.tag_dir / PORTABLE_MOMENTS)
            # tensors, numbers, strings and containers only: read without unpickling anything else
            self.small = torch.load(self.tag_dir / PORTABLE_STATE, map_location="cpu", weights_only=True)
        elif layout == 1:
            whole = torch.load(self.tag_dir / PORTABLE, map_location="cpu", weights_only=True)
            entries = dict(whole.pop("weights"))
            if whole["queues"] is not None:
                entries.update(queue_entries(whole.pop("queues")))
            self.weights = _InMemory(entries)
            self.moments = _InMemory({f"{key}.{name}": t for key, per_name in whole.pop("moments").items()
                                      for name, t in per_name.items()})
            self.small = whole
        else:
            raise ValueError(f"{self.tag_dir}: converted checkpoint layout {layout} is newer than this code reads "
                             f"(layout {PORTABLE_LAYOUT}); update the code, or convert the original checkpoint with "
                             "this version of wenlan.parallel.reshard")

    @property
    def run_state(self) -> dict:
        return self.small["run_state"]

    def weight_map(self) -> WeightMap:
        return WeightMap(self.weights)

    def queues(self) -> dict | None:
        """The global queue state (read whole: every rank holds the queues, or slices its shard from them)."""
        if "queues.image" not in self.weights:
            return None
        return queue_from_entries({n: self.weights.read(n) for n in self.weights.keys() if n.startswith("queues.")})

    def consolidated(self) -> dict[str, torch.Tensor]:
        """Every weight and queue entry, whole: ``read_consolidated``'s state dict."""
        return {name: self.weights.read(name) for name in self.weights.keys()}


def read_partition(tensors, name: str, start: int, numel: int) -> torch.Tensor:
    """Elements [start, start + numel) of the flattened tensor ``name``, zero-padded where the tensor ends
    first (ZeRO-3's last partition), in fp32; only those elements are read."""
    total = math.prod(tensors.shape(name))
    end = min(start + numel, total)
    piece = tensors.read_flat(name, min(start, end), end).float()
    if piece.numel() == numel:
        return piece
    part = torch.zeros(numel)
    part[:piece.numel()] = piece
    return part


def read_consolidated(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Whole fp32 tensors of every parameter and buffer of the trained module (momentum weights from
    their fp32 masters, queues under ``queues.``), plus the run state, from a checkpoint of any ZeRO
    stage and world size, on CPU and without a process group."""
    from wenlan.losses.queue import consolidate

    tag_dir = tag_dir_of(checkpoint)
    info = read_complete(tag_dir)
    if info.get("format") == "portable":
        portable = PortableTag(tag_dir)
        return portable.consolidated(), portable.run_state
    stage, world = info["zero_stage"], info["world_size"]
    model_states = torch.load(model_states_file(tag_dir, stage), map_location="cpu", weights_only=False)
    run_state = model_states[STATE_KEY]
    if info.get("pipeline_stages", 1) > 1:
        # One file per pipeline layer (written by each stage's first data-parallel rank); its keys map
        # back to the plain module's names. ZeRO-1's fp32 masters are not read: fp32 runs only.
        from wenlan.parallel.pipeline import plain_name

        module = {}
        for layer_file in sorted(tag_dir.glob("layer_*-model_states.pt")):
            layer = torch.load(layer_file, map_location="cpu", weights_only=False)
            module.update({plain_name(k): v for k, v in layer.items()})
    else:
        module = dict(model_states["module"])
    plain = info.get("pipeline_stages", 1) == 1
    bf16_masters = _bf16_optimizer_masters(tag_dir, run_state["config"], module) if stage == 1 and plain else None
    if bf16_masters is not None:
        module.update(bf16_masters)
    elif stage > 0 and plain:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        # The optimizer partitions hold the fp32 master of every trainable parameter and the model files
        # the frozen (momentum) partitions; the module dict itself may hold only bf16 copies or, under
        # ZeRO-3, empty placeholders.
        module.update(get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                               exclude_frozen_parameters=False))
    elif stage == 0 and "fp32_groups_flat" in (model_states.get("optimizer") or {}):  # fp16 (bf16 is refused)
        module.update(_split_masters(model_states["optimizer"]["fp32_groups_flat"], run_state["config"], module))
    state = {k: v.float() if v.is_floating_point() else v for k, v in module.items()}

    rank_states = [torch.load(rank_file(tag_dir, r), map_location="cpu", weights_only=False) for r in range(world)]
    # Whole masters are written by each stage's first rank (one stage without a pipeline); ZeRO-3 partitions
    # by every rank.
    masters = {}
    for rs in rank_states:
        for name, master in (rs.get("momentum_masters") or {}).items():
            masters.setdefault(name, []).append(master)
    for name, parts in masters.items():
        state[name] = _whole(parts if stage == 3 else parts[:1], state[name]).float()
    queues = [rs["queues"] for rs in rank_states if rs.get("queues") is not None]
    if queues:
        state.update(queue_entries(consolidate(queues)))
    return state, run_state


def write_text(path: Path, text: str) -> None:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_json(path: Path, data: dict) -> None:
    write_text(path, json.dumps(data, indent=2))


@torch.no_grad()
def load_portable(engine, module, ema, portable: PortableTag) -> dict:
    """Finish a resume from a portable tag on an engine built from its weights (``build_module(cfg,
    portable.weight_map())``): fp32 masters, Adam moments and step, LR schedule, momentum masters, queues.
    Returns the run state.

    Each rank reads only what it holds: under ZeRO-3 its partition of every parameter, under ZeRO-1/2
    its fragment of each parameter that falls in its flat partition (the range DeepSpeed's
    ``safe_set_full_*`` would cut from a whole tensor), under ZeRO-0 whole tensors (each rank holds them).
    Writes go through DeepSpeed's setters, never into what a getter returned: with the optimizer
    offloaded, ``safe_get_local_*`` returns a copy (moved to the device, or swapped in from NVMe and
    released), and writing into it would be lost without an error.
    """
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    weights, moments = portable.weights, portable.moments
    trainable = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    zero3 = any(hasattr(p, "ds_id") for _, p in trainable)
    zero12 = any(hasattr(p, "_hp_mapping") for _, p in trainable)
    optimizer = engine.optimizer.optimizer if zero3 or zero12 else engine.optimizer  # the torch optimizer
    # Adam creates its state at the first step; create it now. ZeRO-3 hands its flat fp32 partitions to
    # the torch optimizer only inside step(), so they are not in param_groups here.
    if zero3:
        flats = engine.optimizer.fp32_partitioned_groups_flat
    elif zero12:
        flats = engine.optimizer.single_partition_of_fp32_groups
    else:
        flats = [p for group in optimizer.param_groups for p in group["params"]]
    for flat in flats:
        for key in MOMENTS:
            optimizer.state[flat].setdefault(key, torch.zeros_like(flat))
    for name, p in trainable:
        if zero3:  # rank r holds [r * P, (r + 1) * P) of the flattened parameter, zero-padded at the end
            size = p.ds_tensor.numel()
            start = dist.get_rank(group=getattr(p, "ds_process_group", None)) * size  # as DeepSpeed's setters
            safe_set_local_fp32_param(p, read_partition(weights, name, start, size))
            for key in MOMENTS:
                safe_set_local_optimizer_state(p, read_partition(moments, f"{key}.{name}", start, size), key)
        elif zero12:
            mapping = p._hp_mapping
            if mapping is None:  # no element of this parameter falls in this rank's partition
                continue
            if mapping.optim_fragment is None:  # linked only once Adam has state: link it to the new state
                flat = flats[mapping.param_group_index]
                mapping.set_optim_state_fragment(flat, optimizer.state[flat])
            # DeepSpeed's set_full_hp_param copies value.flatten()[start:start + numel] into the fragment,
            # a view of this rank's fp32 partition (on the host under offload): read just that range.
            where = mapping.lp_fragment_address
            mapping.get_hp_fragment().data.copy_(read_partition(weights, name, where.start, where.numel))
            for key in MOMENTS:
                mapping.get_hp_fragment(key).data.copy_(read_partition(moments, f"{key}.{name}", where.start,
                                                                       where.numel))
        else:
            optimizer.state[p] = {key: moments.read(f"{key}.{name}").to(p.device).clone() for key in MOMENTS}
    # The step in the type the optimizer creates: a tensor for torch's Adam/AdamW (torch_adam), a Python int
    # for DeepSpeed's FusedAdam and DeepSpeedCPUAdam, which hand it to their kernels.
    torch_adam = type(optimizer).__module__.startswith("torch.optim")
    adam_step = int(portable.small["adam_step"])
    for state in optimizer.state.values():
        state["step"] = torch.tensor(float(adam_step)) if torch_adam else adam_step
    engine.lr_scheduler.load_state_dict(portable.small["lr_scheduler"])
    # LambdaLR restores its position but sets the groups' LR only at its next step: set it now.
    for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr
    for key, value in portable.small["engine_counters"].items():
        setattr(engine, key, value)
    if ema is not None:
        ema.load_whole(lambda name, start, numel: read_partition(weights, name, start, numel))
    if module.queues is not None:
        module.queues.load_state(portable.queues())
    return portable.run_state


def decided_by_rank0(decide, group=None):
    """``decide()`` run on rank 0 only and its result (or its error) given to every rank of ``group``
    (a broadcast of a small object, no gradient). For decisions that gate collectives: ranks that see a
    shared file system differently must still take the same path."""
    result = [None]
    if dist.get_rank() == 0:
        try:
            result = [("ok", decide())]
        except (OSError, ValueError) as err:
            result = [("error", f"{type(err).__name__}: {err}")]
    dist.broadcast_object_list(result, src=0, group=group)
    status, value = result[0]
    if status == "error":
        raise ValueError(f"rank 0: {value}")
    return value


@dataclass
class Progress:
    """Where the run is: what the loop advances and a checkpoint restores."""

    step: int = 0
    samples_seen: int = 0
    restarts: int = 0
    data_position: dict | None = None
    """This rank's streams' positions after the last step (the loader's ``batch["position"]``)."""

    def advance(self, batch: dict | None, global_batch: int) -> None:
        self.step += 1
        self.samples_seen += global_batch
        self.data_position = batch["position"] if batch is not None else None


class Checkpointer:
    """Everything a checkpoint holds, and the one way a run comes back from one.

    A tag holds DeepSpeed's engine state (module, optimizer partitions, LR schedule), the run state
    (``Progress``, the resolved config and the layout, with every stream's data position merged over the
    ranks) as DeepSpeed client state, and per rank ``Strategy.rank_state()`` (RNG states, fp32 masters of
    the momentum weights, the queue shard). Rank 0 alone decides whether to resume and from which tag, and
    the loop remembers the last saved step instead of listing the directory.
    """

    def __init__(self, cfg, group=None):
        self.cfg, self.group = cfg, group
        self.directory = Path(cfg.output_dir) / "checkpoints"

        def decide():
            where = resolve_resume(cfg.resume, self.directory)
            return where, is_portable(where), cfg.data_streams

        self.where, portable, streams = decided_by_rank0(decide, group)
        cfg.data_streams = streams  # resolved per rank before the process group existed: rank 0's counts
        self.portable = None
        if portable:  # converted by wenlan.parallel.reshard: whole tensors, any world size, read on demand
            self.portable = PortableTag(Path(self.where[0]) / self.where[1])
        self.last_saved_step = None

    @property
    def portable_weights(self) -> Mapping | None:
        """The converted checkpoint's weights to build the module from (read one tensor at a time)."""
        return self.portable.weight_map() if self.portable is not None else None

    def restore(self, strategy) -> Progress:
        """The run's progress, after loading the engine and this rank's state (a fresh start: step 0)."""
        if self.portable is not None:
            state = load_portable(strategy.engine, strategy.objective, strategy.ema, self.portable)
            # per-rank RNG states do not carry over to another world size: reseed them by the step
            seed_everything(self.cfg.seed * 100003 + dist.get_rank() * 1009 + state["step"])
        elif self.where is not None:
            state, rank_state = load(strategy.engine, self.where, strategy.stages)
            strategy.load_rank_state(rank_state)
        else:
            return Progress()
        strategy.refresh_temperature()
        if dist.get_rank() == 0:
            log.info("resumed from %s%s/%s at step %d on %d ranks", "converted checkpoint " if self.portable else "",
                     *self.where, state["step"], dist.get_world_size())
        if Path(self.where[0]).resolve() == self.directory.resolve():
            self.last_saved_step = state["step"]
        return Progress(step=state["step"], samples_seen=state["samples_seen"],
                        restarts=state.get("restarts", 0) + 1, data_position=state.get("data_position"))

    def save(self, strategy, progress: Progress) -> None:
        """Every rank calls this at the same step."""
        from wenlan.data.pipeline import merge_positions
        from wenlan.parallel.engine import zero_stage

        positions = [None] * dist.get_world_size()
        dist.all_gather_object(positions, progress.data_position or {}, group=self.group)  # small dicts, no gradient
        run_state = dict(step=progress.step, samples_seen=progress.samples_seen, restarts=progress.restarts,
                         config=self.cfg.to_dict(), zero_stage=zero_stage(self.cfg.deepspeed_config),
                         world_size=dist.get_world_size(), pipeline_stages=strategy.stages,
                         data_position=merge_positions(positions))
        save(strategy.engine, self.directory, progress.step, run_state, strategy.rank_state())
        self.last_saved_step = progress.step
        keep = self.cfg.keep_checkpoints
        # After save()'s last barrier: every rank's files of this step are written and marked complete,
        # and every rank finished reading the tag it resumed from long before (one rank deletes).
        if keep is not None and dist.get_rank() == 0:
            deleted = prune(self.directory, progress.step, keep)
            if deleted:
                log.info("--keep-checkpoints %d: deleted %s", keep, ", ".join(deleted))
