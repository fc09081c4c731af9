"""``torchrun`` without its traceback when a rank stops on a user error.

    python -m engram_train.torchrun --standalone --nproc-per-node 2 -m engram_train.train.main experiment=...

Takes torchrun's arguments unchanged.  When a rank exits non-zero, torchrun (2.13) raises
``ChildFailedError`` out of its ``main``: a Python traceback of the launcher and a table of
failures, printed after the rank's own message.  Here a rank that stopped on a user error
(``engram_train.errors``: it printed ``error: ...`` once, exit code 2) ends the launch with
code 2 and nothing more, whatever became of the other ranks; any other failure gets one line per failed rank (its exit code or
signal and the place of its error file), and torchrun's exit code 1.
"""

from __future__ import annotations

import logging
import sys

from engram_train.errors import USER_ERROR_EXIT


def main(argv=None) -> int:
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
