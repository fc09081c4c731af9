"""megatron-core GPT + MoE backbone with Engram layers.

- ``gpt``: ``build_model`` and ``EngramGPTModel`` (the entry point)
- ``spec``: layer specs; the one place that picks TE / local / CPU modules
- ``layer``: ``BackboneLayer`` (Engram slot, mHC streams, full recompute) and the per-step ``EngramContext``
- ``hyper_connection``: mHC mixing, the stream collapse before the final norm

The model knows nothing of placement: tables come through the layer spec
(``table_provider``) and ``engram_train.parallel.parallelize`` applies the
parallel plans from outside.  The CPU adaptation of megatron-core lives below
this package, in ``engram_train.platform``.

Imports are lazy so that importing this package does not import megatron-core.
"""

__all__ = ["build_model", "EngramGPTModel"]


def __getattr__(name):
    if name in __all__:
        from engram_train.model import gpt

        return getattr(gpt, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
