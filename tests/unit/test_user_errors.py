"""Bad inputs end in one message naming the key, file or value, exit code 2 and no traceback.

Each case runs an entry point as a subprocess, as a user would: ``engram-train`` (the module
behind the console script), the scripts in ``tools/``, and one 2-rank launch through
``engram_train.torchrun``.  Most errors are found before torch is imported, so a case takes
about a second; the few that need the trainer (data read by the prepare step, a checkpoint,
a batch that does not fit the ranks) take longer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN = [sys.executable, "-m", "engram_train.train.main"]


def _tool(name):
    return [sys.executable, str(ROOT / "tools" / f"{name}.py")]


def _run(cmd, cwd, env_extra=None, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env.pop("HYDRA_FULL_ERROR", None)
    env.pop("ENGRAM_TRAIN_DEBUG", None)
    env.update(env_extra or {})
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _assert_one_clear_error(proc, *needles):
    err = proc.stderr
    assert proc.returncode == 2, f"exit code {proc.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    assert "HYDRA_FULL_ERROR" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if "error: " in ln]
    assert len(lines) == 1, err[-3000:]
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Bad (and good) input files, written once."""
    from tokenizers import Tokenizer, models

    d = tmp_path_factory.mktemp("inputs")
    rng = __import__("random").Random(0)
    (d / "random.txt").write_bytes(bytes(rng.randrange(256) for _ in range(20000)))
    (d / "latin1.txt").write_bytes(("Voilà une phrase très française, à l'été.\n\n" * 200).encode("latin-1"))
    (d / "nul.txt").write_bytes(b"text\x00with a NUL byte\n\n" * 100)
    (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    (d / "notext.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    (d / "table.csv").write_text("a,b\n1,2\n")
    (d / "not_a_tokenizer.json").write_text("hello")
    Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")).save(str(d / "no_eos_tokenizer.json"))
    (d / "a_file").write_text("I am a file")
    (d / "garbage_run").mkdir()
    (d / "garbage_run" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n')
    _write_megatron_inputs(d)
    (d / "plain.jsonl.gz").write_text('{"text": "not compressed"}\n')
    (d / "interrupted" / ".partial").mkdir(parents=True)
    (d / "interrupted" / ".partial" / "state.json").write_text('{"fingerprint": "0123456789abcdef", "shards": []}')
    return d


def _write_megatron_inputs(d):
    """Megatron prefixes written by megatron-core's own builder: good ones, and each kind of bad one."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
    from tokenizers import Tokenizer, models

    vocab = {f"t{i}": i for i in range(300)}
    vocab["<|endoftext|>"] = 300
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(d / "mega_tokenizer.json"))
    (d / "hf_dir_without_json").mkdir()
    (d / "hf_dir_without_json" / "vocab.json").write_text("{}")

    def write(name, dtype, top, bin_only=False, idx_only=False):
        builder = IndexedDatasetBuilder(str(d / f"{name}.bin"), dtype=dtype)
        for i in range(20):
            doc = np.append(np.arange(i, i + 30) % 300, 300)
            doc[0] = top - 1 if i == 7 else doc[0]
            builder.add_document(doc, [31])
        builder.finalize(str(d / f"{name}.idx"))
        if bin_only:
            (d / f"{name}.idx").unlink()
        if idx_only:
            (d / f"{name}.bin").unlink()

    write("web", np.uint16, 300)
    write("wide", np.int32, 300)
    write("big_ids", np.uint16, 5000)
    write("no_idx", np.uint16, 300, bin_only=True)
    write("no_bin", np.uint16, 300, idx_only=True)


# (overrides of engram-train, substrings the one error line must contain)
CONFIG_CASES = [
    (["model.foo=1"], ["model.foo"]),
    (["+foo=1"], ["foo: not a configuration key"]),
    (["+trainer.foo=1"], ["trainer.foo: not a configuration key"]),
    (["model.hidden_size=abc"], ["model.hidden_size", "abc"]),
    (["trainer.max_steps=1.5"], ["trainer.max_steps"]),
    (["experiment=nope"], ["experiment/nope", "debug_cpu"]),
    (["model=nope"], ["model/nope"]),
    (["model.hidden_size=["], ["model.hidden_size=["]),
    (["parallel.zero_stage=3"], ["parallel.zero_stage=3", "parallel.zero_stage=1 or 2"]),
    (["parallel.zero_stage=0"], ["parallel.zero_stage=0"]),
    (["experiment=moe_baseline_cpu", "parallel.zero_stage=3"], ["parallel.zero_stage=3"]),
    (["parallel.sequence_parallel=true"], ["parallel.sequence_parallel=True", "tensor_parallel"]),
    (["trainer.stop_at_step=-1"], ["trainer.stop_at_step=-1"]),
    (["trainer.stop_at_step=0"], ["trainer.stop_at_step=0"]),
    (["trainer.max_steps=0"], ["trainer.max_steps=0"]),
    (["engram.hc_mult=2"], ["engram.hc_mult=2", "model.hc_mult=1", "set model.hc_mult only"]),
    (["model.hc_mult=0"], ["model.hc_mult=0", ">= 1"]),
    (["model.hc_mult=-2"], ["model.hc_mult=-2"]),
    (["model.hc_sinkhorn_iters=0"], ["model.hc_sinkhorn_iters=0"]),
    (["model.recompute=partial"], ["model.recompute='partial'", "'full'"]),
    (["parallel.tensor_parallel=3"], ["parallel.tensor_parallel=3", "model.num_attention_heads=4"]),
    (["parallel.tensor_parallel=2", "model.ffn_hidden_size=511"], ["model.ffn_hidden_size=511"]),
    (["parallel.tensor_parallel=2", "model.moe_ffn_hidden_size=127"], ["model.moe_ffn_hidden_size=127"]),
    (["parallel.tensor_parallel=2", "model.num_query_groups=1"], ["model.num_query_groups=1"]),
    (["parallel.tensor_parallel=2", "parallel.sequence_parallel=false"], ["parallel.sequence_parallel=False"]),
    (["parallel.expert_parallel=3"], ["parallel.expert_parallel=3", "model.num_experts=4"]),
    (["parallel.offload_optimizer=nvme"], ["parallel.offload_optimizer='nvme'"]),
    (["parallel.backend=mpi"], ["parallel.backend='mpi'"]),
    (["engram.partition=rows"], ["engram.partition='rows'"]),
    (["engram.optimizer=sgd"], ["engram.optimizer='sgd'"]),
    (["engram.residency=host"], ["engram.optimizer='adam'", "sparse_adam"]),
    (["engram.host_threads=0"], ["engram.host_threads=0", ">= 1", "null"]),
    (["engram.layer_ids=[1,9]"], ["engram.layer_ids=[1, 9]", "model.num_layers=4"]),
    (["engram.n_embed_per_ngram=30"], ["engram.n_embed_per_ngram=30"]),
    (["data.seq_length=512"], ["data.seq_length=512", "model.max_seq_length=256"]),
    (["data.global_batch_size=12"], ["data.global_batch_size=12"]),
    (["data.vocab_size=100"], ["data.vocab_size=100"]),
    (["trainer.precision=fp8"], ["trainer.precision='fp8'"]),
    (["run.wandb_mode=loud"], ["run.wandb_mode='loud'"]),
    (["model.moe_token_dispatcher_type=flex"], ["model.moe_token_dispatcher_type='flex'"]),
    (["data.corpus=wikipedia"], ["data.corpus='wikipedia'"]),
    (["data.files=[a.txt]"], ["data.files", "data.corpus=files"]),
    (["data.corpus=files"], ["data.files"]),
    (["data.global_batch_size=0"], ["data.global_batch_size=0"]),
    (["trainer.grad_clip=-1"], ["trainer.grad_clip=-1"]),
    (["trainer.adam_beta2=1.5"], ["trainer.adam_beta2=1.5"]),
    (["trainer.weight_decay=-0.1"], ["trainer.weight_decay=-0.1"]),
    (["engram.table_weight_decay=-1"], ["engram.table_weight_decay=-1"]),
    (["engram.pad_id=-1"], ["engram.pad_id=-1", "null"]),
    (["model.hidden_dropout=1.5"], ["model.hidden_dropout=1.5"]),
    # DeepSeekMoE routing and MLA
    (["model.moe_router_score_function=relu"], ["model.moe_router_score_function='relu'", "sigmoid"]),
    (["model.moe_router_enable_expert_bias=true"],
     ["model.moe_router_enable_expert_bias=True", "model.moe_router_score_function=sigmoid"]),
    (["model.moe_router_enable_expert_bias=true", "model.moe_router_score_function=sigmoid"],
     ["model.moe_router_load_balancing_type='aux_loss'", "model.moe_router_load_balancing_type=none"]),
    (["model.moe_router_bias_update_rate=-0.1"], ["model.moe_router_bias_update_rate=-0.1"]),
    (["model.moe_router_topk_scaling_factor=0"], ["model.moe_router_topk_scaling_factor=0"]),
    (["model.moe_router_topk=1"], ["model.moe_router_topk=1", "model.moe_router_score_function=sigmoid"]),
    (["model.moe_shared_expert_ffn_hidden_size=-64"], ["model.moe_shared_expert_ffn_hidden_size=-64"]),
    (["model.num_experts=null", "model.moe_shared_expert_ffn_hidden_size=128"],
     ["model.moe_shared_expert_ffn_hidden_size=128", "dense model", "model.num_experts"]),
    (["experiment=paper_cpu", "model.num_experts=0"], ["model.moe_shared_expert_ffn_hidden_size=128", "dense model"]),
    (["parallel.tensor_parallel=2", "model.moe_shared_expert_ffn_hidden_size=127"],
     ["parallel.tensor_parallel=2", "model.moe_shared_expert_ffn_hidden_size=127"]),
    (["model.attention=mha"], ["model.attention='mha'", "'mla'"]),
    (["model.attention=mla"], ["model.q_lora_rank=512", "model.hidden_size=128"]),
    (["model.attention=mla", "model.q_lora_rank=null"], ["model.kv_lora_rank=512", "model.hidden_size=128"]),
    (["model.attention=mla", "model.q_lora_rank=64", "model.kv_lora_rank=32", "model.qk_pos_emb_head_dim=7"],
     ["model.qk_pos_emb_head_dim=7", "even"]),
    (["model.attention=mla", "model.q_lora_rank=64", "model.kv_lora_rank=32", "model.qk_head_dim=0"],
     ["model.qk_head_dim=0"]),
    (["model.attention=mla", "model.q_lora_rank=64", "model.kv_lora_rank=32", "model.qk_pos_emb_head_dim=16",
      "model.num_query_groups=2"], ["model.num_query_groups=2", "model.num_query_groups=null"]),
    (["parallel.tensor_parallel=2", "parallel.sequence_parallel=false", "model.num_experts=null",
      "model.attention=mla", "model.q_lora_rank=64", "model.kv_lora_rank=32"],
     ["parallel.sequence_parallel=False", "model.attention=mla"]),
    (["trainer.nonfinite=ignore"], ["trainer.nonfinite='ignore'", "'stop'", "'skip'"]),
    (["trainer.max_skipped_steps=0"], ["trainer.max_skipped_steps=0", ">= 1"]),
    (["trainer.loss_spike_factor=0.5"], ["trainer.loss_spike_factor=0.5", "or 0: off"]),
    (["trainer.loss_spike_window=1"], ["trainer.loss_spike_window=1"]),
    (["run.lock_wait_s=-1"], ["run.lock_wait_s=-1.0"]),
    (["data.corpus=megatron", "data.prefixes=[0.7,/d/web,0.3]"], ["data.prefixes=", "even length", "3 entries"]),
    (["data.corpus=megatron", "data.prefixes=[0.7,/d/web,-0.3,/d/code]"], ["weight -0.3 of /d/code", "> 0"]),
    (["data.corpus=megatron"], ["data.prefixes=None", "data.corpus=megatron"]),
    (["trainer.progress=sometimes"], ["trainer.progress='sometimes'", "auto", "true", "false"]),
    (["data.prefixes=[/d/web]"], ["data.prefixes is set", "data.corpus=megatron"]),
    # Lngram (engram.keys=latent); the other engram.latent.* refusals are tested in-process below
    (["engram.keys=lattice"], ["engram.keys='lattice'", "'latent'"]),
    (["experiment=lngram_cpu", "engram.residency=host", "engram.optimizer=sparse_adam"],
     ["engram.residency='host'", "hidden states", "engram.residency=device"]),
    # A sweep is checked job by job before its first job trains.
    (["-m", "trainer.seed=1,2", "model.foo=1"], ["model.foo"]),
    (["-m", "trainer.seed=1,2", "parallel.zero_stage=1,3"], ["parallel.zero_stage=3"]),
]


@pytest.mark.parametrize("overrides, needles", CONFIG_CASES, ids=[" ".join(c[0]) for c in CONFIG_CASES])
def test_engram_train_config_errors(overrides, needles, tmp_path):
    proc = _run(TRAIN + ["experiment=debug_cpu", f"run.dir={tmp_path}/run"] + overrides, cwd=tmp_path)
    _assert_one_clear_error(proc, *needles)


# Errors about files, found before training: (overrides with {d} = the inputs dir, needles)
FILE_CASES = [
    (["data.corpus=files", "data.files=[{d}/missing.txt]"], ["{d}/missing.txt"]),
    (["data.corpus=files", "data.files=[{d}/*.nomatch]"], ["*.nomatch", "matches no file"]),
    (["data.corpus=files", "data.files=[{d}/table.csv]"], ["table.csv", ".txt"]),
    (["data.tokenizer={d}/missing.json"], ["data.tokenizer", "missing.json"]),
    (["data.tokenizer={d}/not_a_tokenizer.json"], ["not_a_tokenizer.json"]),
    (["data.tokenizer={d}/no_eos_tokenizer.json"], ["no_eos_tokenizer.json", "EOS"]),
    (["run.dir={d}/a_file/run"], ["run.dir=", "a_file is a file"]),
    (["data.dir={d}/a_file/data"], ["data.dir=", "a_file is a file"]),
    (["data.tokenizer={d}/hf_dir_without_json"], ["hf_dir_without_json", "without tokenizer.json", "save_pretrained"]),
    (["data.corpus=megatron", "data.prefixes=[{d}/web]"], ["data.corpus=megatron needs data.tokenizer"]),
    (["data.corpus=megatron", "data.tokenizer={d}/mega_tokenizer.json", "data.prefixes=[0.5,{d}/web,0.5,{d}/no_idx]"],
     ["{d}/no_idx.idx does not exist", "without the suffix"]),
    (["data.corpus=megatron", "data.tokenizer={d}/mega_tokenizer.json", "data.prefixes=[{d}/no_bin]"],
     ["{d}/no_bin.bin does not exist"]),
    (["data.corpus=megatron", "data.tokenizer={d}/mega_tokenizer.json", "data.prefixes=[{d}/web,{d}/wide]"],
     ["{d}/wide.idx stores tokens as int32", "{d}/web.idx as uint16", "Fix: re-run"]),
    (["data.corpus=megatron", "data.tokenizer={d}/mega_tokenizer.json", "data.prefixes=[{d}/big_ids]"],
     ["{d}/big_ids.bin holds token id 4999", "has 301 ids", "Fix: set data.tokenizer"]),
]


@pytest.mark.parametrize("overrides, needles", FILE_CASES, ids=[" ".join(c[0]) for c in FILE_CASES])
def test_engram_train_file_errors(overrides, needles, inputs, tmp_path):
    args = [o.format(d=inputs) for o in overrides]
    proc = _run(TRAIN + ["experiment=debug_cpu", f"run.dir={tmp_path}/run", f"data.dir={tmp_path}/data"] + args,
                cwd=tmp_path)
    _assert_one_clear_error(proc, *[n.format(d=inputs) for n in needles])


TOOL_CASES = [
    ("plan_memory", ["experiment=debug_cpu"], ["world=N"]),
    ("plan_memory", ["experiment=debug_cpu", "world=2", "model.foo=1"], ["model.foo"]),
    ("plan_memory", ["experiment=debug_cpu", "world=2", "parallel.zero_stage=3"], ["parallel.zero_stage=3"]),
    ("plan_memory", ["experiment=debug_cpu", "world=3", "parallel.tensor_parallel=2"], ["world size 3"]),
    ("plan_offload", ["experiment=debug_cpu"], ["world=N"]),
    ("plan_offload", ["experiment=debug_cpu", "world=1", "--step-time", "0"], ["--step-time=0", "> 0"]),
    ("plan_offload", ["experiment=debug_cpu", "world=1", "--constants", "{t}/none.json"],
     ["none.json", "--calibrate --json"]),
    ("plan_offload", ["experiment=debug_cpu", "world=1", "engram=none"], ["engram.keys=disabled", "hashed"]),
    ("plan_offload", ["experiment=debug_cpu", "world=1", "--nic-gbps", "-5"], ["--nic-gbps=-5.0", "> 0"]),
    ("plan_offload", ["--validate", "--quantile", "1.5"], ["--quantile=1.5", "between 0 and 1"]),
    ("plan_offload", ["--validate", "--cpu", "4096"], ["--cpu=4096", "pick one of them"]),
    ("count_params", ["experiment=debug_cpu,model.foo=1"], ["model.foo"]),
    ("prepare_data", ["--files", "{d}/missing.txt", "--dir", "{t}/d"], ["missing.txt"]),
    ("prepare_data", ["--files", "{d}/random.txt", "--dir", "{t}/d"], ["random.txt", "not UTF-8"]),
    ("prepare_data", ["--files", "{d}/latin1.txt", "--dir", "{t}/d"], ["latin1.txt", "not UTF-8", "iconv"]),
    ("prepare_data", ["--files", "{d}/nul.txt", "--dir", "{t}/d"], ["nul.txt", "NUL"]),
    ("prepare_data", ["--files", "{d}/bad.jsonl", "--dir", "{t}/d"], ["bad.jsonl:2", "JSON"]),
    ("prepare_data", ["--files", "{d}/notext.jsonl", "--dir", "{t}/d"], ["notext.jsonl:1", "data.jsonl_text_key"]),
    ("prepare_data", ["--tokenizer", "{d}/missing.json", "--dir", "{t}/d"], ["missing.json"]),
    ("prepare_data", ["--vocab-size", "100", "--dir", "{t}/d"], ["data.vocab_size=100"]),
    ("prepare_data", ["--files", "{d}/plain.jsonl.gz", "--dir", "{t}/d", "--workers", "1"],
     ["plain.jsonl.gz", "not gzip-compressed", "Fix: compress it"]),
    ("prepare_data", ["--files", "{d}/bad.jsonl", "--dir", "{t}/d", "--workers", "0"], ["--workers=0", "1 or more"]),
    ("prepare_data", ["--files", "{d}/bad.jsonl", "--dir", "{d}/interrupted", "--workers", "1"],
     ["interrupted preparation", "re-run with the options it was started with", "--restart"]),
    ("summarize_run", ["{t}/no_such_run"], ["no_such_run"]),
    ("summarize_run", ["{d}/garbage_run"], ["metrics.jsonl:2"]),
    ("compare_runs", ["{t}/no_runs", "--out", "{t}/cmp"], ["no_runs is not a directory"]),
    ("inspect_engram", ["{t}/no_ckpt", "--out", "{t}/insp"], ["no_ckpt is not a directory"]),
]


@pytest.mark.parametrize("tool, args, needles", TOOL_CASES, ids=[f"{c[0]} {' '.join(c[1])}" for c in TOOL_CASES])
def test_tool_errors(tool, args, needles, inputs, tmp_path):
    proc = _run(_tool(tool) + [a.format(d=inputs, t=tmp_path) for a in args], cwd=ROOT)
    line = _assert_one_clear_error(proc, *needles)
    assert line.startswith(f"{tool}: error: ")


def test_debug_flag_shows_the_traceback(tmp_path):
    for env in ({"HYDRA_FULL_ERROR": "1"}, {"ENGRAM_TRAIN_DEBUG": "1"}):
        proc = _run(TRAIN + ["experiment=debug_cpu", f"run.dir={tmp_path}/run", "trainer.stop_at_step=-1"],
                    cwd=tmp_path, env_extra=env)
        assert proc.returncode != 0
        assert "Traceback" in proc.stderr and "trainer.stop_at_step=-1" in proc.stderr


def test_training_data_that_is_not_text_fails_in_the_trainer(inputs, tmp_path):
    """The prepare step of a training run (after the process group is up) reads the file: Latin-1 text
    is refused, not decoded to replacement characters."""
    proc = _run(TRAIN + ["experiment=debug_cpu", f"run.dir={tmp_path}/run", f"data.dir={tmp_path}/data",
                         "data.corpus=files", f"data.files=[{inputs}/latin1.txt]", "run.wandb_mode=disabled"],
                cwd=tmp_path)
    _assert_one_clear_error(proc, f"{inputs}/latin1.txt", "not UTF-8")


@pytest.mark.slow
def test_checkpoint_error_in_the_trainer(tmp_path):
    """``latest`` names a checkpoint that is not there: one line naming it, not a traceback."""
    ckpt = tmp_path / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "latest").write_text("step_00000005\n")
    proc = _run(TRAIN + ["experiment=debug_cpu", f"run.dir={tmp_path}/run", "run.wandb_mode=disabled"],
                cwd=tmp_path)
    _assert_one_clear_error(proc, "step_00000005", "trainer.resume=false")


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["every_rank", "rank0_only"])
def test_two_ranks_print_one_error(case, inputs, tmp_path):
    """Errors found after the process group is up, printed once, exit code 2, no traceback from the ranks
    or from torchrun.  every_rank: the batch does not fit 2 data-parallel ranks (every rank finds it; the
    message proposes the micro-batch that fits).  rank0_only: rank 0 prepares the data and finds Latin-1
    text while rank 1 waits for it in a barrier, which breaks when rank 0 leaves."""
    if case == "every_rank":
        overrides, needles = ["parallel.expert_parallel=2"], ["data.micro_batch_size=8", "set data.micro_batch_size=4"]
    else:
        overrides = ["data.micro_batch_size=4", f"data.dir={tmp_path}/data", "data.corpus=files",
                     f"data.files=[{inputs}/latin1.txt]"]
        needles = [f"{inputs}/latin1.txt", "not UTF-8"]
    args = ["experiment=debug_cpu", f"run.dir={tmp_path}/run", "run.wandb_mode=disabled", *overrides]
    if case == "every_rank":   # the README's launcher, as a user types it
        cmd = ["bash", str(ROOT / "launchers" / "torchrun.sh"), "2", *args]
    else:
        cmd = [sys.executable, "-m", "engram_train.torchrun", "--standalone", "--nproc-per-node", "2",
               "-m", "engram_train.train.main", *args]
    proc = _run(cmd, cwd=ROOT)
    _assert_one_clear_error(proc, *needles)
    assert "ChildFailedError" not in proc.stderr and "FAILED" not in proc.stderr, proc.stderr[-3000:]


def _snapshot(root: Path) -> dict:
    """Every file under ``root`` with its bytes, Hydra's log (appended to by each launch) excepted:
    what a failed launch must leave as it was."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] != "hydra"}


@pytest.mark.slow
def test_a_checkpoint_of_another_model_is_refused_and_nothing_is_changed(tmp_path):
    """Relaunching a run directory with another model shape stops with one line naming the mismatch,
    and leaves the run's checkpoints and metrics byte for byte as they were (nothing moved aside,
    nothing overwritten)."""
    from tests.distributed.test_train import TINY, _write_corpus

    _write_corpus(str(tmp_path / "corpus.jsonl"))
    run = tmp_path / "run"
    common = TINY + ["data.corpus=files", f"data.files=[{tmp_path / 'corpus.jsonl'}]", f"data.dir={tmp_path / 'data'}",
                     f"run.dir={run}", "trainer.max_steps=2"]
    first = _run(TRAIN + common, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    before = _snapshot(run)
    assert {"checkpoints/latest", "metrics.jsonl", "config.yaml"} <= set(before)
    proc = _run(TRAIN + common + ["model.moe_ffn_hidden_size=32"], cwd=tmp_path)
    _assert_one_clear_error(proc, "step_00000002", "(64, 64)", "(32, 64)",
                            "new run.dir")
    assert _snapshot(run) == before


def test_another_node_reports_its_own_missing_files_and_not_config_errors(tmp_path):
    """Before the process group exists, rank 0 reports; the first rank of another node reports only
    what it checks of its own files (they may differ from node 0's), naming its host."""
    import socket

    other_node = {"RANK": "2", "LOCAL_RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    proc = _run(TRAIN + ["experiment=debug_cpu", f"run.dir={tmp_path}/run", "data.corpus=files",
                         f"data.files=[{tmp_path}/missing.txt]"], cwd=tmp_path, env_extra=other_node)
    line = _assert_one_clear_error(proc, "missing.txt")
    assert line.startswith(f"[{socket.gethostname()}] error: ")
    proc = _run(TRAIN + ["experiment=debug_cpu", f"run.dir={tmp_path}/run", "model.foo=1"], cwd=tmp_path,
                env_extra=other_node)
    assert proc.returncode == 2 and "error" not in proc.stderr, proc.stderr[-2000:]


def test_port_reference_round_trip_and_its_one_line_errors(tmp_path):
    """tools/port_reference.py: demo TransformerBlock weights -> ours -> demo give the same tensors; weights of
    other table sizes or another hc_mult end in one line naming the key to set."""
    import torch

    from engram_train.config.store import compose
    from engram_train.engram.block import EngramBlock
    from engram_train.engram.hashing import prime_table_sizes

    over = ["experiment=debug_cpu", "engram.layer_ids=[1,3]", "engram.table_size_per_ngram=[1500,1500]"]
    cfg = compose(over)
    e, H = cfg.engram, cfg.model.hidden_size
    sizes = prime_table_sizes([1, 3], e.max_ngram, e.heads_per_ngram, [1500] * (e.max_ngram - 1))[3]

    def demo_file(name, hc_mult, table_sizes):
        torch.manual_seed(0)
        blk = EngramBlock(H, hc_mult, table_sizes, e.n_embed_per_ngram, e.heads_per_ngram, e.max_ngram)
        with torch.no_grad():
            for p in blk.parameters():
                p.normal_()
        sd = {"engram." + k: v for k, v in blk.reference_state_dict().items()}   # the demo block's key layout
        torch.save(sd, tmp_path / name)
        return sd

    sd = demo_file("demo.pt", 1, sizes)
    tool = _tool("port_reference")
    proc = _run(tool + ["to-ours", str(tmp_path / "demo.pt"), str(tmp_path / "ours.pt"), "--layer-id", "3"] + over,
                cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = _run(tool + ["to-demo", str(tmp_path / "ours.pt"), str(tmp_path / "back.pt"), "--layer-id", "3"] + over,
                cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert sorted(back) == sorted(sd) and all(torch.equal(back[k], sd[k]) for k in sd)

    other = ["experiment=debug_cpu", "engram.layer_ids=[1,3]", "engram.table_size_per_ngram=[1200,1200]"]
    proc = _run(tool + ["to-ours", str(tmp_path / "demo.pt"), str(tmp_path / "x.pt"), "--layer-id", "3"] + other,
                cwd=ROOT)
    _assert_one_clear_error(proc, "engram.table_size_per_ngram", "set engram.table_size_per_ngram=[1511, 1511]")
    demo_file("demo_hc4.pt", 4, sizes)
    proc = _run(tool + ["to-ours", str(tmp_path / "demo_hc4.pt"), str(tmp_path / "x.pt"), "--layer-id", "3"] + over,
                cwd=ROOT)
    _assert_one_clear_error(proc, "model.hc_mult=1", "set model.hc_mult=4")
@pytest.mark.slow
def test_a_run_directory_in_use_is_refused_and_left_as_it_was(tmp_path):
    """Another live run holds run.dir's lock: one line naming it, exit code 2, and nothing in the directory
    (checkpoints, metrics) is touched -- not even the lock file that names the holder."""
    from engram_train.train.run_lock import RunLock

    run = tmp_path / "run"
    holder = RunLock(str(run))
    holder.acquire()
    try:
        before = _snapshot(run)
        proc = _run(TRAIN + ["experiment=debug_cpu", f"run.dir={run}", "run.wandb_mode=disabled"], cwd=tmp_path)
        _assert_one_clear_error(proc, f"run.dir={run} is in use by another run (PID {os.getpid()} on ",
                                "choose another run.dir")
        assert _snapshot(run) == before
    finally:
        holder.release()


# engram.latent.* refusals, in-process (each a ConfigError of one line naming key, value and fix)
LATENT_CASES = [
    (["engram.latent.orders=[0,2]"], ["engram.latent.orders=[0, 2]", ">= 1"]),
    (["engram.latent.orders=[2,2]"], ["engram.latent.orders=[2, 2]", "distinct"]),
    (["engram.latent.bits=17"], ["engram.latent.bits=17", "[1, 16]"]),
    (["engram.latent.bits=0"], ["engram.latent.bits=0", "[1, 16]"]),
    (["engram.latent.bits=16", "engram.latent.orders=[2,4]"],
     ["engram.latent.orders=[2, 4]", "8 x 2^64", "int64", "engram.latent.bits"]),
    (["engram.latent.readout_heads=6"], ["engram.latent.readout_heads=6", "model.hidden_size=128"]),
    (["engram.latent.readout_kv_heads=3"], ["engram.latent.readout_kv_heads=3", "readout_heads=4"]),
    (["engram.latent.surrogate=straight_through"], ["engram.latent.surrogate='straight_through'", "'one_bit'"]),
    (["model.hc_mult=4"], ["model.hc_mult=4", "model.hc_mult=1"]),
]


@pytest.mark.parametrize("overrides, needles", LATENT_CASES, ids=[" ".join(c[0]) for c in LATENT_CASES])
def test_lngram_config_errors(overrides, needles):
    from engram_train.config.schema import ConfigError
    from engram_train.config.store import compose

    with pytest.raises(ConfigError) as err:
        compose(["experiment=lngram_cpu"] + overrides)
    line = str(err.value)
    assert "\n" not in line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"


def test_lngram_tables_larger_than_a_rank_are_refused_with_their_bytes():
    """Checked before any row is allocated: 16 routes x 2^32 order-4 rows x 128 floats cannot fit."""
    from engram_train.config.schema import ConfigError
    from engram_train.config.store import compose
    from engram_train.lngram.build import check_shards_fit, table_specs
    from engram_train.memory.layout import placement_for

    cfg = compose(["experiment=lngram_cpu", "engram.latent.routes=16", "engram.latent.bits=8",
                   "engram.latent.orders=[4]", "engram.latent.memory_dim=128"])
    specs = table_specs(cfg.engram)
    with pytest.raises(ConfigError) as err:
        check_shards_fit(specs, placement_for("replicated", 1, 0, 1, 0), cfg.engram, "cpu")
    line = str(err.value)
    assert "\n" not in line
    # 2 layers x 16 x 2^32 rows x 128 x (4 weight + 8 adam + 4 grad) bytes, + 8 B/row of gradient ids
    need = 2 * 16 * 2 ** 32 * (128 * 16 + 8)
    for needle in ("engram.latent.orders=[4]", "68,719,476,736 rows", f"{need / 2**30:.1f} GiB",
                   "engram.partition=all"):
        assert needle in line, f"{needle!r} not in {line!r}"
    # spread over enough ranks, the same tables fit
    check_shards_fit(specs, placement_for("all", 1 << 20, 0, 1, 0), cfg.engram, "cpu")
