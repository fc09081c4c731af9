"""Triton kernels of the Engram lookup path and the launchers that size their grids.

Kernels (``_src.py``): ``hash_ngrams`` (compression, windows, mix and modulo of
every head of every Engram layer in one launch), ``gather_rows`` (multi-head
offset gather), ``segment_sum`` (the deterministic half of ``reduce_row_grads``),
``row_adam`` (the ``sparse_adam`` row update) and ``floor_mod`` (the hash's
modulo alone, for exactness tests).  The torch references and the dispatch
between them live with their callers (``engram_train.kernels.rows``, ``NgramHasher``).

Devices: CUDA tensors run compiled kernels; CPU tensors run the same kernels
under Triton's interpreter (numpy, slow: for tests and small runs).  The kernel
source is executed once per mode with Triton's ``interpret`` knob set for that
execution only, so both coexist in one process and neither depends on whether
``TRITON_INTERPRET`` was set before ``triton`` was first imported, nor leaks
into other code that uses Triton.
"""

from __future__ import annotations

import importlib.util
import logging
import threading
from pathlib import Path
from types import ModuleType
from typing import Dict, List, Optional, Sequence

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).resolve().parent / "_src.py"
_lock = threading.Lock()
_modules: Dict[bool, ModuleType] = {}
_error: Dict[str, Optional[str]] = {"import": None}
_launched: set = set()   # (kernel, device type) pairs already logged

#: The hash modulo is exact for table sizes below this bound (``_src.py``'s header).
MAX_TABLE_SIZE = 1 << 40
_MAX_GRID_YZ = 65535


def _load(interpret: bool) -> ModuleType:
    from triton import knobs

    name = f"{__name__}._{'interpreted' if interpret else 'compiled'}"
    spec = importlib.util.spec_from_file_location(name, _SOURCE)
    mod = importlib.util.module_from_spec(spec)
    with knobs.runtime.scope():       # restores the knob (and the environment) afterwards
        knobs.runtime.interpret = interpret
        spec.loader.exec_module(mod)
    return mod


def unavailable_reason() -> Optional[str]:
    """Why Triton cannot be used here (None when it can)."""
    if _error["import"] is None and not _modules:
        try:
            import triton  # noqa: F401
        except Exception as e:   # not installed, or a broken install: the torch paths still work
            _error["import"] = f"{type(e).__name__}: {e}"
    return _error["import"]


def available() -> bool:
    return unavailable_reason() is None


def module(device: torch.device) -> ModuleType:
    """The kernels for tensors on ``device``: interpreted for CPU, compiled for CUDA."""
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"tensors on {device}: the Triton kernels run on CUDA (compiled) or the CPU "
                         "(interpreted); use backend='torch'")
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"Triton is unavailable ({reason}); use backend='torch' or 'auto'")
    interpret = device.type == "cpu"
    mod = _modules.get(interpret)
    if mod is None:
        with _lock:
            mod = _modules.get(interpret)
            if mod is None:
                mod = _modules[interpret] = _load(interpret)
                log.info("Triton kernels ready: %s", "interpreted (CPU tensors)" if interpret else
                         "compiled (CUDA tensors)")
    return mod


def launch(device: torch.device, kernel: str, grid, *args, **meta) -> None:
    """Run ``kernel`` of :func:`module` on ``grid``; for CUDA on ``device`` (Triton launches on the current one)."""
    fn = getattr(module(device), kernel)
    if (kernel, device.type) not in _launched:
        _launched.add((kernel, device.type))
        log.info("Triton kernel %s: first launch, %s", kernel,
                 "interpreted (CPU tensors)" if device.type == "cpu" else f"compiled for {device}")
    if device.type == "cuda":
        with torch.cuda.device(device):
            fn[grid](*args, **meta)
    else:
        fn[grid](*args, **meta)


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, int(n) - 1).bit_length())


def hash_ngrams(raw: torch.Tensor, lookup: torch.Tensor, multipliers: torch.Tensor, primes: torch.Tensor,
                inv_primes: torch.Tensor, pad_id: int, eos_id: Optional[int],
                outs: Sequence[torch.Tensor]) -> None:
    """Hash ids of every layer into ``outs`` in one launch (grid: token blocks x rows x layers).

    ``raw [B, T]`` int64 raw ids, ``lookup`` the compression array, ``multipliers
    [L, N]``, ``primes [L, H]`` int64 and ``inv_primes [L, H]`` float64 (``1/primes``),
    all contiguous on one device; ``pad_id`` the *compressed* pad id; ``eos_id`` the raw
    EOS id, or None for no document-boundary reset.  ``outs``: L contiguous int64
    ``[B, T, H]`` tensors on that device; when they are consecutive slices of one
    buffer the layer stride is passed, otherwise a table of their offsets.
    """
    B, T = raw.shape
    L, N = multipliers.shape
    H = primes.shape[1]
    K = H // (N - 1)
    total = B * T
    if total == 0 or L == 0 or H == 0:
        return
    dev = raw.device
    for t, dtype in ((raw, torch.int64), (lookup, torch.int64), (multipliers, torch.int64),
                     (primes, torch.int64), (inv_primes, torch.float64)):
        assert t.dtype == dtype and t.is_contiguous() and t.device == dev
    assert len(outs) == L and all(o.dtype == torch.int64 and o.is_contiguous() and o.device == dev
                                  and o.shape == (B, T, H) for o in outs)
    base = outs[0]
    deltas = [o.data_ptr() - base.data_ptr() for o in outs]
    stride = deltas[1] if L > 1 else 0
    table = None
    if any(d != i * stride for i, d in enumerate(deltas)) or stride % 8:
        # Buffers of the caller's choosing: their int64 element offsets from outs[0]
        # (addresses of int64 tensors are 8-byte aligned, so the division is exact).
        table = torch.tensor([d // 8 for d in deltas], dtype=torch.int64).to(dev, non_blocking=True)
    block = min(256 if dev.type == "cuda" else 1024, _pow2(T, 16))
    # Rows and layers ride the grid's 2nd and 3rd axes, which CUDA caps at 65535: more rows take more launches
    # (slicing rows moves every layer's output by the same amount, so the offsets table still holds).
    for b0 in range(0, B, _MAX_GRID_YZ):
        b1 = min(B, b0 + _MAX_GRID_YZ)
        launch(dev, "hash_ngrams_kernel", (triton_cdiv(T, block), b1 - b0, L),
               raw[b0:b1], lookup, multipliers, primes, inv_primes, base[b0:b1], table if table is not None else base,
               T, stride // 8, int(pad_id), int(eos_id) if eos_id is not None else -1,
               N=N, K=K, HP=_pow2(H, 2), RESET=eos_id is not None, OUT_TABLE=table is not None, BLOCK=block)


def floor_mod(x: torch.Tensor, p: int) -> torch.Tensor:
    """``x mod p`` (floor) by the kernels' division-free modulo, on ``x``'s device; for exactness tests."""
    if not 2 <= p < MAX_TABLE_SIZE:
        raise ValueError(f"p={p}: the kernel's modulo is exact for 2 <= p < 2**40")
    x = x.to(torch.int64).contiguous()
    out = torch.empty_like(x)
    if x.numel():
        block = 1024
        launch(x.device, "floor_mod_kernel", (triton_cdiv(x.numel(), block),),
               x, out, x.numel(), torch.tensor([p], dtype=torch.int64, device=x.device),
               torch.tensor([1.0 / p], dtype=torch.float64, device=x.device), BLOCK=block)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


__all__: List[str] = ["MAX_TABLE_SIZE", "available", "floor_mod", "hash_ngrams", "launch", "module",
                       "unavailable_reason"]
