"""What this process runs on, below both ``model/`` and ``parallel/``.

- ``device``: the one place that decides the compute device (a CUDA device or the CPU).
- ``cpu_backend``: the documented CPU adaptation of megatron-core, activated by
  ``engram_train.parallel.state.init_parallel`` on machines without CUDA.

Nothing here imports ``model/`` or ``parallel/``, so both can import it without a cycle.
"""
