"""GPU tier of the Triton kernels: the compiled kernels on CUDA against the torch references.

The same checks as tests/unit/test_kernels_triton.py (which runs the kernels
under the interpreter), on CUDA tensors, plus what only a GPU has: bf16, the
gather from pinned host memory over UVA, sizes where int32 offsets would
overflow, and run-to-run determinism of the reduction.  Skipped without CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

from tests.unit.test_kernels_triton import (I64_MAX, I64_MIN, _hasher, _table, ref_adam, ref_gather,  # noqa: E402
                                            ref_hash, ref_reduce)


def test_floor_mod_on_cuda_is_exact():
    from engram_train.kernels import triton as kt

    g = torch.Generator().manual_seed(0)
    xs = torch.randint(I64_MIN, I64_MAX, (1 << 16,), generator=g, dtype=torch.int64)
    xs[:4] = torch.tensor([I64_MIN, I64_MAX, -1, 0])
    for p in (2, 3, (1 << 31) - 1, 1099511627689, (1 << 40) - 1):
        assert torch.equal(kt.floor_mod(xs.cuda(), p).cpu(), torch.remainder(xs, p))


@pytest.mark.parametrize("N, K, reset", [(2, 1, False), (3, 4, False), (3, 4, True), (4, 3, True)])
def test_hash_ngrams_on_cuda_equals_cpu(N, K, reset):
    torch.manual_seed(0)
    raw = torch.randint(0, 300, (5, 301))
    raw[raw % 4 == 0] = 7
    raw[0, 0] = -5
    ht, hk, auto = _hasher(N, K, reset, "torch"), _hasher(N, K, reset, "triton"), _hasher(N, K, reset, "auto")
    assert auto._path(torch.device("cuda")) == "triton"
    want = ht(raw)
    got, got_auto = hk(raw.cuda()), auto(raw.cuda())
    small = ref_hash(ht, raw[:2, :40].numpy())
    for layer in ht.layer_ids:
        assert got[layer].is_cuda
        assert torch.equal(got[layer].cpu(), want[layer]) and torch.equal(got_auto[layer].cpu(), want[layer])
        assert np.array_equal(got[layer][:2, :40].cpu().numpy(), small[layer])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", ["device", "pinned"])
def test_gather_rows_on_cuda(dtype, where):
    from engram_train.kernels import gather_rows

    sizes = [1000, 37, 4099]
    weight, offsets = _table(sizes, 48, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    ids = torch.stack([torch.randint(0, s, (4, 129), generator=g) for s in sizes], dim=-1)
    ids.view(-1, 3)[0] = 0
    ids.view(-1, 3)[-1] = torch.tensor(sizes) - 1
    w = weight.cuda() if where == "device" else weight.pin_memory()
    got = gather_rows(w, ids.cuda(), offsets.cuda())          # auto: Triton for CUDA ids
    assert got.is_cuda and got.dtype == dtype
    assert torch.equal(got.cpu(), gather_rows(weight, ids, offsets, backend="torch"))   # a copy: exact in bf16 too
    assert np.array_equal(got[:1].float().cpu().numpy(), ref_gather(weight.float(), ids[:1], offsets))


def test_gather_rows_from_unpinned_host_memory_is_refused():
    from engram_train.kernels import gather_rows

    weight, offsets = _table([4], 8)
    with pytest.raises(ValueError, match="pin the host table"):
        gather_rows(weight, torch.zeros(3, 1, dtype=torch.int64, device="cuda"), offsets.cuda())


def test_gather_rows_past_int32_element_offsets():
    from engram_train.kernels import gather_rows

    rows, d = (1 << 31) // 64 + 1000, 64              # row * d exceeds 2**31 near the end of the table
    weight = torch.empty(rows, d, dtype=torch.bfloat16, device="cuda")
    ids = torch.tensor([[0], [rows - 1], [rows - 2]], device="cuda")
    weight[ids.view(-1)] = torch.arange(3 * d, device="cuda", dtype=torch.float32).view(3, d).to(torch.bfloat16)
    got = gather_rows(weight, ids, torch.zeros(1, dtype=torch.int64, device="cuda"))
    assert torch.equal(got, weight[ids.view(-1)])


@pytest.mark.parametrize("M, d, R", [(100_003, 32, 5000), (50_000, 64, 1), (7, 5, 3), (0, 16, 4)])
def test_reduce_row_grads_on_cuda(M, d, R):
    from engram_train.kernels import reduce_row_grads

    g = torch.Generator().manual_seed(M)
    ids = torch.randint(0, R, (M,), generator=g)
    grads = torch.randn(M, d, generator=g)
    uniq, summed = reduce_row_grads(ids.cuda(), grads.cuda())
    u_ref, s_ref = reduce_row_grads(ids, grads, backend="torch")
    assert torch.equal(uniq.cpu(), u_ref)
    torch.testing.assert_close(summed.cpu(), s_ref, atol=1e-4, rtol=1e-5)   # summation order differs
    if M < 100:
        keys, dense = ref_reduce(ids, grads)
        np.testing.assert_allclose(summed.cpu().numpy(), dense, atol=1e-5, rtol=1e-6)
    again = reduce_row_grads(ids.cuda(), grads.cuda())[1]
    assert torch.equal(again, summed)                 # no atomics: the same bits on every run
    bf = reduce_row_grads(ids.cuda(), grads.cuda().bfloat16())[1]
    torch.testing.assert_close(bf.float().cpu(), s_ref, atol=0.05 * (max(1.0, float(s_ref.abs().amax())) if M else 1.0),
                               rtol=2e-2)


def test_row_adam_on_cuda_equals_table_sparse_adam():
    from engram_train.kernels import row_adam

    R, d = 1001, 48
    g = torch.Generator().manual_seed(3)
    w0 = torch.randn(R, d, generator=g)
    cpu = [w0.clone(), torch.zeros(R, d), torch.zeros(R, d), torch.zeros(R, dtype=torch.int32)]
    gpu = [t.clone().cuda() for t in cpu]
    ref = [w0.double().numpy().copy(), np.zeros((R, d)), np.zeros((R, d)), np.zeros(R, dtype=np.int64)]
    for n in (700, 1001, 3, 0, 500):
        ids = torch.randperm(R, generator=g)[:n]
        grads = torch.randn(n, d, generator=g)
        row_adam(*cpu, ids, grads, lr=1e-2, backend="torch")
        row_adam(*gpu, ids.cuda(), grads.cuda(), lr=1e-2)
        ref_adam(*ref, ids, grads.numpy(), 1e-2, 0.9, 0.95, 1e-8, 0.0)
    assert torch.equal(gpu[3].cpu(), cpu[3])
    for a, b in zip(gpu[:3], cpu[:3]):
        torch.testing.assert_close(a.cpu(), b, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(gpu[0].cpu().numpy(), ref[0], atol=1e-5, rtol=1e-5)


def test_table_store_gathers_through_triton_on_cuda():
    from engram_train.memory.store import TableShard

    weight, _ = _table([5000], 32)
    shard = TableShard(spec=None, lo=0, hi=5000, weight=weight.cuda(), exchange=None)
    ids = torch.randint(0, 5000, (4096,), device="cuda")
    assert torch.equal(shard.read_rows(ids).cpu(), weight[ids.cpu()])


def test_table_store_reduces_and_steps_through_the_kernels_on_cuda(monkeypatch):
    """engram.kernel_backend=auto on CUDA: the store's gradient reduction launches reduce_row_grads' segment
    sum and its sparse Adam launches row_adam, and the result is the CPU store's (torch references)."""
    from tests.unit.test_table_store import SPECS, _launch_spy, _store, _two_steps

    cpu_store = _store("sparse_adam")
    want = _two_steps(cpu_store)
    launched = _launch_spy(monkeypatch)
    store = _store("sparse_adam", device="cuda")
    assert store.shards[1].weight.is_cuda and store.shards[1].kernel_backend == "auto"
    got = _two_steps(store, device="cuda")
    assert {"gather_rows_kernel", "segment_sum_kernel", "row_adam_kernel"} <= set(launched)
    for step in range(2):
        for l in SPECS:
            assert torch.equal(got[step][l][0].cpu(), want[step][l][0])
            torch.testing.assert_close(got[step][l][1].cpu(), want[step][l][1], rtol=1e-5, atol=1e-6)
    for l, shard in store.shards.items():
        ref = cpu_store.shards[l]
        assert torch.equal(shard.optimizer.row_steps.cpu(), ref.optimizer.row_steps)
        torch.testing.assert_close(shard.weight.cpu(), ref.weight, rtol=1e-5, atol=1e-6)
