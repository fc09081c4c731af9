"""Kernels, each with one torch reference that is also its test oracle.

The reference lives with the component that uses it, and so does the one
dispatch point that picks an implementation (an explicit ``backend=`` argument,
``"auto"`` by default):

====================  ===========================================  ==============================================
kernel                reference (oracle)                           dispatch
====================  ===========================================  ==============================================
``ngram_hash`` (C)    ``NgramHasher`` torch path                   ``NgramHasher(backend="auto"|"torch"|
                                                                   "cpu_kernel"|"triton")``
``hash_ngrams``       ``NgramHasher`` torch path                   same; ``"auto"``: Triton for CUDA tensors
(Triton)
``gather_rows``       ``index_select`` of ``hash_ids + offsets``   ``gather_rows(..., backend=)``; training:
(Triton)              (``engram_train.kernels.rows``)                           ``engram.kernel_backend`` at
                                                                   ``TableShard.read_rows``
``reduce_row_grads``  ``unique_rows`` + ``sum_rows``               ``reduce_row_grads(..., backend=)``; training:
(Triton)              (``engram_train.memory.exchange``)           ``TableStore.reduce_gradients``
``row_adam``          ``sparse_adam_rows``, the rule of            ``row_adam(..., backend=)``; training:
(Triton)              ``TableSparseAdam`` (``memory.optim``)       ``TableSparseAdam.step``
====================  ===========================================  ==============================================

``ngram_hash`` is native C built on first use (``csrc/``); a missing compiler
leaves the torch path in charge.  The Triton kernels (``triton/``) are compiled
for CUDA tensors and run under Triton's interpreter for CPU tensors, so
``backend="triton"`` works (slowly) without a GPU; ``"auto"`` uses them only for
CUDA tensors.  docs/kernels.md describes each kernel, its tests and its benchmark.
"""

from .rows import gather_rows, gather_rows_grad, reduce_row_grads, row_adam

__all__ = ["gather_rows", "gather_rows_grad", "reduce_row_grads", "row_adam"]
