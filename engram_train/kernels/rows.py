"""Table-row kernels of the Engram lookup path: gather, gradient reduction, row Adam.

Each function takes ``backend="auto"|"torch"|"triton"`` and is its own dispatch
point: ``"auto"`` runs Triton for CUDA tensors and torch elsewhere; ``"triton"``
on CPU tensors runs the same kernels under Triton's interpreter (tests).  The
``"torch"`` path is the reference and the tests' oracle:

``gather_rows``       ``weight.index_select(0, hash_ids + offsets)``, the lookup of
                      ``StoreTable`` / ``MultiHeadEmbeddingTable``
``reduce_row_grads``  :func:`unique_rows` + :func:`sum_rows`, the table store's duplicate
                      reduction (``engram_train.memory.exchange`` imports them from here)
``row_adam``          :func:`sparse_adam_rows`, the rule of ``TableSparseAdam.step``
                      (``engram_train.memory.optim``), run over the caller's tensors

The references live here so that this package is a leaf: it imports nothing of
``engram_train``, and the table store imports its rules from it.

Ids are the caller's to check (the table store validates hash ids before it
gathers): the torch path raises on an id outside the table, the Triton gather
reads zeros for it instead of faulting.
"""

from __future__ import annotations

from typing import Tuple

import torch

BACKENDS = ("auto", "torch", "triton")


def _backend(backend: str, device: torch.device, what: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: choose 'auto' (Triton on CUDA, torch elsewhere), 'torch' or 'triton'")
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        from . import triton as triton_kernels

        return "triton" if triton_kernels.available() else "torch"
    if backend == "triton" and device.type not in ("cpu", "cuda"):
        raise ValueError(f"{what} on {device}: backend='triton' runs on CUDA (or the CPU, interpreted); "
                         "use 'auto' or 'torch'")
    return backend


def _launch(device: torch.device, kernel: str, grid, *args, **meta) -> None:
    from . import triton as triton_kernels

    triton_kernels.launch(device, kernel, grid, *args, **meta)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


# ---- gather --------------------------------------------------------------------------------------------

def _check_gather(weight: torch.Tensor, hash_ids: torch.Tensor, offsets: torch.Tensor) -> torch.device:
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a [rows, dim] table, got shape {list(weight.shape)}")
    if hash_ids.dtype != torch.int64 or hash_ids.dim() < 1:
        raise ValueError(f"hash_ids: expected int64 ids of shape [..., heads], got {hash_ids.dtype} "
                         f"{list(hash_ids.shape)}")
    if offsets.dtype != torch.int64 or offsets.shape != (hash_ids.shape[-1],):
        raise ValueError(f"offsets: expected int64 [{hash_ids.shape[-1]}] (one per head), got {offsets.dtype} "
                         f"{list(offsets.shape)}")
    dev = hash_ids.device
    if weight.device != dev:
        # Rows in pinned host memory are read by the GPU over UVA; anything else must be moved first.
        if not (weight.device.type == "cpu" and dev.type == "cuda" and weight.is_pinned()):
            raise ValueError(f"weight on {weight.device}, hash_ids on {dev}: put them on one device, or pin the "
                             "host table (weight.pin_memory()) to gather from it over UVA")
        if weight.stride(1) != 1:   # a contiguous copy would not be pinned
            raise ValueError("weight: a pinned host table needs rows of unit stride; pin a contiguous table")
    return dev


def _gather_torch(weight, hash_ids, offsets):
    rows = (hash_ids + offsets.to(hash_ids.device)).reshape(-1)
    out = weight.index_select(0, rows.to(weight.device)).to(hash_ids.device)
    return out.view(*hash_ids.shape[:-1], hash_ids.shape[-1] * weight.shape[1])


def _gather(weight, hash_ids, offsets, backend):
    return _gather_triton(weight, hash_ids, offsets) if backend == "triton" else _gather_torch(weight, hash_ids, offsets)


def _gather_triton(weight, hash_ids, offsets):
    dev = hash_ids.device
    H, D = hash_ids.shape[-1], weight.shape[1]
    out = torch.empty(*hash_ids.shape[:-1], H * D, dtype=weight.dtype, device=dev)
    M = hash_ids.numel()
    if M == 0 or D == 0:
        return out
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    ids = hash_ids.contiguous()
    offsets = offsets.to(dev).contiguous()
    block_d = min(_pow2(D), 256 if dev.type == "cuda" else 1024)
    # ~4K elements per program: enough bytes in flight per SM for HBM, few interpreter steps on the CPU.
    block_m = max(1, min(_pow2(M), (4096 if dev.type == "cuda" else 16384) // block_d))
    grid = (_cdiv(M, block_m), _cdiv(D, block_d))
    _launch(dev, "gather_rows_kernel", grid, weight, ids, offsets, out, M, weight.shape[0], weight.stride(0), D, H,
            BLOCK_M=block_m, BLOCK_D=block_d)
    return out


class _GatherRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, hash_ids, offsets, backend):
        ctx.save_for_backward(hash_ids, offsets)
        ctx.table = (weight.shape, weight.dtype, weight.device)
        ctx.backend = backend
        return _gather(weight, hash_ids, offsets, backend)

    @staticmethod
    def backward(ctx, grad):
        hash_ids, offsets = ctx.saved_tensors
        shape, dtype, device = ctx.table
        uniq, summed = gather_rows_grad(grad, hash_ids, offsets, backend=ctx.backend)
        # The sparse form of nn.Embedding(sparse=True): coalesced, one entry per touched row.
        g = torch.sparse_coo_tensor(uniq.unsqueeze(0).to(device), summed.to(device=device, dtype=dtype), shape,
                                    is_coalesced=True, check_invariants=False)
        return g, None, None, None


def gather_rows(weight: torch.Tensor, hash_ids: torch.Tensor, offsets: torch.Tensor,
                backend: str = "auto") -> torch.Tensor:
    """``[..., H*d]``: head ``h`` of each position reads row ``hash_ids[..., h] + offsets[h]`` of ``weight``.

    ``weight [R, d]`` fp32 or bf16 on ``hash_ids``' device, or (CUDA ids) in pinned
    host memory, read over UVA without a staging copy; ``hash_ids`` int64
    ``[..., H]``; ``offsets`` int64 ``[H]``.  The result has ``weight``'s dtype and
    lives on ``hash_ids``' device.  When ``weight`` requires grad, its gradient is
    the coalesced sparse tensor of :func:`gather_rows_grad` (unique rows, summed).
    """
    dev = _check_gather(weight, hash_ids, offsets)
    backend = _backend(backend, dev, "hash_ids")
    if weight.requires_grad and torch.is_grad_enabled():
        return _GatherRows.apply(weight, hash_ids, offsets, backend)
    return _gather(weight, hash_ids, offsets, backend)


def gather_rows_grad(grad: torch.Tensor, hash_ids: torch.Tensor, offsets: torch.Tensor,
                     backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Backward of :func:`gather_rows` in the table store's sparse form: ``(unique rows, summed [U, d])``."""
    rows = (hash_ids + offsets.to(hash_ids.device)).reshape(-1)
    d = grad.shape[-1] // max(hash_ids.shape[-1], 1)
    return reduce_row_grads(rows, grad.reshape(rows.numel(), d), backend=backend)


# ---- duplicate reduction -------------------------------------------------------------------------------

def unique_rows(ids: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique ids and the inverse index (``ids == uniq[inv]``)."""
    return torch.unique(ids, sorted=True, return_inverse=True)


def sum_rows(inv: torch.Tensor, grad: torch.Tensor, num_unique: int) -> torch.Tensor:
    """``out[u] = sum of grad[i] with inv[i] == u`` (deterministic on the CPU; CUDA's ``index_add_``
    uses float atomics, ``reduce_row_grads(backend="triton")`` does not)."""
    out = grad.new_zeros(num_unique, grad.shape[-1])
    return out.index_add_(0, inv, grad)


def _reduce_torch(row_ids, grads):
    uniq, inv = unique_rows(row_ids)
    return uniq, sum_rows(inv, grads.to(torch.float32), uniq.numel()).to(grads.dtype)


def _reduce_triton(row_ids, grads):
    dev = row_ids.device
    M, D = grads.shape
    sorted_ids, perm = torch.sort(row_ids, stable=True)   # stable: duplicates keep their input order
    uniq, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
    U = uniq.numel()
    out = torch.empty(U, D, dtype=grads.dtype, device=dev)
    if U == 0 or D == 0:
        return uniq, out
    bounds = torch.zeros(U + 1, dtype=torch.int64, device=dev)
    torch.cumsum(counts, 0, out=bounds[1:])
    if grads.stride(1) != 1:
        grads = grads.contiguous()
    block_d = min(_pow2(D), 256)
    block_s = max(1, min(16, 4096 // block_d))
    _launch(dev, "segment_sum_kernel", (U, _cdiv(D, block_d)), grads, perm, bounds, out, D, grads.stride(0),
            BLOCK_S=block_s, BLOCK_D=block_d)
    return uniq, out


def reduce_row_grads(row_ids: torch.Tensor, grads: torch.Tensor,
                     backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Unique ``row_ids`` ascending (int64 ``[U]``) and the sum of their duplicates' ``grads`` (``[U, d]``).

    ``row_ids`` int64 ``[M]``, ``grads [M, d]`` on one device.  Sums accumulate in
    fp32 and come back in ``grads``' dtype.  The Triton kernel is deterministic on
    every device: it sorts stably and sums each run of equal ids in a fixed order,
    with no float atomics.  The torch reference (``index_add_``) is deterministic
    on the CPU; on CUDA it adds with float atomics.
    """
    if row_ids.dtype != torch.int64 or row_ids.dim() != 1:
        raise ValueError(f"row_ids: expected int64 [M], got {row_ids.dtype} {list(row_ids.shape)}")
    if grads.dim() != 2 or grads.shape[0] != row_ids.numel() or grads.device != row_ids.device:
        raise ValueError(f"grads: expected [{row_ids.numel()}, d] on {row_ids.device}, got {list(grads.shape)} "
                         f"on {grads.device}")
    backend = _backend(backend, row_ids.device, "row_ids")
    return _reduce_triton(row_ids, grads) if backend == "triton" else _reduce_torch(row_ids, grads)


# ---- row Adam ------------------------------------------------------------------------------------------

@torch.no_grad()
def sparse_adam_rows(weight, exp_avg, exp_avg_sq, row_steps, ids, grads, lr, betas, eps, weight_decay,
                     rowwise: bool = False) -> None:
    """``sparse_adam`` (``rowwise``: ``sparse_adam_rowwise``) on the unique rows ``ids``, in place: the
    torch rule, and the reference of :func:`row_adam`."""
    if ids.numel() == 0:
        return
    b1, b2 = float(betas[0]), float(betas[1])
    g = grads.to(torch.float32)
    steps = row_steps[ids] + 1
    row_steps[ids] = steps
    m = exp_avg[ids].mul_(b1).add_(g, alpha=1.0 - b1)
    if rowwise:
        v = exp_avg_sq[ids].mul_(b2).add_(g.square().mean(1, keepdim=True), alpha=1.0 - b2)
    else:
        v = exp_avg_sq[ids].mul_(b2).addcmul_(g, g, value=1.0 - b2)
    exp_avg[ids] = m
    exp_avg_sq[ids] = v
    t = steps.to(torch.float64).unsqueeze(1)
    bc1 = (1.0 - torch.pow(b1, t)).to(torch.float32)
    bc2_sqrt = (1.0 - torch.pow(b2, t)).sqrt().to(torch.float32)
    w = weight[ids]
    if weight_decay:
        w.mul_(1.0 - lr * weight_decay)
    w.addcdiv_(m * (lr / bc1), (v.sqrt() / bc2_sqrt).add_(eps), value=-1.0)
    weight[ids] = w



def _adam_torch(weight, exp_avg, exp_avg_sq, row_steps, ids, grads, lr, betas, eps, weight_decay):
    sparse_adam_rows(weight, exp_avg, exp_avg_sq, row_steps, ids, grads, lr, betas, eps, weight_decay)


def row_adam(weight: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, row_steps: torch.Tensor,
             ids: torch.Tensor, grads: torch.Tensor, lr: float, betas=(0.9, 0.95), eps: float = 1e-8,
             weight_decay: float = 0.0, backend: str = "auto") -> None:
    """``sparse_adam`` on rows ``ids`` of a shard, in place: ``TableSparseAdam.step(ids, grads, lr)``.

    ``weight``, ``exp_avg``, ``exp_avg_sq`` fp32 ``[R, d]`` contiguous, ``row_steps``
    int32 ``[R]``; ``ids`` int64 ``[U]`` *unique* (as :func:`reduce_row_grads` returns
    them), ``grads [U, d]``.  Each row counts its own steps for bias correction.
    """
    for name, t in (("weight", weight), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.shape != weight.shape or t.device != weight.device:
            raise ValueError(f"{name}: expected contiguous fp32 {list(weight.shape)} on {weight.device}, got "
                             f"{t.dtype} {list(t.shape)} on {t.device}")
    if row_steps.shape != (weight.shape[0],) or row_steps.device != weight.device:
        raise ValueError(f"row_steps: expected [{weight.shape[0]}] on {weight.device}, got {list(row_steps.shape)}")
    if ids.dtype != torch.int64 or ids.dim() != 1 or grads.shape != (ids.numel(), weight.shape[1]):
        raise ValueError(f"ids/grads: expected int64 [U] and [U, {weight.shape[1]}], got {ids.dtype} "
                         f"{list(ids.shape)} and {list(grads.shape)}")
    backend = _backend(backend, weight.device, "weight")
    if backend == "torch" or ids.numel() == 0:
        return _adam_torch(weight, exp_avg, exp_avg_sq, row_steps, ids, grads, lr, betas, eps, weight_decay)
    dev = weight.device
    ids, grads = ids.to(dev), grads.to(dev).contiguous()
    b1, b2 = float(betas[0]), float(betas[1])
    # Per-row step counts and bias corrections: [U] values, computed like TableSparseAdam (float64 powers).
    steps = row_steps[ids] + 1
    row_steps[ids] = steps
    t = steps.to(torch.float64)
    bc1 = (1.0 - torch.pow(b1, t)).to(torch.float32)
    bc2_sqrt = (1.0 - torch.pow(b2, t)).sqrt().to(torch.float32)
    U, D = grads.shape
    block_d = min(_pow2(D), 256)
    block_r = max(1, min(_pow2(U), 2048 // block_d))
    _launch(dev, "row_adam_kernel", (_cdiv(U, block_r), _cdiv(D, block_d)),
        weight, exp_avg, exp_avg_sq, ids, grads, bc1, bc2_sqrt, U, D, float(lr), b1, 1.0 - b1, b2, 1.0 - b2,
        float(eps), 1.0 - float(lr) * float(weight_decay), DECAY=bool(weight_decay),
        BLOCK_R=block_r, BLOCK_D=block_d)
