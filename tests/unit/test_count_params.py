"""moe_baseline_cpu stays iso-parameter with debug_cpu; tools/count_params.py agrees with a formula.

The counts here are written out from the configuration (layer shapes of megatron's GPT with SwiGLU
experts and Engram's block, docs/architecture.md), not taken from the model; the table sizes follow
the prime search (distinct primes, in order, from table_size_multiplier x compressed vocabulary),
with the compressed vocabulary the tool estimates when no data is prepared (75% of data.vocab_size)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from engram_train.config.store import compose
from tests.unit.test_engram_hashing import ref_isprime as _is_prime

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NO_DATA = "data.dir=/nonexistent/engram_count_params"   # the tool's estimate of the compressed vocabulary
ZERO_INIT = "engram.table_init_std=0"   # valid in the config (rows start at zero): the model builds too




def formula(experiment: str) -> dict:
    cfg = compose([f"experiment={experiment}", NO_DATA])
    m, e = cfg.model, cfg.engram
    h, f, L = m.hidden_size, m.moe_ffn_hidden_size, m.num_layers
    vocab = -(-cfg.data.vocab_size // m.make_vocab_size_divisible_by) * m.make_vocab_size_divisible_by
    kv = h // m.num_attention_heads * (m.num_query_groups or m.num_attention_heads)
    attention = h * (h + 2 * kv) + h * h + 2 * h            # qkv, output projection, two RMSNorm weights
    expert = 2 * f * h + f * h                              # SwiGLU fc1 (gate and up), fc2
    moe_layers = sum(1 for i in range(L) if i % m.moe_layer_freq == 0)
    experts = moe_layers * m.num_experts * expert
    router = moe_layers * m.num_experts * h
    dense_mlp = (L - moe_layers) * 3 * m.ffn_hidden_size * h
    dense = 2 * vocab * h + h + L * attention + router + dense_mlp   # untied embedding/output, final norm
    tables = 0
    if e.enabled:
        d_e = (e.max_ngram - 1) * e.n_embed_per_ngram
        G = m.hc_mult
        block = d_e * G * h + G * h + d_e * h + h + 3 * G * h + G * h * e.kernel_size
        dense += len(e.layer_ids) * block
        p = int(e.table_size_multiplier * int(0.75 * cfg.data.vocab_size)) - 1
        for _ in sorted(e.layer_ids):
            for _ in range((e.max_ngram - 1) * e.heads_per_ngram):
                p += 1
                while not _is_prime(p):
                    p += 1
                tables += p * (e.n_embed_per_ngram // e.heads_per_ngram)
    inactive = moe_layers * (m.num_experts - m.moe_router_topk) * expert
    active = dense + experts - inactive
    return {"total": dense + experts + tables, "engram_tables": tables, "experts": experts, "dense": dense,
            "active_excl_tables": active,
            "flops_per_token": 2 * (active - vocab * h) + 2 * L * cfg.data.seq_length * h}


@pytest.fixture(scope="module")
def tool_counts(tmp_path_factory):
    out = tmp_path_factory.mktemp("count") / "counts.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "count_params.py"), f"experiment=debug_cpu,{NO_DATA}",
         f"experiment=moe_baseline_cpu,{NO_DATA}", f"experiment=debug_cpu,{NO_DATA},{ZERO_INIT}", "--json", str(out)],
        env=dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "flops_per_token" in proc.stdout and "active_excl_tables" in proc.stdout
    counts = json.loads(out.read_text())
    return (counts[f"experiment=debug_cpu,{NO_DATA}"], counts[f"experiment=moe_baseline_cpu,{NO_DATA}"],
            counts[f"experiment=debug_cpu,{NO_DATA},{ZERO_INIT}"])


def test_baseline_is_iso_parameter_by_formula():
    engram, baseline = formula("debug_cpu"), formula("moe_baseline_cpu")
    assert engram["engram_tables"] > 0 and baseline["engram_tables"] == 0
    assert abs(baseline["total"] / engram["total"] - 1) <= 0.02, (baseline["total"], engram["total"])
    assert abs(baseline["active_excl_tables"] / engram["active_excl_tables"] - 1) <= 0.05


@pytest.mark.parametrize("which", [0, 1], ids=["debug_cpu", "moe_baseline_cpu"])
def test_tool_matches_formula(tool_counts, which):
    name = ("debug_cpu", "moe_baseline_cpu")[which]
    want, got = formula(name), tool_counts[which]
    for key, value in want.items():
        assert got[key] == value, (name, key, got[key], value)


def test_paper_27b_recipes_count_like_the_paper_without_building_them():
    """engram_27b cannot be built here (27B parameters, an alltoall dispatcher that needs CUDA): the tool counts
    from the configuration. The paper: 26.7B total and 3.8B active for both, 5.7B in Engram-27B's tables."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "counts.json")
        proc = subprocess.run(
            [sys.executable, os.path.join(ROOT, "tools", "count_params.py"), "experiment=engram_27b",
             "experiment=moe_27b", "--json", out],
            env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        counts = json.load(open(out))
    engram, moe = counts["experiment=engram_27b"], counts["experiment=moe_27b"]
    for c in (engram, moe):
        assert abs(c["total"] / 26.7e9 - 1) <= 0.03, c["total"]
        assert abs(c["active_excl_tables"] / 3.8e9 - 1) <= 0.05, c["active_excl_tables"]
    assert abs(engram["engram_tables"] / 5.7e9 - 1) <= 0.03 and moe["engram_tables"] == 0
    # Written out from the recipe: 30 MoE layers of 3 x 2560 x 1536 experts, 55 vs 72 routed, 2 shared (in dense).
    expert = 3 * 2560 * 1536
    assert engram["experts"] == 30 * 55 * expert and moe["experts"] == 30 * 72 * expert
    # 17 experts + router rows - tables - 2 Engram blocks of 4 branches (4 key projections with bias, 1 value
    # projection with bias, 3 x 4 norms, a depthwise conv of kernel 4 over 4 x 2560 channels); both have mHC
    assert moe["total"] - engram["total"] == 30 * 17 * (expert + 2560) - engram["engram_tables"] - 2 * (
        (1280 * 2560 + 2560) * (4 + 1) + 3 * 4 * 2560 + 4 * 2560 * 4)


def test_zero_table_init_std_builds_and_counts_like_the_default(tool_counts):
    zero_init, default = tool_counts[2], tool_counts[0]
    assert zero_init == default and zero_init["engram_tables"] == formula("debug_cpu")["engram_tables"] > 0

