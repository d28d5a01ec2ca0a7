"""Shared by the tests that launch real DeepSpeed runs on CPU."""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def launch(ranks: int, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """`deepspeed --num_accelerators N --master_port P wenlan/train.py ARGS`; fails the test on a
    non-zero exit with the tail of the output."""
    cmd = [DEEPSPEED, "--num_accelerators", str(ranks), "--master_port", str(free_port()),
           str(ROOT / "wenlan" / "train.py"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-6000:]}")
    return proc


def assert_close_per_tensor(reference: dict, other: dict, what: str) -> None:
    """Relative error < 1e-5 per tensor, integers exact. BERT's attention key bias adds the same amount
    to all of a query's logits, which softmax ignores: its true gradient is exactly zero and it holds
    only rounding noise (~1e-9), so an absolute floor of 1e-7 per element applies to it, as to any
    tensor that small."""
    assert set(reference) == set(other)
    for name, ref in reference.items():
        if ref.is_floating_point():
            error = (other[name] - ref).norm().item()
            bound = 1e-5 * ref.norm().item() + 1e-7 * ref.numel() ** 0.5
            assert error <= bound, f"{what}: {name} error {error:.2e} > {bound:.2e} (norm {ref.norm().item():.2e})"
        else:
            assert torch.equal(other[name], ref), f"{what}: {name} differs"


def metric_history(out: Path, key: str) -> dict[int, float]:
    """{step: value} of one metric of the run in ``out`` (its MLflow store sits next to it)."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{out.parent / 'mlflow.db'}")
    return {m.step: m.value for m in client.get_metric_history((out / "mlflow_run_id").read_text().strip(), key)}


def exported(out: Path) -> dict[str, torch.Tensor]:
    path = out.parent / f"{out.name}.safetensors"
    from wenlan.export import export

    export(out / "checkpoints", path, full=True)
    from safetensors.torch import load_file

    return load_file(str(path))


def run_until_killed(args: list[str], kill_at: int, ranks: int = 2) -> None:
    """Start a run on ``ranks`` processes and SIGKILL every process of it as soon as rank 0 logs step ``kill_at``."""
    cmd = [DEEPSPEED, "--num_accelerators", str(ranks), "--master_port", str(free_port()), str(ROOT / "wenlan" / "train.py"),
           *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    marker, seen = f"step {kill_at:>6}/", []
    try:
        for line in proc.stdout:
            seen.append(line)
            if marker in line:
                os.killpg(proc.pid, signal.SIGKILL)
                break
        else:
            raise AssertionError(f"run ended before step {kill_at}:\n{''.join(seen)[-4000:]}")
    finally:
        proc.wait(timeout=60)
        proc.stdout.close()


def equivalence_args(data: Path, out: Path, ds: str, steps: int, queue: int, preset: str = "tiny") -> list[str]:
    """train.py arguments of the equivalence tests: a tiny preset on 8 demo shards in 4 streams, a log line
    and a queue check every step, a checkpoint every 2 steps, MLflow next to the run.

    Without colour jitter, as the demo trains on these shards (their captions name colours). The
    per-tensor bound of the comparisons also needs it: BriVL's heads and feed-forward layers are ReLU
    MLPs, and a pre-activation within rounding of zero flips its ReLU in one run and not the other. With
    jitter on, the ZeRO-3 run met one at step 6 (sample 9, unit 24 of the text head's fc1: 0 in the
    reference, 8.1e-10 under ZeRO-3), which changed that sample's text gradient by 0.7% and put the text
    tower's biases at 6x the bound, while every rank's forward and local backward agreed to 2e-6. A
    flip is a property of the data's trajectory, not of the strategy; on this trajectory none occurs."""
    return ["--deepspeed_config", ds, "--preset", preset, "--tokenizer", str(data / "tokenizer"), "--no-color-augment",
            "--train-shards", str(data / "train-{000000..000007}.tar"), "--val-shards", str(data / "val-000000.tar"),
            "--max-steps", str(steps), "--output-dir", str(out), "--queue-size", str(queue), "--log-every", "1",
            "--save-every", "2", "--data-streams", "4", "--mlflow-uri", f"sqlite:///{out.parent / 'mlflow.db'}"]


class Server:
    """`make mlflow-server` on 127.0.0.1 with a SQLite store, started and killed by PID."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self) -> "Server":
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            ["make", "--no-print-directory", "mlflow-server", f"MLFLOW_STORE=sqlite:///{self.root / 'mlflow.db'}",
             f"MLFLOW_ARTIFACTS={self.root / 'artifacts'}", f"MLFLOW_PORT={self.port}", "MLFLOW_ARGS=--workers 1"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            assert self.proc.poll() is None, (self.root / "server.log").read_text()[-3000:]
            time.sleep(1)
        raise TimeoutError(f"mlflow server did not answer /health in 240 s: {(self.root / 'server.log').read_text()[-3000:]}")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)  # make, the server and its uvicorn worker
        self.proc.wait()


# The converter with its memory read at the point where the checkpoint is open (imports done, the files'
# structure unpickled, the model built on the meta device) and no tensor read yet: the resident set then,
# and the peak from then on (Linux: writing 5 to /proc/self/clear_refs resets the peak).
_CONVERT_AND_MEASURE = """
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


def reshard_measuring_memory(tag: Path, out: Path) -> dict[str, float]:
    """Run ``wenlan.parallel.reshard`` on ``tag`` in a child process; MiB resident with the checkpoint
    open, the peak from then on (the whole-process peak where the reset is not possible: conservative),
    and the whole-process peak."""
    import json

    child = subprocess.Popen([sys.executable, "-c", _CONVERT_AND_MEASURE, str(tag), str(out)], cwd=ROOT, env=cpu_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)  # the child's own peak RSS, in KiB on Linux
    child.stdout.close()
    assert os.waitstatus_to_exitcode(status) == 0, output[-4000:]
    measured = json.loads(output.strip().splitlines()[-1])
    peak = usage.ru_maxrss / 1024
    return {"opened": measured["opened"], "peak_after_open": measured["peak_after"] or peak, "peak": peak}
