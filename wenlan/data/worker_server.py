"""What the forkserver of train loader workers imports before it forks any (``wenlan.data.pipeline``'s
``set_forkserver_preload``); never imported by a trainer.

The data pipeline, so that a worker starts without importing torch again. And the workers' signal
dispositions: the Slurm batch script and ``scancel`` signal every process of the job step, the
forkserver and its workers included, and a forked worker used to inherit the trainer's handlers
(``wenlan.parallel.preemption``). With a fresh interpreter USR1 would kill them (its default action)
in the middle of the step the trainer is finishing before its checkpoint. So, as a forked worker did:
USR1 is ignored, SIGTERM leaves quietly with status 0.
"""

import os
import signal

from wenlan.data import pipeline  # noqa: F401  (preloaded)


def _leave_quietly(signum, frame) -> None:
    os._exit(0)


signal.signal(signal.SIGUSR1, signal.SIG_IGN)
signal.signal(signal.SIGTERM, _leave_quietly)
