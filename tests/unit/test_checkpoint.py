"""Checkpoint commit protocol (fsync order), fallback to older checkpoints, and the metrics log on resume.

The Checkpointer runs for real in one process (gloo group of one): a tiny Engram-MoE model from
``build_parallel_model`` with its table store, and a plain torch optimizer in place of DeepSpeed's
(``Checkpointer`` only needs ``engine.module`` and ``engine.optimizer``).
"""

from __future__ import annotations

import json
import logging
import os
from types import SimpleNamespace

import pytest
import torch

from engram_train.config.schema import Config, ConfigError, DataConfig, EngramConfig, ModelConfig, ParallelConfig
from engram_train.train.checkpoint import LATEST, Checkpointer, CheckpointError, TrainState
from engram_train.train.metrics import SUPERSEDED, JsonlLogger

SEED = 1234
VOCAB = 128
TABLE_SIZES = {0: [31, 37, 41, 43]}


@pytest.fixture(scope="module")
def parallel():
    from engram_train.parallel.state import destroy_parallel, init_parallel

    init_parallel(ParallelConfig(), seed=SEED)
    yield
    destroy_parallel()


@pytest.fixture(scope="module")
def run(parallel):
    """engine (module + optimizer) and table store, built once; tests set their state as they need."""
    from engram_train.parallel.parallelize import build_parallel_model

    cfg = Config(model=ModelConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                                   max_seq_length=16, num_experts=2, moe_ffn_hidden_size=32, moe_router_topk=2),
                 engram=EngramConfig(layer_ids=[0], max_ngram=3, heads_per_ngram=2, n_embed_per_ngram=16),
                 data=DataConfig(seq_length=16))
    model, store = build_parallel_model(cfg, VOCAB, TABLE_SIZES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return SimpleNamespace(engine=SimpleNamespace(module=model, optimizer=optimizer), store=store)


def _train_step(run, value: float) -> None:
    """Give model, optimizer and tables a state that identifies ``value``."""
    model, opt = run.engine.module, run.engine.optimizer
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
            p.grad = torch.full_like(p, value)
    opt.step()
    for shard in run.store.shards.values():
        shard.weight.fill_(value)


def _snapshot(run):
    model, opt = run.engine.module, run.engine.optimizer
    return ({k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
            {k: v.clone() for k, v in opt.state_dict()["state"][0].items()},
            {l: s.weight.clone() for l, s in run.store.shards.items()},
            torch.get_rng_state())


def _assert_state(run, snap):
    got = _snapshot(run)
    for want_part, got_part in zip(snap[:3], got[:3]):
        assert want_part.keys() == got_part.keys()
        for k in want_part:
            torch.testing.assert_close(got_part[k], want_part[k], rtol=0, atol=0)
    assert torch.equal(got[3], snap[3])


def _save_steps(run, ckpt: Checkpointer, steps):
    """Save a checkpoint at each step; returns the state snapshot taken at each."""
    snaps = {}
    for step in steps:
        _train_step(run, float(step))
        torch.manual_seed(100 + step)
        snaps[step] = _snapshot(run)
        ckpt.save(run.engine, TrainState(step=step, consumed_samples=8 * step), extra={"data_fingerprint": "fp"},
                  table_store=run.store)
    return snaps


def _load(run, ckpt: Checkpointer):
    return ckpt.load(run.engine, expect={"data_fingerprint": "fp"}, table_store=run.store)


def _truncate(path, keep: int = 100) -> None:
    with open(path, "r+b") as f:
        f.truncate(keep)


# -- commit protocol ------------------------------------------------------------------------------
def test_every_file_and_directory_is_synced_before_latest_names_the_checkpoint(run, tmp_path, monkeypatch):
    root = str(tmp_path / "checkpoints")
    ckpt = Checkpointer(root, keep_last=2)
    _save_steps(run, ckpt, [1])   # the root exists and `latest` is being replaced, as in a long run

    # Files are synced under temporary names and renamed after: follow them by inode, which a rename keeps.
    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", (st.st_dev, st.st_ino)))
        return real_fsync(fd)

    def replace(src, dst, *a, **kw):
        real_replace(src, dst, *a, **kw)
        events.append(("rename", os.fspath(dst)))

    def rename(src, dst, *a, **kw):
        real_rename(src, dst, *a, **kw)
        events.append(("rename", os.fspath(dst)))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "rename", rename)
    final = ckpt.save(run.engine, TrainState(step=2, consumed_samples=16), table_store=run.store)
    monkeypatch.undo()

    def ino(path):
        st = os.stat(path)
        return st.st_dev, st.st_ino

    def last(kind, key, before=len(events)):
        hits = [i for i, e in enumerate(events[:before]) if e == (kind, key)]
        assert hits, f"no {kind} of {key}"
        return hits[-1]

    latest = os.path.join(root, LATEST)
    assert open(latest).read().strip() == "step_00000002"
    i_latest = last("rename", latest)
    i_commit = last("rename", final)                       # step_2.partial -> step_2
    assert i_commit < i_latest

    files, dirs = [], []
    for dirpath, _, names in os.walk(final):
        dirs.append(dirpath)
        files += [os.path.join(dirpath, n) for n in names]
    rel = sorted(os.path.relpath(f, final) for f in files)
    assert {"model.pt", "meta.json", "optim/rank_00000.pt", "rng/rank_00000.pt",
            "tables/manifest.json", "tables/.metadata"} <= set(rel), rel
    assert any(r.startswith("tables/__0_") and r.endswith(".distcp") for r in rel), rel
    assert len(dirs) == 4   # the checkpoint, optim/, rng/, tables/

    # Each file is synced, then its directory (after the file took its final name), all before the commit.
    partial = final + ".partial"
    for f in files:
        i_file = last("fsync", ino(f), before=i_commit)
        named = [i for i, e in enumerate(events[:i_commit])
                 if e == ("rename", os.path.join(partial, os.path.relpath(f, final)))]
        i_dir = last("fsync", ino(os.path.dirname(f)), before=i_commit)
        assert i_dir > max([i_file] + named), f
    for d in dirs[1:]:   # the subdirectories' entries in the checkpoint directory
        assert last("fsync", ino(d), before=i_commit) < last("fsync", ino(final), before=i_commit)
    # The new name is durable before `latest` names it, and `latest` itself is synced before and after.
    i_root = last("fsync", ino(root), before=i_latest)
    assert i_commit < i_root < i_latest
    assert last("fsync", ino(latest), before=i_latest) < i_latest
    assert last("fsync", ino(root)) > i_latest


# -- load and fallback ----------------------------------------------------------------------------
def test_resume_restores_the_latest_checkpoint(run, tmp_path, caplog):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep_last=3)
    snaps = _save_steps(run, ckpt, [1, 2])
    _train_step(run, 9.0)
    with caplog.at_level(logging.INFO, logger="engram_train.train.checkpoint"):
        state = _load(run, ckpt)
    assert state == TrainState(step=2, consumed_samples=16)
    _assert_state(run, snaps[2])
    assert f"resumed from {ckpt.root}/step_00000002 (step 2)" in caplog.text


def test_truncated_model_falls_back_to_the_previous_checkpoint(run, tmp_path, caplog):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep_last=2)
    snaps = _save_steps(run, ckpt, [1, 2, 3])
    broken = os.path.join(ckpt.root, "step_00000003")
    _truncate(os.path.join(broken, "model.pt"))
    _train_step(run, 9.0)
    with caplog.at_level(logging.INFO, logger="engram_train.train.checkpoint"):
        state = _load(run, ckpt)
    assert state == TrainState(step=2, consumed_samples=16)
    _assert_state(run, snaps[2])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"checkpoint {broken} failed to load (model.pt: " in warnings[0]
    assert f"falling back to the older checkpoint {ckpt.root}/step_00000002" in warnings[0]
    assert f"resumed from {ckpt.root}/step_00000002 (step 2)" in caplog.text

    # The damaged checkpoint must not take the place of the good one among the kept ones.
    _save_steps(run, ckpt, [5])
    assert sorted(n for n in os.listdir(ckpt.root) if n.startswith("step_")) == \
        ["step_00000002", "step_00000003", "step_00000005"]


@pytest.mark.parametrize("damage", ["corrupt optimizer", "missing rng", "truncated tables", "bad meta"])
def test_each_damaged_file_makes_the_load_fall_back(run, tmp_path, caplog, damage):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep_last=3)
    snaps = _save_steps(run, ckpt, [1, 2])
    broken = os.path.join(ckpt.root, "step_00000002")
    if damage == "corrupt optimizer":
        with open(os.path.join(broken, "optim", "rank_00000.pt"), "wb") as f:
            f.write(b"not a torch file")
        what = "optim/rank_00000.pt: "
    elif damage == "missing rng":
        os.remove(os.path.join(broken, "rng", "rank_00000.pt"))
        what = "rng/rank_00000.pt: FileNotFoundError"
    elif damage == "truncated tables":
        (data,) = [n for n in os.listdir(os.path.join(broken, "tables")) if n.endswith(".distcp")]
        _truncate(os.path.join(broken, "tables", data), keep=10)
        what = "tables (torch.distributed.checkpoint"
    else:
        with open(os.path.join(broken, "meta.json"), "w") as f:
            f.write('{"step": 2')
        what = "meta.json: JSONDecodeError"
    _train_step(run, 9.0)
    with caplog.at_level(logging.WARNING, logger="engram_train.train.checkpoint"):
        state = _load(run, ckpt)
    assert state.step == 1
    _assert_state(run, snaps[1])
    assert f"checkpoint {broken} failed to load ({what}" in caplog.text


def test_nothing_loads_fails_with_one_line_naming_the_directory(run, tmp_path, caplog):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep_last=2)
    _save_steps(run, ckpt, [1, 2])
    for step in (1, 2):
        _truncate(os.path.join(ckpt.root, f"step_{step:08d}", "model.pt"))
    with caplog.at_level(logging.WARNING, logger="engram_train.train.checkpoint"), \
            pytest.raises(CheckpointError) as err:
        _load(run, ckpt)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"no checkpoint under {ckpt.root} loads (step_00000002: model.pt: ")
    assert "step_00000001: model.pt: " in msg
    assert "trainer.resume=false" in msg
    assert "no older checkpoint to fall back to" in caplog.text


def test_latest_without_any_complete_checkpoint_is_an_error_not_a_fresh_start(run, tmp_path):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep_last=2)
    _save_steps(run, ckpt, [1])
    os.remove(os.path.join(ckpt.root, "step_00000001", "meta.json"))
    with pytest.raises(CheckpointError, match=r"latest names 'step_00000001' but .* holds no complete checkpoint"):
        _load(run, ckpt)


def test_no_checkpoint_is_a_fresh_start(run, tmp_path):
    assert _load(run, Checkpointer(str(tmp_path / "checkpoints"))) is None


@pytest.mark.parametrize("mismatch", ["world size", "data fingerprint", "tables"])
def test_incompatible_checkpoint_is_raised_not_skipped(run, tmp_path, caplog, mismatch):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep_last=2)
    _save_steps(run, ckpt, [1, 2])
    newest = os.path.join(ckpt.root, "step_00000002")
    expect = {"data_fingerprint": "fp"}
    if mismatch == "world size":
        meta_path = os.path.join(newest, "meta.json")
        meta = json.load(open(meta_path))
        meta["world_size"] = 2
        json.dump(meta, open(meta_path, "w"))
        error, pattern = RuntimeError, r"written by 2 ranks, this run has 1"
    elif mismatch == "data fingerprint":
        expect = {"data_fingerprint": "other"}
        error, pattern = RuntimeError, r"has data_fingerprint='fp' but this run has 'other'"
    else:
        manifest_path = os.path.join(newest, "tables", "manifest.json")
        manifest = json.load(open(manifest_path))
        manifest["optimizer"] = "sparse_adam"
        json.dump(manifest, open(manifest_path, "w"))
        error, pattern = ConfigError, r"holds 'sparse_adam' table optimizer state"
    with caplog.at_level(logging.INFO, logger="engram_train.train.checkpoint"), pytest.raises(error, match=pattern):
        ckpt.load(run.engine, expect=expect, table_store=run.store)
    assert "fall" not in caplog.text and "resumed from" not in caplog.text


def test_explicit_path_does_not_fall_back(run, tmp_path):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep_last=2)
    _save_steps(run, ckpt, [1, 2])
    broken = os.path.join(ckpt.root, "step_00000002")
    _truncate(os.path.join(broken, "model.pt"))
    with pytest.raises(CheckpointError, match=rf"^checkpoint {broken} does not load \(model.pt: "):
        ckpt.load(run.engine, path=broken, table_store=run.store)


# -- metrics.jsonl --------------------------------------------------------------------------------
def _write_lines(path, rows, tail: str = "") -> None:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
        f.write(tail)


def _rows(path):
    return [json.loads(line) for line in open(path)]


def test_metrics_on_resume_keep_history_and_move_redone_steps_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    side = tmp_path / SUPERSEDED
    _write_lines(side, [{"step": 9, "loss": 0.9}])   # from an earlier resume: kept, appended to
    _write_lines(path, [{"step": 0, "val_loss": 5.0}, {"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0},
                        {"step": 3, "loss": 2.0}, {"step": 4, "loss": 1.0}], tail='{"step": 5, "lo')
    logger = JsonlLogger(str(path), resume_step=2)
    logger.log(3, {"loss": 2.5})
    logger.close()
    assert _rows(path) == [{"step": 0, "val_loss": 5.0}, {"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0},
                           {"step": 3, "loss": 2.5}]
    lines = open(side).read().splitlines()
    assert [json.loads(x) for x in lines[:3]] == [{"step": 9, "loss": 0.9}, {"step": 3, "loss": 2.0},
                                                  {"step": 4, "loss": 1.0}]
    assert lines[3:] == ['{"step": 5, "lo']   # a line cut short by a crash is kept, not joined to the next


def test_metrics_on_resume_with_nothing_to_redo_only_append(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write_lines(path, [{"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0}])
    logger = JsonlLogger(str(path), resume_step=2)
    logger.log(3, {"loss": 2.0})
    logger.close()
    assert [r["step"] for r in _rows(path)] == [1, 2, 3]
    assert not (tmp_path / SUPERSEDED).exists()


def test_metrics_on_a_fresh_start_move_the_old_log_aside(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    old = [{"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0}]
    _write_lines(path, old)
    with caplog.at_level(logging.WARNING, logger="engram_train.train.metrics"):
        logger = JsonlLogger(str(path), resume_step=None)
    logger.log(1, {"loss": 7.0})
    logger.close()
    assert _rows(path) == [{"step": 1, "loss": 7.0}]
    (aside,) = [p for p in tmp_path.iterdir() if p.name not in ("metrics.jsonl",)]
    assert aside.name.startswith("metrics.") and aside.name.endswith("Z.jsonl")
    assert _rows(aside) == old
    assert f"moved to {aside}" in caplog.text

    # A second fresh start within the same second must not overwrite the first one's log.
    logger = JsonlLogger(str(path), resume_step=None)
    logger.close()
    asides = sorted(p.name for p in tmp_path.iterdir() if p.name != "metrics.jsonl")
    assert len(asides) == 2 and all(_rows(tmp_path / n) for n in asides)
