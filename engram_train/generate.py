"""Sampling text from a trained model: temperature, top-k, top-p; Engram hash ids kept incrementally.

The model is run by **plain recompute**: every new token re-runs the forward over the last
``model.max_seq_length`` tokens (no KV cache; megatron-core's inference contexts are not wired
in).  Engram hash ids are not recomputed: the n-gram window of a new token needs only the
``max_ngram - 1`` tokens before it, so ``IncrementalHashes.append`` hashes the last
``max_ngram`` tokens and keeps the last position -- the same ids as hashing the whole sequence
(with ``engram.reset_at_doc_boundary`` too: an EOS inside the window resets it alike).  When the
sequence outgrows the model's window, positions keep the ids of their true n-grams (the tokens
before the window), not the left padding a training sample's first positions get.
"""

from __future__ import annotations

import time
from typing import Dict, List, Optional

import torch


class IncrementalHashes:
    """Hash ids ``{layer: LongTensor[1, T, H]}`` of a growing sequence, one token at a time.

    Lngram's inputs (``engram.keys=latent``: each layer's document numbering, its keys come from the
    hidden states) have no n-gram window to keep; they are made afresh for the window the model
    reads, like a training sample's."""

    def __init__(self, hasher, tokens: torch.Tensor):
        self.hasher = hasher
        self.incremental = hasher is not None and hasattr(hasher, "max_ngram")
        self.ids = hasher(tokens) if self.incremental else {}
        self.tokens = tokens

    def append(self, token: torch.Tensor) -> None:
        self.tokens = torch.cat([self.tokens, token.view(1, 1)], dim=1)
        if not self.incremental:
            return
        window = self.tokens[:, -self.hasher.max_ngram:]
        new = self.hasher(window)
        for layer, ids in new.items():
            self.ids[layer] = torch.cat([self.ids[layer], ids[:, -1:]], dim=1)

    def last(self, n: int) -> Dict[int, torch.Tensor]:
        if self.hasher is not None and not self.incremental:
            return self.hasher(self.tokens[:, -n:])
        return {layer: ids[:, -n:] for layer, ids in self.ids.items()}


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One token id from ``logits [V]``: greedy at temperature 0, else top-k then nucleus (top-p) sampling."""
    if temperature <= 0:
        return logits.argmax()
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)[0]


@torch.no_grad()
def generate(model, hasher, prompt_ids: List[int], *, max_new_tokens: int, max_seq_length: int, vocab_size: int,
             temperature: float = 0.8, top_k: int = 50, top_p: float = 0.95, eos_id: Optional[int] = None,
             seed: int = 0, device: torch.device = torch.device("cpu")) -> Dict:
    """The prompt's continuation: ``{"ids": [...], "tokens_per_s": ...}`` (new ids only)."""
    model.eval()
    g = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([prompt_ids], dtype=torch.long)
    hashes = IncrementalHashes(hasher, tokens)
    new: List[int] = []
    t0 = time.perf_counter()
    for _ in range(max_new_tokens):
        window = hashes.tokens[:, -max_seq_length:]
        T = window.shape[1]
        logits = model(window.to(device), torch.arange(T, device=device).view(1, T),
                       engram_hash_ids={l: v.to(device) for l, v in hashes.last(T).items()} or None)
        last = logits[0, -1, :vocab_size].float().cpu()   # the padded vocabulary's extra ids are never sampled
        token = sample_next(last, temperature, top_k, top_p, g)
        new.append(int(token))
        hashes.append(token)
        if eos_id is not None and int(token) == eos_id:
            break
    seconds = time.perf_counter() - t0
    return {"ids": new, "tokens_per_s": len(new) / max(seconds, 1e-9), "seconds": seconds}
