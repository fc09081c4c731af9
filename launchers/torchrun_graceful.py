"""``torchrun`` whose agent passes SIGTERM and SIGUSR1 on to its workers and exits with their status.

    python launchers/torchrun_graceful.py [torchrun arguments...]

Stock torchrun turns SIGTERM into ``SignalException``: the agent signals the workers, kills
them 30 s later whatever they are doing, and exits 1 with a traceback even when every worker
stopped cleanly after its checkpoint.  SIGUSR1 (SLURM's time-limit warning) it does not handle
at all, so it dies of it.  The trainer stops on either signal after the step in flight, with a
checkpoint on every rank, and exits 0 (``engram_train.train.trainer``).  Here the agent forwards
the signal to its workers and goes on monitoring them as usual, so torchrun's exit status is the
workers': 0 after a clean preemption, and a failure still fails.  The signal may reach the
agent alone (``kill PID``) or the agent and the workers at once (SLURM signals every process of a
job step, a terminal the whole process group): a worker that gets it twice stops once.
SIGINT, SIGHUP and SIGQUIT keep torchrun's behaviour (shut the workers down).
"""

from __future__ import annotations

import os
import signal
import sys

import psutil

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


def _forward(signum, _frame) -> None:
    # The workers are the agent's direct children (torchrun starts each with Popen).
    for child in psutil.Process().children():
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass


def main() -> None:
    # The agent installs its SignalException handler for the signals of --signals-to-handle (env
    # PET_SIGNALS_TO_HANDLE) when it starts the workers, replacing any other; without SIGTERM and
    # SIGUSR1 in that list ours stay in place.
    os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    for sig in FORWARDED:
        signal.signal(sig, _forward)
    from torch.distributed.run import main as torchrun

    sys.exit(torchrun())


if __name__ == "__main__":
    main()
