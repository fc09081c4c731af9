"""Peak resident memory of this process, read from ``/proc`` (no torch import: the preparation
workers of ``engram_train.data.stream`` report it too)."""

from __future__ import annotations


def peak_rss_bytes() -> int:
    """This process's peak resident memory (``VmHWM``), 0 where ``/proc`` has none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
