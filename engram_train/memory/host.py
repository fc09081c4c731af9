"""Host-resident tables: the rows of the next micro-batch are gathered while this one computes.

With ``engram.residency=host`` a shard's rows and optimizer state live in host
RAM.  Engram addresses depend only on token ids, so the loader's hash ids of
micro-batch ``i+1`` are known while ``i`` runs.  The prefetch is a stage of the
data pipeline (:class:`PrefetchStage`, composed onto the loader where the
trainer builds it): when micro-batch ``i`` is taken, the stage submits ``i+1``
(up to ``engram.prefetch_depth`` ahead) to :class:`HostPrefetcher`, and hands
out ``i`` with its rows attached (``batch[ENGRAM_ROWS]``, a
:class:`PrefetchedRows`).  The rows travel with the batch to the forward, where
each Engram layer gives its block to its table.  The prefetcher's worker thread,
per Engram layer,

1. plans the lookup (``exchange.plan``): sorted unique ids and the inverse
   index; under ``engram.partition=all`` the requests go to the rows' owners
   (an all-to-all of ids on a process group of the prefetcher's own), under
   ``tp`` each rank keeps the rows it owns,
2. gathers the rows this rank serves from the host table in one batched
   ``index_select`` (into pinned staging memory on CUDA),
3. copies the row block to the compute device in one transfer (on a separate
   CUDA stream, ordered by an event; a host copy on CPU, so the CPU runs the
   same pipeline).

The forward then only finishes the lookup (``exchange.finish``: ``rows[inverse]``,
plus the all-reduce of ``tp`` or the all-to-all of rows of ``all``), and its
backward hands ``(unique ids, summed gradient rows)`` to the owning shard, the
same sparse path as device tables.

The host table step (``sparse_adam`` on the touched rows) is ordered by the same
worker thread, overlapped with the trainer until the next forward's first
Engram layer needs rows; the worker splits it into disjoint blocks of rows that
``engram.host_threads`` threads update (bit for bit the one-thread result).  Read
after write (``engram.staleness=0``, the default, exact): gathers and table steps run in submission order on that one
thread, so a gather submitted after a step reads updated rows, and a block
gathered before it has the rows the step changed re-read by the step itself
before its micro-batch may run (:meth:`HostPrefetcher._refresh`; under ``all``
the owner re-reads the rows it serves).  Where replicas of a node share one
copy, the owner's step runs on the trainer's thread, then a barrier, then
every rank's refresh.  With ``engram.staleness=1`` the refresh is skipped:
rows gathered ahead are used as gathered, up to one step stale (the lock-free
behaviour of public speed-runs), documented as such.

Lookups outside the pipeline (evaluation) take the same path synchronously,
queued behind the prefetches already submitted, so that every rank plans its
collectives in the same order.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Deque, Dict, Iterator, List, Optional

import torch

from engram_train.data.batch import ENGRAM_ROWS, HASH_IDS
from engram_train.memory.exchange import Plan


@dataclass
class RowBlock:
    """One layer's lookup of one micro-batch, planned and read ahead."""

    uniq: torch.Tensor          # sorted unique global ids of the rows read (host): what a refresh patches
    rows: torch.Tensor          # [U, d] the rows read (compute device)
    plan: Plan                  # the exchange's plan (compute device): ``exchange.finish(shard, plan, rows)``
    num_ids: int                # ids looked up (checks the block belongs to the micro-batch asking)
    staging: Optional[object] = None   # pinned host memory, kept alive until its copy is done
    ready: Optional[object] = None     # CUDA event recorded after the copies


class PrefetchStats:
    """What the pipeline did since the last :meth:`pop`: the trainer pops it on log steps
    (:meth:`PrefetchStage.window_metrics`), so a log line sums the steps since the previous one
    (the window of its ``tokens_per_s``)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self):
        self.wait_s = 0.0          # main thread waiting for a block that was not ready
        self.update_wait_s = 0.0   # ... and for the table step it must see (the optimizer's lag)
        self.rows = 0              # unique rows fetched
        self.ids = 0               # looked-up ids (rows / ids = unique-row ratio)
        self.h2d_bytes = 0         # bytes copied host -> compute device
        self.refreshed = 0         # rows re-read after an update (read after write)
        # CPU seconds of the worker thread (what tools/plan_offload.py predicts; CPU time, so that other
        # processes on the machine do not count): planning, gathering and copying row blocks, and table
        # steps with their refresh of the blocks read ahead (plus the step pool's threads' seconds).
        self.gather_cpu_s = 0.0
        self.update_cpu_s = 0.0
        # Table steps finished (and counted in update_cpu_s): a step that ends after its log line counts in
        # the next one, so seconds per table step are update_cpu_s / table_steps, line by line.
        self.table_steps = 0

    def add(self, **kw):
        with self._lock:
            for k, v in kw.items():
                setattr(self, k, getattr(self, k) + v)

    def pop(self) -> Dict[str, float]:
        with self._lock:
            out = {"engram_prefetch/wait_s": self.wait_s, "engram_prefetch/update_wait_s": self.update_wait_s,
                   "engram_prefetch/rows": float(self.rows),
                   "engram_prefetch/unique_ratio": self.rows / self.ids if self.ids else 0.0,
                   "engram_prefetch/h2d_bytes": float(self.h2d_bytes),
                   "engram_prefetch/refreshed_rows": float(self.refreshed),
                   "engram_prefetch/gather_cpu_s": self.gather_cpu_s,
                   "engram_prefetch/update_cpu_s": self.update_cpu_s,
                   "engram_prefetch/table_steps": float(self.table_steps)}
            self.reset()
        return out


@dataclass
class _Job:
    """One micro-batch in the pipeline: its gather, and the table steps it must see (read after write)."""

    gather: Future
    after: list


class PrefetchedRows:
    """The rows of one micro-batch's lookups, gathered ahead: what travels in ``batch[ENGRAM_ROWS]``.

    ``get(layer_id)`` hands out one layer's :class:`RowBlock`, once.  The first call waits for the
    gather and for every table step the micro-batch must see (read after write), so the wait
    falls at the first Engram layer of the forward, not when the batch is taken.
    """

    def __init__(self, prefetcher: "HostPrefetcher", job: _Job):
        self._prefetcher = prefetcher
        self._job: Optional[_Job] = job
        self._blocks: Dict[int, RowBlock] = {}

    def get(self, layer_id: int) -> Optional[RowBlock]:
        if self._job is not None:
            job, self._job = self._job, None
            self._blocks = self._prefetcher.wait(job)
        return self._blocks.pop(layer_id, None)


class HostPrefetcher:
    """Gathers row blocks of submitted micro-batches, and runs host table steps, on one worker thread.

    One thread for both keeps them in submission order, which makes reads after writes exact by
    construction: a gather submitted after a table step runs after it; a gather submitted before
    it is patched by it (:meth:`_refresh`) before its micro-batch may use it.  The table step
    itself overlaps the trainer's work until the first Engram layer of the next forward needs rows
    (:meth:`take` waits there, counted as ``engram_prefetch/update_wait_s``).
    """

    def __init__(self, store, staleness: int = 0, host_threads: int = 1):
        self.store = store
        self.staleness = staleness
        self.device = store.device
        self.cuda = self.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engram-host-tables")
        # The table step's row blocks (engram.host_threads; TableSparseAdam.step): the worker above hands
        # them out and waits, so steps stay in submission order with the gathers.  One thread: no pool,
        # the worker runs the blocks itself, one after another (no hand-off to pay for).
        self.step_pool = (ThreadPoolExecutor(max_workers=host_threads, thread_name_prefix="engram-host-step")
                          if host_threads > 1 else None)
        self.pending: Deque[_Job] = collections.deque()
        self.last_update: Optional[Future] = None
        self.stats = PrefetchStats()
        self._offsets = {l: torch.tensor(s.spec.offsets, dtype=torch.int64) for l, s in store.shards.items()}

    # -- worker side ------------------------------------------------------------------------------
    def _gather(self, hash_ids: Dict[int, torch.Tensor]) -> Dict[int, RowBlock]:
        return self.gather_timed(hash_ids)[0]

    def gather_timed(self, hash_ids: Dict[int, torch.Tensor]):
        """One micro-batch's row blocks planned, gathered and copied on the calling thread, by the code the
        worker runs for every prefetch: ``(blocks, CPU seconds)``.  Its counts (``engram_prefetch/rows``,
        ``ids``, ``h2d_bytes``, ``gather_cpu_s``) go into the stats in one update, so a log line never holds
        part of a gather.  ``hash_ids``: ``{layer id: hash ids}`` as the loader
        gives them (``batch[HASH_IDS]``).  For measuring the host pipeline (``tools/plan_offload.py
        --calibrate``); training goes through :meth:`submit`."""
        t0 = time.thread_time()
        blocks = {}
        counts = {"rows": 0, "ids": 0, "h2d_bytes": 0}
        for layer_id, h in hash_ids.items():
            shard = self.store.shards[layer_id]
            ids = (h.to("cpu", torch.int64) + self._offsets[layer_id]).reshape(-1)
            local, plan = shard.exchange.plan(shard, ids)
            if self.cuda:
                staging = torch.empty(local.numel(), shard.embed_dim, dtype=shard.weight.dtype, pin_memory=True)
                torch.index_select(shard.weight, 0, local, out=staging)
                pinned = plan.map(torch.Tensor.pin_memory)
                with torch.cuda.stream(self.copy_stream):
                    rows = staging.to(self.device, non_blocking=True)
                    plan_dev = pinned.map(lambda t: t.to(self.device, non_blocking=True))
                    ready = torch.cuda.Event()
                    ready.record(self.copy_stream)
                block = RowBlock(local + shard.lo, rows, plan_dev, ids.numel(), staging=(staging, pinned), ready=ready)
            else:
                # The CPU runs the same pipeline: a host-to-host copy stands in for the device copy.
                rows = shard.weight.index_select(0, local).to(self.device, copy=True)
                block = RowBlock(local + shard.lo, rows, plan.map(lambda t: t.to(self.device, non_blocking=True)),
                                 ids.numel())
            blocks[layer_id] = block
            index_bytes = sum(t.numel() * t.element_size() for t in plan.tensors())
            counts["rows"] += plan.num_unique
            counts["ids"] += ids.numel()
            counts["h2d_bytes"] += rows.numel() * rows.element_size() + index_bytes
        cpu_s = time.thread_time() - t0
        self.stats.add(gather_cpu_s=cpu_s, **counts)
        return blocks, cpu_s

    def table_step_timed(self, apply, updated: Dict[int, torch.Tensor], ahead=()) -> float:
        """A table step as the worker runs it, on the calling thread: ``apply()`` (the optimizer's step
        of the rows ``updated``, ``{layer id: local row ids}``), then the re-read of those rows in the
        blocks gathered ahead (``ahead``: ``{layer id: RowBlock}`` dicts, as :meth:`gather_timed` returns
        them; none under ``staleness=1``).  Returns its CPU seconds on every thread it ran on, this one
        and ``engram.host_threads``' step pool: what ``engram_prefetch/update_cpu_s`` adds up.  The
        worker runs every table step of training through it (:meth:`submit_update`)."""
        t0 = time.thread_time()
        apply()
        self._refresh(ahead, updated)
        return time.thread_time() - t0 + self._take_pool_cpu_s()

    def _refresh(self, ahead, updated: Dict[int, torch.Tensor]) -> None:
        """Re-read, in the blocks ``ahead`` (``{layer id: RowBlock}`` dicts), the rows a table step updated
        (local host ids)."""
        if self.staleness:
            return
        for blocks in ahead:
            for layer_id, local in updated.items():
                b = blocks.get(layer_id)
                if b is None or local.numel() == 0 or b.uniq.numel() == 0:
                    continue
                shard = self.store.shards[layer_id]
                local = local.to("cpu")
                glob = local + shard.lo
                pos = torch.searchsorted(b.uniq, glob).clamp_(max=b.uniq.numel() - 1)
                hit = b.uniq[pos] == glob
                if bool(hit.any()):
                    fresh = shard.weight.index_select(0, local[hit])
                    if self.cuda:
                        torch.cuda.current_stream(self.device).wait_event(b.ready)
                    b.rows[pos[hit].to(b.rows.device)] = fresh.to(b.rows.device)
                    self.stats.add(refreshed=int(hit.sum()))

    # -- trainer side -----------------------------------------------------------------------------
    def submit(self, hash_ids: Dict[int, torch.Tensor]) -> None:
        self.pending.append(_Job(self.pool.submit(self._gather, hash_ids), []))

    def advance(self) -> PrefetchedRows:
        """The oldest submitted micro-batch is the next one to run: its rows, waited for at first use.

        From here on no table step patches them: every step submitted later belongs to a later
        optimizer step than this micro-batch.
        """
        return PrefetchedRows(self, self.pending.popleft())

    def wait(self, job: _Job) -> Dict[int, RowBlock]:
        """The blocks of ``job`` once gathered and patched by the table steps it must see."""
        t0 = time.perf_counter()
        blocks = job.gather.result()
        t1 = time.perf_counter()
        for update in job.after:
            update.result()
        self.stats.add(wait_s=t1 - t0, update_wait_s=time.perf_counter() - t1)
        return self._ready(blocks)

    def _ready(self, blocks: Dict[int, RowBlock]) -> Dict[int, RowBlock]:
        """The blocks, usable on the compute stream (CUDA: ordered after their copies)."""
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            for b in blocks.values():
                compute.wait_event(b.ready)
                # Allocated on the copy stream, used on this one: keep the allocator from reusing them early.
                for t in (b.rows, *b.plan.tensors()):
                    t.record_stream(compute)
        return dict(blocks)

    def lookup_now(self, layer_id: int, hash_ids: torch.Tensor) -> RowBlock:
        """A lookup outside the pipeline (evaluation): planned and read on the worker thread after
        every prefetch and table step already submitted (the same collective order on every rank)."""
        block = self.pool.submit(self._gather, {layer_id: hash_ids})
        return self._ready(block.result())[layer_id]

    def submit_update(self, apply, updated: Dict[int, torch.Tensor]) -> None:
        """Run ``apply()`` (a table step changing the rows ``updated``) on the worker, overlapped; every
        micro-batch already submitted sees it before it runs."""
        jobs = list(self.pending)

        def update():
            # The gathers of ``jobs`` were submitted to this thread before: done by now, in order.
            self.stats.add(update_cpu_s=self.table_step_timed(apply, updated, [j.gather.result() for j in jobs]),
                           table_steps=1)

        fut = self.pool.submit(update)
        if not self.staleness:   # lock-free: blocks gathered ahead are copies, used without waiting
            for job in jobs:
                job.after.append(fut)
        self.last_update = fut

    def refresh(self, updated: Dict[int, torch.Tensor]) -> None:
        """After a table step applied on the calling thread: patch the micro-batches gathered ahead."""
        self._refresh((job.gather.result() for job in list(self.pending)), updated)   # lazy: none under staleness=1

    def wait_updates(self) -> None:
        """Block until the last table step submitted has been applied (before reading rows directly)."""
        if self.last_update is not None:
            self.last_update.result()

    def _take_pool_cpu_s(self) -> float:
        total = 0.0
        for shard in self.store.shards.values():
            opt = shard.optimizer
            if getattr(opt, "pool", None) is not None:   # written by this worker thread only
                total, opt.pool_cpu_s = total + opt.pool_cpu_s, 0.0
        return total

    def close(self, cancel: bool = False) -> None:
        """Stop the worker once its current job ends; ``cancel``: drop the jobs not yet started (after an
        error), else run them first."""
        self.pool.shutdown(wait=True, cancel_futures=cancel)
        if self.step_pool is not None:
            self.step_pool.shutdown(wait=True, cancel_futures=cancel)


class PrefetchingIterator:
    """The training iterator, ``depth`` micro-batches ahead: each batch comes with its rows gathered
    (``batch[ENGRAM_ROWS]``, a :class:`PrefetchedRows`; the batch is a shallow copy)."""

    def __init__(self, batches: Iterator[dict], prefetcher: HostPrefetcher, depth: int = 1):
        self.batches = batches
        self.prefetcher = prefetcher
        self.depth = depth
        self.ahead: Deque[dict] = collections.deque()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        while len(self.ahead) < self.depth + 1:
            try:
                batch = next(self.batches)
            except StopIteration:
                if not self.ahead:
                    raise
                break
            self.prefetcher.submit(batch[HASH_IDS])
            self.ahead.append(batch)
        batch = dict(self.ahead.popleft())
        batch[ENGRAM_ROWS] = self.prefetcher.advance()
        return batch


class PrefetchStage:
    """The host prefetch as a stage of the data pipeline: ``stage(batches)`` is the loader's
    iterator with every batch's rows gathered ahead; :meth:`window_metrics` are the pipeline's
    figures since the last call (``engram_prefetch/*``, for the log line)."""

    def __init__(self, prefetcher: HostPrefetcher, depth: int):
        self.prefetcher = prefetcher
        self.depth = depth

    def __call__(self, batches: Iterator[dict]) -> PrefetchingIterator:
        return PrefetchingIterator(batches, self.prefetcher, self.depth)

    def window_metrics(self) -> Dict[str, float]:
        return self.prefetcher.stats.pop()


def batch_stages(store, engram_cfg) -> List[PrefetchStage]:
    """The data-pipeline stages the table store needs (``build_train_loader(stages=...)``): the
    host prefetch for host-resident tables, none otherwise (or without a store)."""
    if store is None or store.prefetcher is None:
        return []
    return [PrefetchStage(store.prefetcher, engram_cfg.prefetch_depth)]
