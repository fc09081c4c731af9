"""The training loop and the components it calls.

``Trainer.__init__`` builds everything (parallel groups, data, model, DeepSpeed
engine, checkpointer, logger); ``Trainer.train`` is the loop and fits on a
page.  The model never sees parallelism: ``parallel/`` builds the groups and
the engine.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import asdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist

from engram_train.config.schema import Config
from engram_train.platform.memory import peak_rss_bytes
from engram_train.train.checkpoint import Checkpointer, TrainState
from engram_train.train.evaluate import evaluate, forward_loss, to_device
from engram_train.train import signals
from engram_train.train.guard import LossSpikeDetector, NonFiniteGuard
from engram_train.train.run_lock import RunDirLocked, RunLock
from engram_train.train.metrics import build_logger
from engram_train.train.optimizers import build_optimizers
from engram_train.train.progress import Progress
from engram_train.train.schedule import lr_at

log = logging.getLogger(__name__)


class Trainer:
    def __init__(self, cfg: Config):
        from megatron.core import parallel_state as ps

        from engram_train.data.loader import (build_engram_hasher, build_train_loader, build_valid_batches,
                                              check_vocab)
        from engram_train.data.prepare import PreparedData, prepare_data
        from engram_train.memory.host import batch_stages
        from engram_train.model.gpt import padded_vocab_size
        from engram_train.parallel.parallelize import build_parallel_model
        from engram_train.platform.device import get_device
        from engram_train.parallel.state import init_parallel

        self.cfg = cfg
        # A preemption signal during setup (data, model, checkpoint load) must not kill the rank; it
        # stops the run after its first step instead (the entry point installed this already).
        signals.install()
        init_parallel(cfg.parallel, seed=cfg.trainer.seed)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        cfg.validate(world_size=self.world)
        self.dp_group = ps.get_data_parallel_group()
        self.dp_rank, self.dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        self.device = get_device()
        self.use_bf16 = cfg.trainer.precision == "bf16" or (cfg.trainer.precision == "auto"
                                                             and self.device.type == "cuda")
        self.run_dir = cfg.run.dir
        self.run_lock = self._lock_run_dir(cfg.run.lock_wait_s)

        # Data: rank 0 prepares (idempotent), the others read what it wrote.
        if self.rank == 0:
            self.data = prepare_data(cfg.data)
        dist.barrier()
        if self.rank != 0:
            self.data = PreparedData.load(cfg.data.dir)
        self.hasher = build_engram_hasher(self.data, cfg.engram)

        vocab = cfg.model.vocab_size or padded_vocab_size(
            self.data.tokenizer.vocab_size, cfg.model.make_vocab_size_divisible_by, cfg.parallel.tensor_parallel)
        check_vocab(self.data, vocab)
        self.vocab_size = vocab
        d = cfg.data
        self.grad_accum = d.global_batch_size // (d.micro_batch_size * self.dp_size)
        table_sizes = self.hasher.table_sizes if self.hasher is not None else None
        model, self.table_store = build_parallel_model(
            cfg, vocab, table_sizes, params_dtype=torch.bfloat16 if self.use_bf16 else torch.float32)
        # One step over DeepSpeed's dense parameters and the store's tables: one norm, one clip.
        self.optimizers = build_optimizers(model, cfg, self.dp_size, self.use_bf16, self.table_store)
        self.engine, self.optimizer = self.optimizers.engine, self.optimizers.dense.zero
        self.model = self.engine.module
        # DeepSpeed scales the LM loss by 1/grad_accum in engine.backward; the MoE aux loss enters the
        # graph through megatron's autoscaler, whose gradient scale must match.
        self.model.set_aux_loss_scale(1.0 / self.grad_accum)

        self.checkpointer = Checkpointer(os.path.join(self.run_dir, "checkpoints"), cfg.trainer.keep_last)
        self.state = TrainState()
        if cfg.trainer.resume:
            self.state = self.checkpointer.load(self.engine,
                                                expect={"data_fingerprint": self.data.fingerprint},
                                                table_store=self.table_store) or TrainState()
        self.guard = NonFiniteGuard(cfg.trainer.nonfinite, cfg.trainer.max_skipped_steps, self.checkpointer.latest_dir,
                                    report=self.rank == 0)
        self.spikes = LossSpikeDetector(cfg.trainer.loss_spike_factor, cfg.trainer.loss_spike_window)

        # Stages the components add to the data pipeline (host-resident tables: the next micro-batches'
        # rows, gathered while this one runs, travel with their batch); their figures join the log lines.
        self.batch_stages = batch_stages(self.table_store, cfg.engram)
        self.train_iter = build_train_loader(
            self.data, d, self.hasher, seq_length=d.seq_length, micro_batch_size=d.micro_batch_size,
            global_batch_size=d.global_batch_size, dp_rank=self.dp_rank, dp_size=self.dp_size,
            seed=cfg.trainer.seed, consumed_samples=self.state.consumed_samples,
            max_seq_length=cfg.model.max_seq_length, stages=self.batch_stages)
        self.valid_batches = build_valid_batches(
            self.data, d, self.hasher, seq_length=d.seq_length, micro_batch_size=d.micro_batch_size,
            num_batches=-(-cfg.trainer.eval_iters // self.dp_size), dp_rank=self.dp_rank, dp_size=self.dp_size,
            max_seq_length=cfg.model.max_seq_length)
        self.logger = build_logger(self.run_dir, self.rank, wandb_mode=cfg.run.wandb_mode,
                                   wandb_project=cfg.run.wandb_project, name=cfg.run.name,
                                   config=asdict(cfg), resume_step=self.state.step if self.state.step else None)
        if self.rank == 0:
            counts = self.model.num_parameters()
            if self.table_store is not None:
                counts["engram_tables"] = self.table_store.num_parameters()["global"]
                counts["total"] += counts["engram_tables"]
            log.info("model parameters: %s", {k: f"{v / 1e6:.2f}M" for k, v in counts.items()})
        log_memory(self.model, self.optimizer, self.table_store, self.rank)

    def _lock_run_dir(self, wait_s: float) -> Optional[RunLock]:
        """Rank 0 takes run.dir's lock before anything in it is read or written; all ranks share its verdict."""
        lock, refusal = None, None
        if self.rank == 0:
            os.makedirs(self.run_dir, exist_ok=True)
            lock = RunLock(self.run_dir, wait_s)
            try:
                lock.acquire()
            except RunDirLocked as e:
                refusal = str(e)
        if self.world > 1:
            box = [refusal]
            dist.broadcast_object_list(box, src=0)
            refusal = box[0]
        if refusal is not None:
            raise RunDirLocked(refusal)
        return lock

    def release(self, failed: bool = False) -> None:
        """The run's resources, before its process groups go: the host prefetcher's worker (which may run
        collectives of the table exchange) is stopped first; after an error its queued jobs are dropped."""
        prefetcher = getattr(self.table_store, "prefetcher", None)
        if prefetcher is not None:
            prefetcher.close(cancel=failed)
        if self.run_lock is not None:
            self.run_lock.release()

    def _stop_requested(self) -> bool:
        """True on every rank once any rank got SIGTERM/SIGUSR1 (checked between steps)."""
        if self.world == 1:
            return signals.received() is not None
        # A host flag: the default group carries CPU tensors over gloo (parallel/state.py), so agreeing
        # on a signal every step never waits for the device's queue.
        flag = torch.tensor([1.0 if signals.received() is not None else 0.0])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # -- one optimizer step ------------------------------------------------------------------------
    def train_step(self) -> Dict[str, object]:
        """One optimizer step; its metrics stay where they are (the loss on the device): the loop brings
        them to the host on log steps only (:meth:`_pull`)."""
        lr = lr_at(self.state.step, lr=self.cfg.trainer.lr, min_lr=self.cfg.trainer.min_lr,
                   warmup_steps=self.cfg.trainer.warmup_steps, max_steps=self.cfg.trainer.max_steps)
        losses: List[torch.Tensor] = []
        for _ in range(self.grad_accum):
            batch = to_device(next(self.train_iter), self.device)
            loss = forward_loss(self.engine, batch)
            self.optimizers.backward(loss)
            losses.append(loss.detach())
        loss = self._reduced_loss(losses)
        # One norm over dense and table gradients and the loss's non-finite flag; inf when the update was dropped
        grad_norm = self.optimizers.step(lr, loss)
        # MoE expert-bias balancing, once per optimizer step; a dropped (non-finite) step moves no bias
        self.model.update_expert_bias(apply=torch.isfinite(grad_norm))
        self.state.step += 1
        self.state.consumed_samples += self.cfg.data.global_batch_size
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm}

    def _step_finite(self) -> bool:
        """The step's non-finite verdict, already on the host: the optimizers' step pulled the one global
        norm (which carries the loss too) to decide whether to apply the update, so reading it costs no sync."""
        return self.optimizers.applied

    def _reduced_loss(self, losses: List[torch.Tensor]) -> torch.Tensor:
        loss = torch.stack(losses).mean()
        if self.dp_size > 1:
            dist.all_reduce(loss, group=self.dp_group)
            loss /= self.dp_size
        return loss

    def _model_stats(self) -> Dict[str, object]:
        """Engram gate means and MoE load balance of the last micro-batch (device tensors, already
        computed), and the data pipeline's figures summed over the steps since the last log line."""
        out: Dict[str, object] = {f"engram_gate_mean/layer{i}": g
                                  for i, g in self.model.engram_gate_means().items()}
        out.update(self.model.moe_load_stats())
        for stage in self.batch_stages:
            out.update(stage.window_metrics())
        return out

    def _pull(self, metrics: Dict[str, object],
              extra: Sequence[torch.Tensor] = ()) -> Tuple[Dict[str, float], List[float]]:
        """``metrics`` and ``extra`` with every tensor brought to the host in one transfer: the one sync
        of a log step (values exact: float64 holds every float32, bf16 and float64 value)."""
        keys = [k for k, v in metrics.items() if torch.is_tensor(v)]
        tensors = [metrics[k] for k in keys] + list(extra)
        values = (torch.stack([t.detach().reshape(()).to(self.device, torch.float64) for t in tensors]).tolist()
                  if tensors else [])
        out = dict(metrics)
        out.update(zip(keys, values))
        gates = [v for k, v in out.items() if k.startswith("engram_gate_mean/layer")]
        if gates:
            out["engram_gate_mean"] = sum(gates) / len(gates)
        return out, values[len(keys):]

    # -- the loop ----------------------------------------------------------------------------------
    def train(self) -> Dict[str, float]:
        t = self.cfg.trainer
        tokens_per_step = self.cfg.data.global_batch_size * self.cfg.data.seq_length
        if self.state.step == 0 and signals.received() is None:   # preempted during setup: no time for it
            self._evaluate()
        progress = Progress(t.progress, t.max_steps, self.state.step, enabled=self.rank == 0)
        last: Dict[str, object] = {}
        window: List[torch.Tensor] = []   # the losses of the steps since the last log line, on the device
        tic = time.time()
        stop = min(t.max_steps, t.stop_at_step or t.max_steps)
        while self.state.step < stop:
            last = self.train_step()
            step, done = self.state.step, self.state.step == t.max_steps
            diverged = self.guard.observe(self.state, last["loss"], last["grad_norm"], finite=self._step_finite())
            last["skipped_steps"] = self.state.skipped_steps
            window.append(last["loss"])
            logged = bool(step % t.log_interval == 0 or step % t.eval_interval == 0 or done
                          or self.state.nonfinite_streak)
            if logged:
                elapsed, tic = time.time() - tic, time.time()
                # This step's model figures before evaluation runs the model again; the window's losses
                # feed the spike detector in step order, as if it had seen each at its step.
                last, losses = self._pull({**last, **self._model_stats()}, window)
                if self.rank == 0:
                    for s, loss in zip(range(step - len(losses) + 1, step + 1), losses):
                        self.spikes.observe(s, loss)
                last["tokens_per_s"] = tokens_per_step * len(window) / max(elapsed, 1e-9)
                window = []
                if (step % t.eval_interval == 0 or done) and not self.state.nonfinite_streak:
                    last.update(self._evaluate(record=False))
                    tic = time.time()  # evaluation time is not training throughput
                self.logger.log(step, last)
            if diverged is not None:   # no checkpoint of this state; the newest good one stays
                self.logger.close()
                raise diverged
            progress.update(step, last, logged=logged)
            preempted = self._stop_requested()
            if step % t.save_interval == 0 or step == stop or preempted:
                self._save(last, interval_only=not (step == stop or preempted))
            if preempted:
                log.warning("signal %s: stopped at step %d with a checkpoint; relaunch to resume",
                            signals.received(), step)
                break
        progress.close()
        self.logger.close()
        log.info("rank %d finished at step %d: peak RSS %s", self.rank, self.state.step, _mib(peak_rss_bytes()))
        return self._pull(last)[0]   # a stop between log steps leaves device values in it

    def _save(self, last: Dict[str, float], interval_only: bool) -> None:
        """A checkpoint of the state after this step; an interval's is left out while the steps are
        non-finite (the weights are those of the last good step, already saved or about to be)."""
        if interval_only and self.state.nonfinite_streak:
            if self.rank == 0:
                log.warning("step %d: no checkpoint while updates are dropped (%d non-finite steps in a row)",
                            self.state.step, self.state.nonfinite_streak)
            return
        self.checkpointer.save(self.engine, self.state, table_store=self.table_store,
                               extra={"loss": float(last["loss"]), "data_fingerprint": self.data.fingerprint})

    def _evaluate(self, record: bool = True) -> Dict[str, float]:
        out = evaluate(self.model, self.valid_batches, self.device, self.dp_group)
        if self.rank == 0:
            log.info("step %d: val_loss %.4f (ppl %.1f)", self.state.step, out["val_loss"], out["val_ppl"])
        if record:
            self.logger.log(self.state.step, out)
        return out


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def log_memory(model, optimizer, table_store, rank: int) -> None:
    """Each rank logs what it holds: Engram tables (weights, optimizer state) and dense parameters apart,
    and its peak resident memory so far (VmHWM; ``tools/measure_table_memory.py`` reads it)."""
    dense_params = sum(p.numel() * p.element_size() for p in model.parameters())
    dense_opt = 0
    for group in getattr(optimizer, "single_partition_of_fp32_groups", []):   # ZeRO-1/2: fp32 master + 2 moments
        dense_opt += 3 * group.numel() * group.element_size()
    msg = f"rank {rank} memory: dense parameters {_mib(dense_params)}, dense optimizer state {_mib(dense_opt)}"
    if table_store is not None:
        t = table_store.memory_bytes()
        n = table_store.num_parameters()
        msg += (f"; Engram tables ({table_store.placement.partition}, {n['local'] / 1e6:.2f}M of "
                f"{n['global'] / 1e6:.2f}M parameters) {_mib(t['weight'])}, table optimizer state "
                f"{_mib(t['optimizer'])}, table gradients sparse (rows of one step)")
    log.info(msg + f"; peak RSS {_mib(peak_rss_bytes())}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: Config, on_start: Optional[Callable[[], None]] = None) -> Dict[str, float]:
    """Train ``cfg``; ``on_start`` runs once the trainer is set up (data, model, checkpoint loaded),
    so that a launch refused at start leaves the run directory as it was."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    seed_everything(cfg.trainer.seed)
    trainer = Trainer(cfg)
    failed = True
    try:
        if on_start is not None:
            on_start()
        result = trainer.train()
        failed = False
        return result
    finally:
        trainer.release(failed)
