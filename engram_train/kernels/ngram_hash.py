"""Native CPU kernel for Engram n-gram hashing (``csrc/ngram_hash.c``), built on first use.

The reference, and the oracle the tests compare against, is the torch path of
:class:`engram_train.engram.hashing.NgramHasher` (``backend="torch"``); the
dispatch between the two lives there, in one place.

Build: the C file is compiled once per machine type with the system C compiler
(``$CC``, else ``cc``/``gcc``; ``-O3 -march=native``, no torch headers, well under
a second) into ``$ENGRAM_TRAIN_KERNEL_CACHE`` (default
``~/.cache/engram_train/kernels``), under a name keyed by the source, the flags
and the CPU's feature flags, written atomically so concurrent ranks never load
half a file.  Without a compiler the library is unavailable, :func:`unavailable_reason`
says why, and ``backend="auto"`` hashes with torch instead.

Threads: the kernel itself is single-threaded; :func:`ngram_hash` splits the
flat token range over a small thread pool (ctypes releases the GIL during the
call), sized by ``torch.get_num_threads()``, so it follows torch's setting (1 in
a data-loader worker) and adds no second OpenMP runtime to the process.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).resolve().parent / "csrc" / "ngram_hash.c"
ABI_VERSION = 1
#: The modulo is exact for table sizes below this bound (see the C file's header).
MAX_TABLE_SIZE = 1 << 40
#: Below this many tokens per thread, one thread is faster than handing work out.
MIN_TOKENS_PER_THREAD = 8192

_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared", "-std=c11"]
_FALLBACK_FLAGS = ["-O3", "-fno-math-errno", "-fPIC", "-shared", "-std=c11"]   # compilers without -march=native

_lock = threading.Lock()
_state = {"lib": None, "error": None, "tried": False}
_pool = {"pid": None, "executor": None, "size": 0}

_P = ctypes.c_void_p
_I64 = ctypes.c_int64


def _cpu_tag() -> str:
    """What ``-march=native`` depends on: the machine and its CPU feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line
                    break
    except OSError:
        pass
    return f"{platform.machine()}|{platform.processor()}|{flags}"


def cache_dir() -> Path:
    return Path(os.environ.get("ENGRAM_TRAIN_KERNEL_CACHE") or Path.home() / ".cache" / "engram_train" / "kernels")


def _compiler() -> Optional[str]:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return cand
    return None


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    source = SOURCE.read_bytes()
    errors = []
    for flags in (_FLAGS, _FALLBACK_FLAGS):
        key = hashlib.sha256(source + " ".join([cc, *flags, _cpu_tag()]).encode()).hexdigest()[:16]
        target = cache_dir() / f"ngram_hash_{key}.so"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
            os.close(fd)
            proc = subprocess.run([cc, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
            if proc.returncode != 0:
                os.unlink(tmp)
                errors.append(f"{cc} {' '.join(flags)}: {proc.stderr.strip()[-500:]}")
                continue
            os.replace(tmp, target)   # atomic: another rank sees no file or the whole file
            log.info("built the n-gram hashing kernel: %s", target)
        lib = ctypes.CDLL(str(target))
        lib.engram_ngram_hash_abi_version.restype = _I64
        if lib.engram_ngram_hash_abi_version() != ABI_VERSION:
            raise RuntimeError(f"{target}: ABI version mismatch; delete it to rebuild")
        lib.engram_ngram_hash.restype = None
        lib.engram_ngram_hash.argtypes = [_P, _P, _I64, ctypes.c_int32, _I64, _I64, _I64, _I64, _I64, _I64, _I64,
                                          _P, _P, _P, _P]
        lib.engram_floor_mod.restype = None
        lib.engram_floor_mod.argtypes = [_P, _I64, _I64, ctypes.c_double, _P]
        return lib
    raise RuntimeError("compiling the n-gram hashing kernel failed: " + " | ".join(errors))


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library (built on first call), or None when it cannot be built."""
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                try:
                    _state["lib"] = _build()
                except Exception as e:   # no compiler, read-only home, ...: the torch path still works
                    _state["error"] = f"{type(e).__name__}: {e}"
                    log.warning("n-gram hashing kernel unavailable (%s); hashing with torch", _state["error"])
                _state["tried"] = True
    return _state["lib"]


def available() -> bool:
    return library() is not None


def unavailable_reason() -> Optional[str]:
    library()
    return _state["error"]


def _executor(size: int) -> ThreadPoolExecutor:
    # A pool made before a fork (data-loader workers) has no threads in the child: make a new one.
    if _pool["pid"] != os.getpid() or _pool["size"] != size:
        if _pool["pid"] == os.getpid() and _pool["executor"] is not None:
            _pool["executor"].shutdown(wait=False)   # resized (torch.set_num_threads changed)
        _pool.update(pid=os.getpid(), size=size,
                     executor=ThreadPoolExecutor(max_workers=size, thread_name_prefix="engram-hash"))
    return _pool["executor"]


def _require(lib) -> ctypes.CDLL:
    if lib is None:
        raise RuntimeError(f"the n-gram hashing kernel is unavailable: {unavailable_reason()}; "
                           "use NgramHasher(backend='torch') or 'auto'")
    return lib


def ngram_hash(x: torch.Tensor, raw: torch.Tensor, eos_id: Optional[int], pad_id: int,
               multipliers: torch.Tensor, primes: torch.Tensor, inv_primes: torch.Tensor,
               outs: Sequence[torch.Tensor], num_threads: Optional[int] = None) -> None:
    """Write the hash ids of every layer into ``outs`` (no checks beyond dtype/layout asserts).

    ``x``/``raw``: compressed / raw ids ``[B, T]`` int64 contiguous (``raw`` is read only when
    ``eos_id`` is not None, which switches the document-boundary reset on); ``multipliers [L, N]``,
    ``primes [L, (N-1)*K]`` int64 and ``inv_primes`` (float64 ``1/primes``) contiguous; ``outs``: L
    contiguous int64 ``[B, T, (N-1)*K]`` tensors.  All on the CPU.
    """
    lib = _require(library())
    B, T = x.shape
    L, N = multipliers.shape
    H = primes.shape[1]
    K = H // (N - 1)
    for t, dtype in ((x, torch.int64), (raw, torch.int64), (multipliers, torch.int64), (primes, torch.int64),
                     (inv_primes, torch.float64)):
        assert t.dtype == dtype and t.is_contiguous() and t.device.type == "cpu"
    assert len(outs) == L and all(o.is_contiguous() and o.dtype == torch.int64 and o.shape == (B, T, H)
                                  for o in outs)
    out_ptrs = (ctypes.c_void_p * L)(*[o.data_ptr() for o in outs])
    args = (x.data_ptr(), raw.data_ptr(), int(eos_id if eos_id is not None else -1), int(eos_id is not None), T)
    tail = (int(pad_id), L, N, K, multipliers.data_ptr(), primes.data_ptr(), inv_primes.data_ptr(), out_ptrs)
    total = B * T
    threads = max(1, min(num_threads or torch.get_num_threads(), total // MIN_TOKENS_PER_THREAD))
    if threads == 1:
        lib.engram_ngram_hash(*args, 0, total, *tail)
        return
    bounds = [total * i // threads for i in range(threads + 1)]
    futures = [_executor(threads).submit(lib.engram_ngram_hash, *args, bounds[i], bounds[i + 1], *tail)
               for i in range(threads)]
    for f in futures:
        f.result()


def floor_mod(x: torch.Tensor, p: int) -> torch.Tensor:
    """``x mod p`` (floor semantics) by the kernel's division-free modulo; for exactness tests."""
    lib = _require(library())
    if not 2 <= p < MAX_TABLE_SIZE:
        raise ValueError(f"p={p}: the kernel's modulo is exact for 2 <= p < 2**40")
    x = x.to(torch.int64).contiguous()
    out = torch.empty_like(x)
    lib.engram_floor_mod(x.data_ptr(), x.numel(), int(p), 1.0 / p, out.data_ptr())
    return out


__all__: List[str] = ["MAX_TABLE_SIZE", "available", "cache_dir", "floor_mod", "library", "ngram_hash",
                      "unavailable_reason"]
