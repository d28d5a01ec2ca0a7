"""Shared by the tests that launch real DeepSpeed runs on CPU."""

import os
import socket
import subprocess
import sys
from pathlib import Path

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
