"""Loader: the global sample order, its data-parallel slicing, and micro-batches that carry hash ids.

Sample order.  A split is read with megatron-core's ``IndexedDataset`` and windowed by its
``GPTDataset`` (compiled helpers, CPU): documents (each ending in EOS) are shuffled, concatenated
and cut into ``seq_length + 1`` token windows; the windows are shuffled; ``tokens = w[:-1]``,
``labels = w[1:]``.  We build one ``GPTDataset`` per *epoch* with a seed derived from
``(seed, epoch)``, so global sample ``g`` is sample ``g % E`` of epoch ``g // E`` (``E`` samples
per epoch) -- an infinite order that does not depend on how long the run is (megatron's own
multi-epoch index changes with the requested sample count, which would break resume after a change
of ``max_steps``).  Index building takes milliseconds and is never cached to disk, so no rank waits
for another.

Slicing (Megatron's pretraining sampler).  Global batch ``j`` is samples
``consumed_samples + j*G .. + G - 1`` of the order (``G`` = global batch size); DP rank ``r`` takes
the contiguous slice ``[r*G/D, (r+1)*G/D)`` of it, cut into micro-batches of ``M`` samples
(``G/(M*D)`` gradient-accumulation steps).  Hence:

* any DP size sees the same global batches (concatenate the ranks' slices in rank order);
* a loader rebuilt with ``consumed_samples=k`` continues exactly where the old one stood after
  ``k`` samples; the loader is a pure function of its arguments, there is no state to checkpoint.

Micro-batch: ``tokens``/``labels``/``position_ids`` LongTensor[B,T], ``loss_mask`` FloatTensor[B,T]
(0 only on pad labels; prepared data has none), ``engram_hash_ids`` ``{layer_id: LongTensor[B,T,
(N-1)*K]}`` computed here from ``tokens`` by the Engram hasher (``{}`` without one).  Hash ids depend
only on tokens, so with ``num_workers > 0`` they are computed in the loader worker processes, a
step ahead of the model.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

from engram_train.engram.table import check_hash_ids
from engram_train.errors import DataError, MissingInputError

from .batch import HASH_IDS
from .prepare import PreparedData

log = logging.getLogger(__name__)

Hasher = Callable[[torch.Tensor], Dict[int, torch.Tensor]]
SAMPLE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


# ----------------------------------------------------------------------------- checks


def check_vocab(prepared: PreparedData, model_vocab_size: int) -> None:
    """Raise if a token id of the prepared data would fall outside the model's embedding table."""
    max_id = max(prepared.max_token_id.values())
    if max_id >= model_vocab_size or prepared.vocab_size > model_vocab_size:
        raise DataError(
            f"the prepared data in {prepared.dir} uses token ids up to {max_id} (tokenizer vocabulary "
            f"{prepared.vocab_size}) but the model's vocabulary size is {model_vocab_size}.  Fix: set "
            f"model.vocab_size >= {prepared.vocab_size}, or null to use the tokenizer's size (padded); or "
            f"prepare the data with a smaller data.vocab_size.")


def _check_split(prepared: PreparedData, split: str, seq_length: int, max_seq_length: Optional[int]) -> str:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if seq_length <= 0:
        raise ValueError(f"seq_length={seq_length} must be > 0")
    if max_seq_length is not None and seq_length > max_seq_length:
        raise DataError(f"data.seq_length={seq_length} is longer than the model's model.max_seq_length="
                         f"{max_seq_length}.  Fix: lower data.seq_length or raise model.max_seq_length.")
    prefix = prepared.prefix(split)
    if not IndexedDataset.exists(prefix):
        raise MissingInputError(
            f"the {split} split is missing: {prefix}.bin / {prefix}.idx not found.  Fix: run "
            f"`python tools/prepare_data.py --dir {prepared.dir}` (with your corpus options), or let the "
            f"trainer prepare it (it calls prepare_data on start).")
    num_tokens = prepared.num_tokens[split]
    if num_tokens < seq_length + 1:
        raise DataError(
            f"the {split} split of {prepared.dir} has {num_tokens} tokens, fewer than one sample of "
            f"seq_length + 1 = {seq_length + 1}.  Fix: lower data.seq_length, add text to the corpus"
            + (", or raise data.valid_fraction." if split == "valid" else "."))
    return prefix


def _check_batch(global_batch_size: int, micro_batch_size: int, dp_size: int, dp_rank: int) -> None:
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if micro_batch_size <= 0 or global_batch_size % (micro_batch_size * dp_size) != 0:
        raise DataError(
            f"data.global_batch_size={global_batch_size} must be a multiple of data.micro_batch_size x "
            f"data-parallel size = {micro_batch_size} x {dp_size} = {micro_batch_size * dp_size}.  Fix: change "
            f"the global or micro batch size.")


# ----------------------------------------------------------------------------- global sample order


@dataclass(frozen=True)
class _TokenizerView:
    """What megatron's GPTDatasetConfig reads from a tokenizer (ids only; no text is encoded)."""

    vocab_size: int
    eod: int
    pad: int

    @property
    def unique_identifiers(self) -> dict:   # megatron json-dumps the config with this
        return {"class": "engram_train.Tokenizer", "vocab_size": self.vocab_size, "eod": self.eod, "pad": self.pad}


@contextmanager
def _quiet_megatron_datasets():
    """megatron logs every index build at INFO and warns that nothing is cached; we build per epoch on purpose."""
    logger = logging.getLogger("megatron.core.datasets")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _epoch_seed(seed: int, epoch: int, split: str) -> int:
    # RandomState takes seeds < 2**32; SeedSequence keeps (seed, epoch) pairs from colliding.
    return int(np.random.SeedSequence([int(seed), int(epoch), 0 if split == "train" else 1]).generate_state(1)[0])


class SampleOrder(torch.utils.data.Dataset):
    """Global sample ``g`` (any ``g >= 0``) of one split: a dict of ``tokens``/``labels``/``loss_mask``/``position_ids``.

    Picklable: workers rebuild the per-epoch indices they touch (milliseconds).
    """

    def __init__(self, prefix: str, seq_length: int, seed: int, split: str, vocab_size: int, eos_id: int, pad_id: int):
        from megatron.core.datasets.gpt_dataset import GPTDatasetConfig
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        self.prefix, self.seq_length, self.seed, self.split = prefix, seq_length, seed, split
        with _quiet_megatron_datasets():
            self.indexed = IndexedDataset(prefix)
            self.config = GPTDatasetConfig(
                random_seed=seed,     # replaced per epoch
                sequence_length=seq_length,
                tokenizer=_TokenizerView(vocab_size, eos_id, -1 if pad_id == eos_id else pad_id),
                blend_per_split=[([prefix], None) if s == split else None for s in ("train", "valid", "test")],
                path_to_cache="",     # "": build in memory, never on disk (see module docstring)
                reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                create_attention_mask=False, add_extra_token_to_sequence=True)
        self._epochs: Dict[int, object] = {}
        self.samples_per_epoch = len(self.epoch(0))

    def epoch(self, epoch: int):
        """megatron's ``GPTDataset`` of one epoch (its ``document_index``/``sample_index``/``shuffle_index``)."""
        ds = self._epochs.get(epoch)
        if ds is None:
            import dataclasses

            from megatron.core.datasets.gpt_dataset import GPTDataset
            from megatron.core.datasets.utils import Split

            config = dataclasses.replace(self.config, random_seed=_epoch_seed(self.seed, epoch, self.split))
            documents = np.arange(len(self.indexed), dtype=np.int32)
            with _quiet_megatron_datasets(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = GPTDataset(self.indexed, self.prefix, documents, None,
                                Split.train if self.split == "train" else Split.valid, config)
            if len(self._epochs) >= 2:   # the current epoch and the next are all a loader touches
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = ds
        return ds

    def __getitem__(self, g: int) -> Dict[str, torch.Tensor]:
        epoch, i = divmod(int(g), self.samples_per_epoch)
        sample = self.epoch(epoch)[i]
        return {k: sample[k] for k in SAMPLE_KEYS}

    def __len__(self) -> int:
        return self.samples_per_epoch   # one epoch; indices beyond it wrap into later epochs

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_epochs"] = {}
        return state


class BlendOrder(torch.utils.data.Dataset):
    """Global sample ``g`` of a Megatron blend (``data.corpus=megatron``), drawn by megatron-core's
    ``BlendedMegatronDatasetBuilder``.

    One pass of the blend is ``E`` samples, ``E`` the windows of ``seq_length + 1`` tokens that the
    split's prefixes hold together (a property of the data, never of the run's length); the
    builder is asked for ``E`` samples with the configured weights, so a source of small weight is
    repeated (reshuffled) inside the pass and a large one is partly read.  Global sample ``g`` is
    sample ``g % E``: a pure function of ``g``, hence exact resume.  Built once on every rank at
    construction (the builder synchronizes ranks), never in a loader worker.
    """

    def __init__(self, prepared: PreparedData, split: str, seq_length: int, seed: int):
        from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
        from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

        self.split, self.seq_length = split, seq_length
        b = prepared.blends
        one = "all" in b
        prefixes, weights = b["all" if one else split]
        scans = prepared.meta["prefixes"]
        fraction = 1.0
        if one:
            fraction = (1.0 - float(prepared.meta["valid_fraction"])) if split == "train" else \
                float(prepared.meta["valid_fraction"])
        windows = sum(int(scans[p]["tokens"] * fraction) - 1 for p in prefixes) // seq_length
        if windows < 1:
            raise DataError(f"the {split} split of data.prefixes ({', '.join(prefixes)}) holds fewer than one "
                            f"sample of seq_length + 1 = {seq_length + 1} tokens.  Fix: lower data.seq_length"
                            + (" or raise data.valid_fraction." if one and split == "valid" else "."))
        index = 0 if split == "train" else 1
        blend = (list(prefixes), None if weights is None else list(weights))
        with _quiet_megatron_datasets(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = GPTDatasetConfig(
                random_seed=_epoch_seed(seed, 0, split), sequence_length=seq_length,
                tokenizer=_TokenizerView(prepared.vocab_size, prepared.eos_id,
                                         -1 if prepared.pad_id == prepared.eos_id else prepared.pad_id),
                blend=blend if one else None, split=prepared.megatron_split if one else None,
                blend_per_split=None if one else [blend if i == index else None for i in range(3)],
                path_to_cache="",     # build in memory: nothing is written next to the user's prefixes
                reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False,
                create_attention_mask=False, add_extra_token_to_sequence=True)
            sizes = [windows if i == index else 0 for i in range(3)] if one else \
                [windows if i == index else None for i in range(3)]
            self.dataset = BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True, config).build()[index]
        self.samples_per_epoch = len(self.dataset)

    def __getitem__(self, g: int) -> Dict[str, torch.Tensor]:
        sample = self.dataset[int(g) % self.samples_per_epoch]
        return {k: sample[k] for k in SAMPLE_KEYS}

    def __len__(self) -> int:
        return self.samples_per_epoch


def _open_split(prepared: PreparedData, split: str, seq_length: int, seed: int,
                max_seq_length: Optional[int]):
    if prepared.blends is not None:
        if max_seq_length is not None and seq_length > max_seq_length:
            _check_split(prepared, split, seq_length, max_seq_length)   # its message names the keys
        return BlendOrder(prepared, split, seq_length, seed)
    prefix = _check_split(prepared, split, seq_length, max_seq_length)
    return SampleOrder(prefix, seq_length, seed, split, prepared.vocab_size, prepared.eos_id, prepared.pad_id)


# ----------------------------------------------------------------------------- batches


class Collate:
    """Stack samples into a micro-batch and add the Engram hash ids of its tokens (runs in workers).

    The ids are range-checked here, once, on the CPU where they are made: the tables that read
    them in the forward (the table store's) trust them, so no Engram layer syncs the device to
    check its ids.
    """

    def __init__(self, hasher: Optional[Hasher]):
        self.hasher = hasher
        table_sizes = getattr(hasher, "table_sizes", None) or {}
        self.table_sizes = {layer: (list(sizes), torch.tensor(sizes, dtype=torch.int64))
                            for layer, sizes in table_sizes.items()}

    def __call__(self, samples: Sequence[Dict[str, torch.Tensor]]) -> dict:
        batch = {k: torch.stack([s[k] for s in samples]) for k in SAMPLE_KEYS}
        batch[HASH_IDS] = self.hasher(batch["tokens"]) if self.hasher is not None else {}
        for layer, ids in batch[HASH_IDS].items():
            if layer in self.table_sizes:
                sizes, sizes_t = self.table_sizes[layer]
                check_hash_ids(ids, sizes_t, sizes)
        return batch


def micro_batch_indices(consumed_samples: int, global_batch_size: int, micro_batch_size: int,
                        dp_rank: int, dp_size: int) -> Iterator[List[int]]:
    """Global sample indices of this rank's micro-batches, forever (see module docstring)."""
    per_rank = global_batch_size // dp_size
    start = consumed_samples
    while True:
        base = start + dp_rank * per_rank
        for m in range(0, per_rank, micro_batch_size):
            yield list(range(base + m, base + m + micro_batch_size))
        start += global_batch_size


class _BatchSampler:
    def __init__(self, *args):
        self.args = args

    def __iter__(self):
        return micro_batch_indices(*self.args)


class TrainBatches:
    """Infinite iterator over this rank's training micro-batches (``next(it)``)."""

    def __init__(self, samples: SampleOrder, loader: torch.utils.data.DataLoader, consumed_samples: int,
                 micro_batches_per_step: int):
        self.samples = samples
        self.consumed_samples = consumed_samples          # where this loader started
        self.micro_batches_per_step = micro_batches_per_step   # gradient-accumulation steps
        self.samples_per_epoch = samples.samples_per_epoch
        self._loader = loader
        self._it = None

    def __iter__(self) -> "TrainBatches":
        return self

    def __next__(self) -> dict:
        if self._it is None:   # workers start on first use, not at construction
            self._it = iter(self._loader)
        return next(self._it)


def build_train_loader(prepared: PreparedData, data_cfg, hasher: Optional[Hasher], seq_length: int,
                       micro_batch_size: int, global_batch_size: int, dp_rank: int, dp_size: int, seed: int,
                       consumed_samples: int = 0, *, max_seq_length: Optional[int] = None,
                       pin_memory: bool = False, stages: Sequence[Callable[[Iterator[dict]], Iterator[dict]]] = ()
                       ) -> Iterator[dict]:
    """This DP rank's micro-batches of the training split, from sample ``consumed_samples`` on, forever.

    Workers: ``data_cfg.num_workers`` (0 = in this process).  ``max_seq_length``: the model's limit,
    checked when given.  ``stages``: later steps of the pipeline, applied in order, each
    ``stage(batches) -> batches`` (the table store's host prefetch, ``engram_train.memory.host.batch_stages``).
    """
    _check_batch(global_batch_size, micro_batch_size, dp_size, dp_rank)
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples={consumed_samples} must be >= 0")
    samples = _open_split(prepared, "train", seq_length, seed, max_seq_length)
    num_workers = int(getattr(data_cfg, "num_workers", 0) or 0)
    if num_workers > 0:
        # Workers never tokenize; saying so keeps `tokenizers` (used by prepare in this process) from
        # warning at every fork that it disables its thread pool.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    loader = torch.utils.data.DataLoader(
        samples,
        batch_sampler=_BatchSampler(consumed_samples, global_batch_size, micro_batch_size, dp_rank, dp_size),
        collate_fn=Collate(hasher),
        num_workers=num_workers,
        pin_memory=pin_memory,
        # Its own generator: creating the iterator draws a seed, and a draw from the global one would
        # shift the dropout masks of the step that creates it (the first step after a resume too).
        generator=torch.Generator().manual_seed(seed),
    )
    batches = TrainBatches(samples, loader, consumed_samples, global_batch_size // (micro_batch_size * dp_size))
    for stage in stages:
        batches = stage(batches)
    return batches


def build_valid_batches(prepared: PreparedData, data_cfg, hasher: Optional[Hasher], seq_length: int,
                        micro_batch_size: int, num_batches: int, dp_rank: int, dp_size: int, *,
                        max_seq_length: Optional[int] = None) -> List[dict]:
    """The same ``num_batches`` validation micro-batches of this DP rank at every call.

    Validation batch ``i`` is samples ``i*M*D .. (i+1)*M*D - 1`` of the validation order (seeded by
    ``data.split_seed``, not the training seed, so runs with different seeds are compared on the same
    text); rank ``r`` takes its contiguous ``M`` of them.  So the ranks of a DP=D run with
    ``num_batches=n`` together see exactly the samples of a DP=1 run with ``num_batches=n*D``.
    If that is more than one epoch of the split, later batches repeat text (a warning says so).
    """
    _check_batch(micro_batch_size * dp_size, micro_batch_size, dp_size, dp_rank)
    samples = _open_split(prepared, "valid", seq_length, data_cfg.split_seed, max_seq_length)
    needed = num_batches * micro_batch_size * dp_size
    if needed > samples.samples_per_epoch:
        log.warning("validation asks for %d samples but the valid split holds %d of seq_length %d: samples repeat "
                    "(raise data.valid_fraction or lower the eval batches)", needed, samples.samples_per_epoch,
                    seq_length)
    collate = Collate(hasher)
    indices = micro_batch_indices(0, micro_batch_size * dp_size, micro_batch_size, dp_rank, dp_size)
    return [collate([samples[g] for g in next(indices)]) for _ in range(num_batches)]


def build_engram_hasher(prepared: PreparedData, engram_cfg) -> Optional[Hasher]:
    """The Engram hasher for the prepared tokenizer, or None when Engram is disabled."""
    if engram_cfg is None or not engram_cfg.enabled:
        return None
    if engram_cfg.keys == "latent":   # Lngram: keys come from hidden states; the batch carries documents
        from engram_train.lngram.build import LatentKeyInputs

        return LatentKeyInputs(engram_cfg, prepared.eos_id)
    from engram_train.engram.compress import load_or_build_compression
    from engram_train.engram.hashing import hasher_from_config

    lookup, compressed_vocab_size = load_or_build_compression(str(prepared.tokenizer_path))
    hasher = hasher_from_config(engram_cfg, lookup, compressed_vocab_size, prepared.pad_id, prepared.eos_id)
    tok = prepared.tokenizer
    source = "engram.pad_id" if engram_cfg.pad_id is not None else \
        f"{tok.pad_source}; engram.pad_id overrides it"
    log.info("engram: pad id %d %r (%s), compressed to %d", hasher.pad_id, tok.id_to_token(hasher.pad_id), source,
             hasher.compressed_pad_id)
    return hasher
