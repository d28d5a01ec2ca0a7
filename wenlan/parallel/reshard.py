"""Convert a checkpoint so that training resumes on another number of ranks (or another ZeRO stage).

    python -m wenlan.parallel.reshard --checkpoint OLD/checkpoints[/stepNNNNNNNN] --out NEW/checkpoints

then start the run with ``--resume NEW/checkpoints`` (and the same ``--data-streams``, which is kept
by default). The output is one world-size-free tag holding every tensor whole in ``portable.pt``:

- the fp32 value of every parameter: online ones from the optimizer's masters, momentum ones from
  their fp32 masters (DeepSpeed 0.19's universal checkpoint keeps trainable parameters only, so it
  would drop the momentum towers, and it does not read ZeRO-0 checkpoints);
- Adam's ``exp_avg`` / ``exp_avg_sq`` per trainable parameter and the step count;
- the LR schedule, the queues (global), and the run state with the data position of every stream.

Per-rank RNG states do not carry over to another world size: a resharded run reseeds them from
(seed, rank, step), so runs with dropout continue with a fresh stream of masks.
"""

import argparse
from pathlib import Path

import torch

from wenlan.parallel import checkpoint as ckpt
from wenlan.parallel.checkpoint import MOMENTS


def _optimizer_state(tag_dir: Path, stage: int, config: dict) -> tuple[dict, int]:
    """({"exp_avg": {name: whole tensor}, "exp_avg_sq": {...}}, Adam step) from any ZeRO stage."""
    if stage == 0:
        saved = torch.load(ckpt.model_states_file(tag_dir, 0), map_location="cpu", weights_only=False)["optimizer"]
        order = ckpt.optimizer_order(config)
        index = [i for group in saved["param_groups"] for i in group["params"]]
        states = {key: {order[k]: saved["state"][i][key] for k, i in enumerate(index)} for key in MOMENTS}
        return states, int(saved["state"][index[0]]["step"])

    from deepspeed.utils import zero_to_fp32 as z

    # ZeRO keeps each moment as flat per-rank partitions laid out exactly like the fp32 master, so the
    # same reassembly that rebuilds the weights rebuilds the moments.
    model_states = z.parse_model_states(z.get_model_state_files(str(tag_dir)))
    optim = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
             for f in z.get_optim_files(str(tag_dir))]
    world = len(optim)
    states = {}
    if stage <= 2:
        inner = [o["base_optimizer_state"]["state"] for o in optim]
        paddings = optim[0].get("param_alignment_paddings")
        for key in MOMENTS:
            flats = [[s[g][key] for g in sorted(s)] for s in inner]
            states[key] = z._get_fp32_state_dict_from_zero2_checkpoint(world, flats, model_states, True, paddings)
    else:
        inner = [o["optimizer_state_dict"]["state"] for o in optim]
        for key in MOMENTS:
            flats = [[s[g][key] for g in sorted(s)] for s in inner]
            states[key] = z._get_fp32_state_dict_from_zero3_checkpoint(world, flats, model_states, True)
    step = int(next(iter(inner[0].values()))["step"])
    names = set(ckpt.optimizer_order(config))  # the reassembly also returns buffers: keep the parameters
    # (ZeRO-3's reassembly is lazy: contiguous() materialises each tensor)
    return {key: {n: t.contiguous() for n, t in states[key].items() if n in names} for key in MOMENTS}, step


def reshard(checkpoint: Path, out: Path) -> Path:
    """Write the portable tag for ``checkpoint`` under the checkpoints dir ``out``; returns its path."""
    tag_dir = ckpt.tag_dir_of(checkpoint)
    weights, run_state = ckpt.read_consolidated(tag_dir)
    info = ckpt.read_complete(tag_dir)
    if info.get("pipeline_stages", 1) > 1:
        raise ValueError(f"{tag_dir} is a pipeline checkpoint ({info['pipeline_stages']} stages): converting those "
                         "is not supported; resume it with the same pipeline layout, or export its weights "
                         "(python -m wenlan.export --full) to start a new run")
    if ckpt.is_bf16_optimizer(tag_dir):
        raise ValueError(f"{tag_dir} was written by DeepSpeed's bf16 optimizer (ZeRO-1 with fp32 gradient "
                         "accumulation): converting its Adam moments is not supported yet; resume it on the same "
                         "world size, or export its weights (python -m wenlan.export --full) to start a new run")
    moments, adam_step = _optimizer_state(tag_dir, info["zero_stage"], run_state["config"])
    engine_state = torch.load(ckpt.model_states_file(tag_dir, info["zero_stage"]), map_location="cpu", weights_only=False)
    portable = dict(
        weights={k: v for k, v in weights.items() if not k.startswith("queues.")},
        moments=moments, adam_step=adam_step, lr_scheduler=engine_state["lr_scheduler"],
        engine_counters={k: engine_state[k] for k in ("global_steps", "global_samples", "skipped_steps")},
        queues=ckpt.queue_from_entries(weights),
        run_state=run_state)
    target = Path(out) / tag_dir.name
    target.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_torch_save(portable, target / ckpt.PORTABLE)
    ckpt.write_json(target / ckpt.COMPLETE, {"step": run_state["step"], "world_size": None, "format": "portable",
                                             "zero_stage": None, "data_streams": info.get("data_streams"),
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
