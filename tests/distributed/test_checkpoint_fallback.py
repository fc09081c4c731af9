"""Checkpoint fallback on two gloo ranks: damage that only one rank sees makes both fall back together."""

from __future__ import annotations

import logging
import os

import pytest

from tests.distributed.utils import run_distributed

pytestmark = pytest.mark.distributed

SEED = 1234
VOCAB = 128
TABLE_SIZES = {0: [31, 37, 41, 43]}


def _rank_fallback(root: str):
    from types import SimpleNamespace

    import torch
    import torch.distributed as dist

    from engram_train.config.schema import Config, DataConfig, EngramConfig, ModelConfig, ParallelConfig
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
        cfg = Config(model=ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                                       max_seq_length=16, num_experts=2, moe_ffn_hidden_size=32),
                     engram=EngramConfig(layer_ids=[0], max_ngram=3, heads_per_ngram=2, n_embed_per_ngram=16),
                     data=DataConfig(seq_length=16))
        model, store = build_parallel_model(cfg, VOCAB, TABLE_SIZES)
        engine = SimpleNamespace(module=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3))
        ckpt = Checkpointer(root, keep_last=2)
        rank = dist.get_rank()
        saved = {}
        for step in (1, 2):
            with torch.no_grad():
                for p in model.parameters():
                    p.fill_(float(step))
                    p.grad = torch.ones_like(p)
            engine.optimizer.step()
            saved[step] = [p.detach().clone() for p in model.parameters()]
            ckpt.save(engine, TrainState(step=step, consumed_samples=8 * step), table_store=store)

        # Only rank 1 sees the damage; rank 0 alone would load step 2.
        if rank == 1:
            with open(os.path.join(root, "step_00000002", "optim", "rank_00001.pt"), "wb") as f:
                f.write(b"garbage")
        dist.barrier()
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(9.0)
        state = ckpt.load(engine, table_store=store)
        restored = all(torch.equal(p, q) for p, q in zip(model.parameters(), saved[1]))

        # Damage on rank 0 only, in the last checkpoint left: every rank fails with the same error.
        if rank == 0:
            os.remove(os.path.join(root, "step_00000001", "rng", "rank_00000.pt"))
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
        assert "step_00000002: rank 1: optim/rank_00001.pt: " in r["error"]
        assert "step_00000001: rank 0: rng/rank_00000.pt: FileNotFoundError" in r["error"]
    # Rank 0 reports the reason even though the damage was on rank 1.
    assert any(f"checkpoint {root}/step_00000002 failed to load (rank 1: optim/rank_00001.pt: " in w
               and f"falling back to the older checkpoint {root}/step_00000001" in w
               for w in results[0]["warnings"]), results[0]["warnings"]
