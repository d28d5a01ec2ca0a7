"""A real single-machine Slurm cluster for the tests: slurmctld plus one ``slurmd -D -N nX`` per emulated
node, all as the current user (root in CI), no systemd, no munge, no cgroups, no database.

Debian's ``slurm-wlm`` provides the daemons (``make slurm`` or ``.ci/run`` installs it). Everything the
cluster writes (config, state, spool, logs, the job completion log) lives in one directory; the daemons
are stopped by PID at the end. By hand, from the repository root:

    python tests/slurm_cluster.py /tmp/slurm-play      # starts it, prints the SLURM_CONF to export, waits
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue", "srun")
INSTALL_HINT = "install Slurm with `make slurm` (runs: apt-get install -y slurm-wlm) as root"


def missing_commands() -> list[str]:
    return [c for c in DAEMONS if shutil.which(c) is None and not Path("/usr/sbin", c).exists()]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _conf(root: Path, nodes: list[str], cpus: int) -> str:
    host = socket.gethostname().split(".")[0]
    lines = [
        "ClusterName=wenlantest",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={_free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        # No munge: the daemons and clients trust each other (one machine, one user).
        "AuthType=auth/none",
        "CredType=cred/none",
        # A requeued job may start again once its old credential expired: 10 s instead of the default.
        "AuthInfo=cred_expire=10",
        # No cgroups and no systemd here: track processes through /proc, bind nothing.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        # No slurmdbd, so no sacct: the end state of every job goes to a text file.
        "JobCompType=jobcomp/filetxt",
        f"JobCompLoc={root}/jobcomp.txt",
        "MpiDefault=none",
        "SchedulerType=sched/backfill",
        # Look at pending jobs every 2 s (default 60): a requeued job starts as soon as it may.
        "SchedulerParameters=sched_interval=2,bf_interval=2",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        # Emulated nodes claim more CPUs than the machine has.
        "SlurmdParameters=config_overrides",
        "ReturnToService=2",
        # Finished jobs leave the controller quickly; sbatch --wait polls every 2 s while they are young.
        "MinJobAge=5",
        "KillWait=10",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool-%n",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/slurmctld.log",
        f"SlurmdLogFile={root}/slurmd-%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
    ]
    for name in nodes:
        lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={_free_port()} "
                     f"CPUs={cpus} RealMemory=4096 State=UNKNOWN")
    lines.append(f"PartitionName=test Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


class SlurmCluster:
    """``with SlurmCluster(dir) as cluster:`` starts the daemons and waits until every node is idle."""

    def __init__(self, root: Path, nodes: int = 2, cpus: int = 8):
        self.root = Path(root)
        self.nodes = [f"n{i + 1}" for i in range(nodes)]
        self.cpus = cpus
        self.conf = self.root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []

    @property
    def env(self) -> dict:
        """The environment every Slurm client needs (sbatch, scontrol, ...)."""
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout: float = 60) -> "SlurmCluster":
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        self.conf.write_text(_conf(self.root, self.nodes, self.cpus))
        logs = self.root / "daemons.out"
        with open(logs, "ab") as out:
            # -D: stay in the foreground, so the PID we hold is the daemon's; -i: ignore old state.
            self.procs.append(subprocess.Popen([_binary("slurmctld"), "-D", "-i", "-f", str(self.conf)],
                                               stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                               start_new_session=True))
            for name in self.nodes:
                self.procs.append(subprocess.Popen([_binary("slurmd"), "-D", "-N", name, "-f", str(self.conf)],
                                                   stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                                   start_new_session=True))
        try:
            self.wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states = ""
        while time.monotonic() < deadline:
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead} exited; see {self.root}/*.log and daemons.out:\n{self.tail()}")
            proc = self.run("sinfo", "-h", "-N", "-o", "%N %t", check=False)
            states = proc.stdout.strip()
            idle = {line.split()[0] for line in states.splitlines() if line.split()[-1] == "idle"}
            if idle >= set(self.nodes):
                return
            time.sleep(0.5)
        raise RuntimeError(f"Slurm nodes not idle after {timeout} s (sinfo: {states!r}):\n{self.tail()}")

    def tail(self, chars: int = 3000) -> str:
        text = ""
        for log in sorted(self.root.glob("*.log")) + [self.root / "daemons.out"]:
            if log.exists():
                text += f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}\n"
        return text

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(list(cmd), env=kw.pop("env", self.env), capture_output=True, text=True,
                              timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields (empty once the controller has forgotten the job)."""
        proc = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        fields = {}
        for item in proc.stdout.split():
            key, _, value = item.partition("=")
            fields.setdefault(key, value)
        return fields

    def completions(self) -> list[dict[str, str]]:
        """The job completion log: one dict per finished (or requeued) job run."""
        path = self.root / "jobcomp.txt"
        if not path.exists():
            return []
        return [dict(item.partition("=")[::2] for item in line.split()) for line in path.read_text().splitlines()]

    def stop(self) -> None:
        # Jobs still running (a failed test) first: their slurmstepd processes outlive slurmd.
        if self.procs and self.procs[0].poll() is None:
            jobs = self.run("squeue", "-h", "-o", "%A", check=False).stdout.split()
            if jobs:
                self.run("scancel", *jobs, check=False)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                    time.sleep(1)
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs = []

    def __enter__(self) -> "SlurmCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    import sys

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "slurm-play").resolve()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill PID` stops the daemons too
    with SlurmCluster(root) as cluster:
        print(f"cluster up: export SLURM_CONF={cluster.conf}   (Ctrl-C stops it)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
