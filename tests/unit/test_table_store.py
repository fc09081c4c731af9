"""The table store in one process: layout arithmetic, row init, the table optimizers, the replicated lookup.

Every check is against an independent reference written here: ``torch.optim.AdamW``
over a whole table (``adam``), one ``torch.optim.AdamW`` per row stepping only when
its row is touched (``sparse_adam``), ``torch.chunk`` for row ranges, and
``F.embedding`` over a plain full weight for the lookup and its gradient.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engram_train.memory.layout import TableSpec, placement_for, row_range, shard_bounds
from engram_train.memory import optim
from engram_train.memory.optim import TableAdam, TableSparseAdam
from engram_train.memory.store import StoreOptions, TableStore, init_rows

RTOL, ATOL = 1e-5, 1e-6
BETAS, EPS = (0.9, 0.95), 1e-8
R, D = 23, 5
# (touched rows, lr) per step: first touches, a row left untouched after being touched (2, 7, 11),
# an empty step, a row first touched late (19), one touched every step but the empty one (0).
STEPS = [
    ([0, 2, 7, 11], 1e-2),
    ([0, 3, 4, 19], 3e-3),
    ([], 5e-3),
    ([0, 2, 22], 2e-2),
    ([0, 1, 5, 19, 20, 21], 7e-3),
]


def _step_grads(seed: int = 0):
    """Per step: (unique sorted row ids [n], gradient rows [n, D]): duplicates already summed."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for rows, lr in STEPS:
        ids = torch.tensor(sorted(rows), dtype=torch.int64)
        out.append((ids, torch.randn(len(rows), D, generator=g), lr))
    return out


def _weight(seed: int = 1) -> torch.Tensor:
    return torch.randn(R, D, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_table_adam_matches_torch_adamw_with_zero_gradient_on_untouched_rows(weight_decay):
    weight = _weight()
    opt = TableAdam(weight.clone(), betas=BETAS, eps=EPS, weight_decay=weight_decay)
    ref = torch.nn.Parameter(weight.clone())
    ref_opt = torch.optim.AdamW([ref], lr=1.0, betas=BETAS, eps=EPS, weight_decay=weight_decay, foreach=False)
    for i, (ids, rows, lr) in enumerate(_step_grads()):
        opt.step(ids, rows, lr)
        dense = torch.zeros(R, D)
        dense[ids] = rows
        ref.grad = dense
        ref_opt.param_groups[0]["lr"] = lr
        ref_opt.step()
        st = ref_opt.state[ref]
        msg = lambda m, i=i: f"step {i + 1}: {m}"   # noqa: E731
        torch.testing.assert_close(opt.weight, ref.detach(), rtol=RTOL, atol=ATOL, msg=msg)
        torch.testing.assert_close(opt.exp_avg, st["exp_avg"], rtol=RTOL, atol=ATOL, msg=msg)
        torch.testing.assert_close(opt.exp_avg_sq, st["exp_avg_sq"], rtol=RTOL, atol=ATOL, msg=msg)
        assert opt.num_steps == i + 1 == int(st["step"])
    # Untouched-since-touched rows kept moving (the point of `adam`): row 7 was touched only at step 1.
    assert not torch.equal(opt.weight[7], weight[7])
    assert opt.scalars() == {"num_steps": len(STEPS)}


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_table_sparse_adam_matches_a_per_row_adamw(weight_decay):
    weight = _weight()
    opt = TableSparseAdam(weight.clone(), betas=BETAS, eps=EPS, weight_decay=weight_decay)
    rows_ref, opts_ref = {}, {}      # row -> its own [D] parameter and AdamW, created at its first touch
    counts = torch.zeros(R, dtype=torch.int32)
    for i, (ids, grads, lr) in enumerate(_step_grads()):
        before = {k: t.clone() for k, t in opt.state_tensors().items()}
        before["weight"] = opt.weight.clone()
        opt.step(ids, grads, lr)
        for r, g in zip(ids.tolist(), grads):
            if r not in rows_ref:
                rows_ref[r] = torch.nn.Parameter(weight[r].clone())
                opts_ref[r] = torch.optim.AdamW([rows_ref[r]], lr=lr, betas=BETAS, eps=EPS,
                                                weight_decay=weight_decay, foreach=False)
            rows_ref[r].grad = g.clone()
            opts_ref[r].param_groups[0]["lr"] = lr
            opts_ref[r].step()
            counts[r] += 1
        for r in range(R):
            msg = lambda m, i=i, r=r: f"step {i + 1}, row {r}: {m}"   # noqa: E731
            if r in ids.tolist():
                st = opts_ref[r].state[rows_ref[r]]
                torch.testing.assert_close(opt.weight[r], rows_ref[r].detach(), rtol=RTOL, atol=ATOL, msg=msg)
                torch.testing.assert_close(opt.exp_avg[r], st["exp_avg"], rtol=RTOL, atol=ATOL, msg=msg)
                torch.testing.assert_close(opt.exp_avg_sq[r], st["exp_avg_sq"], rtol=RTOL, atol=ATOL, msg=msg)
            else:   # untouched this step: bit-identical, weight and state
                assert torch.equal(opt.weight[r], before["weight"][r]), msg("weight moved")
                for k in ("exp_avg", "exp_avg_sq", "row_steps"):
                    assert torch.equal(opt.state_tensors()[k][r], before[k][r]), msg(f"{k} changed")
        assert torch.equal(opt.row_steps, counts)
    never = [r for r in range(R) if counts[r] == 0]
    assert never and torch.equal(opt.weight[never], weight[never])
    assert opt.scalars() == {}
    assert set(opt.state_tensors()) == {"exp_avg", "exp_avg_sq", "row_steps"}


def test_table_sparse_adam_rowwise_matches_a_scalar_per_row_adam():
    """Row-wise second moment: each row keeps m [D], one scalar v (EMA of the row's mean squared
    gradient) and its own step; written here in plain Python floats, row by row."""
    from engram_train.memory.optim import TableSparseAdamRowwise

    weight = _weight()
    opt = TableSparseAdamRowwise(weight.clone(), betas=BETAS, eps=EPS)
    assert opt.exp_avg_sq.shape == (R, 1) and opt.nbytes() == R * D * 4 + R * 4 + R * 4
    ref = {r: {"w": weight[r].double().tolist(), "m": [0.0] * D, "v": 0.0, "t": 0} for r in range(R)}
    b1, b2 = BETAS
    for ids, grads, lr in _step_grads():
        opt.step(ids, grads, lr)
        for r, g in zip(ids.tolist(), grads.double().tolist()):
            st = ref[r]
            st["t"] += 1
            st["m"] = [b1 * m + (1 - b1) * x for m, x in zip(st["m"], g)]
            st["v"] = b2 * st["v"] + (1 - b2) * sum(x * x for x in g) / D
            denom = (st["v"] ** 0.5) / (1 - b2 ** st["t"]) ** 0.5 + EPS
            st["w"] = [w - lr / (1 - b1 ** st["t"]) * m / denom for w, m in zip(st["w"], st["m"])]
    for r in range(R):
        torch.testing.assert_close(opt.weight[r].double(), torch.tensor(ref[r]["w"], dtype=torch.float64),
                                   rtol=RTOL, atol=ATOL, msg=lambda m, r=r: f"row {r}: {m}")
        torch.testing.assert_close(float(opt.exp_avg_sq[r, 0]), ref[r]["v"], rtol=RTOL, atol=1e-12)
        assert int(opt.row_steps[r]) == ref[r]["t"]
    assert any(ref[r]["t"] == 0 for r in range(R))   # some rows never touched: they stayed put
    # Not sparse_adam: a row's coordinates share one step size.
    other = TableSparseAdam(weight.clone(), betas=BETAS, eps=EPS)
    for ids, grads, lr in _step_grads():
        other.step(ids, grads, lr)
    assert not torch.allclose(other.weight, opt.weight, rtol=RTOL, atol=ATOL)


def test_adam_and_sparse_adam_agree_on_rows_touched_every_step():
    weight = _weight()
    dense, sparse = TableAdam(weight.clone(), betas=BETAS, eps=EPS), TableSparseAdam(weight.clone(), betas=BETAS,
                                                                                     eps=EPS)
    g = torch.Generator().manual_seed(3)
    ids = torch.tensor([1, 4, 9])
    for lr in (1e-2, 2e-2, 5e-3):
        rows = torch.randn(3, D, generator=g)
        dense.step(ids, rows, lr)
        sparse.step(ids, rows, lr)
    torch.testing.assert_close(sparse.weight[ids], dense.weight[ids], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(sparse.exp_avg[ids], dense.exp_avg[ids], rtol=RTOL, atol=ATOL)


# --- init_rows -----------------------------------------------------------------------------------

# More rows than one init block (4096), so shards start and end inside and across blocks.
BIG = TableSpec(layer_id=3, table_sizes=(4099, 3001, 1213), embed_dim=3)
SMALL = TableSpec(layer_id=1, table_sizes=(31, 37, 41, 43), embed_dim=8)


@pytest.mark.parametrize("spec", [SMALL, BIG], ids=["small", "two_blocks"])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7])
def test_init_rows_shards_concatenate_to_the_whole_table(spec, parts):
    whole = init_rows(spec, 0, spec.rows, 0.02, seed=5)
    assert whole.shape == (spec.rows, spec.embed_dim) and whole.dtype == torch.float32
    shards = [init_rows(spec, *row_range(spec.rows, parts, i), 0.02, seed=5) for i in range(parts)]
    assert torch.equal(torch.cat(shards), whole)


def test_init_rows_arbitrary_ranges_empty_ranges_and_distribution():
    whole = init_rows(BIG, 0, BIG.rows, 0.02, seed=5)
    for lo, hi in [(0, 1), (4095, 4097), (4096, 4096), (100, 8000), (BIG.rows - 1, BIG.rows)]:
        assert torch.equal(init_rows(BIG, lo, hi, 0.02, seed=5), whole[lo:hi])
    assert init_rows(BIG, 7, 7, 0.02, seed=5).shape == (0, BIG.embed_dim)
    assert abs(whole.std().item() - 0.02) < 1e-3 and abs(whole.mean().item()) < 1e-3
    torch.testing.assert_close(init_rows(BIG, 0, 50, 1.0, seed=5), whole[:50] / 0.02)


def test_init_rows_leaves_the_global_rng_alone_and_depends_on_layer_and_seed():
    state = torch.get_rng_state()
    a = init_rows(SMALL, 0, SMALL.rows, 0.02, seed=5)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(99)                                       # the global seed plays no part
    assert torch.equal(init_rows(SMALL, 0, SMALL.rows, 0.02, seed=5), a)
    other_layer = TableSpec(2, SMALL.table_sizes, SMALL.embed_dim)
    assert not torch.allclose(init_rows(other_layer, 0, SMALL.rows, 0.02, seed=5), a)
    assert not torch.allclose(init_rows(SMALL, 0, SMALL.rows, 0.02, seed=6), a)
    # Blocks of one table differ too (not one stream repeated per block).
    big = init_rows(BIG, 0, 8192, 0.02, seed=5)
    assert not torch.allclose(big[:4096], big[4096:])


# --- layout ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,parts,want", [
    (10, 4, [(0, 3), (3, 6), (6, 9), (9, 10)]),
    (10, 8, [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10), (10, 10), (10, 10), (10, 10)]),
    (10, 1, [(0, 10)]),
    (3, 5, [(0, 1), (1, 2), (2, 3), (3, 3), (3, 3)]),
])
def test_row_range_examples(rows, parts, want):
    assert [row_range(rows, parts, i) for i in range(parts)] == want
    assert shard_bounds(rows, parts) == [lo for lo, _ in want] + [rows]


def test_row_range_is_torch_chunk_covering_and_disjoint():
    for rows in [1, 2, 9, 10, 152, 220, 4099]:
        for parts in [1, 2, 3, 4, 7, 8, 16]:
            ranges = [row_range(rows, parts, i) for i in range(parts)]
            chunk = math.ceil(rows / parts)
            sizes = [t.numel() for t in torch.chunk(torch.arange(rows), parts)]
            sizes += [0] * (parts - len(sizes))                 # torch.chunk drops trailing empty chunks
            assert [hi - lo for lo, hi in ranges] == sizes, (rows, parts)
            assert all(hi - lo <= chunk for lo, hi in ranges)
            assert ranges[0][0] == 0 and ranges[-1][1] == rows
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))   # contiguous: covering, disjoint
            b = shard_bounds(rows, parts)
            assert len(b) == parts + 1 and [(b[i], b[i + 1]) for i in range(parts)] == ranges
    for bad in (-1, 4):
        with pytest.raises(ValueError, match="out of range"):
            row_range(10, 4, bad)


def test_row_range_is_dtensors_uneven_shard_0():
    # DTensor's own rule for the rows of Shard(0) on mesh coordinate i of n: the checkpoint saves each
    # shard as a DTensor of that placement, so a torch upgrade that changed the rule must fail here.
    from torch.distributed.tensor import Shard

    for rows in [1, 2, 9, 10, 152, 220, 4099]:
        for parts in [1, 2, 3, 4, 7, 8, 16]:
            for i in range(parts):
                size, offset = Shard.local_shard_size_and_offset(rows, parts, i)
                assert row_range(rows, parts, i) == (offset, offset + size), (rows, parts, i)


def test_placement_for():
    assert placement_for("replicated", 4, 3, 2, 1).rows_of(SMALL) == (0, SMALL.rows)
    p = placement_for("tp", 4, 3, 2, 1)
    assert (p.parts, p.index) == (2, 1) and p.rows_of(SMALL) == row_range(SMALL.rows, 2, 1)
    p = placement_for("all", 4, 3, 2, 1)
    assert (p.parts, p.index) == (4, 3) and p.rows_of(SMALL) == row_range(SMALL.rows, 4, 3)
    assert placement_for("auto", 4, 3, 2, 1).partition == "tp"
    assert placement_for("auto", 4, 3, 1, 0).partition == "replicated"


# --- StoreTable, replicated, one process -----------------------------------------------------------

SPECS = {1: SMALL, 2: TableSpec(2, (47, 53, 59, 61), 8)}
LR_MULT = 5.0


def _store(optimizer="adam", **kw) -> TableStore:
    return TableStore(SPECS, placement_for("replicated", 1, 0, 1, 0),
                      StoreOptions(optimizer=optimizer, lr_mult=LR_MULT, betas=BETAS, eps=EPS, init_std=0.02, seed=11,
                                   **kw))


def _ids(spec: TableSpec, shape, seed: int, hi: int = None) -> torch.Tensor:
    """Hash ids [*shape, heads], head j below its table size (or below ``hi``): duplicates certain."""
    g = torch.Generator().manual_seed(seed)
    cols = [torch.randint(0, hi or s, shape + (1,), generator=g) for s in spec.table_sizes]
    return torch.cat(cols, dim=-1)


def _micro_batches(store, ref_weights, seeds=(0, 1)):
    """Forward + backward of a few micro-batches through the store and through F.embedding on full weights."""
    outs = []
    for seed in seeds:
        for layer_id, spec in SPECS.items():
            hash_ids = _ids(spec, (2, 6), seed + 10 * layer_id, hi=9)
            got = store.table(layer_id, spec.table_sizes, spec.embed_dim)(hash_ids)
            want = F.embedding(hash_ids + torch.tensor(spec.offsets), ref_weights[layer_id]).flatten(-2)
            outs.append((got.detach(), want.detach()))
            upstream = torch.randn(want.shape, generator=torch.Generator().manual_seed(100 + seed))
            (got * upstream).sum().backward()
            (want * upstream).sum().backward()
    return outs


def test_store_table_lookup_gradient_rows_and_norm_match_f_embedding():
    store = _store()
    ref = {l: s.weight.clone().requires_grad_(True) for l, s in store.shards.items()}
    for l, spec in SPECS.items():
        assert torch.equal(store.shards[l].weight, init_rows(spec, 0, spec.rows, 0.02, 11))
    for got, want in _micro_batches(store, ref):
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    total = store.reduce_gradients()
    want_sq = 0.0
    for l, shard in store.shards.items():
        ids, rows = shard.grad
        dense = ref[l].grad
        assert torch.equal(ids, torch.unique(ids)) and ids.dtype == torch.int64   # sorted, unique
        torch.testing.assert_close(rows, dense[ids], rtol=RTOL, atol=ATOL)
        rest = torch.ones(shard.num_rows, dtype=torch.bool)
        rest[ids] = False
        assert rest.any() and torch.count_nonzero(dense[rest]) == 0
        want_sq += dense.double().pow(2).sum()
    torch.testing.assert_close(total, want_sq, rtol=1e-10, atol=0)
    assert total.dtype == torch.float64


@pytest.mark.parametrize("optimizer", ["adam", "sparse_adam"])
def test_store_step_applies_the_table_optimizer_at_lr_mult(optimizer):
    store = _store(optimizer)
    ref = {l: s.weight.clone().requires_grad_(True) for l, s in store.shards.items()}
    _micro_batches(store, ref)
    store.reduce_gradients()
    store.step(lr=1e-2)
    for l, shard in store.shards.items():
        p = torch.nn.Parameter(ref[l].detach().clone())
        p.grad = ref[l].grad
        torch.optim.AdamW([p], lr=1e-2 * LR_MULT, betas=BETAS, eps=EPS, weight_decay=0.0).step()
        # Step 1: untouched rows have zero moments and do not move under either optimizer.
        torch.testing.assert_close(shard.weight, p.detach(), rtol=RTOL, atol=ATOL)
        assert shard.grad is None and shard._pending == []
    with pytest.raises(RuntimeError, match="before reduce_gradients"):
        store.step(lr=1e-2)


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.0625])
def test_store_step_scales_the_gradient_rows(scale):
    store = _store()
    ref = {l: s.weight.clone().requires_grad_(True) for l, s in store.shards.items()}
    _micro_batches(store, ref)
    store.reduce_gradients()
    grads = {l: tuple(t.clone() for t in s.grad) for l, s in store.shards.items()}
    store.step(lr=1e-2, grad_scale=scale)      # the global norm's clip coefficient (train/optimizers.py)
    for l, shard in store.shards.items():
        ids, rows = grads[l]
        # After one step the first moment holds (1 - beta1) * the (scaled) gradient: Adam's update itself
        # hardly depends on the scale, its moments do.
        torch.testing.assert_close(shard.optimizer.exp_avg[ids], (1 - BETAS[0]) * scale * rows, rtol=RTOL,
                                   atol=1e-9)
        torch.testing.assert_close(shard.optimizer.exp_avg_sq[ids], (1 - BETAS[1]) * (scale * rows) ** 2,
                                   rtol=RTOL, atol=1e-12)


def test_store_step_drops_the_update():
    store = _store("sparse_adam")
    before = {l: s.weight.clone() for l, s in store.shards.items()}
    ref = {l: s.weight.clone().requires_grad_(True) for l, s in store.shards.items()}
    _micro_batches(store, ref)
    store.reduce_gradients()
    store.step(lr=1e-2, drop=True)             # a non-finite global norm (train/optimizers.py)
    for l, shard in store.shards.items():
        assert torch.equal(shard.weight, before[l])
        assert torch.count_nonzero(shard.optimizer.exp_avg) == 0 and int(shard.optimizer.row_steps.sum()) == 0
        assert shard.grad is None
    with pytest.raises(RuntimeError, match="before reduce_gradients"):
        store.step(lr=1e-2)


def test_store_table_provider_checks_the_block_and_the_store_agree():
    from engram_train.config.schema import ConfigError

    store = _store()
    t = store.table(1, SMALL.table_sizes, 8)
    assert t is store.tables[1] and list(t.parameters()) == [] and t.num_heads == 4
    with pytest.raises(ConfigError, match="layer 5 has no table"):
        store.table(5, SMALL.table_sizes, 8)
    with pytest.raises(ConfigError, match="the store holds"):
        store.table(1, SMALL.table_sizes, 4)
    assert store.num_parameters() == {"local": (152 + 220) * 8, "global": (152 + 220) * 8}
    with torch.no_grad():
        out = t(_ids(SMALL, (3,), 0))
    assert not out.requires_grad and out.shape == (3, 32)


@pytest.mark.parametrize("optimizer", ["adam", "sparse_adam", "sparse_adam_rowwise"])
def test_store_memory_matches_the_sizing_arithmetic(optimizer):
    from engram_train.memory.layout import shard_bytes

    store = _store(optimizer)
    want = [shard_bytes(spec, store.placement, optimizer) for spec in SPECS.values()]
    got = store.memory_bytes()
    assert got["weight"] == sum(w["weight"] for w in want)
    assert got["optimizer"] == sum(w["optimizer"] for w in want)
    assert got["grad"] == 0
    ref = {l: s.weight.clone().requires_grad_(True) for l, s in store.shards.items()}
    _micro_batches(store, ref)
    store.reduce_gradients()
    assert 0 < store.memory_bytes()["grad"] <= sum(w["grad_max"] for w in want)


# ---- the kernels' dispatch points in the store (engram.kernel_backend) -----------------------------------

def _launch_spy(monkeypatch):
    """Names of the Triton kernels launched from now on (every launch goes through
    engram_train.kernels.triton.launch)."""
    import engram_train.kernels.triton as triton_kernels

    launched = []
    real = triton_kernels.launch
    monkeypatch.setattr(triton_kernels, "launch",
                        lambda device, kernel, *a, **kw: launched.append(kernel) or real(device, kernel, *a, **kw))
    return launched


def _two_steps(store, device="cpu"):
    """Two store steps of two micro-batches each (ids and gradients on ``device``), revisiting rows.
    Returns each step's reduced gradient rows ``{layer: (ids, rows)}``."""
    for table in store.tables.values():
        table.to(device)                  # the model moves its tables' offset buffers with it
    grads = []
    for step, seeds in enumerate([(0, 1), (2, 3)]):
        for seed in seeds:
            for layer_id, spec in SPECS.items():
                hash_ids = _ids(spec, (2, 6), seed + 10 * layer_id, hi=9).to(device)
                out = store.table(layer_id, spec.table_sizes, spec.embed_dim)(hash_ids)
                upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(100 + seed))
                (out * upstream.to(device)).sum().backward()
        store.reduce_gradients()
        grads.append({l: tuple(t.clone() for t in s.grad) for l, s in store.shards.items()})
        store.step(lr=1e-2 * (step + 1))
    return grads


def _lazy_adam_as_before(w, m, v, steps, ids, g, lr, rowwise=False):
    """The table step the store ran before it dispatched to engram_train.kernels.row_adam (copied rule, not
    imported); ``rowwise``: one second moment per row (sparse_adam_rowwise)."""
    b1, b2 = BETAS
    s = steps[ids] + 1
    steps[ids] = s
    mm = m[ids].mul_(b1).add_(g, alpha=1.0 - b1)
    if rowwise:
        vv = v[ids].mul_(b2).add_(g.square().mean(1, keepdim=True), alpha=1.0 - b2)
    else:
        vv = v[ids].mul_(b2).addcmul_(g, g, value=1.0 - b2)
    m[ids], v[ids] = mm, vv
    t = s.to(torch.float64).unsqueeze(1)
    bc1 = (1.0 - torch.pow(b1, t)).to(torch.float32)
    bc2 = (1.0 - torch.pow(b2, t)).sqrt().to(torch.float32)
    ww = w[ids]
    ww.addcdiv_(mm * (lr / bc1), (vv.sqrt() / bc2).add_(EPS), value=-1.0)
    w[ids] = ww


def test_store_on_cpu_gives_the_same_bits_as_before_the_kernel_dispatch(monkeypatch):
    """engram.kernel_backend=auto on the CPU: the torch references, bit for bit the store's former result
    (duplicates summed by index_add_ over torch.unique's inverse, then the lazy Adam rule), no kernel."""
    launched = _launch_spy(monkeypatch)
    store = _store("sparse_adam")
    init = {l: s.weight.clone() for l, s in store.shards.items()}
    ref = {l: w.clone().requires_grad_(True) for l, w in init.items()}
    want = {l: [w.clone(), torch.zeros_like(w), torch.zeros_like(w), torch.zeros(w.shape[0], dtype=torch.int32)]
            for l, w in init.items()}
    for step, seeds in enumerate([(0, 1), (2, 3)]):
        pending = {l: [] for l in SPECS}
        for shard in store.shards.values():   # record what the lookups hand the store, before it reduces
            real_acc = shard.accumulate
            shard.accumulate = (lambda ids, rows, l=shard.spec.layer_id, acc=real_acc:
                                pending[l].append((ids.clone(), rows.clone())) or acc(ids, rows))
        _micro_batches(store, ref, seeds=seeds)
        store.reduce_gradients()
        for l, shard in store.shards.items():
            ids = torch.cat([p[0] for p in pending[l]])
            rows = torch.cat([p[1] for p in pending[l]])
            uniq, inv = torch.unique(ids, sorted=True, return_inverse=True)
            summed = torch.zeros(uniq.numel(), rows.shape[1]).index_add_(0, inv, rows)
            got_ids, got_rows = shard.grad
            assert torch.equal(got_ids, uniq) and torch.equal(got_rows, summed)
            _lazy_adam_as_before(*want[l], uniq, summed, 1e-2 * (step + 1) * LR_MULT)
            del shard.accumulate
        store.step(lr=1e-2 * (step + 1))
        for l, shard in store.shards.items():
            opt = shard.optimizer
            for got, exp in zip((shard.weight, opt.exp_avg, opt.exp_avg_sq, opt.row_steps), want[l]):
                assert torch.equal(got, exp), f"layer {l}, step {step + 1}"
        assert not all(torch.equal(shard.weight, init[l]) for l, shard in store.shards.items())
    assert launched == []


def test_store_reduces_and_steps_through_the_triton_kernels_when_asked(monkeypatch):
    """engram.kernel_backend=triton (the CUDA path of "auto", run here under Triton's interpreter): the store's
    reduction and sparse Adam launch reduce_row_grads' and row_adam's kernels and give the torch result."""
    torch_store = _store("sparse_adam", kernel_backend="torch")
    want = _two_steps(torch_store)
    launched = _launch_spy(monkeypatch)
    store = _store("sparse_adam", kernel_backend="triton")
    assert all(s.optimizer.kernel_backend == "triton" for s in store.shards.values())
    got = _two_steps(store)
    assert {"gather_rows_kernel", "segment_sum_kernel", "row_adam_kernel"} <= set(launched)
    for step in range(2):
        for l in SPECS:
            assert torch.equal(got[step][l][0], want[step][l][0])
            torch.testing.assert_close(got[step][l][1], want[step][l][1], rtol=1e-6, atol=1e-7)
    for l, shard in store.shards.items():
        ref = torch_store.shards[l]
        assert torch.equal(shard.optimizer.row_steps, ref.optimizer.row_steps)
        for a, b in ((shard.weight, ref.weight), (shard.optimizer.exp_avg, ref.optimizer.exp_avg),
                     (shard.optimizer.exp_avg_sq, ref.optimizer.exp_avg_sq)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _dense_adam_as_before(w, m, v, num_steps, ids, grads, lr, weight_decay, eps, chunk_rows=1 << 18):
    """``adam``'s step as the store ran it before its blocked rewrite (copied rule, not imported): moments
    decayed, gradients added and a fresh denominator per block of 2^18 rows."""
    b1, b2 = BETAS
    bc1 = 1.0 - b1 ** num_steps
    bc2_sqrt = math.sqrt(1.0 - b2 ** num_steps)
    for lo in range(0, w.shape[0], chunk_rows):
        hi = min(lo + chunk_rows, w.shape[0])
        ww, mm, vv = w[lo:hi], m[lo:hi], v[lo:hi]
        mm.mul_(b1)
        vv.mul_(b2)
        sel = (ids >= lo) & (ids < hi)
        local, g = ids[sel] - lo, grads[sel]
        mm.index_add_(0, local, g, alpha=1.0 - b1)
        vv.index_add_(0, local, g * g, alpha=1.0 - b2)
        if weight_decay:
            ww.mul_(1.0 - lr * weight_decay)
        denom = (vv.sqrt() / bc2_sqrt).add_(eps)
        ww.addcdiv_(mm, denom, value=-lr / bc1)


@pytest.mark.parametrize("weight_decay,eps", [(0.0, EPS), (0.1, EPS), (0.0, 1e-30)])
def test_table_adam_gives_the_bits_of_its_former_implementation(weight_decay, eps, monkeypatch):
    """The blocked ``adam`` (one reused denominator buffer; zero and subnormal second moments raised to the
    smallest normal float before the sqrt where that cannot change the denominator, not with eps=1e-30)
    computes what the former one did, bit for bit: 20,000 rows of 16 (five blocks), rows never touched
    (v = 0), rows whose moments decayed to subnormals, normal ones, two steps."""
    rows, width = 20_000, 16
    monkeypatch.setattr(optim, "_DENSE_BLOCK_PARAMS", 1 << 16)   # 4,096-row blocks: five here
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(rows, width, generator=gen)
    kind = torch.randint(0, 4, (rows, 1), generator=gen)   # 0: never touched, 1: subnormal v, 2-3: normal
    m0 = torch.where(kind > 0, torch.randn(rows, width, generator=gen) * 1e-3, torch.zeros(()))
    v0 = torch.where(kind == 1, torch.rand(rows, width, generator=gen) * 1e-39,
                     torch.where(kind > 1, torch.rand(rows, width, generator=gen) * 1e-6, torch.zeros(())))
    assert ((v0 > 0) & (v0 < torch.finfo(torch.float32).tiny)).any()
    opt = TableAdam(weight.clone(), betas=BETAS, eps=eps, weight_decay=weight_decay)
    opt.exp_avg.copy_(m0)
    opt.exp_avg_sq.copy_(v0)
    w, m, v = weight.clone(), m0.clone(), v0.clone()
    for step in range(1, 3):
        ids = torch.unique(torch.randint(0, rows, (2000,), generator=gen))
        grads = torch.randn(ids.numel(), width, generator=gen)
        opt.step(ids, grads, 1e-2 * step)
        _dense_adam_as_before(w, m, v, step, ids, grads, 1e-2 * step, weight_decay, eps)
        for name, got, want in (("weight", opt.weight, w), ("exp_avg", opt.exp_avg, m), ("exp_avg_sq", opt.exp_avg_sq, v)):
            assert torch.equal(got, want), f"step {step}: {name}"
    assert opt._denom.shape[0] < rows   # the update really ran in blocks
    assert opt._floor_is_exact(math.sqrt(1 - BETAS[1])) == (eps == EPS)
