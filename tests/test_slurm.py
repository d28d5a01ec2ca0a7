"""The Slurm scripts on a real Slurm cluster (slurmctld + two emulated slurmd nodes on this machine, see
tests/slurm_cluster.py): `sbatch --wait slurm/pretrain_10b.sh` with the tiny preset on CPU across two
nodes, pre-emption (USR1 -> checkpoint -> requeue -> resume) ending bit for bit where the uninterrupted
job ends, and slurm/make_shards.sh as an array job. The three jobs run side by side on the cluster; then
a job started from another run's checkpoint (RESUME=PATH) is pre-empted and must come back from its own."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from data_tools.make_demo_data import write_demo_shards
from tests.helpers import ROOT
from tests.slurm_cluster import INSTALL_HINT, SlurmCluster, missing_commands
from wenlan.export import export

STEPS = 6
TIMEOUT = 900  # seconds for everything the jobs do; a request the cluster cannot satisfy would pend forever


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    missing = missing_commands()
    if missing:
        message = f"Slurm commands not found: {', '.join(missing)}; {INSTALL_HINT}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI must run these tests: .ci/run installs Slurm)")
        pytest.skip(message)
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def train_env(cluster: SlurmCluster, data: Path, out: Path) -> dict:
    env = dict(cluster.env, PRESET="tiny", DS_CONFIG="ds_configs/cpu_tiny.json", ACCELERATOR="cpu",
               TOKENIZER=str(data / "tokenizer"), TRAIN_SHARDS=str(data / "train-{000000..000003}.tar"),
               VAL_SHARDS=str(data / "val-000000.tar"), MAX_STEPS=str(STEPS), OUTPUT_DIR=str(out),
               NUM_WORKERS="1", EVAL_EVERY="0", PYTHON=sys.executable,
               EXTRA_ARGS="--queue-size 512 --log-every 1 --data-streams 4 --no-color-augment")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


# sbatch flags that turn the GPU header (8 nodes x 8 GPUs) into 2 emulated CPU nodes x 1 process.
CPU_FLAGS = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1"]


def write_manifest(root: Path, rows: int = 45) -> Path:
    """A small manifest of local images for the sharding array job."""
    from PIL import Image

    lines = []
    for i in range(rows):
        path = root / f"img-{i:03d}.png"
        Image.new("RGB", (24 + i % 7, 20 + i % 5), (i * 5 % 256, i * 11 % 256, i * 17 % 256)).save(path)
        caption = "" if i == 7 else f"第{i}张图：一个彩色的方块"  # one rejected row
        lines.append(json.dumps({"image": str(path), "caption": caption, "id": f"row-{i}"}, ensure_ascii=False))
    manifest = root / "manifest.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def completions(cluster: SlurmCluster, job_id: str) -> list[str]:
    return [c["JobState"] for c in cluster.completions() if c.get("JobId") == job_id]


@pytest.fixture(scope="module")
def jobs(cluster, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("jobs")
    data = tmp / "data"
    write_demo_shards(data, n_train=1200, n_val=96, seed=0, image_size=64, shard_size=300, quiet=True)
    deadline = time.monotonic() + TIMEOUT

    # (1) the uninterrupted reference, exactly as a user submits it (plus the CPU overrides)
    ref = dict(out=tmp / "ref" / "out", log=tmp / "ref.out")
    ref["proc"] = subprocess.Popen(["timeout", str(TIMEOUT), "sbatch", "--wait", *CPU_FLAGS, f"--output={ref['log']}",
                                    "slurm/pretrain_10b.sh"], cwd=ROOT, env=train_env(cluster, data, ref["out"]),
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    # (2) the same run, signalled mid-way as Slurm does before the time limit
    pre = dict(out=tmp / "preempted" / "out", log=tmp / "preempted.out")
    pre["id"] = cluster.run("sbatch", "--parsable", *CPU_FLAGS, f"--output={pre['log']}", "slurm/pretrain_10b.sh",
                            cwd=ROOT, env=train_env(cluster, data, pre["out"])).stdout.strip().split(";")[0]

    # (3) the sharding array job: three tasks, next to a single-process run of the same manifest
    shards = dict(manifest=write_manifest(tmp_path_factory.mktemp("manifest")), out=tmp / "shards-array",
                  single=tmp / "shards-single", log=tmp / "shards-%A_%a.out")
    shard_env = dict(cluster.env, MANIFEST=str(shards["manifest"]), OUT=str(shards["out"]), SHARD_SIZE="5",
                     WORKERS="1", FETCH_THREADS="2", PYTHON=sys.executable, EXTRA_ARGS="--quiet")
    shards["proc"] = subprocess.Popen(["timeout", str(TIMEOUT), "sbatch", "--wait", "--array=0-2", "--cpus-per-task=1",
                                       "--mem=100M", f"--output={shards['log']}", "slurm/make_shards.sh"],
                                      cwd=ROOT, env=shard_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True)
    single = subprocess.run([sys.executable, "data_tools/make_shards.py", "--manifest", str(shards["manifest"]),
                             "--out", str(shards["single"]), "--shard-size", "5", "--workers", "0", "--quiet"],
                            cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert single.returncode == 0, single.stdout + single.stderr

    def fail(what: str):
        logs = "\n".join(f"--- {p.name}\n{read(p)[-4000:]}" for p in sorted(tmp.glob("*.out")))
        pytest.fail(f"{what}\n{logs}\n{cluster.tail()}")

    # Signal the batch shell once step 2 is logged (Slurm's --signal=B:USR1@... does the same).
    while "step      2/" not in read(pre["log"]):
        if time.monotonic() > deadline or completions(cluster, pre["id"]):
            fail("the job to pre-empt never reached step 2")
        time.sleep(0.5)
    cluster.run("scancel", "--signal=USR1", "--batch", pre["id"])
    while "COMPLETED" not in completions(cluster, pre["id"]):
        if time.monotonic() > deadline or {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"} & set(
                completions(cluster, pre["id"])):
            fail(f"pre-empted job {pre['id']}: {completions(cluster, pre['id'])}")
        time.sleep(1)

    for job in (ref, shards):
        try:
            job["sbatch"] = job["proc"].communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
        except subprocess.TimeoutExpired:
            job["proc"].kill()
            fail("sbatch --wait did not return")
        job["rc"] = job["proc"].returncode
    yield dict(tmp=tmp, ref=ref, pre=pre, shards=shards, cluster=cluster)


def exported(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = out.parent / "full.safetensors"
    export(out / "checkpoints", path, full=True)
    return load_file(str(path))


def mlflow_runs(out: Path) -> list:
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out.parent / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("wenlan").experiment_id])
    return client, runs


def test_sbatch_pretrain_10b_trains_across_two_nodes(jobs):
    ref = jobs["ref"]
    log = read(ref["log"])
    assert ref["rc"] == 0, ref["sbatch"] + log
    assert "Submitted batch job" in ref["sbatch"]
    # Both emulated nodes' ranks joined one process group of size 2, rendezvous on the first node.
    assert re.search(r"rank 0 of 2 on node n1 \(pid \d+\)", log), log
    assert re.search(r"rank 1 of 2 on node n2 \(pid \d+\)", log), log
    assert "2 node(s) [n1 n2] x 1 process(es), rendezvous 127.0.0.1:" in log
    assert "ZeRO-1, 2 ranks, global batch 128, 6 steps" in log
    assert f"step      {STEPS}/{STEPS}" in log and "image->text" in log
    assert "training finished with exit code 0" in log
    assert json.loads((ref["out"] / "eval.json").read_text())["n_pairs"] == 96
    client, runs = mlflow_runs(ref["out"])
    assert len(runs) == 1 and runs[0].info.run_id == (ref["out"] / "mlflow_run_id").read_text().strip()
    assert runs[0].data.params["preset"] == "tiny" and runs[0].data.metrics["restarts"] == 0
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == list(range(1, STEPS + 1))


def test_preempted_job_checkpoints_requeues_and_ends_bitwise_equal(jobs):
    pre, ref = jobs["pre"], jobs["ref"]
    log = read(pre["log"])
    stopped = re.search(r"pre-empted \(SIGUSR1\): checkpoint of step (\d+) saved", log)
    assert stopped, log
    k = int(stopped.group(1))
    assert 2 <= k < STEPS
    assert "batch script got SIGUSR1" in log and f"requeueing job {pre['id']}" in log
    assert f"job {pre['id']} (restart 1)" in log and f"at step {k} on 2 ranks" in log
    assert log.rstrip().endswith("training finished with exit code 0")
    # Every step ran exactly once over the two runs of the job (the log is appended to on requeue).
    assert [int(n) for n in re.findall(rf"^step +(\d+)/{STEPS} ", log, re.M)] == list(range(1, STEPS + 1))
    assert completions(jobs["cluster"], pre["id"]) == ["PENDING", "COMPLETED"]  # requeued once, then done
    tags = sorted(p.name for p in (pre["out"] / "checkpoints").iterdir() if p.name.startswith("step"))
    assert tags == [f"step{k:08d}", f"step{STEPS:08d}"]  # the pre-emption checkpoint and the final one
    # The weights, momentum towers and queues equal the uninterrupted job's, bit for bit.
    reference, resumed = exported(ref["out"]), exported(pre["out"])
    assert reference.keys() == resumed.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name
    # One MLflow run, continued by the requeued job, which logged the restart.
    client, runs = mlflow_runs(pre["out"])
    assert len(runs) == 1 and runs[0].data.metrics["restarts"] == 1
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")] == list(range(1, STEPS + 1))


def test_make_shards_array_job_equals_single_process(jobs):
    shards = jobs["shards"]
    assert shards["rc"] == 0, shards["sbatch"] + "\n".join(read(p) for p in jobs["tmp"].glob("shards-*.out"))
    logs = "".join(read(p) for p in sorted(jobs["tmp"].glob("shards-*.out")))
    for i in range(3):
        assert f"make_shards: task {i} of 3" in logs, logs
    array, single = shards["out"], shards["single"]
    names = sorted(p.name for p in single.glob("*.tar"))
    assert len(names) == 9 and names == sorted(p.name for p in array.glob("*.tar"))
    for name in names:
        assert (array / name).read_bytes() == (single / name).read_bytes(), name
    assert json.loads((array / "stats.json").read_text()) == json.loads((single / "stats.json").read_text())


def test_resume_path_applies_to_the_first_start_only(jobs):
    """RESUME=PATH starts the job from the reference job's final checkpoint (step 6); pre-empted at step
    k > 6 and requeued, the job resumes from its own checkpoint of step k, not from PATH again: every step
    7..20 runs exactly once over the job's two starts."""
    cluster, tmp, ref = jobs["cluster"], jobs["tmp"], jobs["ref"]
    assert ref["rc"] == 0, read(ref["log"])
    source = ref["out"] / "checkpoints" / f"step{STEPS:08d}"
    # Room after the signal: the ranks agree to stop one step after the step they were signalled in.
    out, log_file, total = tmp / "from-path" / "out", tmp / "from-path.out", STEPS + 14
    env = dict(train_env(cluster, tmp / "data", out), RESUME=str(source), MAX_STEPS=str(total))
    job = cluster.run("sbatch", "--parsable", *CPU_FLAGS, f"--output={log_file}", "slurm/pretrain_10b.sh",
                      cwd=ROOT, env=env).stdout.strip().split(";")[0]
    deadline = time.monotonic() + TIMEOUT
    while f"step      {STEPS + 2}/" not in read(log_file):
        assert time.monotonic() < deadline and not completions(cluster, job), read(log_file) + cluster.tail()
        time.sleep(0.5)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    while "COMPLETED" not in completions(cluster, job):
        failed = {"FAILED", "CANCELLED", "TIMEOUT"} & set(completions(cluster, job))
        assert time.monotonic() < deadline and not failed, read(log_file) + cluster.tail()
        time.sleep(1)
    log = read(log_file)
    stopped = re.search(r"pre-empted \(SIGUSR1\): checkpoint of step (\d+) saved", log)
    assert stopped, log
    k = int(stopped.group(1))
    assert STEPS + 2 <= k < total
    assert f"resumed from {source.parent}/{source.name} at step {STEPS} on 2 ranks" in log
    assert f"RESUME={source} applies to the first start only" in log
    assert f"resumed from {out / 'checkpoints'}/step{k:08d} at step {k} on 2 ranks" in log
    assert [int(n) for n in re.findall(rf"^step +(\d+)/{total} ", log, re.M)] == list(range(STEPS + 1, total + 1))
    assert log.rstrip().endswith("training finished with exit code 0")
