"""The kernel package is a leaf under a name no other distribution can take.

``engram_train.kernels`` imports nothing else of ``engram_train`` (the torch
references of its row kernels live in it), and the repository installs no
top-level ``kernels`` package, the import name of Hugging Face's ``kernels``.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "engram_train" / "kernels"


def _absolute_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_kernel_package_imports_nothing_of_engram_train():
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) >= 4, sources   # __init__, rows, ngram_hash, triton/{__init__,_src}
    offending = [f"{p.relative_to(REPO)}: import {name}" for p in sources for name in _absolute_imports(p)
                 if name == "engram_train" or name.startswith("engram_train.") or name == "kernels"
                 or name.startswith("kernels.")]
    assert not offending, offending


def test_no_top_level_kernels_package_of_ours():
    spec = importlib.util.find_spec("kernels")
    if spec is None:
        return
    places = list(spec.submodule_search_locations or []) + ([spec.origin] if spec.origin else [])
    ours = [p for p in places if Path(p).resolve().is_relative_to(REPO)]
    assert not ours, f"`import kernels` resolves into this repository: {ours} (remove a stale kernels/ folder)"


def test_references_the_store_uses_are_the_kernel_package_ones():
    from engram_train.kernels import rows
    from engram_train.memory import exchange, optim

    assert exchange.unique_rows is rows.unique_rows and exchange.sum_rows is rows.sum_rows
    assert optim.sparse_adam_rows is rows.sparse_adam_rows
