"""Bad configuration fails fast, before any process group starts, naming the field and the fix."""

import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT, cpu_env
from wenlan.config import resolve
from wenlan.train import parse_args


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    from data_tools.make_demo_data import write_demo_shards

    root = tmp_path_factory.mktemp("data")
    write_demo_shards(root, n_train=40, n_val=20, seed=0, image_size=32, shard_size=20, quiet=True)
    return root


def args_for(data, tmp_path, **overrides):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(overrides.pop("ds", {"train_micro_batch_size_per_gpu": 8,
                                                  "zero_optimization": {"stage": 1}})))
    values = {"--deepspeed_config": str(ds), "--preset": "tiny", "--tokenizer": str(data / "tokenizer"),
              "--train-shards": str(data / "train-{000000..000001}.tar"), "--val-shards": str(data / "val-000000.tar"),
              "--max-steps": "2", "--output-dir": str(tmp_path / "out"), "--data-streams": "2"}
    values.update(overrides)
    argv = []
    for k, v in values.items():
        argv += [k, *(v.split(" ") if v else [])]  # "": a flag without a value
    return parse_args(argv)


def test_valid_config_resolves(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = resolve(args_for(tiny_data, tmp_path))
    assert cfg.batch.global_batch == 16 and cfg.objective.queue_size % 16 == 0
    assert cfg.data_streams == 2


def test_cut_depth_keeps_the_widths_and_the_run_records_the_cut_model(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = resolve(args_for(tiny_data, tmp_path, **{"--preset": "10b", "--cut-depth": "2", "--attention-layers": "0"}))
    recorded = json.loads(json.dumps(cfg.to_dict()))["model"]
    assert recorded["image"]["backbone_kwargs"] == {"embed_dim": 2560, "depth": 2, "num_heads": 32}
    assert (recorded["text"]["hidden"], recorded["text"]["bert_ffn"], recorded["text"]["bert_layers"]) == (4096, 16384, 2)
    assert recorded["image"]["layers"] == recorded["text"]["layers"] == 0 and recorded["embed_dim"] == 2048


def test_queue_warmup_follows_the_lr_warmup_unless_given(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = resolve(args_for(tiny_data, tmp_path, **{"--max-steps": "800"}))
    assert cfg.lr_warmup_steps == 80 and cfg.objective.queue_warmup_steps == 80
    cfg = resolve(args_for(tiny_data, tmp_path, **{"--max-steps": "800", "--warmup-steps": "30"}))
    assert cfg.objective.queue_warmup_steps == 30
    cfg = resolve(args_for(tiny_data, tmp_path, **{"--max-steps": "800", "--queue-warmup-steps": "0"}))
    assert cfg.objective.queue_warmup_steps == 0 and cfg.lr_warmup_steps == 80
    assert json.loads(json.dumps(cfg.to_dict()))["objective"]["queue_warmup_steps"] == 0  # resolved in config.json


@pytest.mark.parametrize("override, message", [
    ({"--freeze": "text.bert*"}, "--freeze 'text.bert*' matches no parameter"),
    ({"--init-from": "missing.safetensors"}, "--init-from: no such file 'missing.safetensors'"),
    ({"--queue-warmup-steps": "-1"}, "objective.queue_warmup_steps=-1 must be >= 0"),
    ({"--activation-checkpointing": "-1"}, "--activation-checkpointing -1: use 0 (off), 1 (every block)"),
    ({"--keep-checkpoints": "0"}, "--keep-checkpoints 0: must be >= 1"),
    ({"--cut-depth": "1"}, "--cut-depth: the image backbone 'test_efficientnet_gn' is not a ViT"),
    ({"--preset": "tiny-vit", "--cut-depth": "0"}, "--cut-depth 0: must be >= 1"),
    ({"--attention-layers": "-1"}, "--attention-layers -1: must be >= 0"),
    ({"--activation-checkpointing": "1", "ds": {"train_micro_batch_size_per_gpu": 8, "pipeline": {"stages": 2}}},
     "a pipeline checkpoints its layers with the DeepSpeed config's pipeline.activation_checkpoint_interval"),
    ({"--preset": "huge"}, "--preset: unknown preset 'huge'; choose one of tiny, tiny-vit, base, 1b, 10b, brivl-1.0"),
    ({"--queue-size": "100"}, "queue_size=100 is not a multiple of the global batch 16"),
    ({"--queue-size": "100"}, "use --queue-size 96"),
    ({"--train-shards": "nowhere/train-{0..1}.tar"}, "--train-shards: shard not found: nowhere/train-0.tar"),
    ({"--val-shards": "missing.tar"}, "--val-shards: shard not found: missing.tar"),
    ({"--tokenizer": "no/such/dir"}, "--tokenizer: 'no/such/dir' is not a Hugging Face tokenizer directory"),
    ({"--max-steps": "0"}, "--max-steps must be >= 1"),
    ({"--momentum": "1.5"}, "objective.momentum=1.5 must be in [0, 1)"),
    ({"--mlflow-uri": "file:///tmp/mlruns"}, "--mlflow-uri 'file:///tmp/mlruns' is a file store, which MLflow 3 "
                                              "refuses; use sqlite:////tmp/mlruns.db"),
    ({"--mlflow-uri": "outputs/mlruns"}, "use sqlite:///outputs/mlruns.db, an http(s):// tracking server"),
    ({"ds": {"train_batch_size": 30, "train_micro_batch_size_per_gpu": 8}},
     "train_batch_size=30 != train_micro_batch_size_per_gpu=8 x gradient_accumulation_steps=1 x data-parallel size 2"),
    ({"ds": {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 3}, "pipeline": {"stages": 2}}},
     "pipeline.stages=2 with zero_optimization.stage=3: DeepSpeed's pipeline engine supports ZeRO-0/1 only"),
    ({"ds": {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 1}, "pipeline": {"stages": 3}}},
     "pipeline.stages=3 does not divide the 2 ranks; launch a multiple of 3 processes"),
    ({"ds": {"train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": True}}},
     "bf16 with zero_optimization.stage=0: DeepSpeed runs it through its fp16 optimizer"),
    ({"ds": {"train_micro_batch_size_per_gpu": 8, "bf16": {"enabled": True}, "pipeline": {"stages": 2},
             "zero_optimization": {"stage": 1}, "data_types": {"grad_accum_dtype": "fp32"}}},
     "makes DeepSpeed use its bf16 optimizer, which never updates the learnable temperature"),
    ({"ds": {"train_micro_batch_size_per_gpu": 8, "pipeline": {"stages": 2, "partition_method": "uniform"}}},
     "pipeline.partition_method='uniform' is not one of parameters, flops; use \"parameters\" or \"flops\""),
    # 2 ranks in 2 stages leave one data-parallel rank: the batch arithmetic counts that one.
    ({"ds": {"train_batch_size": 12, "train_micro_batch_size_per_gpu": 8, "pipeline": {"stages": 2}}},
     "train_batch_size=12 != train_micro_batch_size_per_gpu=8 x gradient_accumulation_steps=1 x data-parallel size 1"),
    ({"--data-streams": "4"}, "2 shard(s) for DataConfig.streams=4: every stream needs at least one shard"),
    ({"--data-streams": "3"}, "DataConfig.streams=3 is not a multiple of the world size 2"),
    ({"ds": {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 4}}},
     "zero_optimization.stage=4 is not a ZeRO stage; use 0, 1, 2 or 3"),
    ({"--objective": "ernie-vil2", "--image-views": "1"},
     "--image-views 1: --objective ernie-vil2 contrasts two augmented views of each image"),
    ({"--objective": "brivl", "--image-views": "2"},
     "--image-views 2: --objective brivl reads one view per image"),
    ({"--objective": "cookie", "--shared-layers": "0"}, "objective.cookie.shared_layers=0"),
    ({"--shared-layers": "2"}, "--shared-layers 2: only --objective cookie has a transformer shared by both towers"),
    ({"--objective": "cookie", "--multiview-queue": ""}, "--multiview-queue: only --objective ernie-vil2 takes queues"),
    ({"--objective": "ernie-vil2", "--multiview-queue": "", "--queue-size": "100"},
     "queue_size=100 is not a multiple of the global batch 16"),
    ({"--objective": "ernie-vil2", "--multiview-queue": "", "--queue-mode": "sharded"},
     "objective.queue_mode='sharded' with ernie-vil2's queue: its queues are replicated only"),
    ({"--objective": "cookie", "ds": {"train_micro_batch_size_per_gpu": 8, "pipeline": {"stages": 2}}},
     "--objective cookie with pipeline.stages=2: the pipeline engine passes one image and one caption batch"),
    ({"--objective": "ernie-vil2", "ds": {"train_micro_batch_size_per_gpu": 8, "pipeline": {"stages": 2}}},
     "drop the DeepSpeed config's pipeline section (ZeRO-3 scales it) or use --objective brivl|clip"),
])
def test_bad_config_messages(tiny_data, tmp_path, monkeypatch, override, message):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError) as err:
        resolve(args_for(tiny_data, tmp_path, **override))
    assert message in str(err.value)


@pytest.mark.parametrize("objective", ["ernie-vil2", "cookie"])
def test_multi_view_objectives_resolve_with_two_views(tiny_data, tmp_path, monkeypatch, objective):
    """Two views by default; cookie's shared transformer enters the model config (and so every file
    that rebuilds the model: config.json, checkpoints, exports)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    extra = {"--shared-layers": "2"} if objective == "cookie" else {}
    cfg = resolve(args_for(tiny_data, tmp_path, **{"--objective": objective, **extra}))
    assert cfg.image_views == 2 and not cfg.objective.spec.momentum
    assert cfg.model.shared_layers == (2 if objective == "cookie" else 0)
    assert resolve(args_for(tiny_data, tmp_path)).image_views == 1


def test_train_cli_exits_before_any_process_group(tiny_data, tmp_path):
    """The launcher-facing entry point prints the message and exits 2 within seconds."""
    argv = ["--deepspeed_config", str(ROOT / "ds_configs" / "cpu_tiny.json"), "--preset", "tiny",
            "--tokenizer", str(tiny_data / "tokenizer"), "--train-shards", "missing-{000..003}.tar",
            "--val-shards", str(tiny_data / "val-000000.tar"), "--max-steps", "1", "--output-dir", str(tmp_path)]
    proc = subprocess.run([sys.executable, str(ROOT / "wenlan" / "train.py"), *argv], env=cpu_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "error: --train-shards: shard not found: missing-000.tar" in proc.stderr
    assert "init_distributed" not in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("config, preset", [("cpu_tiny.json", "tiny"), ("cpu_tiny_zero3.json", "tiny"),
                                            ("zero3_1b.json", "1b"), ("zero3_10b.json", "10b"),
                                            ("finetune_brivl.json", "brivl-1.0")])
def test_shipped_deepspeed_configs_resolve(tiny_data, tmp_path, monkeypatch, config, preset):
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = args_for(tiny_data, tmp_path, **{"--deepspeed_config": str(ROOT / "ds_configs" / config), "--preset": preset})
    cfg = resolve(args)
    assert cfg.batch.global_batch == 2 * cfg.deepspeed_config["train_micro_batch_size_per_gpu"]
    if config == "finetune_brivl.json":  # BriVL's 9,600-key queue fits 60 per GPU on 1, 2, 4, 8 or 16 GPUs
        assert all(cfg.objective.queue_size % (60 * n) == 0 for n in (1, 2, 4, 8, 16))


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory):
    """64 one-sample shards: enough streams for a 64-GPU layout."""
    from data_tools.make_demo_data import write_demo_shards

    root = tmp_path_factory.mktemp("many")
    write_demo_shards(root, n_train=64, n_val=4, seed=0, image_size=32, shard_size=1, quiet=True)
    return root


@pytest.mark.parametrize("config, preset, world, stages", [
    ("zero3_1b.json", "1b", 16, 1), ("zero3_10b.json", "10b", 64, 1), ("pipe_10b.json", "10b", 64, 8)])
def test_shipped_gpu_configs_resolve_at_their_cluster_size(tiny_data, many_shards, tmp_path, monkeypatch, config,
                                                          preset, world, stages):
    """The world sizes of slurm/pretrain_1b.sh (2 x 8 GPUs) and pretrain_10b.sh (8 x 8): the batch, the queue
    and the stream layout agree, and every bf16 config reduces gradients in fp32."""
    monkeypatch.setenv("WORLD_SIZE", str(world))
    dp = world // stages
    args = args_for(tiny_data, tmp_path, **{"--deepspeed_config": str(ROOT / "ds_configs" / config), "--preset": preset,
                                            "--train-shards": str(many_shards / "train-{000000..000063}.tar"),
                                            "--data-streams": str(dp), "--max-steps": "200000"})
    cfg = resolve(args)
    ds = cfg.deepspeed_config
    assert cfg.batch.pipeline_stages == stages and cfg.batch.data_parallel_size == dp
    assert cfg.batch.global_batch == dp * ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]
    assert cfg.objective.queue_size % cfg.batch.global_batch == 0 and cfg.lr_warmup_steps == 20000
    assert ds["bf16"]["enabled"] and ds["communication_data_type"] == "fp32"
    # fp32 accumulation where DeepSpeed trains every parameter with it (not the pipeline: see the README)
    assert ds.get("data_types", {}).get("grad_accum_dtype") == (None if stages > 1 else "fp32")


def test_default_streams_give_every_rank_its_workers(tiny_data, many_shards, tmp_path, monkeypatch):
    """16 ranks asking for 4 workers each used to get lcm(16, 8) = 16 streams: one worker per rank."""
    monkeypatch.setenv("WORLD_SIZE", "16")
    args = args_for(tiny_data, tmp_path, **{"--deepspeed_config": str(ROOT / "ds_configs" / "zero3_1b.json"),
                                            "--preset": "1b", "--train-shards": str(many_shards / "train-{000000..000063}.tar"),
                                            "--num-workers": "4"})
    args.data_streams = None
    assert resolve(args).data_streams == 64


def test_pipeline_with_more_stages_than_layers_fails_before_launch(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "64")
    ds = {"ds": {"train_micro_batch_size_per_gpu": 8, "zero_optimization": {"stage": 1}, "pipeline": {"stages": 64}}}
    with pytest.raises(ValueError, match="pipeline.stages=64: the model has 18 pipeline layers"):
        resolve(args_for(tiny_data, tmp_path, **ds))


@pytest.mark.parametrize("config, preset, world, stages", [("cpu_tiny_pipe.json", "tiny", 2, 2),
                                                           ("pipe_10b.json", "10b", 16, 8)])
def test_shipped_pipeline_configs_resolve(tiny_data, tmp_path, monkeypatch, config, preset, world, stages):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    args = args_for(tiny_data, tmp_path, **{"--deepspeed_config": str(ROOT / "ds_configs" / config), "--preset": preset})
    cfg = resolve(args)
    ds = cfg.deepspeed_config
    assert cfg.batch.pipeline_stages == stages and cfg.batch.data_parallel_size == world // stages
    assert cfg.batch.global_batch == (world // stages) * ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"]


def test_pipeline_stages_balance_flops_not_parameters():
    """1b preset, 4 stages, counted on the meta device: "flops" evens out the stages' forward FLOPs;
    balancing parameters (the default) would leave the image stages a third slower (a ViT block does
    ~2.5x the FLOPs per parameter of a BERT layer)."""
    from wenlan.losses.objective import ObjectiveConfig
    from wenlan.models.presets import get_preset
    from wenlan.parallel.pipeline import check_stages

    def stage_flops(parts, flops):
        return [sum(flops[a:b]) for a, b in zip(parts[:-1], parts[1:])]

    parts, flops = check_stages(get_preset("1b"), ObjectiveConfig(), 4, "flops")
    by_params, _ = check_stages(get_preset("1b"), ObjectiveConfig(), 4)
    assert len(flops) == 67 and flops[1] == flops[2] > flops[40] == flops[41] > 0  # ViT block > BERT layer
    balanced, unbalanced = stage_flops(parts, flops), stage_flops(by_params, flops)
    assert max(balanced) / (sum(balanced) / 4) < 1.05
    assert max(unbalanced) / (sum(unbalanced) / 4) > 1.3
