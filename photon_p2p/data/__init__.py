"""The data layer: text files -> tokenizer -> packed token shards on disk -> resumable batch sampler.

- ``tokenizer.py``: the ``Tokenizer`` interface, the built-in ``ByteTokenizer``, ``HFTokenizer`` (Hugging Face
  ``tokenizers`` JSON), ``load_tokenizer`` / ``tokenizer_from_json``, and ``train_bpe`` (byte-level BPE)
- ``sources.py``: ``--data`` paths (files, directories, globs, ``default``) resolved to files; files read as
  documents (plain text, ``.jsonl``, ``.parquet``, gzipped or not)
- ``shards.py``: ``prepare_dataset`` tokenizes once into content-addressed, cached train/val token files and
  returns a ``TokenDataset`` of read-only memmaps
- ``sampler.py``: ``BatchSampler`` (shuffled, partitionable, resumable training batches) and
  ``iter_eval_batches`` (deterministic validation batches)

Names are imported lazily, so ``import photon_p2p.data.tokenizer`` (e.g. by ``photon-tokenizer``) does not pay
for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Tokenizer": "tokenizer",
    "ByteTokenizer": "tokenizer",
    "HFTokenizer": "tokenizer",
    "load_tokenizer": "tokenizer",
    "tokenizer_from_json": "tokenizer",
    "train_bpe": "tokenizer",
    "SourceFile": "sources",
    "Document": "sources",
    "resolve_paths": "sources",
    "iter_documents": "sources",
    "TokenDataset": "shards",
    "prepare_dataset": "shards",
    "default_cache_dir": "shards",
    "BatchSampler": "sampler",
    "iter_eval_batches": "sampler",
}

__all__ = [
    "BatchSampler",
    "ByteTokenizer",
    "Document",
    "HFTokenizer",
    "SourceFile",
    "TokenDataset",
    "Tokenizer",
    "default_cache_dir",
    "iter_documents",
    "iter_eval_batches",
    "load_tokenizer",
    "prepare_dataset",
    "resolve_paths",
    "tokenizer_from_json",
    "train_bpe",
]

if TYPE_CHECKING:
    from photon_p2p.data.sampler import BatchSampler, iter_eval_batches
    from photon_p2p.data.shards import TokenDataset, default_cache_dir, prepare_dataset
    from photon_p2p.data.sources import Document, SourceFile, iter_documents, resolve_paths
    from photon_p2p.data.tokenizer import (
        ByteTokenizer,
        HFTokenizer,
        Tokenizer,
        load_tokenizer,
        tokenizer_from_json,
        train_bpe,
    )


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
