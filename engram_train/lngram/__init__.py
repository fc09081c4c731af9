"""Lngram, latent-key n-gram memory (arXiv 2605.24869; docs/lngram.md): the second memory kind.

- ``keys``: route symbols, exact n-gram addresses, document masking (pure tensor arithmetic).
- ``block``: ``LngramBlock`` (router, lookup, readout over routes with a zero sink, short conv) and
  ``RouterSurrogate``, the router's one-bit / exact counterfactual gradient.
- ``build``: from ``engram.keys=latent``: the loader's per-layer inputs, block arguments, the
  table store's specs, parameter counts and the shard-size check.

Its tables live in the same table store as Engram's (``engram_train.memory``); the model slot
(``model/layer.py``) builds one block or the other.
"""
