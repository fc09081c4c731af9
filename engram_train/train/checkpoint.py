"""Atomic, durable, resumable checkpoints: one ``torch.distributed.checkpoint`` (DCP) save of the run's state.

Layout of ``<run.dir>/checkpoints``::

    latest                      text file naming the newest complete checkpoint
    step_00000100/
        meta.json               human-readable: step, consumed samples, world size, the run's extra metadata
                                (loss, data fingerprint) and the tables' manifest; written last (its
                                presence marks a complete checkpoint)
        .metadata               DCP's index: every key's global shape and where its chunks lie
        __<rank>_<n>.distcp     what each rank wrote

Everything but ``meta.json`` is one ``dcp.save`` of four DCP ``Stateful`` components (``_components``),
each under its own key prefix:

    dense.        DeepSpeed's parameters: fp32 weights, Adam moments and step, in global (TP=1, EP=1)
                  shapes (``engram_train.parallel.dense_checkpoint.DenseState``)
    tables.       the Engram table store: rows and their optimizer state in global shapes
                  (``TableStore.state_dict``, format in ``engram_train.memory.checkpoint``)
    train_state.  ``TrainState`` below
    rng.rank_<r>  each rank's RNG states (torch, numpy, python, megatron's tracker), pickled

Each rank writes what it owns (a replicated tensor once), nothing is gathered whole, every tensor is
written in chunks of at most ``BLOCK_BYTES`` of whole rows (``_save_planner``), and it loads at any
other layout (TP, EP, DP, ``engram.partition``, host or device tables, number of ranks).  RNG states
are per rank and restored when the number of ranks is the same (they only feed dropout; a resharded
run keeps its seeded ones).  Loading is one ``dcp.load`` of the same components.

Checkpoints of the earlier layout (``dense/`` and ``tables/``, each its own DCP directory with the
same keys without the prefix, ``tables/manifest.json`` and ``rng/rank_<r>.pt`` beside
``meta.json``) still load, by the same components (``engram_train.train.checkpoint_legacy``); this
code writes the layout above only.

Commit protocol (a crash or power loss at any point leaves the previous ``latest`` intact and loadable):
* everything is written into ``step_N.partial``; every file is fsynced by its writer before the
  exchange of outcomes that ends the write phase (DCP's ``FileSystemWriter(sync_files=True)`` its
  data files and ``.metadata``, ``_write_durably`` ``meta.json``);
* rank 0 then writes ``meta.json``, fsyncs every directory of the checkpoint bottom-up, renames
  ``step_N.partial -> step_N`` and fsyncs the checkpoints root, so the new name is durable;
* only then is ``latest`` replaced atomically (tmp + fsync + ``os.replace`` + fsync of the root).
  ``fsync_file`` and ``fsync_dir`` below do all of the syncing.

A write that fails (ENOSPC, EDQUOT, EIO, EROFS, on any rank) ends the save on every rank together:
after each phase the ranks exchange their outcome (this replaces the barriers), rank 0 removes
``step_N.partial``, ``latest`` keeps naming the previous checkpoint, and every rank raises
``CheckpointWriteError`` naming the rank, the directory, its free space and the approximate size
of a checkpoint.  Before writing, the save refuses when the free space is clearly short of that size.

Rotation (``trainer.keep_last``) counts good checkpoints only: one written while the run was in a
row of non-finite steps (``meta.json``: ``nonfinite_streak > 0``) does not count, and the newest
checkpoint from before the run's first non-finite step is never deleted (``_prune``).

Loading tries the checkpoint ``latest`` names, then each older complete one, newest first: a
checkpoint that fails to load (truncated or missing file, I/O error) is skipped with a warning.
Every rank takes part in each decision (a failure on one rank makes all ranks fall back), so all
ranks always load the same step.  A checkpoint that cannot belong to this run's configuration
(world size, data fingerprint, Engram tables) is a user error and raised, never skipped.

The learning rate is a function of the step and the data position is ``consumed_samples``
(``TrainState``), so neither needs state of its own.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

from engram_train.config.schema import ConfigError
from engram_train.errors import UserError

log = logging.getLogger(__name__)

LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d+)$")


@dataclass
class TrainState:
    """The loop's position, the ``train_state`` component of a checkpoint (a DCP ``Stateful``)."""

    step: int = 0                 # optimizer steps completed
    consumed_samples: int = 0     # global samples consumed by those steps
    # The non-finite guard's record (engram_train.train.guard), kept across resumes:
    skipped_steps: int = 0        # steps whose update was dropped (non-finite loss or gradient norm)
    nonfinite_streak: int = 0     # of those, how many in a row up to ``step``
    first_nonfinite_step: Optional[int] = None

    def state_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        unknown = sorted(set(state_dict) - {f.name for f in fields(self)})
        if unknown:   # a checkpoint of another version, or another component's state: never set silently
            raise ValueError(f"train_state: unknown keys {unknown}; TrainState has "
                             f"{[f.name for f in fields(self)]}")
        for key, value in state_dict.items():
            setattr(self, key, value)


class IncompatibleCheckpoint(UserError, RuntimeError):
    """The checkpoint cannot belong to this run's configuration: a user error, never a reason to fall back."""


class CheckpointError(UserError, RuntimeError):
    """No checkpoint could be loaded although the run directory holds some."""


class CheckpointWriteError(UserError, RuntimeError):
    """A checkpoint could not be written (full disk, quota, I/O error, read-only filesystem); nothing changed."""


# The write failures a user fixes on the filesystem: anything else is a bug and keeps its traceback.
DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EIO: "I/O error", errno.EROFS: "read-only filesystem"}


class _LoadFailed(Exception):
    """The checkpoint is damaged or unreadable (on at least one rank, for all ranks): try an older one."""


def _barrier():
    if dist.is_initialized():
        dist.barrier()


# -- durability ---------------------------------------------------------------------------------
def fsync_file(path: str) -> None:
    """Flush ``path``'s data and metadata to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Make the entries created in (or renamed into) directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dirs_bottom_up(top: str) -> None:
    # Children first: a parent's fsync only covers its own entries, not what they contain.
    for dirpath, _, _ in os.walk(top, topdown=False):
        fsync_dir(dirpath)


def _write_durably(path: str, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write ``path`` through a temporary file that is fsynced before it takes the name
    (the directory entry is made durable by the caller's ``fsync_dir``)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, mode) as f:
        write(f)
    fsync_file(tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: str, text: str) -> None:
    _write_durably(path, lambda f: f.write(text), mode="w")
    fsync_dir(os.path.dirname(path) or ".")


def _free_bytes(path: str) -> int:
    """Free bytes for this user on the filesystem of ``path`` (or of its nearest existing parent)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


def _tree_bytes(top: str) -> int:
    total = 0
    for dirpath, _, files in os.walk(top):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                pass
    return total


def _size(n: float) -> str:
    unit = "B"
    for bigger in ("KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024:
            break
        n, unit = n / 1024, bigger
    return f"{n:.0f} B" if unit == "B" else f"{n:.1f} {unit}"


def _disk_errno(e: BaseException) -> Optional[int]:
    """The filesystem errno (``DISK_ERRNOS``) behind ``e``, if any: DCP wraps each rank's failure in a
    ``CheckpointException``, and an error may carry the ``OSError`` as its cause or context."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in DISK_ERRNOS:
            return x.errno
        failures = getattr(x, "failures", None)
        if isinstance(failures, dict):
            todo += [f[0] if isinstance(f, tuple) else f for f in failures.values()]
        todo += [x.__cause__, x.__context__]
    return None


# -- RNG ----------------------------------------------------------------------------------------
def _rng_state() -> Dict[str, Any]:
    from megatron.core import tensor_parallel

    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, Any]) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class _RankRng:
    """This rank's RNG states under a key of its own (``rank_<r>``), as a DCP ``Stateful``: per-rank state
    has no global shape, so it is one pickled value (torchtitan keeps its per-rank data loader state so)."""

    def __init__(self, rank: int):
        self.key = f"rank_{rank:05d}"

    def state_dict(self) -> Dict[str, Any]:
        buf = io.BytesIO()
        torch.save(_rng_state(), buf)
        return {self.key: buf.getvalue()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        _set_rng_state(torch.load(io.BytesIO(state_dict[self.key]), weights_only=False))


# -- one save of every component ----------------------------------------------------------------
BLOCK_BYTES = 4 << 20


def _save_planner():
    import dataclasses
    import math

    from torch.distributed.checkpoint import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex
    from torch.distributed.checkpoint.planner import TensorWriteData, WriteItemType
    from torch.distributed.tensor import DTensor

    class RowBlockSavePlanner(DefaultSavePlanner):
        """DCP's default save plan with every tensor chunk of more than ``BLOCK_BYTES`` split into blocks
        of whole rows.  DCP reads a saved chunk whole before copying the part a rank needs, so a chunk as
        large as a rank's whole table shard (4 GB for one tensor of ``experiment=host_1b_cpu``) would cost
        that much extra memory at every resume.  Small blocks also bound what saving holds: DCP's writer
        copies each block (a view of a larger tensor) and keeps the last copy of every key until the
        rank's file is complete, and the allocator keeps freed blocks of a few MiB for reuse: about one
        block per key (measured: +40 MB saving 800 MB of table rows in 4 MiB blocks, +330 MB in 64 MiB
        blocks).  The chunking is DCP metadata only: keys and global shapes do not change, and a
        checkpoint written in any chunking loads at any layout."""

        def create_local_plan(self):
            plan = super().create_local_plan()
            # (fqn, global offsets) of a block -> (its rows, the first global row of the chunk it splits)
            self._blocks: Dict[Any, Any] = {}
            items = []
            for item in plan.items:
                td = item.tensor_data
                if td is None or len(td.chunk.sizes) == 0:
                    items.append(item)
                    continue
                rows = td.chunk.sizes[0]
                row_bytes = math.prod(td.chunk.sizes[1:]) * td.properties.dtype.itemsize
                per_block = max(1, BLOCK_BYTES // max(1, row_bytes))
                if rows <= per_block:
                    items.append(item)
                    continue
                for r0 in range(0, rows, per_block):
                    n = min(per_block, rows - r0)
                    offsets = torch.Size([td.chunk.offsets[0] + r0, *td.chunk.offsets[1:]])
                    sizes = torch.Size([n, *td.chunk.sizes[1:]])
                    index = MetadataIndex(item.index.fqn, offsets)
                    self._blocks[(index.fqn, offsets)] = (n, td.chunk.offsets[0])
                    items.append(dataclasses.replace(
                        item, index=index, type=WriteItemType.SHARD,
                        tensor_data=TensorWriteData(chunk=ChunkStorageMetadata(offsets=offsets, sizes=sizes),
                                                    properties=td.properties, size=td.size)))
            self.plan = dataclasses.replace(plan, items=items)
            return self.plan

        def lookup_object(self, index):
            block = self._blocks.get((index.fqn, index.offset))
            if block is None:
                return super().lookup_object(index)
            rows, first_row = block
            obj = self.state_dict[index.fqn]
            local = obj.to_local() if isinstance(obj, DTensor) else obj
            return local.narrow(0, index.offset[0] - first_row, rows)

    return RowBlockSavePlanner()


def save_state(components: Dict[str, Any], path: str) -> None:
    """One ``dcp.save`` of ``components`` (``Stateful``s or state dicts) into directory ``path``, in row
    blocks (collective over all ranks)."""
    import torch.distributed.checkpoint as dcp

    # sync_files: every data file and .metadata is fsynced (the commit protocol counts on it)
    dcp.save(components, storage_writer=dcp.FileSystemWriter(path, sync_files=True), planner=_save_planner())


# -- load helpers -------------------------------------------------------------------------------
def _one_line(e: BaseException, limit: int = 300, what: str = "") -> str:
    """``Type: message`` on one line; for DCP's CheckpointException the first underlying failure,
    after ``what`` (the DCP directory that was read: DCP's own message names no file)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank = min(failures)
        wrapped = failures[rank]
        inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        where = f"{what} (torch.distributed.checkpoint, rank {rank})" if what else \
            f"torch.distributed.checkpoint, rank {rank}"
        return f"{where}: {_one_line(inner, limit)}"
    text = " ".join(str(e).split())
    if len(text) > limit:
        text = text[:limit] + "..."
    return text if isinstance(e, _LoadFailed) else f"{type(e).__name__}: {text}"


def _read_file(path: str, what: str, read: Callable[[str], Any]) -> Any:
    """``read(path)``, with a failure that names the file (``what``, relative to the checkpoint)."""
    try:
        return read(path)
    except _fatal_errors():
        raise
    except Exception as e:
        raise _LoadFailed(f"{what}: {_one_line(e)}") from e


def _read_json(path: str) -> Any:
    with open(path) as f:
        return json.load(f)


def _read_meta(path: str) -> Dict[str, Any]:
    meta = _read_json(path)
    missing = [k for k in ("step", "consumed_samples", "world_size") if k not in meta]
    if missing:
        raise ValueError(f"no {', '.join(missing)}")
    return meta


def _fatal_errors() -> Tuple[type, ...]:
    # Raised as they are: the configuration does not fit (user error), or the machine ran out of
    # memory, which says nothing about the checkpoint (an older one would not fare better).
    return (IncompatibleCheckpoint, ConfigError, MemoryError, torch.OutOfMemoryError)


def _load_failures() -> Tuple[type, ...]:
    from torch.distributed.checkpoint.api import CheckpointException   # a BaseException, not an Exception

    return (Exception, CheckpointException)


class Checkpointer:
    def __init__(self, root: str, keep_last: int = 2):
        self.root = root
        self.keep_last = keep_last
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self._failed: set = set()   # checkpoints that failed to load in this process: never kept by _prune

    # -- discovery ------------------------------------------------------------------------------
    def _complete(self, name: str) -> bool:
        return bool(_STEP_DIR.match(name)) and os.path.isfile(os.path.join(self.root, name, "meta.json"))

    def _step_names(self) -> List[str]:
        """Every ``step_N`` directory (complete or not), oldest first."""
        if not os.path.isdir(self.root):
            return []
        names = [n for n in os.listdir(self.root) if _STEP_DIR.match(n)]
        return sorted(names, key=lambda n: int(_STEP_DIR.match(n).group(1)))

    def _latest_name(self) -> Optional[str]:
        path = os.path.join(self.root, LATEST)
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            return f.read().strip()

    def candidates(self) -> List[str]:
        """Complete checkpoints to try, best first: the one ``latest`` names, then the older
        complete ones, newest first.  Newer directories than ``latest`` were never committed."""
        complete = [n for n in reversed(self._step_names()) if self._complete(n)]
        name = self._latest_name()
        if name is not None:
            if self._complete(name):
                step = int(_STEP_DIR.match(name).group(1))
                older = [n for n in complete if int(_STEP_DIR.match(n).group(1)) < step]
                return [os.path.join(self.root, n) for n in [name] + older]
            log.warning("%s names %r, which is incomplete or missing; looking for another",
                        os.path.join(self.root, LATEST), name)
        return [os.path.join(self.root, n) for n in complete]

    def latest_dir(self) -> Optional[str]:
        """The newest complete checkpoint: the one ``latest`` names, else the newest complete step dir."""
        found = self.candidates()
        return found[0] if found else None

    # -- save -----------------------------------------------------------------------------------
    def _components(self, engine, state: TrainState, table_store, rng: bool = True) -> Dict[str, Any]:
        """The checkpoint's ``Stateful`` components (module docstring), saved and loaded in one DCP call."""
        from engram_train.parallel.dense_checkpoint import DenseState

        out: Dict[str, Any] = {"dense": DenseState(engine), "train_state": state}
        if table_store is not None:
            out["tables"] = table_store
        if rng:
            out["rng"] = _RankRng(self.rank)
        return out

    def save(self, engine, state: TrainState, extra: Optional[Dict[str, Any]] = None, table_store=None) -> str:
        t0 = time.time()
        name = f"step_{state.step:08d}"
        final, partial = os.path.join(self.root, name), os.path.join(self.root, name + ".partial")
        need = self._bytes_needed(engine, table_store)

        def begin():
            if self.rank != 0:
                return
            if not os.path.isdir(self.root):
                os.makedirs(self.root)
                fsync_dir(os.path.dirname(os.path.abspath(self.root)))
            shutil.rmtree(partial, ignore_errors=True)
            free = _free_bytes(self.root)
            if free < need:
                raise OSError(errno.ENOSPC, "refused before writing, the free space is short of a checkpoint")
            os.makedirs(partial)

        def write():
            # collective: every rank writes (and fsyncs) what it owns
            save_state(self._components(engine, state, table_store), partial)

        def commit():
            if self.rank != 0:
                return
            meta = {**asdict(state), "world_size": self.world, "time": time.time(), **(extra or {})}
            if table_store is not None:
                from engram_train.memory.checkpoint import manifest

                meta["tables"] = manifest(table_store)
            _write_durably(os.path.join(partial, "meta.json"), lambda f: f.write(json.dumps(meta, indent=2)),
                           mode="w")
            _fsync_dirs_bottom_up(partial)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(partial, final)
            fsync_dir(self.root)
            _atomic_write_text(os.path.join(self.root, LATEST), name)

        # Each phase ends with every rank's outcome (in place of a barrier): a failure on one rank
        # makes all leave before the next collective, so none waits forever in it.
        self._save_phase(begin, final, need)
        self._save_phase(write, final, need)   # DCP's own collectives agree on its failures too
        # from here every rank's files are on stable storage
        self._save_phase(commit, final, need)
        if self.rank == 0:
            self._failed.discard(final)
            self._prune(keep=name, first_nonfinite_step=state.first_nonfinite_step)
        _barrier()
        log.info("saved checkpoint %s in %.1fs", final, time.time() - t0)
        return final

    def _save_phase(self, phase: Callable[[], None], final: str, need: int) -> None:
        failure, outcome = None, None
        try:
            phase()
        except _load_failures() as e:
            failure = e
            code = _disk_errno(e)
            # DCP's collective write hands every rank the failures of all: name the rank that hit one.
            failures = getattr(e, "failures", None)
            culprit = min(failures) if isinstance(failures, dict) and failures else self.rank
            outcome = (code, _one_line(e, what=os.path.basename(final) + ".partial"), culprit)
        outcomes = self._gather(outcome)
        failed = [(o[2], o[:2]) for o in outcomes if o is not None]
        if not failed:
            return
        if self.rank == 0:
            # Nothing of this checkpoint survives; `latest` still names the previous one.
            shutil.rmtree(final + ".partial", ignore_errors=True)
            if self._latest_name() != os.path.basename(final):
                shutil.rmtree(final, ignore_errors=True)
        rank, (code, reason) = next(((r, o) for r, o in failed if o[0] is not None), failed[0])
        if code is None:   # not a filesystem condition: a bug, with its traceback on the rank that hit it
            if failure is not None:
                raise failure
            raise RuntimeError(f"rank {rank} failed to write checkpoint {final}: {reason}")
        # Rank 0's view (after its clean-up) for every rank: one message, whichever rank prints it.
        free_latest = self._gather((_free_bytes(self.root), self._latest_name()) if self.rank == 0 else None)[0]
        free, latest = free_latest
        fix = ("free space there, lower trainer.keep_last or point run.dir at a larger filesystem"
               if code in (errno.ENOSPC, errno.EDQUOT) else "check the filesystem (or point run.dir elsewhere)")
        raise CheckpointWriteError(
            f"rank {rank} could not write checkpoint {final} ({DISK_ERRNOS[code]}: {reason}); {self.root} has "
            f"{_size(free)} free and a checkpoint needs about {_size(need)}; {fix}, then "
            "relaunch: " + (f"{os.path.join(self.root, LATEST)} still names {latest}, which is complete"
                            if latest else "no earlier checkpoint exists"))

    def _bytes_needed(self, engine, table_store) -> int:
        """About what one checkpoint takes: the newest complete one's size, else the fp32 weights and
        Adam moments of the dense partitions and the tables' rows and optimizer state (the same on every rank)."""
        own = 0
        for group in getattr(engine.optimizer, "single_partition_of_fp32_groups", []):
            own += 3 * group.numel() * group.element_size()
        if table_store is not None:
            n, b = table_store.num_parameters(), table_store.memory_bytes()
            # Replicated rows are written once: this rank's share of the whole table.
            own += (b["weight"] + b["optimizer"]) * n["global"] // max(n["local"], 1) // self.world
        latest = self.latest_dir() if self.rank == 0 else None
        previous = _tree_bytes(latest) if latest else 0
        both = self._gather((own, previous))
        return both[0][1] or sum(o for o, _ in both)

    def _prune(self, keep: str, first_nonfinite_step: Optional[int] = None) -> None:
        # Only checkpoints up to the one just saved count: newer ones belong to work this run redoes
        # (it fell back past them) and are overwritten when it gets there; ones that failed to load
        # must not take the place of the good older ones.  Of those, the newest keep_last good ones
        # stay, and the newest from before the first non-finite step (the one to go back to).
        def step_of(n):
            return int(_STEP_DIR.match(n).group(1))

        limit = step_of(keep)
        names = [n for n in self._step_names() if step_of(n) <= limit
                 and os.path.join(self.root, n) not in self._failed]
        good = [n for n in names if self._good(n)]
        kept = set(good[-self.keep_last:]) | {keep}
        if first_nonfinite_step is not None:
            before = [n for n in good if step_of(n) < first_nonfinite_step]
            if before:
                kept.add(before[-1])
        for n in names:
            if n not in kept:
                shutil.rmtree(os.path.join(self.root, n), ignore_errors=True)

    def _good(self, name: str) -> bool:
        """Complete, and not written in a row of non-finite steps."""
        try:
            with open(os.path.join(self.root, name, "meta.json")) as f:
                return not json.load(f).get("nonfinite_streak", 0)
        except (OSError, ValueError):
            return False

    # -- load -----------------------------------------------------------------------------------
    def _gather(self, obj) -> List[Any]:
        if self.world == 1 or not dist.is_initialized():
            return [obj]
        out: List[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def _agreed_candidates(self) -> List[str]:
        """Rank 0's list for every rank: all ranks must try the same checkpoints in the same order."""
        found = [self.candidates() if self.rank == 0 else None]
        if self.world > 1 and dist.is_initialized():
            dist.broadcast_object_list(found, src=0)
        return found[0]

    def _on_every_rank(self, path: str, fn: Callable[[], Any], what: str = "") -> Any:
        """``fn()`` on every rank, then agree: if it failed on any rank, every rank raises
        ``_LoadFailed`` (so all fall back together); a fatal error on any rank stops every rank.
        ``what``: the part of the checkpoint ``fn`` reads, named in DCP's failures."""
        result, own_fatal, outcome = None, None, None
        try:
            result = fn()
        except _fatal_errors() as e:
            own_fatal, outcome = e, ("fatal", _one_line(e, what=what))
        except _load_failures() as e:
            outcome = ("failed", _one_line(e, what=what))
        outcomes = self._gather(outcome)
        if own_fatal is not None:
            raise own_fatal
        for r, out in enumerate(outcomes):
            if out is not None and out[0] == "fatal":
                raise IncompatibleCheckpoint(f"rank {r} stopped loading checkpoint {path}: {out[1]}")
        by_reason: Dict[str, List[int]] = {}
        for r, out in enumerate(outcomes):
            if out is not None:
                by_reason.setdefault(out[1], []).append(r)
        if by_reason:
            if self.world == 1:
                raise _LoadFailed(next(iter(by_reason)))
            raise _LoadFailed("; ".join(f"rank {','.join(map(str, ranks))}: {reason}"
                                        for reason, ranks in by_reason.items()))
        return result

    def _read(self, engine, path: str, expect: Optional[Dict[str, Any]], table_store) -> Dict[str, Any]:
        """What this rank needs to know of ``path`` before loading (metadata read and checked against the
        run), without touching the run's state."""
        import torch.distributed.checkpoint as dcp

        from engram_train.memory import checkpoint as table_checkpoint
        from engram_train.parallel import dense_checkpoint

        meta = _read_file(os.path.join(path, "meta.json"), "meta.json", _read_meta)
        for key, want in (expect or {}).items():
            if key in meta and meta[key] != want:
                raise IncompatibleCheckpoint(
                    f"checkpoint {path} has {key}={meta[key]!r} but this run has {want!r}; "
                    "use the same data settings, or a new run.dir (or trainer.resume=false)")
        same_world = meta["world_size"] == self.world
        if os.path.isdir(os.path.join(path, "dense")):
            from engram_train.train import checkpoint_legacy

            return checkpoint_legacy.read(self, engine, path, meta, table_store, same_world)
        keys = _read_file(path, ".metadata", lambda p: dcp.FileSystemReader(p).read_metadata().state_dict_metadata)
        # ConfigError (another model, other tables): a user error, not damage.
        dense_checkpoint.check_compatible(engine, keys, path, prefix="dense.")
        if table_store is not None:
            if "tables" not in meta:
                raise ConfigError(f"engram: the checkpoint {path} holds no Engram tables and this run has some; "
                                  "the Engram settings must match the checkpoint's")
            table_checkpoint.check_compatible(table_store, meta["tables"], path)
        rng = f"rng.rank_{self.rank:05d}"
        if same_world and rng not in keys:
            raise _LoadFailed(f".metadata: no {rng}")
        return {"meta": meta, "same_world": same_world, "legacy": None}

    def _load_one(self, engine, path: str, expect, table_store) -> TrainState:
        # Agreed phases, so that no rank enters a collective (DCP's load, the agreement itself) while
        # another has already given up on this checkpoint.  A failure in the load leaves the run's
        # state half-loaded; the next candidate overwrites all of it.
        import torch.distributed.checkpoint as dcp

        found = self._on_every_rank(path, lambda: self._read(engine, path, expect, table_store))
        meta = found["meta"]
        if found["legacy"] is not None:
            from engram_train.train import checkpoint_legacy

            state = checkpoint_legacy.load(self, engine, path, meta, found["legacy"], table_store)
        else:
            state = TrainState()
            components = self._components(engine, state, table_store, rng=found["same_world"])
            self._on_every_rank(path, lambda: dcp.load(components, checkpoint_id=path))
        if not found["same_world"] and self.rank == 0:
            log.info("checkpoint %s was written by %d ranks, this run has %d: resharded; RNG states "
                     "stay as seeded (they only feed dropout)", path, meta["world_size"], self.world)
        return state

    def load(self, engine, path: Optional[str] = None,
             expect: Optional[Dict[str, Any]] = None, table_store=None) -> Optional[TrainState]:
        """Restore model, optimizer, tables and RNG; returns None if there is no checkpoint.

        ``path``: that checkpoint and no other.  Default: the one ``latest`` names, falling back to
        each older complete one in turn if it fails to load (a warning names it and the reason).
        ``expect``: metadata that must match (e.g. the prepared data's fingerprint: a checkpoint
        trained on another tokenization cannot be resumed meaningfully).
        """
        candidates = [path] if path is not None else self._agreed_candidates()
        if not candidates:
            name = self._latest_name()
            if name is not None:
                raise CheckpointError(
                    f"{os.path.join(self.root, LATEST)} names {name!r} but {self.root} holds no complete "
                    "checkpoint; restore the checkpoint directories, or start afresh with a new run.dir "
                    "(or trainer.resume=false)")
            return None
        failures: List[Tuple[str, str]] = []
        for i, cand in enumerate(candidates):
            try:
                state = self._load_one(engine, cand, expect, table_store)
            except _LoadFailed as e:
                self._failed.add(cand)
                failures.append((cand, str(e)))
                if self.rank == 0 and path is None:
                    nxt = (f"falling back to the older checkpoint {candidates[i + 1]}" if i + 1 < len(candidates)
                           else "no older checkpoint to fall back to")
                    log.warning("checkpoint %s failed to load (%s); %s", cand, e, nxt)
                continue
            log.info("resumed from %s (step %d)", cand, state.step)
            return state
        if path is not None:
            raise CheckpointError(f"checkpoint {path} does not load ({failures[0][1]}); restore it, "
                                  "or load another checkpoint")
        tried = " | ".join(f"{os.path.basename(c)}: {reason}" for c, reason in failures)
        raise CheckpointError(
            f"no checkpoint under {self.root} loads ({tried}); restore a good checkpoint there "
            "(or move the damaged step_* directories out), or start afresh with a new run.dir "
            "(or trainer.resume=false)")
