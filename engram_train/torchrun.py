"""``torchrun`` for engram_train runs: preemption signals reach the ranks, user errors print once.

    python -m engram_train.torchrun --standalone --nproc-per-node 2 -m engram_train.train.main experiment=...

Takes torchrun's arguments unchanged (``launchers/torchrun.sh`` and ``launchers/slurm.sbatch``
start the agent through it).  Two differences from stock torchrun (2.13):

* **Signals.**  Stock torchrun turns SIGTERM into ``SignalException``: the agent signals the
  workers, kills them 30 s later whatever they are doing, and exits 1 with a traceback even when
  every worker stopped cleanly after its checkpoint; SIGUSR1 (SLURM's time-limit warning) it does
  not handle at all, so it dies of it.  Here the agent passes SIGTERM and SIGUSR1 on to its workers
  and goes on monitoring them, so the launch's exit status is the workers': 0 after a clean
  preemption (every rank stops after the same step with a checkpoint, ``engram_train.train``),
  and a failure still fails.  The signal may reach the agent alone (``kill PID``) or the agent and
  the workers at once (SLURM signals every process of a job step, a terminal the whole process
  group): a worker that gets it twice stops once.  SIGINT, SIGHUP and SIGQUIT keep torchrun's
  behaviour (shut the workers down).
* **User errors.**  When a rank exits non-zero, torchrun raises ``ChildFailedError`` out of its
  ``main``: a Python traceback of the launcher and a table of failures, printed after the rank's
  own message.  A rank that stopped on a user error (``engram_train.errors``: it printed
  ``error: ...`` once, exit code 2) ends the launch with code 2 and nothing more, whatever became
  of the other ranks; any other failure gets one line per failed rank (its exit code or signal)
  and torchrun's exit code 1.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from engram_train.errors import USER_ERROR_EXIT
from engram_train.train.signals import STOP_SIGNAL_ENV

FORWARDED = (signal.SIGTERM, signal.SIGUSR1)


def _forward(signum, _frame) -> None:
    import psutil

    # Workers started after this (the signal came while the agent was still starting them) inherit
    # the request through the environment (engram_train.train.signals).
    os.environ[STOP_SIGNAL_ENV] = str(int(signum))
    # The workers are the agent's direct children (torchrun starts each with Popen).
    for child in psutil.Process().children():
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass


def main(argv=None) -> int:
    # The agent installs its SignalException handler for the signals of --signals-to-handle (env
    # PET_SIGNALS_TO_HANDLE) when it starts the workers, replacing any other; without SIGTERM and
    # SIGUSR1 in that list ours stay in place.
    os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"
    for sig in FORWARDED:
        signal.signal(sig, _forward)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    # The agent logs each failed rank and each rank it stops ("failed (exitcode: 2) ...", "Sending
    # process ... closing signal SIGTERM"): the summary below says the same once.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    try:
        torchrun_main(argv)
    except ChildFailedError as e:
        failures = e.failures
        # The other ranks may have been stopped by the launcher (a signal) or broke a collective.
        if any(f.exitcode == USER_ERROR_EXIT for f in failures.values()):
            return USER_ERROR_EXIT
        for rank, f in sorted(failures.items()):
            how = f"signal {f.signal_name()}" if f.exitcode < 0 else f"exit code {f.exitcode}"
            print(f"torchrun: rank {rank} failed ({how}); its error is printed above", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
