"""Checkpoint fallback on two gloo ranks (data parallel, DeepSpeed ZeRO-1): damage that only one rank sees
makes both fall back together, and a damaged file both ranks read does too."""

from __future__ import annotations

import logging
import os
import time

import pytest

from tests.distributed.utils import run_distributed

pytestmark = pytest.mark.distributed

SEED = 1234
VOCAB = 128
TABLE_SIZES = {0: [31, 37, 41, 43]}
B, T = 2, 16


def _train_step(optimizers, store, value: float, rank: int, cfg) -> None:
    """One data-parallel training step on this rank's batch, drawn from ``value``."""
    import torch

    g = torch.Generator().manual_seed(int(value * 1000) + rank)
    tokens = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    hash_ids = {l: torch.randint(0, min(s), (B, T, 4), generator=g) for l, s in TABLE_SIZES.items()}
    loss = optimizers.engine(tokens, torch.arange(T).expand(B, T), labels, engram_hash_ids=hash_ids).float().mean()
    optimizers.backward(loss)
    optimizers.step(1e-2, loss)


def _state(engine, store):
    """Model parameters, DeepSpeed's fp32 masters and Adam moments (collective over data parallelism), tables."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    opt = engine.optimizer
    for i, hp in enumerate(opt.single_partition_of_fp32_groups):   # link every group, as DenseState does
        lazy_init_hp_params_optimizer_state(opt.bit16_groups[i], hp, opt.optimizer.state)
    out = {}
    for n, p in engine.module.named_parameters():
        out[f"param.{n}"] = p.detach().clone()
        out[f"fp32.{n}"] = safe_get_full_fp32_param(p).clone()
        for m in ("exp_avg", "exp_avg_sq"):
            out[f"{m}.{n}"] = safe_get_full_optimizer_state(p, m).clone()
    for l, shard in store.shards.items():
        out[f"table{l}.weight"] = shard.weight.clone()
        out.update({f"table{l}.{k}": t.clone() for k, t in shard.optimizer.state_tensors().items()})
    return out


def _drop_key(step_dir: str, key: str) -> None:
    """Damage a checkpoint so that one rank alone sees it: its per-rank ``key`` is no longer in the index."""
    import pickle

    path = os.path.join(step_dir, ".metadata")
    with open(path, "rb") as f:
        meta = pickle.load(f)
    del meta.state_dict_metadata[key]
    with open(path, "wb") as f:
        pickle.dump(meta, f)


def _rank_fallback(root: str):
    import torch
    import torch.distributed as dist

    from engram_train.config.schema import Config, DataConfig, EngramConfig, ModelConfig, ParallelConfig
    from engram_train.train.optimizers import build_optimizers
    from engram_train.parallel.parallelize import build_parallel_model
    from engram_train.parallel.state import destroy_parallel, init_parallel
    from engram_train.train.checkpoint import Checkpointer, CheckpointError, TrainState

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append((record.levelno, record.getMessage()))

    logger = logging.getLogger("engram_train.train.checkpoint")
    logger.addHandler(Keep())
    logger.setLevel(logging.INFO)

    init_parallel(ParallelConfig(), seed=SEED)
    try:
        world = dist.get_world_size()
        cfg = Config(model=ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                                       max_seq_length=T, num_experts=2, moe_ffn_hidden_size=32),
                     engram=EngramConfig(layer_ids=[0], max_ngram=3, heads_per_ngram=2, n_embed_per_ngram=16),
                     data=DataConfig(seq_length=T, micro_batch_size=B, global_batch_size=B * world))
        model, store = build_parallel_model(cfg, VOCAB, TABLE_SIZES)
        optimizers = build_optimizers(model, cfg, dp_size=world, use_bf16=False, tables=store)
        engine = optimizers.engine
        ckpt = Checkpointer(root, keep_last=3)
        rank = dist.get_rank()
        saved = {}
        for step in (1, 2, 3):
            _train_step(optimizers, store, float(step), rank, cfg)
            saved[step] = _state(engine, store)
            ckpt.save(engine, TrainState(step=step, consumed_samples=8 * step), table_store=store)

        # Step 3: only rank 1 sees the damage (its own RNG state is gone); rank 0 alone would load step 3.
        # Step 2: a data file that both ranks read (replicated tensors) is cut short.
        if rank == 0:
            _drop_key(os.path.join(root, "step_00000003"), "rng.rank_00001")
            with open(os.path.join(root, "step_00000002", "__0_0.distcp"), "r+b") as f:
                f.truncate(100)
        dist.barrier()
        _train_step(optimizers, store, 9.0, rank, cfg)
        state = ckpt.load(engine, table_store=store)
        now = _state(engine, store)
        restored = sorted(now) == sorted(saved[1]) and all(torch.equal(now[k], saved[1][k]) for k in now)

        # Damage on rank 0 only, in the last checkpoint left: every rank fails with the same error.
        if rank == 0:
            _drop_key(os.path.join(root, "step_00000001"), "rng.rank_00000")
        dist.barrier()
        try:
            ckpt.load(engine, table_store=store)
            error = None
        except CheckpointError as e:
            error = str(e)
        return {"step": state.step, "restored": restored, "error": error,
                "warnings": [m for level, m in records if level == logging.WARNING]}
    finally:
        destroy_parallel()


def test_damage_on_one_rank_makes_every_rank_fall_back(tmp_path):
    results = run_distributed(_rank_fallback, 2, str(tmp_path / "checkpoints"), timeout=300)
    root = tmp_path / "checkpoints"
    for r in results:
        assert r["step"] == 1 and r["restored"]
        assert r["error"] is not None and r["error"].startswith(f"no checkpoint under {root} loads (")
        assert "step_00000003: rank 1: .metadata: no rng.rank_00001" in r["error"]
        assert "step_00000002: rank 0,1: torch.distributed.checkpoint, rank 0: " in r["error"]
        assert "step_00000001: rank 0: .metadata: no rng.rank_00000" in r["error"]
    assert results[0]["error"] == results[1]["error"]
    # Rank 0 reports the reason even though the damage was on rank 1.
    warnings = results[0]["warnings"]
    assert any(f"checkpoint {root}/step_00000003 failed to load (rank 1: .metadata: no rng.rank_00001" in w
               and f"falling back to the older checkpoint {root}/step_00000002" in w for w in warnings), warnings
    assert any(f"checkpoint {root}/step_00000002 failed to load (rank 0,1: torch.distributed.checkpoint"
               in w and f"falling back to the older checkpoint {root}/step_00000001" in w for w in warnings), warnings


def _rank_write_failure(root: str, fail_rank: int, how: str):
    """Two ranks save; ``fail_rank`` alone hits ENOSPC writing its data file (``how="one"``), or the real
    filesystem fills up under both ranks during DCP's write (``how="full"``, root on a small tmpfs)."""
    import errno

    import torch
    import torch.distributed as dist

    from engram_train.config.schema import Config, DataConfig, EngramConfig, ModelConfig, ParallelConfig
    from engram_train.train.optimizers import build_optimizers
    from engram_train.parallel.parallelize import build_parallel_model
    from engram_train.parallel.state import destroy_parallel, init_parallel
    from engram_train.train import checkpoint as ckpt_mod
    from engram_train.train.checkpoint import Checkpointer, CheckpointWriteError, TrainState

    init_parallel(ParallelConfig(), seed=SEED)
    try:
        world, rank = dist.get_world_size(), dist.get_rank()
        cfg = Config(model=ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                                       max_seq_length=T, num_experts=2, moe_ffn_hidden_size=32),
                     engram=EngramConfig(layer_ids=[0], max_ngram=3, heads_per_ngram=2, n_embed_per_ngram=16),
                     data=DataConfig(seq_length=T, micro_batch_size=B, global_batch_size=B * world))
        model, store = build_parallel_model(cfg, VOCAB, TABLE_SIZES)
        optimizers = build_optimizers(model, cfg, dp_size=world, use_bf16=False, tables=store)
        engine = optimizers.engine
        ckpt = Checkpointer(root, keep_last=3)
        _train_step(optimizers, store, 1.0, rank, cfg)
        ckpt.save(engine, TrainState(step=1, consumed_samples=8), table_store=store)
        _train_step(optimizers, store, 2.0, rank, cfg)
        if how == "one" and rank == fail_rank:
            from torch.distributed.checkpoint import filesystem

            def no_space(*args, **kwargs):
                raise OSError(errno.ENOSPC, "No space left on device")
            filesystem._write_item = no_space
        if how == "full":
            ckpt_mod._free_bytes = lambda path: 1 << 40   # past the pre-check: the write itself must fail
            if rank == 0:   # leave less than a checkpoint free
                free = ckpt_mod.shutil.disk_usage(root).free
                with open(os.path.join(os.path.dirname(root), "filler"), "wb") as f:
                    f.write(b"\0" * (free - 64 * 1024))
            dist.barrier()
        t0 = time.monotonic()
        try:
            ckpt.save(engine, TrainState(step=2, consumed_samples=16), table_store=store)
            error = None
        except CheckpointWriteError as e:
            error = str(e)
        took = time.monotonic() - t0
        dist.barrier()   # every rank is out of the save and can meet here
        return {"error": error, "took": took, "listing": sorted(os.listdir(root)),
                "latest": open(os.path.join(root, "latest")).read().strip()}
    finally:
        destroy_parallel()


def test_a_write_failure_on_one_rank_ends_the_save_on_every_rank(tmp_path):
    root = tmp_path / "checkpoints"
    results = run_distributed(_rank_write_failure, 2, str(root), 1, "one", timeout=300)
    for r in results:
        assert r["error"] is not None and r["error"].startswith(f"rank 1 could not write checkpoint {root}/step_00000002 "
                                                               "(no space left on the device: ")
        assert r["took"] < 60
    assert results[0]["error"] == results[1]["error"]   # the same line: printed once by whichever rank claims it
    assert results[0]["listing"] == ["latest", "step_00000001"] and results[0]["latest"] == "step_00000001"


def test_a_filesystem_that_fills_up_during_the_write_ends_the_save_on_every_rank(tmp_path):
    import shutil
    import subprocess

    mnt = tmp_path / "small_fs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        root = mnt / "checkpoints"
        results = run_distributed(_rank_write_failure, 2, str(root), 0, "full", timeout=300)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    for r in results:
        assert r["error"] is not None and "could not write checkpoint" in r["error"], results
        assert "(no space left on the device: " in r["error"] and f"{root} has " in r["error"], results
        assert r["took"] < 60, results
    assert results[0]["listing"] == ["latest", "step_00000001"] and results[0]["latest"] == "step_00000001"
