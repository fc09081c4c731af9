"""Run a function in N gloo processes and collect what each rank returns.

    results = run_distributed(fn, world_size=2, *args, timeout=120, **kwargs)

``fn`` must be importable by name (a module-level function of a test module):
the children are started with ``spawn``.  Each child gets the torchrun
environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT`` on a free port) but does *not* initialize torch.distributed:
``fn`` does that itself (``init_parallel`` reads the environment), exactly as
under torchrun.  Children run single-threaded torch so that a few ranks share
a small CPU fairly.

Returns ``[result of rank 0, result of rank 1, ...]`` (results travel through
``torch.save``, so tensors and plain Python objects are fine).  If a rank
raises, the others are stopped and a ``RuntimeError`` carrying the child's
traceback is raised; if the ranks do not finish within ``timeout`` seconds
(a collective that never pairs up), they are killed and ``TimeoutError`` is
raised.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from typing import Any, Callable, List

import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, fn: Callable, world_size: int, port: int, out_dir: str, args, kwargs) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    path = os.path.join(out_dir, f"rank{rank}.pt")
    try:
        result = fn(*args, **kwargs)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, path)
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save({"result": result}, path)


def run_distributed(fn: Callable, world_size: int, *args, timeout: float = 120.0, **kwargs) -> List[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return the per-rank results."""
    with tempfile.TemporaryDirectory(prefix="engram_dist_") as out_dir:
        ctx = mp.start_processes(_child, args=(fn, world_size, free_port(), out_dir, args, kwargs),
                                 nprocs=world_size, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=0.5):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{getattr(fn, '__name__', fn)} did not finish on {world_size} "
                                       f"ranks within {timeout:.0f} s")
        except mp.ProcessRaisedException as e:
            raise RuntimeError(f"rank {e.error_index} failed:\n{e}") from None
        except mp.ProcessExitedException as e:
            err = _error_of(out_dir, e.error_index)
            raise RuntimeError(f"rank {e.error_index} exited with code {e.exit_code}" +
                               (f":\n{err}" if err else "")) from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
                p.join()
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)["result"]
                for r in range(world_size)]


def _error_of(out_dir: str, rank: int):
    path = os.path.join(out_dir, f"rank{rank}.pt")
    if os.path.exists(path):
        return torch.load(path, weights_only=False).get("error")
    return None
