"""The keys of a micro-batch that more than one package reads, defined once.

The loader (:class:`engram_train.data.loader.Collate`) makes ``tokens``, ``labels``,
``loss_mask``, ``position_ids`` and :data:`HASH_IDS`; a stage of the data pipeline may add
:data:`ENGRAM_ROWS` (host-resident tables, :mod:`engram_train.memory.host`); the forward
(:func:`engram_train.train.evaluate.forward_per_token`) hands both to the model.
"""

#: ``{layer_id: LongTensor[B, T, (max_ngram-1)*heads_per_ngram]}``: the Engram hash ids of the tokens.
HASH_IDS = "engram_hash_ids"

#: The rows of this micro-batch's Engram lookups, gathered ahead by the host prefetch stage:
#: ``rows.get(layer_id)`` is one layer's block (read once).  Absent where no stage gathers ahead.
ENGRAM_ROWS = "engram_rows"
