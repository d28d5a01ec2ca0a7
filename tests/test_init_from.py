"""Starting a run from weights (``--init-from``) and freezing parameters (``--freeze``), on real
DeepSpeed engines (CPU, gloo).

A 1-rank run trains 2 steps and is exported; new runs start from that file under ZeRO-0 (1 rank), ZeRO-3
(2 ranks) and a 2-stage pipeline, with another seed. Their first step runs at a learning rate of 1e-12
(a warm-up of 1e9 steps), too small to move any weight by an fp32 ulp of its value, so the weights
after it are those the run started from: the file's, under every strategy. The step-1 losses agree
(the same global batch in micro-batches of 16 everywhere). A ZeRO-3 run with ``--freeze`` trains 3 steps
at the full learning rate: the frozen tensors stay bitwise the file's and hold no optimizer state.
"""

import json
from pathlib import Path

import pytest
import torch

from data_tools.make_demo_data import write_demo_shards
from tests.helpers import ROOT, equivalence_args, exported, launch, metric_history

MICRO, QUEUE = 16, 64
FROZEN = ("text_tower.bert.*", "image_tower.region_position")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("init-data")
    write_demo_shards(root, n_train=400, n_val=32, seed=11, image_size=64, shard_size=100, quiet=True)
    return root


def ds_config(tmp: Path, stage: int, accum: int, stages: int = 1) -> str:
    name = "cpu_tiny_pipe.json" if stages > 1 else "cpu_tiny.json"
    cfg = json.loads((ROOT / "ds_configs" / name).read_text())
    cfg.update(train_micro_batch_size_per_gpu=MICRO, gradient_accumulation_steps=accum)
    if stages > 1:
        cfg["pipeline"]["stages"] = stages
    else:
        cfg["zero_optimization"] = {"stage": stage}
    path = tmp / f"ds_{stage}_{accum}_{stages}.json"
    path.write_text(json.dumps(cfg))
    return str(path)


def args(data: Path, out: Path, ds: str, steps: int, *extra: str) -> list[str]:
    # The shards' index is absent: 4 streams read 4 shards each (any world size dividing 4).
    return equivalence_args(data, out, ds, steps, QUEUE) + ["--train-shards", str(data / "train-{000000..000003}.tar"),
                                                            *extra]


@pytest.fixture(scope="module")
def runs(data, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("init")
    source = tmp / "source"
    launch(1, args(data, source, ds_config(tmp, 0, 2), 2))
    exported(source)  # writes source.safetensors (online, momentum, queues) next to the run
    weights = tmp / "source.safetensors"
    still = ["--init-from", str(weights), "--seed", "7", "--warmup-steps", "1000000000"]
    outs = {"weights": weights}
    for name, ranks, ds in (("zero0", 1, ds_config(tmp, 0, 2)), ("zero3", 2, ds_config(tmp, 3, 1)),
                            ("pipe", 2, ds_config(tmp, 1, 2, stages=2))):
        outs[name] = tmp / name
        proc = launch(ranks, args(data, outs[name], ds, 1, *still))
        assert f"towers from --init-from {weights}" in proc.stderr + proc.stdout
    outs["frozen"] = tmp / "frozen"
    proc = launch(2, args(data, outs["frozen"], ds_config(tmp, 3, 1), 3, "--init-from", str(weights), "--seed", "7",
                          "--freeze", *FROZEN))
    assert "frozen: image_tower.region_position, text_tower.bert" in proc.stderr + proc.stdout
    return outs


@pytest.mark.parametrize("strategy", ["zero0", "zero3", "pipe"])
def test_init_from_starts_from_the_file_under_every_strategy(runs, strategy):
    from safetensors.torch import load_file

    source = load_file(str(runs["weights"]))
    started = exported(runs[strategy])
    online = [k for k in source if k.startswith(("image_tower.", "text_tower."))]
    assert online and set(online) <= set(started)
    for name in online:
        torch.testing.assert_close(started[name], source[name], rtol=0, atol=1e-9)
        # The momentum towers start as copies of the loaded online towers (the file's are not read); the
        # EMA step's m * k + (1 - m) * q rounds to within an ulp or two of the unchanged value.
        torch.testing.assert_close(started["momentum." + name], source[name], rtol=2e-7, atol=1e-9)
    torch.testing.assert_close(started["log_scale"], source["log_scale"], rtol=0, atol=1e-9)
    assert started["queue.filled"].item() == MICRO * 2  # one step's keys: the queue started empty


def test_the_runs_own_seed_would_start_elsewhere(runs):
    """Seed 7's initialisation differs from the file everywhere it matters: the checks above can fail."""
    from safetensors.torch import load_file

    from wenlan.models import BriVL, get_preset
    from wenlan.models.init import init_weights

    model = BriVL(get_preset("tiny"), momentum=False)
    init_weights(model, seed=7)
    source = load_file(str(runs["weights"]))
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and tensor.std() > 0:  # not the constant ones/zeros of norms and biases
            assert (tensor - source[name]).abs().max() > 1e-3, name


def test_first_step_loss_is_the_same_under_every_strategy(runs):
    reference = metric_history(runs["zero0"], "loss")[1]
    for strategy in ("zero3", "pipe", "frozen"):
        assert metric_history(runs[strategy], "loss")[1] == pytest.approx(reference, rel=1e-5), strategy


def test_freeze_keeps_tensors_bitwise_and_without_optimizer_state(runs):
    import fnmatch

    from safetensors.torch import load_file

    source, trained = load_file(str(runs["weights"])), exported(runs["frozen"])
    online = [k for k in source if k.startswith(("image_tower.", "text_tower.")) and "running_" not in k]
    frozen = [k for k in online if any(fnmatch.fnmatch(k, p) for p in FROZEN)]
    assert len(frozen) > 10
    for name in frozen:
        assert torch.equal(trained[name], source[name]), name
    moved = [k for k in online if k not in frozen and not torch.equal(trained[k], source[k])]
    assert len(moved) > 0.9 * (len(online) - len(frozen))  # the rest trained at the full learning rate
    # ZeRO-3 keeps the optimizer's fp32 partitions in one flat tensor per parameter group and rank:
    # together they hold the trainable parameters (plus alignment padding), none of the frozen ones.
    tag = sorted((runs["frozen"] / "checkpoints").glob("step*"))[-1]
    stored = 0
    for path in tag.glob("*optim_states.pt"):
        state = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        stored += sum(t.numel() for t in state["fp32_flat_groups"])
    numel = {k: source[k].numel() for k in online}
    trainable = sum(n for k, n in numel.items() if k not in frozen) + source["log_scale"].numel()
    assert trainable <= stored < trainable + 1024, (stored, trainable, sum(numel[k] for k in frozen))
