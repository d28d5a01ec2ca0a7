"""The 10b preset's widths on 2 CPU processes: ViT 2560, text 4096 (FFN 16384, vocabulary 21128), joint
dimension 2048, with the depth cut to one ViT block and one BERT layer and no attention layers on top
(``--cut-depth 1 --attention-layers 0``): 0.40 B online parameters plus their momentum towers, ~7.5 GiB
a process. One text attention layer more would add 0.2 B parameters and 3.2 GB to each checkpoint, more
than the CI machine's disk and memory can spare; its shapes are those of the BERT layer's.

It runs the shipped ``zero3_10b.json`` (bf16, fp32 gradient accumulation, its persistence threshold) at
micro-batch 2 with torch's Adam (FusedAdam JIT-compiles on CPU), built under ``zero.Init``, activation
checkpointing on every block: two steps, a checkpoint, an export, a conversion by the streaming
converter (``wenlan.parallel.reshard``, its memory measured: bounded by the largest tensor, the 330 MiB
embedding), and a resume from the converted tag, each rank reading its own partitions, to step 3. The
tensors straddle limits the tiny preset never reaches: the 67 M-element FFN matrices and the 86.5 M
embedding are over the persistence threshold and larger than a reduce or prefetch bucket, and the small
ones (norms, biases of 2560-4096) persist on every rank. Nothing in the path may depend on small widths.

A checkpoint is 6.7 GiB: the test deletes what it wrote as it goes (CI disks are small).
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_tools.make_demo_data import write_demo_shards
from tests.helpers import ROOT, cpu_env, launch, reshard_measuring_memory

DEPTH, MICRO, QUEUE = 1, 2, 64


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("scale-data")
    write_demo_shards(root, n_train=64, n_val=8, seed=5, image_size=64, shard_size=16, quiet=True)
    return root


def shipped_10b_config(tmp: Path) -> str:
    cfg = json.loads((ROOT / "ds_configs" / "zero3_10b.json").read_text())
    cfg["train_micro_batch_size_per_gpu"] = MICRO
    cfg["optimizer"]["params"]["torch_adam"] = True
    # The shipped limits keep every gathered parameter live and its buckets hold 2e8 elements, sized for
    # an 80 GB GPU; here they would cost ~2 GB a process that the CI machine (24 GB) does not have. The
    # smaller limits are below the largest tensors (the 86.5 M embedding, the 67 M FFN matrices), so a
    # tensor larger than a bucket, the case the tiny preset never meets, is exercised too.
    cfg["zero_optimization"].update(stage3_max_live_parameters=1e8, stage3_max_reuse_distance=1e8,
                                    reduce_bucket_size=5e7, stage3_prefetch_bucket_size=5e7)
    path = tmp / "zero3_10b_cpu.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def args(data: Path, out: Path, ds: str, steps: int, *extra: str) -> list[str]:
    return ["--deepspeed_config", ds, "--preset", "10b", "--cut-depth", str(DEPTH), "--attention-layers", "0", "--tokenizer",
            str(data / "tokenizer"), "--train-shards", str(data / "train-{000000..000003}.tar"),
            "--val-shards", str(data / "val-000000.tar"), "--max-steps", str(steps), "--output-dir", str(out),
            "--queue-size", str(QUEUE), "--log-every", "1", "--data-streams", "2", "--activation-checkpointing", "1",
            "--num-workers", "0",  # loader processes would take ~1 GB of the CI machine's memory, and test nothing here
            "--mlflow-uri", f"sqlite:///{out.parent / 'mlflow.db'}", *extra]


def test_10b_widths_train_checkpoint_export_convert_and_resume_under_zero3(data, tmp_path):
    from safetensors import safe_open

    from wenlan.models.presets import cut_depth, get_preset
    from wenlan.parallel import checkpoint as ckpt
    from wenlan.parallel.tensorfile import SafetensorsFile

    ds, out = shipped_10b_config(tmp_path), tmp_path / "run"
    proc = launch(2, args(data, out, ds, 2), timeout=900)
    text = proc.stdout + proc.stderr
    assert "preset 10b (depth 1, 0 attention layers)" in text and "activation checkpointing every block" in text
    assert "step      2/2" in text

    checkpoints = out / "checkpoints"
    assert ckpt.complete_tags(checkpoints) == [ckpt.tag_for(2)]
    complete = ckpt.read_complete(checkpoints / ckpt.tag_for(2))
    assert complete["zero_stage"] == 3 and complete["world_size"] == 2

    # The export holds every online tensor at the 10b shapes (one block per stack).
    model_file = tmp_path / "towers.safetensors"
    # as a user runs it, in a process of its own (it holds the consolidated weights: 1.6 GB here)
    subprocess.run([sys.executable, "-m", "wenlan.export", "--checkpoint", str(checkpoints), "--out", str(model_file)],
                   cwd=ROOT, env=cpu_env(), check=True, capture_output=True, timeout=600)
    expected = cut_depth(get_preset("10b"), vit_blocks=DEPTH, bert_layers=DEPTH, attention_layers=0)
    with safe_open(str(model_file), "pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        embedding = f.get_tensor("text_tower.bert.embeddings.word_embeddings.weight")
    model_file.unlink()
    assert shapes["text_tower.bert.embeddings.word_embeddings.weight"] == (21128, 4096)
    assert shapes["image_tower.backbone.net.patch_embed.proj.weight"] == (2560, 3, 16, 16)
    assert shapes["text_tower.bert.encoder.layer.0.intermediate.dense.weight"] == (16384, 4096)
    assert not any(".layer.1." in name or "blocks.1." in name for name in shapes)
    heads = [name for name in shapes if name.endswith("head.fc2.weight")]
    assert heads and all(shapes[name][0] == expected.embed_dim for name in heads)
    assert embedding.dtype == torch.float32 and torch.isfinite(embedding).all()

    # The converter streams: once the checkpoint is open, its memory grows by about one tensor.
    tag = checkpoints / ckpt.tag_for(2)
    checkpoint_mb = sum(f.stat().st_size for f in tag.iterdir()) / 2**20
    converted = tmp_path / "converted"
    memory = reshard_measuring_memory(tag, converted)
    shutil.rmtree(tag)  # the run goes on from the converted tag alone
    files = [SafetensorsFile(converted / tag.name / name) for name in ("weights.safetensors", "moments.safetensors")]
    largest_mb = max(torch.Size(f.shape(n)).numel() * f.dtype(n).itemsize for f in files for n in f.keys()) / 2**20
    extra = memory["peak_after_open"] - memory["opened"]
    print(f"\nconverter on the 10b widths: {memory['opened']:.0f} MiB resident with the checkpoint open, +{extra:.0f} "
          f"MiB from then on, whole-process peak {memory['peak']:.0f} MiB; checkpoint {checkpoint_mb:.0f} MiB, largest "
          f"tensor {largest_mb:.0f} MiB")
    assert checkpoint_mb > 6000 and largest_mb == 21128 * 4096 * 4 / 2**20
    assert extra < 3 * largest_mb, f"{extra:.0f} MiB over the open checkpoint, largest tensor {largest_mb:.0f} MiB"

    # Resume from the converted tag: the run continues at step 3 and keeps only its newest checkpoint.
    proc = launch(2, args(data, out, ds, 3, "--resume", str(converted), "--keep-checkpoints", "1"), timeout=900)
    text = proc.stdout + proc.stderr
    assert "resumed from converted checkpoint" in text
    assert "at step 2 on 2 ranks" in text.split("resumed from converted checkpoint", 1)[1].splitlines()[0]
    assert "step      3/3" in text and "step      1/" not in text
    assert ckpt.complete_tags(checkpoints) == [ckpt.tag_for(3)]
    shutil.rmtree(out)
    shutil.rmtree(converted)
