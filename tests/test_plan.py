"""The memory planner (wenlan.plan): every shipped GPU config fits its documented cluster, model states
agree with DeepSpeed's own estimators, activations agree with what autograd really saves on CPU."""

import json
import re
import subprocess
import sys

import pytest
import torch

from tests.helpers import ROOT, cpu_env
from wenlan.config import PRESET_OBJECTIVES
from wenlan.losses.objective import ObjectiveConfig
from wenlan.models.presets import cut_depth, get_preset
from wenlan.plan import (PlanConfig, activation_agreement, deepspeed_model_states, make_plan,
                         without_dropout)

GPU_MEMORY_GB = 80


def slurm_layout(script: str) -> dict:
    """Preset, DeepSpeed config, GPU count and checkpointing a Slurm script runs by default."""
    text = (ROOT / "slurm" / script).read_text()

    def default(var: str, fallback: str | None = None) -> str:
        found = re.search(rf"^{var}=\$\{{{var}:-([^}}]*)\}}", text, re.M)
        return found.group(1) if found else fallback

    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)", text, re.M).group(1))
    per_node = int(re.search(r"^#SBATCH --gpus-per-node=(\d+)", text, re.M).group(1))
    return dict(preset=default("PRESET"), config=default("DS_CONFIG"), gpus=nodes * per_node,
                checkpointing=int(default("ACTIVATION_CHECKPOINTING", "0")))


def documented_layouts() -> dict[str, dict]:
    """Every GPU config's documented run: the Slurm scripts' defaults; the 10b pipeline on
    pretrain_10b.sh's GPUs; ZeRO-2 for 1b on pretrain_1b.sh's; fine-tuning on one GPU (README)."""
    ten, one = slurm_layout("pretrain_10b.sh"), slurm_layout("pretrain_1b.sh")
    layouts = {ten["config"]: ten, one["config"]: one,
               "ds_configs/pipe_10b.json": dict(ten, config="ds_configs/pipe_10b.json", checkpointing=0),
               "ds_configs/zero2_1b.json": dict(one, config="ds_configs/zero2_1b.json"),
               "ds_configs/finetune_brivl.json": dict(preset="brivl-1.0", config="ds_configs/finetune_brivl.json",
                                                      gpus=1, checkpointing=0)}
    return layouts


GPU_CONFIGS = sorted(f"ds_configs/{p.name}" for p in (ROOT / "ds_configs").glob("*.json")
                     if not p.name.startswith("cpu_"))


@pytest.mark.parametrize("config", GPU_CONFIGS)
def test_shipped_gpu_config_fits_its_cluster(config):
    layouts = documented_layouts()
    assert config in layouts, f"{config} has no documented GPU count: add it to documented_layouts()"
    layout = layouts[config]
    plan = make_plan(PlanConfig(preset=layout["preset"], deepspeed_config=str(ROOT / config), gpus=layout["gpus"],
                                gpu_memory_gb=GPU_MEMORY_GB, activation_checkpointing=layout["checkpointing"]),
                     full=False)
    memory = plan.worst.memory
    assert plan.fits, (f"{config} ({layout['preset']}, {layout['gpus']} GPUs) needs {memory.total / 1e9:.1f} GB per "
                       f"GPU, over {plan.budget / 1e9:.1f} GB: {memory.as_dict()}")


def test_json_has_exactly_the_documented_keys():
    proc = subprocess.run([sys.executable, "-m", "wenlan.plan", "--preset", "tiny", "--deepspeed_config",
                           "ds_configs/cpu_tiny_zero3.json", "--gpus", "2", "--gpu-memory-gb", "1", "--json"],
                          cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert set(out) == {"fits", "max_micro_batch", "per_gpu_bytes", "train_flops_per_sample", "epoch_hours"}
    parts = {"parameters", "gradients", "optimizer", "momentum", "queues", "activations", "buffers"}
    assert set(out["per_gpu_bytes"]) == parts | {"total"}
    assert out["per_gpu_bytes"]["total"] == sum(out["per_gpu_bytes"][k] for k in parts)
    assert isinstance(out["fits"], bool) and out["max_micro_batch"] >= 1
    assert out["train_flops_per_sample"] > 0 and out["epoch_hours"] > 0


@pytest.mark.parametrize("flags, named", [
    (["--gpus", "0"], "--gpus"),
    (["--gpus", "3"], "--gpus"),  # 8 pipeline stages do not divide 3 GPUs
    (["--gpus", "8192"], "--gpus"),  # a global batch of 16 x 32 x 1024 is larger than the queue
    (["--preset", "11b"], "--preset"),
    (["--gpu-name", "Z80"], "--gpu-name"),
    (["--deepspeed_config", "ds_configs/missing.json"], "--deepspeed_config"),
])
def test_bad_flag_fails_naming_it(flags, named, capsys):
    from wenlan.plan import main

    args = dict(zip(["--preset", "--deepspeed_config", "--gpus", "--gpu-memory-gb"],
                    ["10b", str(ROOT / "ds_configs/pipe_10b.json"), "64", "80"]))
    args.update(zip(flags[::2], flags[1::2]))
    with pytest.raises(SystemExit) as exit_:
        main([x for pair in args.items() for x in pair])
    assert exit_.value.code == 2
    assert named in capsys.readouterr().err


AGREEMENT_QUEUE = 1024
"""Queue slots in the activation checks: the logits against it are saved, the queue itself is not."""


@pytest.mark.parametrize("preset, config, gpus", [("1b", "ds_configs/zero3_1b.json", 16),
                                                  ("10b", "ds_configs/zero3_10b.json", 64),
                                                  ("1b", "ds_configs/zero2_1b.json", 16)])
def test_model_states_agree_with_deepspeed_estimators(preset, config, gpus):
    estimate, planned = deepspeed_model_states(preset, str(ROOT / config), gpus)
    assert abs(planned / estimate - 1) < 0.05, f"planner {planned / 1e9:.3f} GB, DeepSpeed {estimate / 1e9:.3f} GB"


@pytest.mark.parametrize("preset", ["tiny", "base", "10b-cut"])
def test_activations_agree_with_saved_tensors(preset):
    """The planner's meta-device count against a real CPU forward's saved tensors, checkpointing off and
    on every block; the 10b widths with two ViT blocks and one layer of everything else."""
    name = preset.removesuffix("-cut")
    cfg = without_dropout(cut_depth(get_preset(name), vit_blocks=2, bert_layers=1, attention_layers=1) if preset.endswith("-cut") else get_preset(name))
    objective = ObjectiveConfig(**dict(PRESET_OBJECTIVES[name], queue_size=AGREEMENT_QUEUE))
    rows = activation_agreement(cfg, objective)
    assert [every for every, _, _ in rows] == [0, 1]
    assert rows[1][2] < rows[0][2]  # checkpointing saved less: the second count did checkpoint
    for every, planned, measured in rows:
        assert abs(planned / measured - 1) < 0.15, \
            f"{preset}, checkpointing {every}: planner {planned / 1e6:.1f} MB, measured {measured / 1e6:.1f} MB"


def test_momentum_bytes_are_what_the_ema_holds(tmp_path):
    """Without ZeRO-3 every rank holds the whole bf16 key towers and MomentumEMA's fp32 master of each."""
    from wenlan.models.brivl import BriVL
    from wenlan.parallel.momentum import MomentumEMA

    config = tmp_path / "bf16_zero1.json"
    config.write_text(json.dumps({"train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": True},
                                  "zero_optimization": {"stage": 1}}))
    plan = make_plan(PlanConfig(preset="tiny", deepspeed_config=str(config), gpus=2, gpu_memory_gb=1), full=False)
    model = BriVL(get_preset("tiny")).to(torch.bfloat16)
    ema = MomentumEMA(list(model.named_momentum_pairs()))
    keys = [p for tower in (model.momentum_image_tower, model.momentum_text_tower) for p in tower.parameters()]
    held = sum(p.numel() * p.element_size() for p in keys) + sum(m.numel() * m.element_size() for m in ema.masters)
    assert plan.worst.memory.momentum == held
