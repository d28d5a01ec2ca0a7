"""Real DeepSpeed runs on CPU (gloo): 2-rank ZeRO-1 training, save -> resume, export -> load, MLflow,
standalone evaluation, the CLIP objective (on shards in img2dataset's layout, with verify_shards'
index). One set of launches checks several things each."""

import io
import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import wenlan
from data_tools.make_demo_data import write_demo_shards
from data_tools.shard_io import read_samples
from data_tools.verify_shards import verify
from tests.helpers import DEEPSPEED, ROOT, cpu_env, free_port, launch
from wenlan.data import DataConfig, load_tokenizer, make_eval_loader, model_images
from wenlan.export import export, load_model_from_checkpoint
from wenlan.losses.objective import ObjectiveConfig
from wenlan.models.brivl import model_config_from_dict
from wenlan.models.flops import train_flops_per_sample
from wenlan.parallel.checkpoint import read_consolidated

QUEUE = 512  # 4 steps of global batch 128 fill it exactly; step 5 overwrites slots 0..127


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    write_demo_shards(root, n_train=1200, n_val=96, seed=0, image_size=64, shard_size=300, quiet=True)
    return root


@pytest.fixture(scope="module")
def img2dataset_shards(data, tmp_path_factory) -> Path:
    """The demo train pairs rewritten as img2dataset writes them: `00000.tar` ... with `{key}.jpg`,
    `{key}.txt`, `{key}.json` (every 7th sample's caption only in the json), `00000.parquet` and
    `00000_stats.json` beside each tar; then verify_shards' index.json."""
    import webdataset as wds

    out = tmp_path_factory.mktemp("img2dataset")
    for shard in range(4):
        with wds.TarWriter(str(out / f"{shard:05d}.tar"), encoder=False, mtime=0) as sink:
            for i, sample in enumerate(read_samples(data / f"train-{shard:06d}.tar")):
                key = f"{shard:05d}{i:04d}"
                caption = sample["txt"].decode("utf-8")
                meta = {"url": f"http://example.com/{key}.jpg", "caption": caption, "key": key, "status": "success",
                        "error_message": None, "width": 64, "height": 64, "sha256": "0" * 64}
                fields = {"__key__": key, "jpg": sample["jpg"], "json": json.dumps(meta, ensure_ascii=False).encode()}
                if i % 7:
                    fields["txt"] = sample["txt"]
                sink.write(fields)
        (out / f"{shard:05d}.parquet").write_bytes(b"PAR1" + bytes(64) + b"PAR1")
        (out / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 300, "successes": 300}))
    index = verify(sorted(out.glob("*.tar")), out / "index.json")
    assert index["total"] == 1200 and not index["broken"] and not index["bad_samples"]
    return out


def ds_config(tmp: Path, stage: int, micro: int, bf16: bool = False) -> str:
    cfg = json.loads((ROOT / "ds_configs" / "cpu_tiny.json").read_text())
    cfg["zero_optimization"] = {"stage": stage}
    cfg["train_micro_batch_size_per_gpu"] = micro
    if bf16:
        cfg["bf16"] = {"enabled": True}
    path = tmp / f"ds_zero{stage}_mb{micro}{'_bf16' if bf16 else ''}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def train_args(data: Path, out: Path, ds: str, steps: int, *extra: str) -> list[str]:
    return ["--deepspeed_config", ds, "--preset", "tiny", "--tokenizer", str(data / "tokenizer"),
            "--train-shards", str(data / "train-{000000..000003}.tar"), "--val-shards", str(data / "val-000000.tar"),
            "--max-steps", str(steps), "--output-dir", str(out), "--queue-size", str(QUEUE), "--log-every", "1",
            "--num-workers", "1", "--no-color-augment", "--data-streams", "4",
            "--mlflow-uri", f"sqlite:///{out.parent / 'mlflow.db'}", *extra]


@pytest.fixture(scope="module")
def two_rank_run(data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("run")
    out = tmp / "out"
    first = launch(2, train_args(data, out, ds_config(tmp, 1, 64), 4, "--save-every", "2", "--eval-every", "2"))
    step4 = read_consolidated(out / "checkpoints" / "step00000004")
    export(out / "checkpoints", tmp / "step4.safetensors", full=True)
    eval_after_4 = json.loads((out / "eval.json").read_text())
    tags_before = sorted(p.name for p in (out / "checkpoints").glob("step*"))
    # A save cut short by a crash (no complete.json), older than the resumed run's save, and one newer.
    for step in (3, 9):
        (out / "checkpoints" / f"step{step:08d}").mkdir()
        (out / "checkpoints" / f"step{step:08d}" / "mp_rank_00_model_states.pt").write_bytes(b"partial")
    resumed = launch(2, train_args(data, out, ds_config(tmp, 1, 64), 5, "--keep-checkpoints", "2", "--log-model"))
    return dict(out=out, tmp=tmp, first=first, resumed=resumed, step4=step4, eval4=eval_after_4,
                tags_before=tags_before)


def test_two_rank_training_writes_contract_outputs(two_rank_run):
    out = two_rank_run["out"]
    log = two_rank_run["first"].stdout
    assert "step      4/4" in log and "image->text" in log
    line = next(x for x in log.splitlines() if x.startswith("step      3/4"))
    assert re.search(r"samples/s  [0-9.e+-]+ TFLOP/s/device  time: data \d+% fwd\+bwd \d+% opt \d+% ema \d+% "
                     r"enqueue \d+% eval \d+%", line), line
    assert "MFU" not in log  # no peak FLOP/s for a CPU
    assert json.loads((out / "config.json").read_text())["batch"] == {"micro_batch": 64, "grad_accum": 1,
                                                                       "data_parallel_size": 2, "pipeline_stages": 1}
    assert two_rank_run["tags_before"] == ["step00000002", "step00000004"]
    for tag in ("step00000004", "step00000005"):
        assert (out / "checkpoints" / tag / "complete.json").is_file()
    metrics = json.loads((out / "eval.json").read_text())
    assert {"r1_i2t", "r5_i2t", "r10_i2t", "r1_t2i", "r5_t2i", "r10_t2i", "mean_recall", "n_pairs"} <= set(metrics)
    assert metrics["n_pairs"] == 96


def test_keep_checkpoints_deletes_older_tags_after_a_complete_save(two_rank_run):
    """--keep-checkpoints 2 in the resumed run: after step 5 is complete, rank 0 keeps it and the newest
    older complete tag (step 4, the one it resumed from), deletes step 2 and the crashed save of step
    3, and leaves the newer incomplete step 9 (a later step of an earlier attempt) alone."""
    checkpoints = two_rank_run["out"] / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step*")) == ["step00000004", "step00000005", "step00000009"]
    assert (checkpoints / "latest").read_text() == "step00000005"
    log = two_rank_run["resumed"].stdout + two_rank_run["resumed"].stderr
    assert "--keep-checkpoints 2: deleted step00000002, step00000003" in log


def test_resume_continues_at_the_right_step_with_the_saved_queue(two_rank_run):
    assert "resumed from" in two_rank_run["resumed"].stderr + two_rank_run["resumed"].stdout
    assert "at step 4" in two_rank_run["resumed"].stderr + two_rank_run["resumed"].stdout
    assert "step      5/5" in two_rank_run["resumed"].stdout and "step      1/5" not in two_rank_run["resumed"].stdout
    state4, run4 = two_rank_run["step4"]
    state5, run5 = read_consolidated(two_rank_run["out"] / "checkpoints")
    assert (run4["step"], run5["step"]) == (4, 5)
    assert run5["samples_seen"] == 5 * 128 and run5["restarts"] == 1
    assert state4["queues.filled"].item() == QUEUE and state4["queues.ptr"].item() == 0
    assert state5["queues.ptr"].item() == 128
    # The resumed run enqueued one global batch onto the restored queue: the rest is untouched.
    for name in ("queues.image", "queues.text", "queues.ids"):
        assert torch.equal(state5[name][128:], state4[name][128:])
        assert not torch.equal(state5[name][:128], state4[name][:128])
    # and it kept training from the saved weights, not from a fresh initialisation
    w = "model.image_tower.head.fc2.weight"
    assert (state5[w] - state4[w]).abs().max() < 0.1 * state4[w].abs().max()


def test_export_full_names_and_load_gives_engine_embeddings(two_rank_run, data):
    tmp = two_rank_run["tmp"]
    tensors = load_file(str(tmp / "step4.safetensors"))
    assert any(k.startswith("image_tower.") for k in tensors) and any(k.startswith("text_tower.") for k in tensors)
    assert any(k.startswith("momentum.image_tower.") for k in tensors)
    assert {"queue.image", "queue.text", "queue.ptr"} <= set(tensors)
    state4, _ = two_rank_run["step4"]
    torch.testing.assert_close(tensors["queue.text"], state4["queues.text"], rtol=0, atol=0)

    # The engine's own end-of-run evaluation (step 5) is reproduced by the standalone path...
    model, cfg = load_model_from_checkpoint(two_rank_run["out"] / "checkpoints")
    tokenizer = load_tokenizer(str(data / "tokenizer"))
    from wenlan.evaluate import evaluate
    metrics = evaluate(model, [str(data / "val-000000.tar")], tokenizer, 64, cfg.text.max_len)
    engine_metrics = json.loads((two_rank_run["out"] / "eval.json").read_text())
    for k in ("r1_i2t", "r5_i2t", "r1_t2i", "mean_recall"):
        assert metrics[k] == pytest.approx(engine_metrics[k], abs=1e-9)

    # ...and wenlan.load of the export gives the same embeddings as the checkpoint's towers.
    out = tmp / "step5.safetensors"
    export(two_rank_run["out"] / "checkpoints", out)
    loaded = wenlan.load(out)
    batch = next(iter(make_eval_loader(DataConfig(shards=[str(data / "val-000000.tar")], batch_size=8,
                                                  max_text_len=cfg.text.max_len, num_workers=0), tokenizer)))
    pixels = model_images(batch["images"], batch["colour_maps"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(pixels), model.encode_image(pixels))
        # the README's use: PIL images in, the eval view and normalisation applied inside
        from PIL import Image
        first = [Image.open(io.BytesIO(s["jpg"])) for s, _ in zip(read_samples(data / "val-000000.tar"), range(2))]
        torch.testing.assert_close(loaded.encode_image(first), loaded.encode_image(pixels[:2]))
        torch.testing.assert_close(loaded.encode_text({"input_ids": batch["input_ids"],
                                                       "attention_mask": batch["attention_mask"]}),
                                   model.encode_text(batch["input_ids"], batch["attention_mask"]))
    captions = [tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "") for ids in batch["input_ids"][:2]]
    torch.testing.assert_close(loaded.encode_text(captions), model.encode_text(batch["input_ids"][:2],
                                                                               batch["attention_mask"][:2]))


def test_mlflow_run_has_params_metrics_and_artifacts(two_rank_run):
    import mlflow

    out = two_rank_run["out"]
    client = mlflow.MlflowClient(f"sqlite:///{out.parent / 'mlflow.db'}")
    run = client.get_run((out / "mlflow_run_id").read_text().strip())
    assert run.data.params["preset"] == "tiny"
    for key in ("loss", "lr", "samples_per_s", "data_wait", "skipped_samples", "eval/r1_i2t", "restarts",
                "tflops_per_device", "time/forward_backward", "time/optimizer", "time/ema", "time/enqueue"):
        assert key in run.data.metrics, key
    assert "mfu" not in run.data.metrics and "peak_memory_gb" not in run.data.metrics  # CPU: no peak, no device
    # TFLOP/s per device is the run's FLOPs per sample at its samples/s over its 2 ranks.
    saved = json.loads((out / "config.json").read_text())
    flops = train_flops_per_sample(model_config_from_dict(saved["model"]),
                                   ObjectiveConfig.from_dict(saved["objective"]), 64, 2)
    window = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)}
              for k in ("tflops_per_device", "samples_per_s", "time/eval", "time/forward_backward", "data_wait",
                        "time/optimizer", "time/ema", "time/enqueue")}
    for step in (1, 2, 3, 4, 5):
        assert window["tflops_per_device"][step] == pytest.approx(flops * window["samples_per_s"][step] / 2 / 1e12,
                                                                  rel=1e-9)
        shares = [window[k][step] for k in window if k.startswith("time/") or k == "data_wait"]
        assert window["time/forward_backward"][step] > 0 and sum(shares) <= 1.0
    # the evaluation after step 2 falls in step 3's window, and only there
    assert window["time/eval"][3] > 0 and window["time/eval"][2] == window["time/eval"][4] == 0
    assert run.data.metrics["restarts"] == 1  # the resumed launch continued the same MLflow run
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2, 3, 4, 5]
    # brivl's loss is the sum of its two directions, logged next to it
    directions = {k: {m.step: m.value for m in client.get_metric_history(run.info.run_id, k)}
                  for k in ("loss", "loss_i2t", "loss_t2i")}
    for step in (1, 2, 3, 4, 5):
        assert directions["loss"][step] == pytest.approx(directions["loss_i2t"][step] + directions["loss_t2i"][step],
                                                         rel=1e-6)
        assert directions["loss_i2t"][step] != directions["loss_t2i"][step]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"eval.json", "deepspeed_config.json", "model"} <= artifacts
    # --log-model: the run's final export, as wenlan.load reads it
    model = Path(client.download_artifacts(run.info.run_id, "model/model.safetensors", str(out.parent)))
    assert model.read_bytes() == (out / "model.safetensors").read_bytes()
    with safe_open(str(model), "pt") as f:
        assert f.metadata()["wenlan_step"] == "5"
    tags = run.data.tags
    assert (tags["wenlan.preset"], tags["wenlan.objective"], tags["wenlan.strategy"], tags["wenlan.world_size"],
            tags["restarts"]) == ("tiny", "brivl", "ZeRO-1", "2", "1")
    if (ROOT / ".git").exists():  # a checkout (CI's is): the commit that ran
        assert len(tags["mlflow.source.git.commit"]) == 40
    assert run.info.status == "FINISHED"


def test_unreachable_tracking_server_changes_nothing_and_says_what_was_dropped(two_rank_run, data, tmp_path):
    """The first launch of two_rank_run again, tracked to a server that never existed: the same weights
    at step 4, bit for bit, and the log says what MLflow did not get."""
    out = tmp_path / "untracked"
    args = train_args(data, out, ds_config(tmp_path, 1, 64), 4, "--save-every", "2", "--eval-every", "2")
    args[args.index("--mlflow-uri") + 1] = f"http://127.0.0.1:{free_port()}"
    proc = launch(2, args)
    log = proc.stdout + proc.stderr
    assert "failed (" in log and "training continues" in log
    assert re.search(r"not recorded: .*\d+ metric values.*run \(never opened\)", log), log[-3000:]
    state, _ = read_consolidated(out / "checkpoints" / "step00000004")
    reference, _ = two_rank_run["step4"]
    assert set(state) == set(reference)
    for name, tensor in reference.items():
        assert torch.equal(state[name], tensor), name


def test_standalone_evaluate_cli(two_rank_run, data):
    import subprocess
    import sys

    out = two_rank_run["tmp"] / "standalone_eval.json"
    proc = subprocess.run([sys.executable, "-m", "wenlan.evaluate", "--checkpoint",
                           str(two_rank_run["out"] / "checkpoints"), "--val-shards", str(data / "val-000000.tar"),
                           "--tokenizer", str(data / "tokenizer"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    assert "image->text" in proc.stdout
    assert json.loads(out.read_text())["r1_i2t"] == json.loads((two_rank_run["out"] / "eval.json").read_text())["r1_i2t"]


def test_clip_objective_single_rank_zero0_on_img2dataset_shards(data, img2dataset_shards, tmp_path):
    out = tmp_path / "clip"
    args = train_args(data, out, ds_config(tmp_path, 0, 32), 3, "--objective", "clip")
    args[args.index("--train-shards") + 1] = str(img2dataset_shards)  # the directory: its tars, not the side files
    proc = launch(1, args)
    log = proc.stdout + proc.stderr
    assert "step      3/3" in proc.stdout
    assert f"shard index {img2dataset_shards / 'index.json'}: 4 shards, 1200 samples per epoch (37.5 steps" in log
    state, run_state = read_consolidated(out / "checkpoints")
    assert run_state["config"]["objective"]["name"] == "clip"
    assert not any(k.startswith(("queues.", "model.momentum_")) for k in state)


def test_bf16_zero2_single_rank(data, tmp_path):
    out = tmp_path / "bf16"
    proc = launch(1, train_args(data, out, ds_config(tmp_path, 2, 32, bf16=True), 2))
    assert "step      2/2" in proc.stdout
    state, run_state = read_consolidated(out / "checkpoints")
    assert run_state["zero_stage"] == 2
    # the fp32 masters of trainable weights come back whole and finite
    w = state["model.image_tower.head.fc1.weight"]
    assert w.dtype == torch.float32 and torch.isfinite(w).all()
    assert json.loads((out / "eval.json").read_text())["n_pairs"] == 96


def test_non_finite_loss_stops_the_run_before_saving(data, tmp_path):
    """At an absurd learning rate the weights overflow after the first steps and the loss turns NaN:
    every rank stops with DIVERGED_EXIT, nothing after the divergence is saved, the MLflow run is FAILED,
    and the message names the newest checkpoint, saved before the divergence."""
    import mlflow

    from wenlan.train import DIVERGED_EXIT

    ds = json.loads(Path(ds_config(tmp_path, 1, 32)).read_text())
    ds["optimizer"]["params"]["lr"] = 1e35
    ds["gradient_clipping"] = 0.0
    path = tmp_path / "ds_diverge.json"
    path.write_text(json.dumps(ds))
    out = tmp_path / "diverge"
    cmd = [DEEPSPEED, "--num_accelerators", "2", "--master_port", str(free_port()), str(ROOT / "wenlan" / "train.py"),
           *train_args(data, out, str(path), 20, "--save-every", "1", "--log-every", "5", "--warmup-steps", "0")]
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == DIVERGED_EXIT, log[-3000:]
    message = re.search(r"error: non-finite loss at step (\d+) .*The newest checkpoint \(step (\d+)\) was saved "
                        r"before it", log)
    assert message, log[-3000:]
    stopped, healthy = int(message.group(1)), int(message.group(2))
    assert healthy == stopped - 1  # saved every step up to the divergence, never after it
    tags = sorted(p.name for p in (out / "checkpoints").glob("step*"))
    assert tags[-1] == f"step{healthy:08d}" and not (out / "eval.json").exists()
    client = mlflow.MlflowClient(f"sqlite:///{out.parent / 'mlflow.db'}")
    assert client.get_run((out / "mlflow_run_id").read_text().strip()).info.status == "FAILED"
