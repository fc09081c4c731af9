"""Tokenizer: a byte-level BPE trained on the training documents, or the user's ``tokenizer.json``.

Either way the prepared directory holds one ``tokenizer.json`` that every later stage loads
(the Engram compression reads the same file).  ``EOS_TOKEN`` separates documents in the token
stream; ``PAD_TOKEN`` never occurs in prepared data and is only there for loaders that pad.

Text is encoded with special tokens *disabled*: a corpus that literally contains
``<|endoftext|>`` gets those characters as ordinary bytes, so a document boundary is only ever
the EOS the prepare step appends.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from engram_train.errors import DataError, MissingInputError

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Tried in order on a user tokenizer: GPT-2/NeoX/Qwen, Llama 3, Llama 2/Mistral/T5, others.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<EOS>",
                  "<|eot_id|>", "<|im_end|>", "[SEP]")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>", "<PAD>")


def train_bpe(documents: Iterable[str], vocab_size: int, num_documents: Optional[int] = None):
    """A byte-level BPE (GPT-2 style) over ``documents``; specials get ids 0 (EOS) and 1 (pad)."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),   # every byte encodable, seen or not
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer, length=num_documents)
    return tok


class Tokenizer:
    """The prepared ``tokenizer.json`` with its EOS and pad ids resolved.

    Picklable (re-loads from ``path``), so datasets holding one can go to loader workers.
    """

    def __init__(self, path: str, eos_token: Optional[str] = None, pad_token: Optional[str] = None):
        from tokenizers import Tokenizer as HFTokenizer

        self.path = str(path)
        if not Path(self.path).is_file():
            raise MissingInputError(f"tokenizer file {self.path} does not exist.  Fix: give data.tokenizer "
                                    f"a tokenizer.json (Hugging Face `tokenizers` format) or leave it unset to "
                                    f"train a BPE.")
        try:
            self._tok = HFTokenizer.from_file(self.path)
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise DataError(f"{self.path} is not a Hugging Face tokenizer.json ({e}).  Fix: give the "
                             f"tokenizer.json file itself, not a vocab/merges file or a directory.") from e
        self._tok.encode_special_tokens = True
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        self.eos_token = self._resolve(eos_token, EOS_CANDIDATES, "EOS")
        self.eos_id = self._tok.token_to_id(self.eos_token)
        try:
            self.pad_token = self._resolve(pad_token, PAD_CANDIDATES, "pad")
        except ValueError:
            # Prepared data is never padded; a tokenizer without a pad token (GPT-2) pads with EOS.
            self.pad_token = self.eos_token
        self.pad_id = self._tok.token_to_id(self.pad_token)

    def _resolve(self, name: Optional[str], candidates: Sequence[str], what: str) -> str:
        tried = (name,) if name is not None else candidates
        for token in tried:
            if self._tok.token_to_id(token) is not None:
                return token
        raise DataError(f"{self.path} has no {what} token: tried {list(tried)}.  Fix: add one of them "
                         f"as a special token, or name yours explicitly ({what.lower()}_token=...).")

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of many texts at once (parallel inside `tokenizers`)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> Optional[str]:
        return self._tok.id_to_token(int(token_id))

    def __getstate__(self):
        return {"path": self.path, "eos_token": self.eos_token, "pad_token": self.pad_token}

    def __setstate__(self, state):
        self.__init__(state["path"], state["eos_token"], state["pad_token"])

    def __repr__(self) -> str:
        return (f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r}:{self.eos_id}, "
                f"pad={self.pad_token!r}:{self.pad_id})")
