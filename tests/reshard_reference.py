"""The converter's reference: Adam's moments reassembled in memory with DeepSpeed 0.19.8's zero_to_fp32
(every rank's optimizer file loaded whole), as ``wenlan.parallel.reshard`` did before it streamed."""

from pathlib import Path

import torch

from wenlan.parallel import checkpoint as ckpt
from wenlan.parallel.checkpoint import MOMENTS


def in_memory_moments(tag_dir: Path) -> tuple[dict, int]:
    """({"exp_avg": {name: whole tensor}, "exp_avg_sq": {...}}, Adam step) of a checkpoint tag."""
    from deepspeed.utils import zero_to_fp32 as z

    info = ckpt.read_complete(tag_dir)
    stage, config = info["zero_stage"], ckpt.read_consolidated(tag_dir)[1]["config"]
    if stage == 0:
        saved = torch.load(ckpt.model_states_file(tag_dir, 0), map_location="cpu", weights_only=False)["optimizer"]
        order = ckpt.optimizer_order(config)
        index = [i for group in saved["param_groups"] for i in group["params"]]
        states = {key: {order[k]: saved["state"][i][key] for k, i in enumerate(index)} for key in MOMENTS}
        return states, int(saved["state"][index[0]]["step"])
    model_states = z.parse_model_states(z.get_model_state_files(str(tag_dir)))
    optim = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"]
             for f in z.get_optim_files(str(tag_dir))]
    world, states = len(optim), {}
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
    return {key: {n: t.contiguous() for n, t in states[key].items() if n in names} for key in MOMENTS}, step


def assert_conversion_is_exact(saved_tag: Path, converted: Path) -> None:
    """The converted tag under the checkpoints dir ``converted`` holds, bit for bit, the weights, queues
    and data position that ``read_consolidated`` reads from ``saved_tag`` and the moments and step of
    ``in_memory_moments``."""
    from wenlan.parallel.checkpoint import PortableTag, read_consolidated

    saved, saved_run = read_consolidated(saved_tag)
    portable, portable_run = read_consolidated(converted)
    assert set(saved) == set(portable) and saved_run["data_position"] == portable_run["data_position"]
    for name in saved:
        assert saved[name].dtype == portable[name].dtype and torch.equal(saved[name], portable[name]), name
    moments, adam_step = in_memory_moments(saved_tag)
    tag = PortableTag(Path(converted) / Path(saved_tag).name)
    assert tag.small["adam_step"] == adam_step == saved_run["step"]
    assert len(tag.moments.keys()) == 2 * len(moments["exp_avg"])
    for key, per_name in moments.items():
        for name, tensor in per_name.items():
            assert torch.equal(tag.moments.read(f"{key}.{name}"), tensor), f"{key} of {name}"
