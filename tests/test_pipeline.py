"""Pipeline parallelism against the plain engine, on real DeepSpeed engines (CPU, gloo).

A 2-stage pipeline (2 processes) and 2 stages x 2 data-parallel ranks (4 processes) train from the
same seed, data and global batch as a 1-rank plain engine: every step's loss and the exported weights,
momentum towers and queues agree. A pipeline run killed after a checkpoint and resumed continues with
the uninterrupted run's losses and ends with its weights bit for bit. Retrieval metrics computed
through the pipeline equal those of the plain engine and of ``wenlan.evaluate`` on the pipeline's
checkpoint.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from data_tools.make_demo_data import write_demo_shards
from tests.helpers import (ROOT, assert_close_per_tensor, cpu_env, equivalence_args, exported, launch, metric_history,
                           run_until_killed)

STEPS = 6
MICRO = 16  # the in-batch negatives are a micro-batch's: every run uses the same micro-batch
QUEUE = 64
LOSS = re.compile(r"step\s+(\d+)/\d+\s+loss ([\d.]+)")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipe-data")
    write_demo_shards(root, n_train=800, n_val=40, seed=5, image_size=64, shard_size=100, quiet=True)
    return root


def ds_config(tmp: Path, stages: int, accum: int) -> str:
    cfg = json.loads((ROOT / "ds_configs" / "cpu_tiny_pipe.json").read_text())
    cfg.update(train_micro_batch_size_per_gpu=MICRO, gradient_accumulation_steps=accum)
    cfg["optimizer"]["params"]["lr"] = 1e-4  # see test_zero_equivalence: a gentle LR keeps runs comparable
    if stages == 1:
        del cfg["pipeline"]
        cfg["zero_optimization"] = {"stage": 0}
    else:
        cfg["pipeline"]["stages"] = stages
    path = tmp / f"ds_pipe{stages}_{accum}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def train_args(data: Path, out: Path, ds: str) -> list[str]:
    return equivalence_args(data, out, ds, STEPS, QUEUE)


def losses(stdout: str) -> dict[int, float]:
    return {int(step): float(loss) for step, loss in LOSS.findall(stdout)}


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict[str, tuple[Path, dict[int, float]]]:
    tmp = tmp_path_factory.mktemp("pipe")
    layouts = {"plain-1rank": (1, 1, 2), "pipe-2stage": (2, 2, 2), "pipe-2stage-x2dp": (4, 2, 1)}
    outs = {}
    for name, (ranks, stages, accum) in layouts.items():
        out = tmp / name
        proc = launch(ranks, train_args(data, out, ds_config(tmp, stages, accum)))
        outs[name] = (out, losses(proc.stdout))
        assert sorted(outs[name][1]) == list(range(1, STEPS + 1)), proc.stdout[-3000:]
    return outs


@pytest.mark.parametrize("layout", ["pipe-2stage", "pipe-2stage-x2dp"])
def test_pipeline_equals_plain_engine(runs, layout):
    (ref_out, ref_losses), (out, pipe_losses) = runs["plain-1rank"], runs[layout]
    for step, loss in ref_losses.items():  # printed with 4 decimals
        assert abs(pipe_losses[step] - loss) <= 2e-4, f"step {step}: loss {pipe_losses[step]} vs {loss}"
    reference, other = exported(ref_out), exported(out)
    assert any(k.startswith("momentum.text_tower.bert.") for k in reference)
    assert {"queue.image", "queue.text", "queue.ids", "queue.ptr", "queue.filled"} <= set(reference)
    assert_close_per_tensor(reference, other, layout)
    w = "text_tower.head.fc1.weight"  # it trained: the online towers left their momentum copies behind
    assert (reference[w] - reference["momentum." + w]).abs().max() > 1e-6


@pytest.mark.parametrize("layout", ["pipe-2stage", "pipe-2stage-x2dp"])
def test_pipeline_gradient_norm_equals_plain_engine_every_step(runs, layout):
    """The norm before clipping, over every stage's gradients: a scale error (1/micro-batches, 1/replicas)
    that AdamW and clipping would hide from the weights shows here."""
    reference = metric_history(runs["plain-1rank"][0], "grad_norm")
    other = metric_history(runs[layout][0], "grad_norm")
    assert sorted(reference) == sorted(other) == list(range(1, STEPS + 1))
    for step, norm in reference.items():
        assert other[step] == pytest.approx(norm, rel=1e-5), f"step {step}"


def test_pipeline_checkpoint_holds_layers_per_stage(runs):
    tag = runs["pipe-2stage"][0] / "checkpoints" / f"step{STEPS:08d}"
    layers = sorted(tag.glob("layer_*-model_states.pt"))
    state = torch.load(layers[0], map_location="cpu", weights_only=False)
    # One layer file holds a block of the online tower and the same block of its momentum copy.
    assert any(k.startswith("model__image_tower__") for k in state)
    assert any(k.startswith("model__momentum_image_tower__") for k in state)
    assert json.loads((tag / "complete.json").read_text())["pipeline_stages"] == 2


def test_pipeline_eval_equals_plain_and_offline_eval(runs, data, tmp_path):
    plain = json.loads((runs["plain-1rank"][0] / "eval.json").read_text())
    pipe = json.loads((runs["pipe-2stage"][0] / "eval.json").read_text())
    offline = tmp_path / "eval.json"
    subprocess.run([sys.executable, "-m", "wenlan.evaluate", "--checkpoint", str(runs["pipe-2stage"][0] / "checkpoints"),
                    "--val-shards", str(data / "val-000000.tar"), "--tokenizer", str(data / "tokenizer"),
                    "--out", str(offline)], cwd=ROOT, env=cpu_env(), check=True, capture_output=True)
    offline = json.loads(offline.read_text())
    keys = [f"r{k}_{d}" for k in (1, 5, 10) for d in ("i2t", "t2i")] + ["n_pairs"]
    assert pipe["n_pairs"] == 40
    assert {k: pipe[k] for k in keys} == {k: plain[k] for k in keys} == {k: offline[k] for k in keys}


def test_pipeline_kill_then_resume_continues_the_same_losses(runs, data, tmp_path):
    """Killed (SIGKILL, every process) at step 3, after the step-2 checkpoint; the resumed run logs the
    uninterrupted run's losses for steps 3.. and ends with its weights bit for bit."""
    out = tmp_path / "killed"
    args = train_args(data, out, ds_config(tmp_path, 2, 2))
    run_until_killed(args, kill_at=3)
    resumed = losses(launch(2, args).stdout)
    uninterrupted = runs["pipe-2stage"][1]
    assert sorted(resumed) == list(range(3, STEPS + 1))
    assert {s: resumed[s] for s in resumed} == {s: uninterrupted[s] for s in resumed}
    reference, other = exported(runs["pipe-2stage"][0]), exported(out)
    for name, tensor in reference.items():
        assert torch.equal(other[name], tensor), name


def test_bf16_pipeline_learns_its_temperature_in_fp32(data, tmp_path):
    """pipe_10b.json's precision on 2 stages: the temperature, a parameter of the loss on the last stage,
    trains from the exact configured value (not its bf16 rounding, 0.07021) through fp32 values."""
    shipped = json.loads((ROOT / "ds_configs" / "pipe_10b.json").read_text())
    cfg = json.loads(Path(ds_config(tmp_path, 2, 2)).read_text())
    cfg.update(bf16=shipped["bf16"], communication_data_type=shipped["communication_data_type"])
    if "data_types" in shipped:
        cfg["data_types"] = shipped["data_types"]
    path = tmp_path / "pipe_bf16.json"
    path.write_text(json.dumps(cfg))
    out = tmp_path / "bf16"
    launch(2, equivalence_args(data, out, str(path), 4, QUEUE))
    temperature = metric_history(out, "temperature")
    assert temperature[1] == pytest.approx(0.07, abs=1e-8)
    assert abs(temperature[4] - 0.07) > 1e-6  # it trained
    assert all(abs(t - 0.07021) > 1e-5 for t in temperature.values())  # never the bf16 weight's value
