"""A checkpoint written by the code before issue 17 (commit cdd7c15: DeepSpeed's norm patched, the
trainer calling the table store around ``engine.step``) resumes with today's code, and the resumed
run continues exactly as that code's own uninterrupted run did.

The fixture (``tests/fixtures/checkpoint_cdd7c15``) and its expected losses, gradient norms and
final state were written by ``tests/fixtures/make_checkpoint_fixture.py`` run with that commit's
code: nothing here is produced by the code under test.  A resume that silently started over (or
loaded only part of the state) takes other losses from its first step on.

Since the Engram block's fused autograd functions (engram_train/engram/fused.py) the block rounds
differently in the last bits from the fixture's code, which composed torch ops: the resumed run's
losses, gradient norms and state sums are compared to the fixture's at ``REL`` (float32's last
bits, compounded over two steps), far below what a restart or a partly loaded state changes.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from tests.fixtures.make_checkpoint_fixture import LR, SEED, TABLE_SIZES, VOCAB, batch, config, fingerprint

REL = 1e-6


def close(got, want) -> bool:
    return got == pytest.approx(want, rel=REL, abs=0.0)


FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "checkpoint_cdd7c15")


def test_a_checkpoint_of_the_previous_code_resumes_and_continues_as_it_did(tmp_path):
    from engram_train.parallel.parallelize import build_parallel_model
    from engram_train.parallel.state import destroy_parallel, init_parallel
    from engram_train.train.checkpoint import Checkpointer, TrainState
    from engram_train.train.optimizers import build_optimizers

    with open(os.path.join(FIXTURE, "expected.json")) as f:
        want = json.load(f)
    root = tmp_path / "checkpoints"
    shutil.copytree(os.path.join(FIXTURE, "checkpoints"), root)
    cfg = config()
    init_parallel(cfg.parallel, seed=SEED + 1)   # another seed: only the checkpoint can give the state back
    try:
        model, store = build_parallel_model(cfg, VOCAB, TABLE_SIZES)
        optimizers = build_optimizers(model, cfg, dp_size=1, use_bf16=False, tables=store)
        state = Checkpointer(str(root), keep_last=1).load(optimizers.engine, table_store=store)
        assert state == TrainState(step=want["saved_at"], consumed_samples=2 * want["saved_at"])
        assert torch.equal(torch.get_rng_state(), torch.manual_seed(77).get_state())   # RNG restored
        for step in range(want["saved_at"] + 1, len(want["losses"]) + 1):
            tokens, pos, labels, hash_ids = batch(step)
            loss = optimizers.engine(tokens, pos, labels, engram_hash_ids=hash_ids).float().mean()
            optimizers.backward(loss)
            norm = optimizers.step(LR, loss.detach())
            assert close(float(loss), want["losses"][str(step)]), step
            assert close(float(norm), want["grad_norms"][str(step)]), step
        assert close(fingerprint(optimizers.engine, store), want["state_after"])
    finally:
        destroy_parallel()


def test_a_resumed_checkpoint_of_the_earlier_layout_is_saved_in_the_new_one_and_resumes_again(tmp_path):
    """The fixture (``dense/``, ``tables/``, ``rng/`` beside ``meta.json``) resumed and saved again is one
    DCP directory; resumed from that, after the run had gone on, the run takes the earlier code's losses and
    reaches its state again.  A damaged file of the earlier layout is named when it stops a load."""
    import torch.distributed.checkpoint as dcp

    from engram_train.parallel.parallelize import build_parallel_model
    from engram_train.parallel.state import destroy_parallel, init_parallel
    from engram_train.train.checkpoint import Checkpointer, CheckpointError
    from engram_train.train.optimizers import build_optimizers

    with open(os.path.join(FIXTURE, "expected.json")) as f:
        want = json.load(f)
    root, broken = tmp_path / "checkpoints", tmp_path / "broken"
    shutil.copytree(os.path.join(FIXTURE, "checkpoints"), root)
    shutil.copytree(os.path.join(FIXTURE, "checkpoints"), broken)
    os.remove(broken / "step_00000002" / "rng" / "rank_00000.pt")
    cfg = config()
    init_parallel(cfg.parallel, seed=SEED + 1)
    try:
        model, store = build_parallel_model(cfg, VOCAB, TABLE_SIZES)
        optimizers = build_optimizers(model, cfg, dp_size=1, use_bf16=False, tables=store)
        engine = optimizers.engine
        with pytest.raises(CheckpointError, match=r"rng/rank_00000\.pt: FileNotFoundError"):
            Checkpointer(str(broken)).load(engine, path=str(broken / "step_00000002"), table_store=store)

        ckpt = Checkpointer(str(root), keep_last=1)
        state = ckpt.load(engine, table_store=store)
        saved = ckpt.save(engine, state, table_store=store)   # replaces the fixture's step_00000002
        assert sorted(os.listdir(saved)) == [".metadata", "__0_0.distcp", "meta.json"]
        keys = dcp.FileSystemReader(saved).read_metadata().state_dict_metadata
        assert {k.split(".")[0] for k in keys} == {"dense", "tables", "train_state", "rng"}

        def go_on():
            for step in range(want["saved_at"] + 1, len(want["losses"]) + 1):
                tokens, pos, labels, hash_ids = batch(step)
                loss = engine(tokens, pos, labels, engram_hash_ids=hash_ids).float().mean()
                optimizers.backward(loss)
                norm = optimizers.step(LR, loss.detach())
                assert close(float(loss), want["losses"][str(step)]), step
                assert close(float(norm), want["grad_norms"][str(step)]), step
            assert close(fingerprint(engine, store), want["state_after"])

        go_on()
        torch.manual_seed(5)
        assert ckpt.load(engine, table_store=store) == state   # back from the state after step 4
        assert torch.equal(torch.get_rng_state(), torch.manual_seed(77).get_state())
        go_on()
    finally:
        destroy_parallel()
