"""Tokenizer: a byte-level BPE trained on the training documents, or the user's ``tokenizer.json``.

Either way the prepared directory holds one ``tokenizer.json`` that every later stage loads
(the Engram compression reads the same file).  A user's tokenizer may be a Hugging Face
tokenizer directory (or a ``tokenizer.json`` inside one): its ``special_tokens_map.json`` and
``tokenizer_config.json`` then name the EOS and pad tokens, ahead of the lists of known names,
and travel with ``tokenizer.json`` into the prepared directory.  ``EOS_TOKEN`` separates documents in the token
stream; ``PAD_TOKEN`` never occurs in prepared data and is only there for loaders that pad.

Text is encoded with special tokens *disabled*: a corpus that literally contains
``<|endoftext|>`` gets those characters as ordinary bytes, so a document boundary is only ever
the EOS the prepare step appends.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from engram_train.errors import DataError, MissingInputError

log = logging.getLogger(__name__)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
# Tried in order on a user tokenizer: GPT-2/NeoX/Qwen, Llama 3, Llama 2/Mistral/T5, others.
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<EOS>",
                  "<|eot_id|>", "<|im_end|>", "[SEP]")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]", "<|padding|>", "<|finetune_right_pad_id|>", "<PAD>")
# Files of a Hugging Face tokenizer directory that name its special tokens (read in this order).
SPECIAL_TOKEN_FILES = ("special_tokens_map.json", "tokenizer_config.json")


def tokenizer_json_path(path) -> Path:
    """The ``tokenizer.json`` that ``path`` names: the file itself or the one in a directory."""
    path = Path(path)
    return path / "tokenizer.json" if path.is_dir() else path


def declared_special_tokens(tokenizer_json) -> Dict[str, str]:
    """``{"eos_token": ..., "pad_token": ...}`` as the files next to ``tokenizer_json`` name them.

    ``special_tokens_map.json`` first, then ``tokenizer_config.json``; an entry is a string or an
    ``AddedToken`` dict (its ``content``).  Missing files or entries give nothing.
    """
    found: Dict[str, str] = {}
    directory = Path(tokenizer_json).parent
    for name in SPECIAL_TOKEN_FILES:
        path = directory / name
        if not path.is_file():
            continue
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{path} is not a readable JSON file ({e}).  Fix: repair or remove it (it names "
                            f"the tokenizer's special tokens).") from None
        for key in ("eos_token", "pad_token"):
            value = data.get(key) if isinstance(data, dict) else None
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value and key not in found:
                found[key] = value
    return found


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

        self.path = str(tokenizer_json_path(path))
        if not Path(self.path).is_file():
            raise MissingInputError(f"tokenizer file {self.path} does not exist.  Fix: give data.tokenizer "
                                    f"a tokenizer.json (Hugging Face `tokenizers` format) or a Hugging Face "
                                    f"tokenizer directory holding one, or leave it unset to train a BPE.")
        try:
            self._tok = HFTokenizer.from_file(self.path)
        except Exception as e:  # the library raises a bare Exception on malformed files
            raise DataError(f"{self.path} is not a Hugging Face tokenizer.json ({e}).  Fix: give the "
                             f"tokenizer.json file itself, not a vocab/merges file or a directory.") from e
        self._tok.encode_special_tokens = True
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        declared = declared_special_tokens(self.path)
        self.eos_token = self._resolve(eos_token, declared.get("eos_token"), EOS_CANDIDATES, "EOS")
        self.eos_id = self._tok.token_to_id(self.eos_token)
        # Where the pad token came from, for the log of the Engram pad id.
        self.pad_source = "the pad token named by the caller" if pad_token is not None else \
            "the pad token of its special-tokens map" if "pad_token" in declared else "the pad token found by name"
        try:
            self.pad_token = self._resolve(pad_token, declared.get("pad_token"), PAD_CANDIDATES, "pad")
        except DataError:
            if pad_token is not None or "pad_token" in declared:
                raise
            # Prepared data is never padded; a tokenizer without a pad token (GPT-2) pads with EOS.
            self.pad_token = self.eos_token
            self.pad_source = "EOS: the tokenizer has no pad token"
        self.pad_id = self._tok.token_to_id(self.pad_token)

    def _resolve(self, name: Optional[str], declared: Optional[str], candidates: Sequence[str], what: str) -> str:
        if name is None and declared is not None:
            if self._tok.token_to_id(declared) is None:
                raise DataError(f"{self.path}: the {what} token {declared!r} that {' / '.join(SPECIAL_TOKEN_FILES)} "
                                f"next to it name is not in its vocabulary.  Fix: correct the {what.lower()}_token "
                                f"entry of that file, or remove it.")
            return declared
        tried = (name,) if name is not None else candidates
        for token in tried:
            if self._tok.token_to_id(token) is not None:
                return token
        raise DataError(f"{self.path} has no {what} token: tried {list(tried)}.  Fix: add one of them "
                         f"as a special token, name it as {what.lower()}_token in a special_tokens_map.json "
                         f"next to it, or name yours explicitly ({what.lower()}_token=...).")

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
        return {"path": self.path, "eos_token": self.eos_token, "pad_token": self.pad_token,
                "pad_source": self.pad_source}

    def __setstate__(self, state):
        self.__init__(state["path"], state["eos_token"], state["pad_token"])
        self.pad_source = state.get("pad_source", self.pad_source)

    def __repr__(self) -> str:
        return (f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r}:{self.eos_id}, "
                f"pad={self.pad_token!r}:{self.pad_id})")
