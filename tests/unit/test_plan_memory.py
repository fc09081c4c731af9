"""tools/plan_memory.py: table bytes against an independent computation, dense counts against the real
model, host residency (bytes per node and per device), the 27B and 100B-host sizing recipes, and one-line
errors."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "plan_memory.py")


def run_tool(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)


def plan_json(*args):
    proc = run_tool(*args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def load_tool():
    spec = importlib.util.spec_from_file_location("plan_memory", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _is_prime(n):
    if n < 2:
        return False
    f = 2
    while f * f <= n:
        if n % f == 0:
            return False
        f += 1
    return True


def _primes(layer_ids, max_ngram, heads, starts):
    """Distinct primes per (layer, order, head), each the next unused prime at or above its order's start."""
    seen, out = set(), {}
    for layer in layer_ids:
        sizes = []
        for start in starts[: max_ngram - 1]:
            p = start
            for _ in range(heads):
                while not _is_prime(p) or p in seen:
                    p += 1
                seen.add(p)
                sizes.append(p)
        out[layer] = sizes
    return out


@pytest.mark.parametrize("optimizer", ["adam", "sparse_adam"])
def test_debug_cpu_tp2_table_bytes_match_an_independent_computation(optimizer):
    r = plan_json("experiment=debug_cpu", "parallel.tensor_parallel=2", f"engram.optimizer={optimizer}", "world=2")
    # debug_cpu: Engram at layers [1, 3], orders 2..3, 4 heads of 64/4 = 16 floats, sizes 5 x 4096 (V' <= V);
    # 8 sequences of 256 tokens per step, 8 ids per token and layer.
    dim, ids_step = 16, 8 * 256 * 8
    primes = _primes([1, 3], 3, 4, [5 * 4096, 5 * 4096])
    rows = {l: sum(s) for l, s in primes.items()}
    assert r["engram"]["table_sizes"] == {str(l): s for l, s in primes.items()}
    assert r["engram"]["params"] == sum(rows.values()) * dim
    assert r["default_partition"] == "tp" and r["engram"]["optimizer"] == optimizer
    for name, parts in (("replicated", 1), ("tp", 2), ("all", 2)):
        shard = {l: min(-(-n // parts), n) for l, n in rows.items()}        # rank 0: the first ceil-chunk
        n = sum(shard.values())
        got = r["placements"][name]
        assert got["parts"] == parts and got["shard_rows"] == n
        assert got["weight"] == 4 * dim * n
        assert got["optimizer"] == 8 * dim * n + (4 * n if optimizer == "sparse_adam" else 0)
        assert got["grad_max"] == sum(min(k, ids_step) * (4 * dim + 8) for k in shard.values())
        assert r["totals"][name] == got["weight"] + got["optimizer"] + got["grad_max"] + r["dense"]["total"]


SMALL = {
    "gqa_moe_every_2nd_untied": ["experiment=debug_cpu", "model.num_query_groups=2", "model.moe_layer_freq=2",
                                 "data.vocab_size=1000", "engram.layer_ids=[0,2]",
                                 "engram.table_size_per_ngram=[31,37]"],
    "dense_tied_4gram": ["experiment=debug_cpu", "model.num_experts=null", "data.vocab_size=300",
                         "model.untie_embeddings_and_output_weights=false", "engram.max_ngram=4",
                         "engram.n_embed_per_ngram=32", "engram.kernel_size=3",
                         "engram.table_size_per_ngram=[31,37,41]"],
    # DeepSeekMoE + MLA (issue 15): shared experts, sigmoid + expert-bias routing, query latent
    "mla_shared_sigmoid_bias": ["experiment=debug_cpu", "model.attention=mla", "model.q_lora_rank=48",
                                "model.kv_lora_rank=40", "model.qk_head_dim=24", "model.qk_pos_emb_head_dim=8",
                                "model.v_head_dim=20", "model.moe_shared_expert_ffn_hidden_size=96",
                                "model.moe_router_score_function=sigmoid", "model.moe_router_enable_expert_bias=true",
                                "model.moe_router_load_balancing_type=none", "model.moe_layer_freq=2",
                                "data.vocab_size=500", "engram.table_size_per_ngram=[31,37]"],
    # mHC: 4 residual streams (mixing per sublayer, the collapse before the final norm, Engram per stream)
    "mhc4_mla_shared": ["experiment=debug_cpu", "model.hc_mult=4", "model.attention=mla", "model.q_lora_rank=48",
                        "model.kv_lora_rank=40", "model.qk_head_dim=24", "model.qk_pos_emb_head_dim=8",
                        "model.v_head_dim=20", "model.moe_shared_expert_ffn_hidden_size=96",
                        "data.vocab_size=500", "engram.table_size_per_ngram=[31,37]"],
    # MLA with a full-rank query projection, tied embeddings, dense MLPs only
    "mla_no_q_latent_dense": ["experiment=debug_cpu", "model.attention=mla", "model.q_lora_rank=null",
                              "model.kv_lora_rank=32", "model.qk_head_dim=16", "model.qk_pos_emb_head_dim=16",
                              "model.v_head_dim=32", "model.num_experts=null", "data.vocab_size=300",
                              "model.untie_embeddings_and_output_weights=false", "engram.enabled=false"],
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_dense_parameter_count_matches_the_real_model(name):
    from engram_train.config.store import compose
    from engram_train.engram.hashing import prime_table_sizes
    from engram_train.model.counts import param_counts
    from engram_train.model.gpt import build_model
    from engram_train.parallel.state import destroy_parallel, init_parallel

    tool = load_tool()
    cfg = compose(SMALL[name])
    e = cfg.engram
    sizes = prime_table_sizes(e.layer_ids, e.max_ngram, e.heads_per_ngram, e.table_size_per_ngram) \
        if e.enabled else None
    init_parallel(cfg.parallel, seed=0)
    try:
        model = build_model(cfg.model, e, cfg.parallel, cfg.data.vocab_size, sizes)
        real = model.num_parameters()
        # megatron marks the weights it splits over TP (column/row-parallel, vocab-parallel), even at TP=1
        real_split = sum(p.numel() for n, p in model.named_parameters()
                         if getattr(p, "tensor_model_parallel", False) and ".mlp.experts." not in n)
    finally:
        destroy_parallel()
    want = param_counts(cfg.model, e, tool.padded_vocab(cfg))
    assert (want["dense"], want["experts"]) == (real["dense"], real["experts"])
    assert want["tp_split"] == real_split
    n_experts = cfg.model.num_experts or 0
    assert want["expert_bias"] == sum(b.numel() for n, b in model.named_buffers() if n.endswith(".expert_bias"))
    moe_layers = sum(1 for layer in model.gpt.decoder.layers if hasattr(layer.mlp, "router"))
    per_expert = real["experts"] // max(1, moe_layers * n_experts)
    inactive = moe_layers * (n_experts - cfg.model.moe_router_topk) * per_expert if n_experts else 0
    assert want["active"] == real["total"] - real["engram_tables"] - inactive
    assert want["total"] + real["engram_tables"] == real["total"]
    if e.enabled:
        tables, _ = tool.table_sizes(e, None, cfg.data.vocab_size)
        assert real["engram_tables"] == sum(map(sum, tables.values())) * e.n_embed_per_ngram // e.heads_per_ngram
    else:
        assert real["engram_tables"] == 0


def test_engram_27b_recipe_validates_and_holds_about_5_7b_table_parameters():
    from engram_train.config.store import compose

    proc = run_tool("experiment=engram_27b", "world=64")
    assert proc.returncode == 0, proc.stderr
    for piece in ("MLA attention", "shared experts", "routed experts (55, top-6)", "routers", "Engram blocks",
                  "sigmoid scores x 2.5", "expert-bias balancing (1,650 fp32 bias values"):
        assert piece in proc.stdout, piece

    cfg = compose(["experiment=engram_27b"])
    cfg.validate(world_size=64)
    assert cfg.engram.layer_ids == [1, 14] and cfg.engram.heads_per_ngram == 8 and cfg.engram.max_ngram == 3
    r = plan_json("experiment=engram_27b", "world=64")
    assert r["engram"]["params"] == pytest.approx(5.7e9, rel=0.05)
    primes = [p for s in r["engram"]["table_sizes"].values() for p in s]
    assert len(primes) == len(set(primes)) == 2 * 2 * 8
    # 55 routed experts: no EP size divides them and DP 16 (moe_27b's 72 go over EP 8)
    assert (r["tensor_parallel"], r["data_parallel"], r["expert_parallel"], r["zero_stage"]) == (4, 16, 1, 2)
    assert plan_json("experiment=moe_27b", "world=64")["expert_parallel"] == 8
    assert r["precision"] == "bf16" and r["default_partition"] == "tp"
    assert r["placements"]["tp"]["shard_rows"] * 4 == pytest.approx(r["engram"]["rows"], abs=8)


def _shard(rows, parts, index):
    """torch.chunk's rows for shard ``index`` of ``parts``."""
    chunk = -(-rows // parts)
    lo = min(index * chunk, rows)
    return min(lo + chunk, rows) - lo


HOST = ["experiment=debug_cpu", "engram.residency=host", "engram.optimizer=sparse_adam",
        "parallel.tensor_parallel=2", "data.global_batch_size=16"]


@pytest.mark.parametrize("sizes,depth", [(None, 1), ([31, 37], 2)])
def test_host_residency_bytes_match_an_independent_computation(sizes, depth):
    # world 4 = TP 2 x DP 2, nodes of 2 ranks: node 0 holds ranks 0 and 1 (TP ranks 0 and 1).
    extra = [f"engram.prefetch_depth={depth}"] + ([f"engram.table_size_per_ngram=[{sizes[0]},{sizes[1]}]"]
                                                  if sizes else [])
    r = plan_json(*HOST, *extra, "world=4", "ranks_per_node=2")
    dim, heads, world, k, tp = 16, 8, 4, 2, 2
    ids_mb, ids_step = 8 * 256 * heads, 16 * 256 * heads       # micro-batch 8 x 256 tokens, global batch 16
    primes = _primes([1, 3], 3, 4, sizes or [5 * 4096, 5 * 4096])
    rows = {l: sum(p) for l, p in primes.items()}
    per_row = 12 * dim + 4                       # fp32 weight + 2 moments, int32 step count
    # Row blocks: (depth + 1) per layer, min(layer rows, ids) unique fp32 rows + an int64 inverse index.
    blocks = (depth + 1) * sum(min(n, ids_mb) * dim * 4 + 8 * ids_mb for n in rows.values())
    node_tables = {
        "replicated": k * sum(rows.values()) * per_row,                       # a whole copy per rank
        "tp": sum(_shard(n, tp, rank % tp) for rank in range(k) for n in rows.values()) * per_row,
        "all": sum(_shard(n, world, rank) for rank in range(k) for n in rows.values()) * per_row,
    }
    assert node_tables["tp"] == sum(rows.values()) * per_row                # TP 2 = 2 ranks/node: one copy
    h = r["host"]
    assert r["residency"] == "host" and h["ranks_per_node"] == k and h["node_ranks"] == k and h["nodes"] == 2
    assert h["blocks_in_flight"] == depth + 1 and h["ids_per_micro_batch"] == ids_mb
    for name, parts in (("replicated", 1), ("tp", tp), ("all", world)):
        got = h["placements"][name]
        grad = sum(min(_shard(n, parts, 0), ids_step) * (4 * dim + 8) for n in rows.values())
        assert got["row_blocks"] == got["staging_per_rank"] == blocks
        assert got["tables_per_node"] == node_tables[name]
        assert got["host_bytes_per_node"] == r["host_bytes_per_node"][name] == node_tables[name] + k * blocks
        assert got["device_bytes_per_rank"] == r["device_bytes_per_rank"][name] == \
            r["dense"]["total"] + blocks + grad
    assert h["placements"]["replicated"]["table_copies_per_node"] == k
    assert h["placements"]["all"]["table_copies_per_node"] == pytest.approx(k / world, rel=1e-3)


def test_host_residency_text_names_the_copies_per_node():
    proc = run_tool(*HOST, "world=4", "ranks_per_node=2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "host per node" in out and "device per rank" in out and "host RAM per node" in out
    assert "without engram.host_dir" in out and "ranks_per_node=2 copies" in out


def test_host_dir_maps_one_copy_of_each_shard_per_node():
    private = plan_json(*HOST, "world=4", "ranks_per_node=2")["host"]["placements"]
    shared = plan_json(*HOST, "engram.host_dir=/dev/shm/engram", "world=4", "ranks_per_node=2")
    h = shared["host"]["placements"]
    # Node 0 = ranks 0 and 1: replicas of the whole table (replicated), the two TP halves (tp), or two
    # quarters (all). Mapped files share the replicas only.
    assert h["replicated"]["table_copies_per_node"] == 1
    assert h["replicated"]["tables_per_node"] * 2 == private["replicated"]["tables_per_node"]
    for name in ("tp", "all"):
        assert h[name]["tables_per_node"] == private[name]["tables_per_node"]
    assert "the same shard map one copy" in run_tool(*HOST, "engram.host_dir=/dev/shm/engram", "world=4",
                                       "ranks_per_node=2").stdout


DEVICE_KEYS = {"world", "tensor_parallel", "data_parallel", "expert_parallel", "expert_data_parallel",
               "zero_stage", "offload_optimizer", "padded_vocab", "precision", "precision_assumed",
               "default_partition", "placements", "dense", "engram", "totals", "model"}


def test_device_residency_output_has_no_host_part_and_ignores_ranks_per_node():
    args = ["experiment=debug_cpu", "parallel.tensor_parallel=2", "world=2"]
    r = plan_json(*args)
    assert set(r) == DEVICE_KEYS
    assert set(r["placements"]["tp"]) == {"parts", "shard_rows", "weight", "optimizer", "grad_max", "total"}
    assert plan_json(*args, "ranks_per_node=3") == r
    plain, per_node = run_tool(*args), run_tool(*args, "ranks_per_node=3")
    assert plain.returncode == per_node.returncode == 0
    assert plain.stdout == per_node.stdout and "host" not in plain.stdout


def test_engram_100b_host_recipe_validates_and_needs_a_quarter_of_the_table_per_node():
    from engram_train.config.store import compose

    cfg = compose(["experiment=engram_100b_host_4node"])
    cfg.validate(world_size=32)
    e = cfg.engram
    assert (e.residency, e.optimizer, e.partition) == ("host", "sparse_adam", "all")
    r = plan_json("experiment=engram_100b_host_4node", "world=32", "ranks_per_node=8")
    params = r["engram"]["params"]
    assert params == pytest.approx(1e11, rel=0.05)
    assert r["default_partition"] == "all" and r["host"]["nodes"] == 4
    # Independently: 1e11 parameters of 80 floats per row, 12 bytes each + 4 per row, a quarter per node,
    # plus 8 ranks x 2 layers x 2 blocks of 2 x 4096 x 16 ids (fp32 rows of 80 + an int64 index).
    ids = 2 * 4096 * 16
    table, staging = 1e11 * (12 + 4 / 80), 8 * 2 * 2 * ids * (4 * 80 + 8)
    assert r["host_bytes_per_node"]["all"] == pytest.approx(table / 4 + staging, rel=0.05)
    assert r["host"]["placements"]["all"]["table_copies_per_node"] == pytest.approx(0.25, rel=1e-3)
    assert r["host_bytes_per_node"]["replicated"] == pytest.approx(8 * table + staging, rel=0.05)   # 8 copies


@pytest.mark.parametrize("args,key", [
    (["experiment=debug_cpu", "parallel.tensor_parallel=2", "world=3"], "parallel.tensor_parallel"),
    (["experiment=debug_cpu", "engram.partition=rows", "world=1"], "engram.partition"),
    (["experiment=debug_cpu", "world=2", "ranks_per_node=0"], "ranks_per_node"),
    (HOST + ["data.global_batch_size=48", "world=6", "ranks_per_node=4"], "ranks_per_node"),
])
def test_bad_config_exits_2_with_one_line_naming_the_key(args, key):
    proc = run_tool(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0] and "Traceback" not in proc.stderr, proc.stderr
