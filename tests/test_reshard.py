"""``wenlan.parallel.reshard`` streams: tensors are read from the ZeRO files by byte range and written one
at a time, so the converter's memory is bounded by the largest tensor, not the checkpoint (measured on a
6.8 GB checkpoint of the 10b widths in test_scale). The files it reads and writes are checked against
torch and safetensors' own readers; the resumed runs themselves are checked against uninterrupted ones in
test_zero_equivalence."""

import json

import pytest
import torch

from wenlan.parallel.tensorfile import SafetensorsFile, SafetensorsWriter, TorchFile


def test_torch_file_reads_each_tensor_as_torch_load_does(tmp_path):
    """Views into shared storages, a transposed (non-contiguous) tensor, a Parameter, bf16 and ints,
    inside the containers DeepSpeed saves."""
    from collections import OrderedDict

    base = torch.randn(6, 5)
    saved = {"weight": base, "row": base[2], "transposed": base.t(), "param": torch.nn.Parameter(torch.randn(4)),
             "groups": [torch.arange(10)[3:8], torch.randn(7).bfloat16()],
             "state": OrderedDict(step=3, shape=torch.Size([6, 5]), empty=torch.zeros(0))}
    torch.save(saved, tmp_path / "f.pt")
    expected = torch.load(tmp_path / "f.pt", weights_only=False)
    lazy = TorchFile(tmp_path / "f.pt")
    got = lazy.materialize(lazy.obj)
    for name in ("weight", "row", "transposed", "param"):
        assert torch.equal(got[name], expected[name]), name
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(got["groups"], expected["groups"]))
    assert got["state"]["step"] == 3 and got["state"]["shape"] == torch.Size([6, 5]) and got["state"]["empty"].numel() == 0
    assert torch.equal(lazy.read_flat(lazy.obj["row"], 1, 4), base[2, 1:4])  # a range of a view: its bytes only


def test_safetensors_writer_is_read_back_by_safetensors(tmp_path):
    from safetensors.torch import load_file

    tensors = {"a": torch.randn(3, 5), "b.c": torch.arange(7), "h": torch.randn(2, 2).bfloat16(), "e": torch.zeros(0, 4)}
    writer = SafetensorsWriter(tmp_path / "t.safetensors", [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()],
                               {"format": "test"})
    with pytest.raises(ValueError, match="the header's next tensor is 'a'"):
        writer.write("b.c", tensors["b.c"])
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    writer.close()
    loaded = load_file(str(tmp_path / "t.safetensors"))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], t) for n, t in tensors.items())
    ours = SafetensorsFile(tmp_path / "t.safetensors")
    assert ours.metadata == {"format": "test"} and torch.equal(ours.read("h"), tensors["h"])
    assert torch.equal(ours.read_flat("a", 4, 12), tensors["a"].reshape(-1)[4:12])  # cuts rows: a flat range


def test_a_portable_tag_of_the_single_file_layout_still_loads(tmp_path):
    """Tags converted before the conversion streamed hold everything in one ``portable.pt`` and have no
    ``layout`` in complete.json: they still resume and export."""
    from wenlan.parallel.checkpoint import COMPLETE, PORTABLE, PortableTag, read_consolidated, read_partition

    tag = tmp_path / "checkpoints" / "step00000004"
    tag.mkdir(parents=True)
    weights = {"a.weight": torch.randn(3, 4), "b.bias": torch.randn(5)}
    queues = dict(image=torch.randn(8, 2), text=torch.randn(8, 2), ids=torch.arange(8), ptr=4, filled=8, size=8,
                  shard=0, num_shards=1)
    torch.save(dict(weights=weights, moments={"exp_avg": {"a.weight": torch.ones(3, 4)},
                                              "exp_avg_sq": {"a.weight": torch.zeros(3, 4)}},
                    adam_step=4, lr_scheduler={}, engine_counters={}, queues=queues, run_state={"step": 4}),
               tag / PORTABLE)
    (tag / COMPLETE).write_text(json.dumps({"step": 4, "world_size": None, "format": "portable", "zero_stage": None}))
    state, run_state = read_consolidated(tag.parent)
    assert run_state == {"step": 4} and torch.equal(state["a.weight"], weights["a.weight"])
    assert torch.equal(state["queues.image"], queues["image"]) and state["queues.ptr"].item() == 4
    portable = PortableTag(tag)
    assert torch.equal(read_partition(portable.weights, "b.bias", 3, 3), torch.cat([weights["b.bias"][3:], torch.zeros(1)]))
    assert torch.equal(portable.moments.read("exp_avg.a.weight"), torch.ones(3, 4))
    assert portable.queues()["ptr"] == 4 and set(portable.weight_map()) == set(weights)


@pytest.mark.parametrize("zero_stage, expected", [(None, True), (3, False)])
def test_bf16_optimizer_is_told_from_zero_by_the_file_structure(tmp_path, zero_stage, expected):
    """Runs in bf16 name ZeRO's optimizer files ``bf16_*`` too; only DeepSpeed's bf16 optimizer's state lacks
    ``zero_stage``. The check reads no tensor of the (at 10B, multi-GB) file."""
    from wenlan.parallel.checkpoint import is_bf16_optimizer

    state = {"single_partition_of_fp32_groups": [torch.randn(8)]}
    if zero_stage is not None:
        state["zero_stage"] = zero_stage
    torch.save({"optimizer_state_dict": state}, tmp_path / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    assert is_bf16_optimizer(tmp_path) is expected
