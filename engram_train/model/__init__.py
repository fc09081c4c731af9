"""megatron-core GPT + MoE backbone with Engram layers.

- ``gpt``: ``build_model`` and ``EngramGPTModel`` (the entry point)
- ``spec``: layer specs; the one place that picks TE / local / CPU modules
- ``engram_layer``: ``EngramTransformerLayer`` and the per-step ``EngramContext``
- ``cpu_backend``: the documented CPU adaptation of megatron-core (activated by
  ``engram_train.parallel.state.init_parallel`` on machines without CUDA)

Imports are lazy so that importing this package does not import megatron-core.
"""

__all__ = ["build_model", "EngramGPTModel"]


def __getattr__(name):
    if name in __all__:
        from engram_train.model import gpt

        return getattr(gpt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
