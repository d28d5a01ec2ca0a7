"""Convert a checkpoint so that training resumes on another number of ranks (or another ZeRO stage).

    python -m wenlan.parallel.reshard --checkpoint OLD/checkpoints[/stepNNNNNNNN] --out NEW/checkpoints

then start the run with ``--resume NEW/checkpoints`` (and the same ``--data-streams``, which is kept
by default). The output is one world-size-free tag holding every tensor whole:

- ``weights.safetensors``: the fp32 value of every parameter and buffer (online parameters from the
  optimizer's masters, momentum ones from their fp32 masters; DeepSpeed 0.19's universal checkpoint
  keeps trainable parameters only, so it would drop the momentum towers, and it does not read ZeRO-0
  checkpoints) and the global queues as ``queues.*``: what ``read_consolidated`` returns;
- ``moments.safetensors``: Adam's ``exp_avg.NAME`` / ``exp_avg_sq.NAME`` per trainable parameter;
- ``portable_state.pt``: the Adam step, the LR schedule, DeepSpeed's counters and the run state with
  the data position of every stream (small).

It streams: each output tensor is assembled from its ranks' pieces, read from the ZeRO files with a
seek and a read of just those bytes (``wenlan.parallel.tensorfile``), written, and dropped before the
next, so the converter's memory is bounded by a few times the largest tensor (and the queues), not by
the model or a rank's files. A resume reads each rank's own partitions from these files
(``checkpoint.load_portable``).

Per-rank RNG states do not carry over to another world size: a resharded run reseeds them from
(seed, rank, step), so runs with dropout continue with a fresh stream of masks.
"""

import argparse
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from wenlan.parallel import checkpoint as ckpt
from wenlan.parallel.checkpoint import MOMENTS
from wenlan.parallel.tensorfile import SafetensorsWriter, TensorRef, TorchFile

Reader = Callable[[], torch.Tensor]  # reads one whole output tensor when called


def _files(tag_dir: Path, pattern: str) -> list[Path]:
    """DeepSpeed's per-rank files in rank order (its own natural sort: rank 10 after rank 9)."""
    from deepspeed.utils.zero_to_fp32 import natural_keys

    files = sorted(tag_dir.glob(pattern), key=lambda p: natural_keys(p.name))
    if not files:
        raise FileNotFoundError(f"{tag_dir}: no {pattern} files")
    return files


class _Concat:
    """Flat tensors of several files read as their concatenation: ZeRO-1/2's group partitions over the
    ranks, or one ZeRO-3 rank's sub-groups. ``read(start, end)`` reads only the overlapping pieces."""

    def __init__(self, parts: list[tuple[TorchFile, TensorRef]]):
        self.parts = parts
        self.starts = [0]
        for _, ref in parts:
            self.starts.append(self.starts[-1] + ref.numel())

    def numel(self) -> int:
        return self.starts[-1]

    @property
    def dtype(self) -> torch.dtype:
        return self.parts[0][1].dtype

    def read(self, start: int, end: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, end), read straight into ``out`` (or a new tensor): no second copy to join pieces."""
        if not 0 <= start <= end <= self.numel():
            raise IndexError(f"range [{start}, {end}) of flat groups holding {self.numel()} elements")
        out = torch.empty(end - start, dtype=self.dtype) if out is None else out
        for (file, ref), lo, hi in zip(self.parts, self.starts, self.starts[1:]):
            if lo < end and start < hi:
                a, b = max(start, lo), min(end, hi)
                file.read_flat(ref, a - lo, b - lo, out=out[a - start:b - start])
        return out


class ZeroTag:
    """A (non-pipeline) checkpoint tag of any ZeRO stage as named whole tensors that are read one at a
    time: ``weights`` (everything ``read_consolidated`` returns but the queues) and ``moments[key]``
    (Adam's state per trainable parameter), each {name: (shape, dtype, reader)}.

    The slicing is DeepSpeed 0.19.8's ``zero_to_fp32``, one tensor at a time:
    - ZeRO-1/2: optimizer group g's flat fp32 master is the concatenation of the ranks' partitions
      (``single_partition_of_fp32_groups[g]``); its parameters lie in order, each followed by its
      ``param_alignment_paddings`` entry; Adam's moments lie exactly like the master.
    - ZeRO-3: each parameter is split into ``world`` partitions of ceil(numel / world) (the last
      zero-padded); rank r's flat groups concatenated hold its partition of every trainable parameter in
      ``param_shapes`` order at the same offset on every rank; frozen (momentum) parameters are split the
      same way in each rank's ``frozen_param_fragments``.
    - ZeRO-0: whole tensors in the one model file, the optimizer's state by parameter index.
    The momentum towers' fp32 masters (``momentum_masters`` of the rank files: whole on the first rank,
    ZeRO-3 partitions on every rank) take precedence, as in ``read_consolidated``.
    """

    def __init__(self, tag_dir: Path):
        self.tag_dir = Path(tag_dir)
        info = ckpt.read_complete(self.tag_dir)
        self.stage, self.world = info["zero_stage"], info["world_size"]
        model = TorchFile(ckpt.model_states_file(self.tag_dir, self.stage))
        self.model = model
        self.run_state = model.materialize(model.obj[ckpt.STATE_KEY])
        self.config = self.run_state["config"]
        self.engine_state = {k: model.materialize(model.obj[k]) for k in
                             ("lr_scheduler", "global_steps", "global_samples", "skipped_steps")}
        self.rank_files = [TorchFile(ckpt.rank_file(self.tag_dir, r)) for r in range(self.world)]
        self.trainable = ckpt.optimizer_order(self.config)
        self.weights: dict[str, tuple[tuple, torch.dtype, Reader]] = {}
        self.moments: dict[str, dict[str, tuple[tuple, torch.dtype, Reader]]] = {key: {} for key in MOMENTS}
        if self.stage == 0:
            self._zero0()
        elif self.stage <= 2:
            self._zero12()
        else:
            self._zero3()
        self._momentum_masters()

    # ---- helpers --------------------------------------------------------------------------------------------

    def _module(self, file: TorchFile) -> None:
        """Every entry of the module state dict, as saved (ZeRO-3: buffers whole, parameters empty)."""
        for name, ref in file.obj["module"].items():
            self.weights[name] = (ref.shape, _out_dtype(ref.dtype), _reading(file, ref))

    def _optimizer_files(self) -> list[TorchFile]:
        files = [TorchFile(f) for f in _files(self.tag_dir, "*_optim_states.pt")]
        state = files[0].obj["optimizer_state_dict"]
        count = state["partition_count"]
        count = max(count) if isinstance(count, list) else count
        if count != len(files) or len(files) != self.world:
            raise ValueError(f"{self.tag_dir}: {len(files)} optimizer files, the checkpoint was written by "
                             f"{self.world} ranks with partition_count {count}: the tag is incomplete or mixed")
        return files

    def _adam_step(self, state) -> int:
        step = state["step"]
        return int(step.item() if isinstance(step, torch.Tensor) else step)

    # ---- per stage ----------------------------------------------------------------------------------------

    def _zero0(self) -> None:
        self._module(self.model)
        saved = self.model.obj["optimizer"]
        if "fp32_groups_flat" in saved:  # fp16: the masters are flat per group (bf16 is refused by the config)
            for names, flat in zip(ckpt.optimizer_groups(self.config), saved["fp32_groups_flat"], strict=True):
                offset = 0
                for name in names:
                    shape = self.weights[name][0]
                    n = math.prod(shape)
                    self.weights[name] = (shape, torch.float32, _flat_reader(_Concat([(self.model, flat)]),
                                                                             offset, n, shape))
                    offset += n
        index = [i for group in saved["param_groups"] for i in group["params"]]
        for name, i in zip(self.trainable, index, strict=True):
            for key in MOMENTS:
                ref = saved["state"][i][key]
                self.moments[key][name] = (ref.shape, torch.float32, _reading(self.model, ref))
        self.adam_step = self._adam_step({"step": self.model.materialize(saved["state"][index[0]]["step"])})

    def _zero12(self) -> None:
        self._module(self.model)  # buffers (and low-precision copies, replaced below)
        obj = self.model.obj
        for name, ref in (obj.get("frozen_param_fragments") or {}).items():  # whole on rank 0
            self.weights[name] = (ref.shape, torch.float32, _reading(self.model, ref))
        files = self._optimizer_files()
        states = [f.obj["optimizer_state_dict"] for f in files]
        paddings = states[0].get("param_alignment_paddings")
        inner = [s["base_optimizer_state"]["state"] for s in states]
        groups = sorted(inner[0])
        for g, shapes in enumerate(obj["param_shapes"]):
            flats = {None: _Concat([(f, s["single_partition_of_fp32_groups"][g]) for f, s in zip(files, states)])}
            flats.update({key: _Concat([(f, s[groups[g]][key]) for f, s in zip(files, inner)]) for key in MOMENTS})
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                shape = tuple(shape)
                n = math.prod(shape)
                self.weights[name] = (shape, torch.float32, _flat_reader(flats[None], offset, n, shape))
                for key in MOMENTS:
                    self.moments[key][name] = (shape, torch.float32, _flat_reader(flats[key], offset, n, shape))
                offset += n + (paddings[g][i] if paddings is not None else 0)
            _check_consumed(offset, flats[None].numel(), self.world, f"{self.tag_dir}: optimizer group {g}")
        self.adam_step = self._adam_step(files[0].materialize(inner[0][groups[0]]))
        self._shared(obj)

    def _zero3(self) -> None:
        models = [TorchFile(f) for f in _files(self.tag_dir, "zero_pp_rank_*_mp_rank_00_model_states.pt")]
        if len(models) != self.world:
            raise ValueError(f"{self.tag_dir}: {len(models)} model files for {self.world} ranks")
        self._module(models[0])  # buffers whole; parameters are replaced below
        obj = models[0].obj
        for name, shape in (obj.get("frozen_param_shapes") or {}).items():
            shape = tuple(shape)
            parts = [_Concat([(m, m.obj["frozen_param_fragments"][name])]) for m in models]
            self.weights[name] = (shape, torch.float32, _zero3_reader(parts, 0, shape))
        files = self._optimizer_files()
        states = [f.obj["optimizer_state_dict"] for f in files]
        inner = [s["optimizer_state_dict"]["state"] for s in states]
        groups = sorted(inner[0])
        flats = {None: [_Concat([(f, t) for t in s["fp32_flat_groups"]]) for f, s in zip(files, states)]}
        flats.update({key: [_Concat([(f, st[g][key]) for g in groups]) for f, st in zip(files, inner)]
                      for key in MOMENTS})
        offset = 0
        for shapes in obj["param_shapes"]:
            for name, shape in shapes.items():
                shape = tuple(shape)
                self.weights[name] = (shape, torch.float32, _zero3_reader(flats[None], offset, shape))
                for key in MOMENTS:
                    self.moments[key][name] = (shape, torch.float32, _zero3_reader(flats[key], offset, shape))
                offset += math.ceil(math.prod(shape) / self.world)
        if offset != flats[None][0].numel():
            raise ValueError(f"{self.tag_dir}: the trainable parameters' partitions take {offset} elements per rank, "
                             f"the flat groups hold {flats[None][0].numel()}")
        self.adam_step = self._adam_step(files[0].materialize(inner[0][groups[0]]))
        self._shared(obj)

    def _shared(self, obj) -> None:
        for alias, source in (obj.get("shared_params") or {}).items():
            if source in self.weights:
                self.weights[alias] = self.weights[source]

    def _momentum_masters(self) -> None:
        """fp32 masters of the momentum weights from the rank files (present where the weights are low
        precision): whole on the first rank that has them, else ZeRO-3 partitions of every rank."""
        per_name: dict[str, list[tuple[TorchFile, TensorRef]]] = {}
        for file in self.rank_files:
            for name, ref in (file.obj.get("momentum_masters") or {}).items():
                per_name.setdefault(name, []).append((file, ref))
        for name, parts in per_name.items():
            shape = self.weights[name][0]
            if self.stage == 3:
                self.weights[name] = (shape, torch.float32, _zero3_reader([_Concat([p]) for p in parts], 0, shape))
            else:
                self.weights[name] = (shape, torch.float32, _flat_reader(_Concat(parts[:1]), 0, math.prod(shape), shape))

    def queues(self) -> dict[str, torch.Tensor]:
        """The global queues as ``queues.*`` entries (read whole: every rank of a resumed run holds them)."""
        from wenlan.losses.queue import consolidate

        shards = [f.materialize(f.obj["queues"]) for f in self.rank_files if f.obj.get("queues") is not None]
        return ckpt.queue_entries(consolidate(shards)) if shards else {}


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype.is_floating_point else dtype


def _reading(file: TorchFile, ref: TensorRef) -> Reader:
    def read():
        tensor = file.read(ref)
        return tensor.float() if tensor.is_floating_point() else tensor
    return read


def _flat_reader(flat: _Concat, offset: int, numel: int, shape: tuple) -> Reader:
    return lambda: flat.read(offset, offset + numel).float().view(shape)


def _zero3_reader(ranks: list[_Concat], offset: int, shape: tuple) -> Reader:
    """A ZeRO-3 parameter: rank r's ceil(numel / world) elements at ``offset`` of its flat groups, in rank
    order, without the last partition's padding."""
    numel = math.prod(shape)
    part = math.ceil(numel / len(ranks))

    def read():
        whole = torch.empty(numel, dtype=ranks[0].dtype)
        for r, flat in enumerate(ranks):  # only the unpadded elements of each partition are read
            lo, hi = min(r * part, numel), min((r + 1) * part, numel)
            flat.read(offset, offset + hi - lo, out=whole[lo:hi])
        return whole.float().view(shape)
    return read


def _check_consumed(offset: int, available: int, world: int, what: str) -> None:
    """zero_to_fp32's check: ZeRO-2 pads each group to a multiple of 2 x world, so the parameters
    (with their alignment paddings) must fill the group up to that padding."""
    align = 2 * world
    if align * math.ceil(offset / align) != align * math.ceil(available / align):
        raise ValueError(f"{what}: the parameters take {offset} elements, the partitions hold {available}")


def _write(path: Path, entries: dict[str, tuple[tuple, torch.dtype, Reader]], metadata: dict) -> int:
    """One safetensors file, streamed; returns the largest tensor's size in bytes."""
    writer = SafetensorsWriter(path, [(name, dtype, shape) for name, (shape, dtype, _) in entries.items()], metadata)
    largest = 0
    try:
        for name, (shape, dtype, read) in entries.items():
            tensor = read()
            writer.write(name, tensor)
            largest = max(largest, tensor.numel() * tensor.element_size())
            del tensor  # before the next one is read
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return largest


def reshard(checkpoint: Path, out: Path) -> Path:
    """Write the portable tag for ``checkpoint`` under the checkpoints dir ``out``; returns its path."""
    tag_dir = ckpt.tag_dir_of(checkpoint)
    info = ckpt.read_complete(tag_dir)
    if info.get("format") == "portable":
        raise ValueError(f"{tag_dir} is already a converted checkpoint: resume from it on any number of ranks")
    if info.get("pipeline_stages", 1) > 1:
        raise ValueError(f"{tag_dir} is a pipeline checkpoint ({info['pipeline_stages']} stages): converting those "
                         "is not supported; resume it with the same pipeline layout, or export its weights "
                         "(python -m wenlan.export --full) to start a new run")
    if ckpt.is_bf16_optimizer(tag_dir):
        raise ValueError(f"{tag_dir} was written by DeepSpeed's bf16 optimizer (ZeRO-1 with fp32 gradient "
                         "accumulation): converting its Adam moments is not supported yet; resume it on the same "
                         "world size, or export its weights (python -m wenlan.export --full) to start a new run")
    source = ZeroTag(tag_dir)
    target = Path(out) / tag_dir.name
    if target.exists():  # a conversion cut short, or an older one: not complete until written again
        (target / ckpt.COMPLETE).unlink(missing_ok=True)
        shutil.rmtree(target)
    target.mkdir(parents=True)
    weights = {n: source.weights[n] for n in source.weights}
    for name, tensor in source.queues().items():  # small next to the model; whole on every resumed rank anyway
        weights[name] = (tuple(tensor.shape), tensor.dtype, lambda t=tensor: t)
    moments = {f"{key}.{name}": source.moments[key][name] for name in source.trainable for key in MOMENTS}
    meta = {"format": "wenlan-portable", "step": str(source.run_state["step"])}
    _write(target / ckpt.PORTABLE_WEIGHTS, weights, meta)
    _write(target / ckpt.PORTABLE_MOMENTS, moments, meta)
    ckpt.atomic_torch_save(dict(adam_step=source.adam_step, lr_scheduler=source.engine_state["lr_scheduler"],
                                engine_counters={k: source.engine_state[k] for k in
                                                 ("global_steps", "global_samples", "skipped_steps")},
                                run_state=source.run_state),
                           target / ckpt.PORTABLE_STATE)
    ckpt.write_json(target / ckpt.COMPLETE, {"step": source.run_state["step"], "world_size": None, "format": "portable",
                                             "layout": ckpt.PORTABLE_LAYOUT, "zero_stage": None,
                                             "data_streams": info.get("data_streams"),
                                             "converted_from": {"world_size": info["world_size"],
                                                                "zero_stage": info["zero_stage"]}})
    ckpt.write_text(Path(out) / "latest", tag_dir.name)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description="Convert a checkpoint to resume on another number of ranks.")
    parser.add_argument("--checkpoint", required=True, help="DIR/checkpoints (newest complete tag) or one tag dir")
    parser.add_argument("--out", required=True, help="a checkpoints directory to write the converted tag into")
    args = parser.parse_args()
    target = reshard(Path(args.checkpoint), Path(args.out))
    print(f"wrote {target}: resume with --resume {Path(args.out)} on any number of ranks")


if __name__ == "__main__":
    main()
