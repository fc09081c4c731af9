"""The one place that decides which device this process computes on.

Everything else asks here instead of probing ``torch.cuda`` itself, so a CPU
run and a CUDA run go through the same code and differ only in what this
module answers.  There is no override flag on purpose: a machine with a GPU
trains on it, a machine without one trains on its CPU.
"""

from __future__ import annotations

import os

import torch


def is_cpu() -> bool:
    """True when this process has no usable CUDA device."""
    return not torch.cuda.is_available()


def get_device() -> torch.device:
    """The device of this process: its local CUDA device (``LOCAL_RANK``) or the CPU."""
    if is_cpu():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
