"""The table store on gloo ranks (partition ``tp`` and ``all``) against a single-process oracle.

The oracle (one process, TP=1) is the model with its Engram blocks' own dense
``MultiHeadEmbeddingTable``, set to ``init_rows(spec, 0, rows, std, SEED)``, i.e.
the values the store draws for its shards.  Its Engram convs are made non-zero (a
fresh block's conv is zero, which would hide a wrong gather).  It runs two steps
with different batches (the second touches rows the first did not and leaves
some of the first's untouched); after each, the table is updated by
``torch.optim.AdamW`` (``adam``) or by one ``torch.optim.AdamW`` per row that
steps only when its row is touched (``sparse_adam``); dense weights stay put.
The per-step gradient target is the mean of the per-DP-slice gradients, as in
``test_model_parallel``.

Each rank builds ``build_table_store`` + ``build_model(table_provider=store.table)``
+ ``parallelize``, loads the oracle's dense state (``full_to_local``, without the
table weights), runs the same two steps on its DP slice and returns per step: the
per-token loss, the Engram lookups, the DP-averaged dense gradients in the full
layout, its shard's sparse gradient rows (global ids), ``grad_sq_norm`` and the
shard after ``store.step(lr)``.

Several configurations run in one spawn per world size (``init_parallel`` /
``destroy_parallel`` per configuration on one gloo default group), so the
spawns are paid once: ``tp`` at TP=2 (world 2) and TP=4 (world 4) with and
without sequence parallelism, ``all`` at world 2 (TP=1, DP=2) and world 4
(TP=2, DP=2), and the DP>1 replica reductions: ``tp`` at TP=2 on world 4 and
``replicated`` on world 2.  megatron refuses MoE under TP without SP in training
mode, so the SP-off configurations run in eval mode, oracle included (see
:func:`_training`).

``test_checkpoint_reshards`` saves stores (``all`` on 4 ranks, two table steps, in blocks of a few rows)
as the checkpoint's ``tables`` component (``engram_train.train.checkpoint.save_state``) and loads them
at ``tp`` TP=2 on 2 ranks and into one replicated process.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed.utils import run_distributed

pytestmark = pytest.mark.distributed

SEED = 1234
B, T, VOCAB = 4, 16, 100
ENGRAM_LAYERS = (1, 2)
# 153 and 221 rows: uneven shards at 2 and 4 parts (four odd primes would add up to an even number of
# rows, which 2 parts split evenly; the store does not need primes).
TABLE_SIZES = {1: [31, 37, 41, 44], 2: [47, 53, 59, 62]}
EMBED_DIM = 8                                              # n_embed_per_ngram 16 / heads_per_ngram 2
LR = 1e-2
RTOL, ATOL = 1e-4, 1e-5
WEIGHT_ATOL = 1e-4          # table weights after Adam steps (see test_table_steps_match_adamw_and_rowwise_adam)
OPTIMIZERS = ("adam", "sparse_adam")
# Checkpoints carry every table optimizer's state (sparse_adam_rowwise: a [rows, 1] second moment).
CHECKPOINT_OPTIMIZERS = OPTIMIZERS + ("sparse_adam_rowwise",)
# Hash ids per step, the same range for every head: step 2 leaves ids 0..7 untouched (adam keeps moving
# them, sparse_adam does not) and touches 16..30 for the first time (per-row bias correction).
ID_RANGES = ((0, 16), (8, 31))

# (partition, tensor_parallel, sequence_parallel) per world size.
CONFIGS = {
    2: [("tp", 2, True), ("tp", 2, False), ("all", 1, False), ("replicated", 1, False)],
    4: [("tp", 4, True), ("tp", 4, False), ("all", 2, True), ("tp", 2, True)],
}


def _configs(tp: int = 1, sp: bool = False, partition: str = "auto", optimizer: str = "adam"):
    from engram_train.config.schema import EngramConfig, ModelConfig, ParallelConfig, TrainerConfig

    model = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=4,
                        ffn_hidden_size=96, max_seq_length=T, num_experts=4, moe_ffn_hidden_size=32,
                        moe_router_topk=2, moe_layer_freq=2, moe_aux_loss_coeff=1e-2)
    engram = EngramConfig(layer_ids=list(ENGRAM_LAYERS), max_ngram=3, heads_per_ngram=2, n_embed_per_ngram=16,
                          partition=partition, optimizer=optimizer)
    return model, engram, ParallelConfig(tensor_parallel=tp, sequence_parallel=sp), TrainerConfig(seed=SEED)


def _batch(step: int):
    g = torch.Generator().manual_seed(SEED + step)
    tokens = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    position_ids = torch.arange(T).expand(B, T).contiguous()
    lo, hi = ID_RANGES[step]
    hash_ids = {l: torch.randint(lo, hi, (B, T, 4), generator=g) for l in ENGRAM_LAYERS}
    return tokens, position_ids, labels, hash_ids


def _rows(batch, dp_rank: int, dp_size: int):
    n = B // dp_size
    sl = slice(dp_rank * n, (dp_rank + 1) * n)
    tokens, pos, labels, hash_ids = batch
    return tokens[sl], pos[sl], labels[sl], {l: h[sl] for l, h in hash_ids.items()}


def _touched(batch):
    """Global row ids looked up by the whole batch, per layer (sorted)."""
    from engram_train.memory.layout import table_specs

    specs = table_specs(TABLE_SIZES, 16, 2)
    return {l: torch.unique((h + torch.tensor(specs[l].offsets)).reshape(-1)) for l, h in batch[3].items()}


def _table_key(layer_id: int) -> str:
    return f"gpt.decoder.layers.{layer_id}.engram.table.weight"


def _grads(model):
    return {n: (p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
            for n, p in model.named_parameters()}


def _lookup_hooks(model, out):
    hooks = []
    for layer_id, blk in model.engram_blocks().items():
        hooks.append(blk.table.register_forward_hook(
            lambda _m, _a, o, layer_id=layer_id: out.__setitem__(layer_id, o.detach().clone())))
    return hooks


# --- the oracle ------------------------------------------------------------------------------------

_ORACLES = {}


def _training(tp: int, sp: bool) -> bool:
    """megatron refuses MoE under TP without SP in training mode: such configurations run in eval mode
    (no MoE aux loss then, in the oracle too).  Gradients flow all the same, but the experts' do not
    match the oracle there (up to TP times too large: relative errors 1.0 at TP=2, 3.0 at TP=4, an
    unsupported megatron mode, not the store's), so those configurations check every gradient but
    the experts'."""
    return tp == 1 or sp


def _oracle(dp_size: int, optimizer: str, training: bool = True):
    """Initial full state and, per step: per-slice losses and lookups, mean gradients, table after the step."""
    key = (dp_size, optimizer, training)
    if key in _ORACLES:
        return _ORACLES[key]
    from engram_train.memory.layout import table_specs
    from engram_train.memory.store import init_rows
    from engram_train.model.gpt import build_model
    from engram_train.parallel.parallelize import parallelize
    from engram_train.parallel.state import destroy_parallel, init_parallel

    m, e, p, tr = _configs(optimizer=optimizer)
    specs = table_specs(TABLE_SIZES, e.n_embed_per_ngram, e.heads_per_ngram)
    init_parallel(p, SEED)
    try:
        model = parallelize(build_model(m, e, p, VOCAB, TABLE_SIZES), SEED)
        model.train(training)
        tables = {}
        with torch.no_grad():
            for layer_id, blk in model.engram_blocks().items():
                blk.conv.weight.normal_(0.0, 0.2)
                blk.table.weight.copy_(init_rows(specs[layer_id], 0, specs[layer_id].rows, e.table_init_std, SEED))
                tables[layer_id] = blk.table.weight
        state = {k: v.detach().clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
        lr = LR * e.table_lr_mult
        betas = (tr.adam_beta1, tr.adam_beta2)
        if optimizer == "adam":
            adamw = torch.optim.AdamW(list(tables.values()), lr=lr, betas=betas, eps=tr.adam_eps, weight_decay=0.0)
        row_params, row_opts = {}, {}       # (layer, row) -> its own [d] parameter and AdamW
        lookups = {}
        hooks = _lookup_hooks(model, lookups)
        steps = []
        for step in range(len(ID_RANGES)):
            batch, losses, slice_lookups, grads = _batch(step), [], [], None
            for r in range(dp_size):
                model.zero_grad(set_to_none=True)
                tokens, pos, labels, hash_ids = _rows(batch, r, dp_size)
                loss = model(tokens, pos, labels, hash_ids)
                loss.mean().backward()
                losses.append(loss.detach())
                slice_lookups.append(dict(lookups))
                g = _grads(model)
                grads = g if grads is None else {k: grads[k] + g[k] for k in g}
            grads = {k: v / dp_size for k, v in grads.items()}
            touched = _touched(batch)
            with torch.no_grad():
                if optimizer == "adam":
                    for layer_id, w in tables.items():
                        w.grad = grads[_table_key(layer_id)].clone()
                    adamw.step()
                else:
                    for layer_id, w in tables.items():
                        for row in touched[layer_id].tolist():
                            k = (layer_id, row)
                            if k not in row_params:
                                row_params[k] = torch.nn.Parameter(w[row].clone())
                                row_opts[k] = torch.optim.AdamW([row_params[k]], lr=lr, betas=betas,
                                                                eps=tr.adam_eps, weight_decay=0.0)
                            row_params[k].grad = grads[_table_key(layer_id)][row].clone()
                            row_opts[k].step()
                            w[row] = row_params[k].detach()
            model.zero_grad(set_to_none=True)
            steps.append(dict(losses=losses, lookups=slice_lookups, grads=grads, touched=touched,
                              tables={l: w.detach().clone() for l, w in tables.items()}))
        for h in hooks:
            h.remove()
        _ORACLES[key] = (state, steps)
        return _ORACLES[key]
    finally:
        destroy_parallel()


# --- the ranks -------------------------------------------------------------------------------------


def _run_config(partition: str, tp: int, sp: bool, optimizer: str, full_state):
    import torch.distributed as dist
    from megatron.core import parallel_state as mps

    from engram_train.engram.table import MultiHeadEmbeddingTable
    from engram_train.memory.store import build_table_store
    from engram_train.model.gpt import build_model
    from engram_train.parallel import state as ps
    from engram_train.parallel.parallelize import deepspeed_parameters, parallelize
    from engram_train.parallel.sharding import full_to_local, local_to_full

    m, e, p, tr = _configs(tp, sp, partition, optimizer)
    ps.init_parallel(p, SEED)
    try:
        store = build_table_store(e, tr, TABLE_SIZES, partition, SEED)
        model = parallelize(build_model(m, e, p, VOCAB, TABLE_SIZES, table_provider=store.table), SEED)
        dense_state = {k: v for k, v in full_state.items() if not k.endswith(".engram.table.weight")}
        assert len(full_state) - len(dense_state) == len(ENGRAM_LAYERS)
        model.load_state_dict(full_to_local(dense_state, model))
        model.train(_training(tp, sp))
        rank = dist.get_rank()
        out = dict(
            rank=rank, dp_rank=mps.get_data_parallel_rank(), dp_size=mps.get_data_parallel_world_size(),
            tp_rank=mps.get_tensor_model_parallel_rank(),
            sequence_parallel=bool(model.config.sequence_parallel),
            placement=(store.placement.partition, store.placement.parts, store.placement.index),
            shards={l: (s.lo, s.hi, tuple(s.weight.shape), tuple(s.optimizer.exp_avg.shape))
                    for l, s in store.shards.items()},
            table_modules=any(isinstance(mod, MultiHeadEmbeddingTable) for mod in model.modules()),
            table_params=[n for n, q in model.named_parameters() if getattr(q, "engram_table", False)],
            num_deepspeed_params=len(deepspeed_parameters(model)),
            num_parameters=store.num_parameters(), steps=[])
        lookups = {}
        _lookup_hooks(model, lookups)
        for step in range(len(ID_RANGES)):
            model.zero_grad(set_to_none=True)
            lookups.clear()
            tokens, pos, labels, hash_ids = _rows(_batch(step), mps.get_data_parallel_rank(),
                                                  mps.get_data_parallel_world_size())
            loss = model(tokens, pos, labels, hash_ids)
            loss.mean().backward()
            grads = _grads(model)
            if mps.get_data_parallel_world_size() > 1:
                for name, q in model.named_parameters():
                    # Dense gradients over the DP group; expert gradients over the expert-DP group.
                    group = mps.get_data_parallel_group() if getattr(q, "allreduce", True) \
                        else mps.get_expert_data_parallel_group()
                    dist.all_reduce(grads[name], group=group)
                    grads[name] /= mps.get_data_parallel_world_size()
            sq = store.reduce_gradients()
            sparse = {l: (s.grad[0] + s.lo, s.grad[1].clone()) for l, s in store.shards.items()}
            store.step(lr=LR)
            out["steps"].append(dict(
                loss=loss.detach(), lookups=dict(lookups), grads=local_to_full(grads, model), sparse=sparse,
                grad_sq_norm=sq.clone(),
                weights={l: s.weight.clone() for l, s in store.shards.items()},
                row_steps={l: s.optimizer.row_steps.clone() for l, s in store.shards.items()
                           if hasattr(s.optimizer, "row_steps")}))
        return out
    finally:
        ps.destroy_parallel()


def _rank_all_configs(configs, full_state):
    """One gloo default group for the whole spawn; megatron's groups per configuration."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return [dict(config=(partition, tp, sp), optimizer=optimizer,
                 **_run_config(partition, tp, sp, optimizer, full_state))
            for partition, tp, sp in configs for optimizer in OPTIMIZERS]


@pytest.fixture(scope="module", params=sorted(CONFIGS), ids=lambda w: f"world{w}")
def spawned(request):
    world = request.param
    full_state = _oracle(1, "adam")[0]
    results = run_distributed(_rank_all_configs, world, CONFIGS[world], full_state, timeout=240)
    by_config = {}
    for rank_results in results:
        for res in rank_results:
            by_config.setdefault((res["config"], res["optimizer"]), []).append(res)
    return world, by_config


def _close(got, want, what, rtol=RTOL, atol=ATOL):
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def test_forward_and_gradients_match_single_process(spawned):
    world, by_config = spawned
    for ((partition, tp, sp), optimizer), ranks in by_config.items():
        dp = world // tp
        oracle_steps = _oracle(dp, optimizer, _training(tp, sp))[1]
        for step, want in enumerate(oracle_steps):
            union = {l: [] for l in ENGRAM_LAYERS}
            for res in ranks:
                what = f"{partition} tp={tp} sp={sp} {optimizer} step {step + 1} rank {res['rank']}"
                assert res["dp_rank"] == res["rank"] // tp and res["dp_size"] == dp and res["tp_rank"] == \
                    res["rank"] % tp, what
                assert res["sequence_parallel"] == sp, what
                got = res["steps"][step]
                _close(got["loss"], want["losses"][res["dp_rank"]], f"{what} loss", rtol=1e-5, atol=1e-6)
                for l in ENGRAM_LAYERS:
                    # Rows are copied (or summed with zeros), never computed: exact at step 1; at step 2 they
                    # are the tables after one step (the weights' tolerance).
                    _close(got["lookups"][l], want["lookups"][res["dp_rank"]][l], f"{what} lookup layer {l}",
                           rtol=0 if step == 0 else RTOL, atol=0 if step == 0 else WEIGHT_ATOL)
                dense_want = {k: v for k, v in want["grads"].items() if not k.endswith(".engram.table.weight")}
                assert set(got["grads"]) == set(dense_want), what
                for k in dense_want:
                    if not _training(tp, sp) and ".mlp.experts." in k:
                        # megatron's MoE under TP without SP (refused in training mode, run here in eval
                        # mode) gives expert weights TP times their gradient: not ours to check.
                        continue
                    _close(got["grads"][k], dense_want[k], f"{what} gradient {k}")
                sq_want = 0.0
                for l in ENGRAM_LAYERS:
                    table_grad = want["grads"][_table_key(l)]
                    sq_want += table_grad.double().pow(2).sum()
                    ids, rows = got["sparse"][l]
                    lo, hi = res["shards"][l][:2]
                    assert ids.dtype == torch.int64 and torch.equal(ids, torch.unique(ids)), what
                    assert bool(((ids >= lo) & (ids < hi)).all()), f"{what}: sparse rows outside [{lo}, {hi})"
                    # Table gradients are ~1e-3: an absolute 1e-5 would hide a lot.
                    _close(rows, table_grad[ids], f"{what} sparse gradient rows layer {l}", atol=1e-7)
                    union[l].append(ids)
                # Step 2's gradients come from tables one Adam step apart (see WEIGHT_ATOL): rtol 1e-4 there.
                _close(got["grad_sq_norm"], sq_want, f"{what} grad_sq_norm", rtol=1e-5 if step == 0 else RTOL,
                       atol=0)
            for l in ENGRAM_LAYERS:
                ids = torch.unique(torch.cat(union[l]))
                nonzero = want["grads"][_table_key(l)].abs().sum(1).nonzero().flatten()
                what = f"{partition} tp={tp} sp={sp} {optimizer} step {step + 1} layer {l}"
                assert torch.equal(ids, nonzero), f"{what}: shards' rows are not the oracle's non-zero rows"
                assert torch.equal(ids, want["touched"][l]), what


def test_table_steps_match_adamw_and_rowwise_adam(spawned):
    world, by_config = spawned
    for ((partition, tp, sp), optimizer), ranks in by_config.items():
        oracle_steps = _oracle(world // tp, optimizer, _training(tp, sp))[1]
        for step, want in enumerate(oracle_steps):
            for res in ranks:
                what = f"{partition} tp={tp} sp={sp} {optimizer} step {step + 1} rank {res['rank']}"
                got = res["steps"][step]
                for l in ENGRAM_LAYERS:
                    lo, hi = res["shards"][l][:2]
                    # atol WEIGHT_ATOL: Adam divides each element by its own magnitude, so an element whose
                    # gradient nearly cancels (seen: |g| = 1.1e-7, about 11 eps) turns float32 summation-order
                    # noise (3e-10) into 1e-5..2e-5 of weight.  A wrong rule moves rows by O(lr * lr_mult).
                    _close(got["weights"][l], want["tables"][l][lo:hi], f"{what} table layer {l}", atol=WEIGHT_ATOL)
                    if optimizer == "sparse_adam":
                        counts = sum(torch.isin(torch.arange(lo, hi), s["touched"][l]).long()
                                     for s in oracle_steps[:step + 1])
                        assert torch.equal(got["row_steps"][l], counts), f"{what}: row_steps layer {l}"
                    else:
                        assert got["row_steps"] == {}


def test_oracles_tell_adam_from_sparse_adam():
    """The optimizer comparison can fail: at step 2 the two oracles differ exactly where they should."""
    adam, sparse = _oracle(1, "adam")[1], _oracle(1, "sparse_adam")[1]
    for l in ENGRAM_LAYERS:
        torch.testing.assert_close(adam[0]["tables"][l], sparse[0]["tables"][l], rtol=1e-6, atol=1e-7)
        first, second = adam[0]["touched"][l], adam[1]["touched"][l]
        only_first = first[~torch.isin(first, second)]
        only_second = second[~torch.isin(second, first)]
        assert only_first.numel() and only_second.numel()
        a, s = adam[1]["tables"][l], sparse[1]["tables"][l]
        assert torch.equal(s[only_first], sparse[0]["tables"][l][only_first])          # sparse: frozen
        assert (a[only_first] - adam[0]["tables"][l][only_first]).abs().min() > 1e-4    # adam: keeps moving
        assert (a[only_second] - s[only_second]).abs().max() > 1e-4                     # bias corrections
        never = torch.ones(a.shape[0], dtype=torch.bool)
        never[torch.cat([first, second])] = False
        assert torch.equal(a[never], s[never])


def test_each_rank_holds_only_its_shard(spawned):
    from engram_train.memory.layout import row_range

    world, by_config = spawned
    rows = {l: sum(s) for l, s in TABLE_SIZES.items()}
    for ((partition, tp, sp), optimizer), ranks in by_config.items():
        assert sorted(r["rank"] for r in ranks) == list(range(world))
        for res in ranks:
            what = f"{partition} tp={tp} {optimizer} rank {res['rank']}"
            parts, index = {"tp": (tp, res["rank"] % tp), "all": (world, res["rank"]),
                            "replicated": (1, 0)}[partition]
            assert res["placement"] == (partition, parts, index), what
            assert not res["table_modules"] and res["table_params"] == [], what
            local = 0
            for l, (lo, hi, wshape, mshape) in res["shards"].items():
                assert (lo, hi) == row_range(rows[l], parts, index), what
                assert wshape == mshape == (hi - lo, EMBED_DIM), what
                local += (hi - lo) * EMBED_DIM
            assert res["num_parameters"] == {"local": local, "global": sum(rows.values()) * EMBED_DIM}, what
        if partition != "replicated":
            # Uneven shards everywhere: these table sizes never divide by the number of parts.
            assert all(rows[l] % parts for l in rows)


# --- checkpoints -----------------------------------------------------------------------------------


def _store_only(partition: str, tp: int, optimizer: str, seed: int):
    """``init_parallel`` + a table store alone (no model)."""
    from engram_train.memory.store import build_table_store
    from engram_train.parallel import state as ps

    _, e, p, tr = _configs(tp, False, partition, optimizer)
    ps.init_parallel(p, SEED)
    return build_table_store(e, tr, TABLE_SIZES, partition, seed)


def _shard_state(store):
    return {l: dict(lo=s.lo, hi=s.hi, weight=s.weight.clone(),
                    **{k: t.clone() for k, t in s.optimizer.state_tensors().items()},
                    **s.optimizer.scalars())
            for l, s in store.shards.items()}


SMALL_BLOCK_BYTES = 200


def _rank_save(path: str):
    """Two table steps through the store's own lookups (no model), then save; returns this rank's shards."""
    import torch.distributed as dist

    from engram_train.memory import checkpoint
    from engram_train.parallel import state as ps
    from engram_train.train import checkpoint as train_checkpoint

    dist.init_process_group("gloo")
    # Blocks of a few rows: every shard is written as several DCP chunks, which loads must reassemble.
    train_checkpoint.BLOCK_BYTES = SMALL_BLOCK_BYTES
    out = {}
    for optimizer in CHECKPOINT_OPTIMIZERS:
        store = _store_only("all", 1, optimizer, SEED)
        try:
            for step in range(2):
                for l, spec in store.specs.items():
                    g = torch.Generator().manual_seed(100 * step + 10 * l + dist.get_rank())
                    # Step 1 touches nearly every row, step 2 a subset: row_steps end up 0, 1 and 2.
                    hi = None if step == 0 else 9
                    hash_ids = torch.stack([torch.randint(0, hi or s, (24,), generator=g)
                                            for s in spec.table_sizes], dim=-1)
                    rows = store.table(l, spec.table_sizes, spec.embed_dim)(hash_ids)
                    (rows * torch.randn(rows.shape, generator=g)).sum().backward()
                store.reduce_gradients()
                store.step(lr=LR)
            train_checkpoint.save_state({"tables": store}, os.path.join(path, optimizer))
            out[optimizer] = dict(_shard_state(store), manifest=checkpoint.manifest(store))
        finally:
            ps.destroy_parallel()
    return out


def _load(path: str, partition: str, tp: int):
    import torch.distributed.checkpoint as dcp

    from engram_train.parallel import state as ps

    out = {}
    for optimizer in CHECKPOINT_OPTIMIZERS:
        store = _store_only(partition, tp, optimizer, SEED + 1)    # another seed: loading must overwrite
        try:
            dcp.load({"tables": store}, checkpoint_id=os.path.join(path, optimizer))
            out[optimizer] = _shard_state(store)
        finally:
            ps.destroy_parallel()
    return out


def _rank_load(path: str, partition: str, tp: int):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return _load(path, partition, tp)


def _global(shards):
    """Rank-ordered shards of one layer -> global tensors (scalars must agree)."""
    keys = [k for k in shards[0] if isinstance(shards[0][k], torch.Tensor)]
    out = {k: torch.cat([s[k] for s in shards]) for k in keys}
    for k in shards[0]:
        if k not in keys and k not in ("lo", "hi"):
            assert len({s[k] for s in shards}) == 1, k
            out[k] = shards[0][k]
    return out


def test_checkpoint_reshards(tmp_path):
    import torch.distributed.checkpoint as dcp

    from engram_train.config.schema import ConfigError
    from engram_train.memory import checkpoint
    from engram_train.memory.layout import row_range

    path = str(tmp_path)
    saved_ranks = run_distributed(_rank_save, 4, path, timeout=180)
    saved = {}
    for optimizer in CHECKPOINT_OPTIMIZERS:
        saved[optimizer] = {}
        for l in ENGRAM_LAYERS:
            shards = [r[optimizer][l] for r in saved_ranks]
            assert [(s["lo"], s["hi"]) for s in shards] == [row_range(sum(TABLE_SIZES[l]), 4, i) for i in range(4)]
            saved[optimizer][l] = _global(shards)
        meta = dcp.FileSystemReader(os.path.join(path, optimizer)).read_metadata().state_dict_metadata
        for l in ENGRAM_LAYERS:
            weight = meta[f"tables.{checkpoint.PREFIX}.layer{l}.weight"]
            rows_per_chunk = max(1, SMALL_BLOCK_BYTES // (weight.size[1] * 4))
            assert max(c.sizes[0] for c in weight.chunks) == rows_per_chunk
            assert len(weight.chunks) >= sum(-(-(hi - lo) // rows_per_chunk) for lo, hi in
                                             (row_range(sum(TABLE_SIZES[l]), 4, i) for i in range(4)))
        manifest = saved_ranks[0][optimizer]["manifest"]
        assert manifest["partition"] == "all" and manifest["world_size"] == 4 and manifest["optimizer"] == optimizer
    s = saved["sparse_adam"][1]
    assert set(s["row_steps"].unique().tolist()) == {0, 1, 2}
    assert saved["adam"][1]["num_steps"] == 2
    assert saved["sparse_adam_rowwise"][1]["exp_avg_sq"].shape == (sum(TABLE_SIZES[1]), 1)

    def check(loaded, what):
        for optimizer in CHECKPOINT_OPTIMIZERS:
            for l in ENGRAM_LAYERS:
                want = saved[optimizer][l]
                got = _global(loaded[optimizer][l])
                assert set(got) == set(want), f"{what} {optimizer} layer {l}"
                for k in want:
                    if isinstance(want[k], torch.Tensor):
                        assert torch.equal(got[k], want[k]), f"{what} {optimizer} layer {l}: {k} differs"
                    else:
                        assert got[k] == want[k], f"{what} {optimizer} layer {l}: {k}"

    # partition=tp at TP=2 on 2 ranks: each rank holds its half; both TP shards together are the table.
    tp_ranks = run_distributed(_rank_load, 2, path, "tp", 2, timeout=120)
    check({o: {l: [r[o][l] for r in tp_ranks] for l in ENGRAM_LAYERS} for o in CHECKPOINT_OPTIMIZERS}, "tp=2")
    for r, res in enumerate(tp_ranks):
        for l in ENGRAM_LAYERS:
            assert (res["adam"][l]["lo"], res["adam"][l]["hi"]) == row_range(sum(TABLE_SIZES[l]), 2, r)

    # One process, replicated: the whole table.
    from engram_train.parallel import state as ps

    one = _load(path, "replicated", 1)
    for optimizer in CHECKPOINT_OPTIMIZERS:
        for l in ENGRAM_LAYERS:
            assert (one[optimizer][l]["lo"], one[optimizer][l]["hi"]) == (0, sum(TABLE_SIZES[l]))
    check({o: {l: [one[o][l]] for l in ENGRAM_LAYERS} for o in CHECKPOINT_OPTIMIZERS}, "replicated, one process")

    # The optimizer must match the checkpoint's.
    store = _store_only("replicated", 1, "sparse_adam", SEED)
    try:
        with pytest.raises(ConfigError, match="engram.optimizer='sparse_adam'"):
            checkpoint.check_compatible(store, saved_ranks[0]["adam"]["manifest"], os.path.join(path, "adam"))
    finally:
        ps.destroy_parallel()
