"""``wenlan.parallel.reshard`` streams: tensors are read from the ZeRO files by byte range and written one
at a time, so the converter's memory is bounded by the largest tensor, not the checkpoint. The files it
reads and writes are checked against torch and safetensors' own readers; the resumed runs themselves are
checked against uninterrupted ones in test_zero_equivalence."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from data_tools.make_demo_data import write_demo_shards
from tests.helpers import DEEPSPEED, ROOT, cpu_env, free_port
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


# Runs the converter with its memory read at the point where the checkpoint is open (imports done, the
# files' structure unpickled, the model built on the meta device) and no tensor is read yet: the resident
# set then, and the peak from then on (Linux: writing 5 to /proc/self/clear_refs resets the peak).
CONVERT_AND_MEASURE = """
import json, sys
import wenlan.parallel.reshard as reshard

def status(key):
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) / 1024

class Measured(reshard.ZeroTag):
    def __init__(self, *args):
        super().__init__(*args)
        Measured.opened = status("VmRSS:")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            Measured.reset = True
        except OSError:
            Measured.reset = False

reshard.ZeroTag = Measured
reshard.reshard(sys.argv[1], sys.argv[2])
print(json.dumps({"opened": Measured.opened, "peak_after": status("VmHWM:") if Measured.reset else None}))
"""


def test_converter_peak_memory_is_bounded_by_the_largest_tensor(tmp_path):
    """A 2-rank ZeRO-3 checkpoint of a ~35M-parameter model (~0.5 GB of fp32 state: masters, moments,
    momentum partitions) converted in a child process: the memory it takes once the checkpoint is open
    (peak minus the resident set at that point) stays under 3x the largest tensor, far under the
    checkpoint's size. The child's whole peak (ru_maxrss) is printed next to it."""
    data, out = tmp_path / "data", tmp_path / "wide"
    try:
        write_demo_shards(data, n_train=64, n_val=16, seed=5, image_size=64, shard_size=32, quiet=True)
        ds = json.loads((ROOT / "ds_configs" / "cpu_tiny.json").read_text())
        ds.update(train_micro_batch_size_per_gpu=8, zero_optimization={"stage": 3})
        (tmp_path / "ds.json").write_text(json.dumps(ds))
        cmd = [DEEPSPEED, "--num_accelerators", "2", "--master_port", str(free_port()), str(ROOT / "tests" / "wide_train.py"),
               "--deepspeed_config", str(tmp_path / "ds.json"), "--preset", "tiny", "--tokenizer", str(data / "tokenizer"),
               "--train-shards", str(data / "train-{000000..000001}.tar"), "--val-shards", str(data / "val-000000.tar"),
               "--max-steps", "1", "--output-dir", str(out), "--queue-size", "64", "--data-streams", "2",
               "--mlflow-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
        proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
        tag = out / "checkpoints" / "step00000001"
        checkpoint_mb = sum(f.stat().st_size for f in tag.iterdir()) / 2**20

        child = subprocess.Popen([sys.executable, "-c", CONVERT_AND_MEASURE, str(tag), str(tmp_path / "converted")],
                                 cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        output = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)  # the child's own peak RSS, in KiB on Linux
        child.stdout.close()
        assert os.waitstatus_to_exitcode(status) == 0, output[-4000:]
        measured = json.loads(output.strip().splitlines()[-1])
        peak = usage.ru_maxrss / 1024
        after_open = measured["peak_after"] if measured["peak_after"] is not None else peak  # else: conservative

        files = [SafetensorsFile(tmp_path / "converted" / tag.name / name)
                 for name in ("weights.safetensors", "moments.safetensors")]
        largest_mb = max(torch.Size(f.shape(n)).numel() * f.dtype(n).itemsize for f in files for n in f.keys()) / 2**20
        extra = after_open - measured["opened"]
        print(f"\nconverter: {measured['opened']:.0f} MiB resident with the checkpoint open, peak {after_open:.0f} MiB "
              f"from then on (+{extra:.0f} MiB), whole-process peak {peak:.0f} MiB; checkpoint {checkpoint_mb:.0f} MiB, "
              f"largest tensor {largest_mb:.0f} MiB")
        assert checkpoint_mb > 400 and largest_mb < checkpoint_mb / 10  # the sizes the bound is about
        assert extra < 3 * largest_mb, f"{extra:.0f} MiB over the open checkpoint, largest tensor {largest_mb:.0f} MiB"
    finally:  # ~1 GB: CI disks are small
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(tmp_path / "converted", ignore_errors=True)


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
