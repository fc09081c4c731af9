"""Checkpoint commit protocol (fsync order), fallback to older checkpoints, and the metrics log on resume.

The Checkpointer runs for real in one process (gloo group of one): a tiny Engram-MoE model from
``build_parallel_model`` with its table store, in a real DeepSpeed ZeRO-1 engine (``build_optimizers``), built
once per module.  State is set by real training steps on batches that depend on a value, so every saved
step has its own weights, Adam moments and step, table rows and table optimizer state; it is read back
through DeepSpeed (``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``).
"""

from __future__ import annotations

import json
import logging
import os
import re
from types import SimpleNamespace

import pytest
import torch

from engram_train.config.schema import Config, ConfigError, DataConfig, EngramConfig, ModelConfig, ParallelConfig
from engram_train.train.checkpoint import LATEST, Checkpointer, CheckpointError, TrainState
from engram_train.train.metrics import SUPERSEDED, JsonlLogger

SEED = 1234
VOCAB = 128
TABLE_SIZES = {0: [31, 37, 41, 43]}
B, T = 2, 16
TABLE_LR = 1e-2
MOMENTS = ("exp_avg", "exp_avg_sq")


def _cfg(**model) -> Config:
    dims = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, max_seq_length=T,
                num_experts=2, moe_ffn_hidden_size=32, moe_router_topk=2)
    dims.update(model)
    return Config(model=ModelConfig(**dims),
                  engram=EngramConfig(layer_ids=[0], max_ngram=3, heads_per_ngram=2, n_embed_per_ngram=16),
                  data=DataConfig(seq_length=T, micro_batch_size=B, global_batch_size=B))


def _build(cfg: Config) -> SimpleNamespace:
    """A DeepSpeed ZeRO-1 engine (fp32) over a fresh model, with the model's table store."""
    from engram_train.parallel.parallelize import build_parallel_model
    from engram_train.train.optimizers import build_optimizers

    model, store = build_parallel_model(cfg, VOCAB, TABLE_SIZES)
    optimizers = build_optimizers(model, cfg, dp_size=1, use_bf16=False, tables=store)
    return SimpleNamespace(engine=optimizers.engine, store=store, cfg=cfg, optimizers=optimizers)


@pytest.fixture(scope="module")
def parallel():
    from engram_train.parallel.state import destroy_parallel, init_parallel

    init_parallel(ParallelConfig(), seed=SEED)
    yield
    destroy_parallel()


@pytest.fixture(scope="module")
def run(parallel):
    """engine and table store, built once; tests give them their state by training steps."""
    return _build(_cfg())


def _train_step(run, value: float) -> None:
    """One training step (dense through DeepSpeed, tables through the store) on a batch drawn from ``value``."""
    g = torch.Generator().manual_seed(int(value * 1000))
    tokens = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    hash_ids = {l: torch.randint(0, min(s), (B, T, 4), generator=g) for l, s in TABLE_SIZES.items()}
    loss = run.engine(tokens, torch.arange(T).expand(B, T), labels, engram_hash_ids=hash_ids).float().mean()
    run.optimizers.backward(loss)
    run.optimizers.step(TABLE_LR, loss)


def _snapshot(run):
    """(model parameters, DeepSpeed's fp32 masters, Adam moments and step, tables, torch RNG), all copies."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    opt = run.engine.optimizer
    # DeepSpeed links parameters to their Adam state only for the groups that had state after the first
    # group's first step; link every group (as DenseState.state_dict does) so that each one can be read.
    for i, hp in enumerate(opt.single_partition_of_fp32_groups):
        lazy_init_hp_params_optimizer_state(opt.bit16_groups[i], hp, opt.optimizer.state)
    stepped = {i for i, hp in enumerate(opt.single_partition_of_fp32_groups) if opt.optimizer.state[hp]}
    params, masters, adam = {}, {}, {}
    for n, p in run.engine.module.named_parameters():
        params[n] = p.detach().clone()
        masters[n] = safe_get_full_fp32_param(p).clone()
        for m in MOMENTS:   # an engine that never stepped has no Adam state yet: zero moments
            adam[f"{m}.{n}"] = (safe_get_full_optimizer_state(p, m).clone()
                                if p._hp_mapping.param_group_index in stepped else torch.zeros_like(p))
    for i, hp in enumerate(opt.single_partition_of_fp32_groups):
        adam[f"step.group{i}"] = torch.tensor(float(opt.optimizer.state[hp].get("step", 0)))
    tables = {}
    for l, shard in run.store.shards.items():
        tables[f"layer{l}.weight"] = shard.weight.clone()
        tables.update({f"layer{l}.{k}": t.clone() for k, t in shard.optimizer.state_tensors().items()})
        tables.update({f"layer{l}.{k}": torch.tensor(v) for k, v in shard.optimizer.scalars().items()})
    return params, masters, adam, tables, torch.get_rng_state()


def _assert_state(run, snap):
    got = _snapshot(run)
    for part, want_part, got_part in zip(("params", "fp32", "adam", "tables"), snap[:4], got[:4]):
        assert want_part.keys() == got_part.keys(), part
        for k in want_part:
            torch.testing.assert_close(got_part[k], want_part[k], rtol=0, atol=0, msg=lambda m: f"{part} {k}: {m}")
    assert torch.equal(got[4], snap[4]), "torch RNG state"


def _differing(a, b):
    """Per part of two snapshots: does any tensor differ?"""
    parts = [any(not torch.equal(x[k], y[k]) for k in x) for x, y in zip(a[:4], b[:4])]
    return parts + [not torch.equal(a[4], b[4])]


def _save_steps(run, ckpt: Checkpointer, steps):
    """Train and save a checkpoint at each step; returns the state snapshot taken at each."""
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


def _data(step_dir) -> str:
    """The data file of a checkpoint written by one rank (dense, tables, train state and RNG)."""
    (name,) = [n for n in os.listdir(step_dir) if n.endswith(".distcp")]
    return os.path.join(step_dir, name)


DATA_FAILED = "torch.distributed.checkpoint, rank 0: "


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
    # One DCP save: its index and this rank's data file, and meta.json; nothing gathered whole.
    assert {"meta.json", ".metadata"} <= set(rel), rel
    assert [r for r in rel if r not in ("meta.json", ".metadata")] == ["__0_0.distcp"], rel
    assert len(dirs) == 1
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(final).read_metadata().state_dict_metadata
    assert {k.split(".")[0] for k in keys} == {"dense", "tables", "train_state", "rng"}, sorted(keys)

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
    # The steps are told apart by every part of the state, so a load of the wrong one shows.
    assert _differing(snaps[1], snaps[2]) == [True] * 5
    _train_step(run, 9.0)
    with caplog.at_level(logging.INFO, logger="engram_train.train.checkpoint"):
        state = _load(run, ckpt)
    assert state == TrainState(step=2, consumed_samples=16)
    _assert_state(run, snaps[2])
    assert f"resumed from {ckpt.root}/step_00000002 (step 2)" in caplog.text


def test_a_fresh_engine_resumes_exactly_where_the_saved_one_was(run, tmp_path):
    """Weights, fp32 masters, Adam moments and step, tables and RNG all come back into an engine built anew:
    its next step is the very step the original engine takes."""
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep_last=2)
    saved = _save_steps(run, ckpt, [3])[3]
    assert float(saved[2]["step.group0"]) > 1          # the Adam step count matters (bias correction)
    _train_step(run, 4.0)                               # the original engine goes on
    want = _snapshot(run)

    fresh = _build(_cfg())
    assert _differing(_snapshot(fresh), saved)[:4] == [True] * 4
    assert _load(fresh, ckpt) == TrainState(step=3, consumed_samples=24)
    _assert_state(fresh, saved)
    _train_step(fresh, 4.0)
    _assert_state(fresh, want)


def test_truncated_data_falls_back_to_the_previous_checkpoint(run, tmp_path, caplog):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep_last=2)
    snaps = _save_steps(run, ckpt, [1, 2, 3])
    broken = os.path.join(ckpt.root, "step_00000003")
    _truncate(_data(broken))
    _train_step(run, 9.0)
    with caplog.at_level(logging.INFO, logger="engram_train.train.checkpoint"):
        state = _load(run, ckpt)
    assert state == TrainState(step=2, consumed_samples=16)
    _assert_state(run, snaps[2])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"checkpoint {broken} failed to load ({DATA_FAILED}" in warnings[0]
    assert f"falling back to the older checkpoint {ckpt.root}/step_00000002" in warnings[0]
    assert f"resumed from {ckpt.root}/step_00000002 (step 2)" in caplog.text

    # The damaged checkpoint must not take the place of the good one among the kept ones.
    _save_steps(run, ckpt, [5])
    assert sorted(n for n in os.listdir(ckpt.root) if n.startswith("step_")) == \
        ["step_00000002", "step_00000003", "step_00000005"]


@pytest.mark.parametrize("damage", ["corrupt metadata", "missing data", "cut data", "bad meta"])
def test_each_damaged_file_makes_the_load_fall_back(run, tmp_path, caplog, damage):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep_last=3)
    snaps = _save_steps(run, ckpt, [1, 2])
    broken = os.path.join(ckpt.root, "step_00000002")
    if damage == "corrupt metadata":
        with open(os.path.join(broken, ".metadata"), "wb") as f:
            f.write(b"not a checkpoint")
        what = ".metadata: "
    elif damage == "missing data":
        os.remove(_data(broken))
        what = DATA_FAILED
    elif damage == "cut data":
        _truncate(_data(broken), keep=10)
        what = DATA_FAILED
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
        _truncate(_data(os.path.join(ckpt.root, f"step_{step:08d}")))
    with caplog.at_level(logging.WARNING, logger="engram_train.train.checkpoint"), \
            pytest.raises(CheckpointError) as err:
        _load(run, ckpt)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"no checkpoint under {ckpt.root} loads (step_00000002: {DATA_FAILED}")
    assert f"step_00000001: {DATA_FAILED}" in msg
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


def test_a_checkpoint_from_another_number_of_ranks_loads_without_its_rng(run, tmp_path, caplog):
    """The dense and table state are in global coordinates: another world size is no error; the RNG
    states (per rank) stay as they are."""
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep_last=2)
    saved = _save_steps(run, ckpt, [1])[1]
    newest = os.path.join(ckpt.root, "step_00000001")
    meta_path = os.path.join(newest, "meta.json")
    meta = json.load(open(meta_path))
    meta["world_size"] = 2
    json.dump(meta, open(meta_path, "w"))
    _train_step(run, 9.0)
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    with caplog.at_level(logging.INFO, logger="engram_train.train.checkpoint"):
        assert _load(run, ckpt) == TrainState(step=1, consumed_samples=8)
    _assert_state(run, saved[:4] + (rng,))
    assert "written by 2 ranks, this run has 1: resharded" in caplog.text
    assert "fall" not in caplog.text


@pytest.fixture(scope="module")
def other_models(parallel):
    """Engines of other model configurations, built when a test first asks for one.  Only loaded into,
    never trained: megatron's MoE aux-loss tracker is global and sized by the first model's layers."""
    built = {}

    def get(**model):
        key = tuple(sorted(model.items()))
        if key not in built:
            built[key] = _build(_cfg(**model))
        return built[key]

    return get


@pytest.mark.parametrize("mismatch", ["hidden size", "number of layers", "bigger model", "data fingerprint",
                                      "tables", "no tables"])
def test_incompatible_checkpoint_is_raised_not_skipped(run, other_models, tmp_path, caplog, mismatch):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep_last=2)
    _save_steps(run, ckpt, [1, 2])
    newest = os.path.join(ckpt.root, "step_00000002")
    expect = {"data_fingerprint": "fp"}
    into = run
    if mismatch == "hidden size":
        into = other_models(hidden_size=48)
        error = ConfigError
        pattern = (rf"the checkpoint {re.escape(newest)} holds gpt\.embedding\.word_embeddings\.weight as "
                   rf"\({VOCAB}, 32\), this model as \({VOCAB}, 48\): another model configuration")
    elif mismatch == "number of layers":
        into = other_models(num_layers=3)
        error = ConfigError
        pattern = (rf"the checkpoint {re.escape(newest)} has no dense tensor 'gpt\.decoder\.layers\.2\.[\w.]+' "
                   r"that this model has")
    elif mismatch == "bigger model":
        # Saved from 3 layers, loaded into 2: every tensor of the smaller model is there, but the
        # checkpoint's third layer would be silently dropped.
        from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

        ckpt = Checkpointer(str(tmp_path / "bigger"), keep_last=2)
        get_moe_layer_wise_logging_tracker().clear()   # megatron sizes its per-layer aux-loss log once
        try:
            _save_steps(other_models(num_layers=3), ckpt, [1])
        finally:
            get_moe_layer_wise_logging_tracker().clear()
        newest = os.path.join(ckpt.root, "step_00000001")
        error = ConfigError
        pattern = (rf"the checkpoint {re.escape(newest)} holds \d+ dense tensors this model lacks "
                   r"\(first: 'gpt\.decoder\.layers\.2\.[\w.]+'\): it was saved from a bigger model")
    elif mismatch == "data fingerprint":
        expect = {"data_fingerprint": "other"}
        error, pattern = RuntimeError, r"has data_fingerprint='fp' but this run has 'other'"
    else:
        meta_path = os.path.join(newest, "meta.json")
        meta = json.load(open(meta_path))
        if mismatch == "tables":
            meta["tables"]["optimizer"] = "sparse_adam"
            error, pattern = ConfigError, r"holds 'sparse_adam' table optimizer state"
        else:   # as a checkpoint of a run without Engram tables has it
            del meta["tables"]
            error, pattern = ConfigError, rf"the checkpoint {re.escape(newest)} holds no Engram tables"
        json.dump(meta, open(meta_path, "w"))
    before = _snapshot(into)
    with caplog.at_level(logging.INFO, logger="engram_train.train.checkpoint"), pytest.raises(error, match=pattern):
        ckpt.load(into.engine, expect=expect, table_store=into.store)
    assert "fall" not in caplog.text and "resumed from" not in caplog.text
    _assert_state(into, before)   # raised before anything was loaded


def test_explicit_path_does_not_fall_back(run, tmp_path):
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep_last=2)
    _save_steps(run, ckpt, [1, 2])
    broken = os.path.join(ckpt.root, "step_00000002")
    _truncate(_data(broken))
    with pytest.raises(CheckpointError,
                       match="^" + re.escape(f"checkpoint {broken} does not load ({DATA_FAILED}")):
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


# -- write failures (full disk, quota, I/O error, read-only) ----------------------------------------
@pytest.mark.parametrize("errno_name, where", [
    ("ENOSPC", "data"),      # inside DCP's collective write: wrapped in a CheckpointException
    ("EDQUOT", "data"),
    ("EIO", "commit"),       # rank 0's meta.json
    ("EROFS", "commit"),
])
def test_a_failed_write_leaves_latest_and_no_partial_and_names_the_directory(run, tmp_path, monkeypatch,
                                                                            errno_name, where):
    import errno as errno_mod

    from engram_train.train import checkpoint as ckpt_mod
    from engram_train.train.checkpoint import CheckpointWriteError

    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep_last=2)
    _save_steps(run, ckpt, [1])
    before = sorted(os.listdir(ckpt.root))
    code = getattr(errno_mod, errno_name)

    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    if where == "data":
        from torch.distributed.checkpoint import filesystem

        monkeypatch.setattr(filesystem, "_write_item", fail)
    else:
        monkeypatch.setattr(ckpt_mod, "_write_durably", fail)
    _train_step(run, 2.0)
    with pytest.raises(CheckpointWriteError) as err:
        ckpt.save(run.engine, TrainState(step=2, consumed_samples=16), table_store=run.store)
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith(f"rank 0 could not write checkpoint {ckpt.root}/step_00000002 (")
    assert os.strerror(code) in msg or ckpt_mod.DISK_ERRNOS[code] in msg
    assert f"{ckpt.root} has " in msg and " free and a checkpoint needs about " in msg
    assert f"{ckpt.root}/latest still names step_00000001" in msg
    assert sorted(os.listdir(ckpt.root)) == before       # no step_00000002(.partial), `latest` unchanged
    assert (tmp_path / "checkpoints" / LATEST).read_text().strip() == "step_00000001"
    monkeypatch.undo()
    assert _load(run, ckpt).step == 1


def test_a_checkpoint_that_clearly_does_not_fit_is_refused_before_writing(run, tmp_path, monkeypatch):
    from engram_train.train import checkpoint as ckpt_mod
    from engram_train.train.checkpoint import CheckpointWriteError

    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep_last=2)
    _save_steps(run, ckpt, [1])
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(ckpt.root, "step_00000001"))
               for f in fs)
    monkeypatch.setattr(ckpt_mod, "_free_bytes", lambda path: size // 2)
    written = []
    monkeypatch.setattr(ckpt_mod, "_write_durably", lambda *a, **k: written.append(a))
    with pytest.raises(CheckpointWriteError) as err:
        ckpt.save(run.engine, TrainState(step=2, consumed_samples=16), table_store=run.store)
    assert "refused before writing" in str(err.value)
    assert f"a checkpoint needs about {ckpt_mod._size(size)}" in str(err.value)
    assert written == [] and sorted(os.listdir(ckpt.root)) == ["latest", "step_00000001"]


def test_the_first_checkpoint_s_size_estimate_is_close_to_what_it_takes(run, tmp_path):
    """With no earlier checkpoint the estimate comes from the optimizer partitions and the tables."""
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), keep_last=2)
    estimate = ckpt._bytes_needed(run.engine, run.store)
    _save_steps(run, ckpt, [1])
    actual = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(ckpt.root, "step_00000001"))
                 for f in fs)
    assert 0.5 * actual <= estimate <= 1.5 * actual, (estimate, actual)
    assert ckpt._bytes_needed(run.engine, run.store) == actual   # from now on: the newest checkpoint's size


# -- rotation: keep-last counts good checkpoints; the one from before divergence stays -----------------
def _fake_checkpoints(root, streaks):
    """``step_N`` directories with the meta.json the trainer writes: ``streaks[N]`` non-finite steps in a row."""
    os.makedirs(root, exist_ok=True)
    for step, streak in streaks.items():
        d = os.path.join(root, f"step_{step:08d}")
        os.makedirs(d)
        with open(os.path.join(d, "meta.json"), "w") as f:
            json.dump({"step": step, "consumed_samples": 0, "world_size": 1, "nonfinite_streak": streak}, f)


@pytest.mark.parametrize("streaks, first_bad, keep_last, kept", [
    ({1: 0, 2: 0, 3: 0, 4: 0}, None, 2, [3, 4]),                  # healthy: the plain keep-last
    ({2: 0, 4: 0, 6: 2, 8: 4}, 5, 1, [4, 8]),                     # written in a streak: do not count
    ({2: 0, 4: 0, 6: 0, 8: 0, 10: 0}, 5, 2, [4, 8, 10]),          # recovered: step 4 (before step 5) stays
    ({2: 0, 4: 0, 6: 0, 8: 0, 10: 0}, 1, 2, [8, 10]),             # nothing before the first bad step
])
def test_rotation_counts_good_checkpoints_and_keeps_the_one_from_before_divergence(tmp_path, streaks, first_bad,
                                                                                  keep_last, kept):
    root = str(tmp_path / "checkpoints")
    _fake_checkpoints(root, streaks)
    newest = f"step_{max(streaks):08d}"
    Checkpointer(root, keep_last=keep_last)._prune(keep=newest, first_nonfinite_step=first_bad)
    assert sorted(os.listdir(root)) == [f"step_{s:08d}" for s in kept]


def test_train_state_refuses_keys_it_does_not_have():
    state = TrainState()
    state.load_state_dict({"step": 7, "consumed_samples": 56})
    assert (state.step, state.consumed_samples) == (7, 56)
    with pytest.raises(ValueError, match=r"train_state: unknown keys \['epoch'\]"):
        state.load_state_dict({"step": 8, "epoch": 1})
