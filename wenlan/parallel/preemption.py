"""Pre-emption: on SIGUSR1 or SIGTERM every rank finishes the current optimizer step, the ranks agree to
stop after that same step, save a checkpoint and exit with ``PREEMPTED_EXIT``; the Slurm batch script
(slurm/common.sh) then requeues the job, which resumes with ``--resume auto``. No step is lost or run twice.

Slurm sends USR1 to the batch shell before the time limit (``#SBATCH --signal=B:USR1@600``) and the
shell forwards it to the ranks; SIGTERM is what Slurm, ``scancel`` and most schedulers send to every
process of a job before killing it.
"""

import logging
import os
import signal
import socket
import sys

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later"; the batch script requeues the job on it
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preemption:
    """Install in every rank after the process group exists and before any DataLoader worker is forked.

    ``group``: a host-side (gloo) group for the per-step agreement, so that it never waits on the device."""

    def __init__(self, group=None):
        self.requested: str | None = None  # name of the first signal received
        self.pid = os.getpid()
        self.group = group
        self._pending = None  # the agreement launched at the previous step: (work, flag)
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        log.info("rank %d of %d on node %s (pid %d): SIGUSR1/SIGTERM stop training after the current step",
                 dist.get_rank(), dist.get_world_size(), node, self.pid)

    def _handle(self, signum, frame) -> None:
        if os.getpid() != self.pid:
            # A forked DataLoader worker (an eval loader's; train loaders' workers start from a forkserver
            # given the same dispositions by wenlan.data.worker_server) inherited this handler. Slurm signals
            # every process of a job step: a worker ignores USR1, and leaves quietly on SIGTERM (also its
            # parent's way to stop it), with exit status 0 so that the training process is not interrupted
            # in the middle of a step.
            if signum == signal.SIGTERM:
                os._exit(0)
            return
        # Only record it: the handler runs between two Python bytecodes, maybe inside a collective or a save.
        if self.requested is None:
            self.requested = signal.Signals(signum).name
            log.warning("rank %d got %s: stopping after the current step", dist.get_rank(), self.requested)

    def should_stop(self) -> bool:
        """Collective, called by every rank at the end of every optimizer step: True on every rank once any
        rank was signalled, so that all stop after the same step. Each call launches this step's agreement
        (an all-reduce of one int on the host group, no gradient) and returns the previous step's, which
        has long arrived: no blocking round trip per step, at the price of stopping one step later."""
        stop = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            stop = bool(flag.item())
        flag = torch.tensor([int(self.requested is not None)], dtype=torch.int32)  # host memory
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return stop

    def finish(self) -> None:
        """Wait for the agreement still in flight (before the group is used for anything else or torn down)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None

    def exit(self, step: int) -> None:
        """After the checkpoint of ``step`` is saved: leave with the exit code that means "requeue me"."""
        self.finish()
        dist.barrier()  # no gradient; every rank is done with the checkpoint
        if dist.get_rank() == 0:
            print(f"pre-empted ({self.requested or 'signal on another rank'}): checkpoint of step {step} saved, "
                  f"exiting with {PREEMPTED_EXIT} to be requeued", flush=True)
        sys.exit(PREEMPTED_EXIT)
