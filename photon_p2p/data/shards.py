"""Packed token shards: ``--data`` tokenized once into flat token files, cached by content, read through memmap.

A cache entry is a directory holding ``train.bin`` and ``val.bin`` (every document's tokens followed by the
end-of-text id, back to back; uint16 when the vocabulary fits, else uint32) and ``meta.json``. Its name comes from
a sha256 over the format version, the tokenizer's fingerprint, the validation fraction and the sha256 of each input
file's bytes, so renaming or moving the data still hits the cache and editing one byte misses it.

The validation split is by document: a document is held out iff the blake2b hash of its text falls below
``val_fraction``. That is deterministic, the same on every machine and in any file order, and keeps duplicated
documents on one side. At least one document is always held out and at least one kept for training.

Entries are built in a temporary directory and renamed into place when complete: a crash never leaves an entry
that loads wrong, and of two processes building the same entry at once, the first to finish wins and the other
discards its copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from photon_p2p.data.sources import SourceFile, iter_documents, resolve_paths
from photon_p2p.data.tokenizer import Tokenizer
from photon_p2p.errors import DataError

logger = logging.getLogger(__name__)

# Bump when the bytes written for the same inputs change (document splitting, split rule, layout).
FORMAT_VERSION = 1
_BATCH_CHARS = 1 << 20  # tokenize ~1 MiB of text per encode_batch call: big enough for Rust's threads to pay off
_BATCH_DOCS = 1024
_STALE_TMP_SECONDS = 24 * 3600


@dataclass
class TokenDataset:
    """A built cache entry: ``train`` and ``val`` are read-only memmaps of token ids."""

    path: Path
    meta: dict[str, Any]
    train: np.memmap
    val: np.memmap

    @property
    def vocab_size_needed(self) -> int:
        """Largest token id in the data plus one: the embedding must have at least this many rows."""
        return int(self.meta["vocab_size_needed"])

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TokenDataset:
        """Open an entry; ValueError/OSError/KeyError if it is not a complete one of this format."""
        p = Path(path)
        meta = json.loads((p / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format version {meta.get('format_version')} != {FORMAT_VERSION}")
        dtype = np.dtype(meta["dtype"])
        arrays = {}
        for split in ("train", "val"):
            file = p / f"{split}.bin"
            expected = int(meta[f"{split}_tokens"]) * dtype.itemsize
            if expected == 0 or file.stat().st_size != expected:
                raise ValueError(f"{file} holds {file.stat().st_size} bytes, meta.json says {expected}")
            arrays[split] = np.memmap(file, dtype=dtype, mode="r")
        return cls(path=p, meta=meta, train=arrays["train"], val=arrays["val"])


def default_cache_dir() -> Path:
    env = os.environ.get("PHOTON_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "photon-p2p" / "shards"


def file_sha256(path: str, bar: tqdm | None = None) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
                if bar is not None:
                    bar.update(len(block))
    except OSError as e:
        raise DataError(f"--data {path}: cannot read ({e.strerror or e})") from None
    return h.hexdigest()


def cache_key(tokenizer_fingerprint: str, val_fraction: float, file_hashes: Sequence[str]) -> str:
    desc = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer_fingerprint,
        "val_fraction": repr(float(val_fraction)),
        "files": list(file_hashes),
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()


def prepare_dataset(
    paths: list[str], tokenizer: Tokenizer, *, cache_dir: str | None, val_fraction: float, progress: bool = True
) -> TokenDataset:
    """Tokenize ``paths`` into cached train/val token files (once per content), and open them."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    files = resolve_paths(paths)
    with tqdm(total=sum(f.size for f in files), unit="B", unit_scale=True, desc="hashing", disable=not progress) as bar:
        hashes = [file_sha256(f.path, bar) for f in files]
    key = cache_key(tokenizer.fingerprint, val_fraction, hashes)

    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    # name what the user can change: the flag they gave, or the place the default came from
    where = f"--cache-dir {root}" if cache_dir else f"shard cache {root} (choose another with --cache-dir)"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{where}: cannot create ({e.strerror or e})") from None
    final = root / key[:32]

    if final.exists():
        try:
            ds = TokenDataset.load(final)
            if ds.meta.get("key") != key:
                raise ValueError("key mismatch")
            logger.info(
                "using cached token shards %s (%s train / %s val tokens)",
                final,
                f"{len(ds.train):,}",
                f"{len(ds.val):,}",
            )
            return ds
        except (OSError, ValueError, KeyError, TypeError) as e:
            logger.warning("cache entry %s is unusable (%s); rebuilding it", final, e)
            _discard(final, root)

    _remove_stale_tmp(root)
    try:
        # not mkdtemp, whose directories are private: a shared --cache-dir should stay readable per the umask
        tmp = root / f".tmp-{key[:16]}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
    except OSError as e:
        raise DataError(f"{where}: cannot write ({e.strerror or e})") from None
    try:
        _build(tmp, files, hashes, tokenizer, val_fraction, key, progress)
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            # another process finished the same entry first; theirs holds the same bytes
            logger.info("another process built %s first; using its copy", final)
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DataError(
            f"{where}: cannot write token shards ({e.strerror or e}); free some space or choose another --cache-dir"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return TokenDataset.load(final)


# --------------------------------------------------------------------------------------------------------------
# building


@dataclass
class _Split:
    """One output file being appended to, and the document a guarantee may have to move out of it."""

    path: Path
    dtype: np.dtype
    tokens: int = 0
    docs: int = 0
    pending: list[int] = field(default_factory=list)
    # (hash, offset, length) of the document that moves if the other split ends up empty
    candidate: tuple[int, int, int] | None = None

    def add(self, doc_hash: int, ids: list[int], eos: int, prefer_low: bool) -> None:
        length = len(ids) + 1
        if self.candidate is None or (doc_hash < self.candidate[0]) == prefer_low:
            self.candidate = (doc_hash, self.tokens, length)
        self.pending.extend(ids)
        self.pending.append(eos)
        self.tokens += length
        self.docs += 1

    def flush(self, f: Any) -> int:
        """Write pending ids; return their max + 1 (0 if none)."""
        if not self.pending:
            return 0
        arr = np.array(self.pending, dtype=np.int64)
        self.pending.clear()
        top = int(arr.max())
        if top > np.iinfo(self.dtype).max or int(arr.min()) < 0:
            raise RuntimeError(f"tokenizer produced id {top}, outside {self.dtype}")  # a tokenizer bug
        arr.astype(self.dtype).tofile(f)
        return top + 1


def _build(
    tmp: Path,
    files: list[SourceFile],
    hashes: list[str],
    tokenizer: Tokenizer,
    val_fraction: float,
    key: str,
    progress: bool,
) -> None:
    started = time.time()
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)
    train, val = _Split(tmp / "train.bin", dtype), _Split(tmp / "val.bin", dtype)
    threshold = int(val_fraction * 2**64)
    eos = tokenizer.eos_id
    vocab_needed = 0

    with open(train.path, "wb") as ftrain, open(val.path, "wb") as fval:
        batch: list[str] = []
        chars = 0

        def flush() -> None:
            nonlocal chars, vocab_needed
            for text, ids in zip(batch, tokenizer.encode_batch(batch), strict=True):
                doc_hash = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")
                if doc_hash < threshold:
                    val.add(doc_hash, ids, eos, prefer_low=False)  # highest hash is the least "val-like"
                else:
                    train.add(doc_hash, ids, eos, prefer_low=True)
            vocab_needed = max(vocab_needed, train.flush(ftrain), val.flush(fval))
            batch.clear()
            chars = 0

        for doc in iter_documents(files, progress=progress, desc="tokenizing"):
            batch.append(doc.text)
            chars += len(doc.text)
            if chars >= _BATCH_CHARS or len(batch) >= _BATCH_DOCS:
                flush()
        if batch:
            flush()
        for f in (ftrain, fval):
            f.flush()
            os.fsync(f.fileno())

    if train.docs + val.docs < 2:
        names = " ".join(f.path for f in files)
        raise DataError(
            f"--data {names}: only one document; add more text so a validation document can be held "
            f"out (plain-text files over 64 KiB are split into several documents)"
        )
    if val.docs == 0:
        _move(train, val)
    elif train.docs == 0:
        _move(val, train)

    meta = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "tokenizer": {
            "name": tokenizer.name,
            "fingerprint": tokenizer.fingerprint,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": eos,
        },
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "train_tokens": train.tokens,
        "val_tokens": val.tokens,
        "train_documents": train.docs,
        "val_documents": val.docs,
        "vocab_size_needed": vocab_needed,
        # the paths of the first build: the entry is reused for the same content under any name
        "sources": [{"path": f.path, "sha256": h, "size": f.size} for f, h in zip(files, hashes, strict=True)],
        "created": time.time(),
        "build_seconds": round(time.time() - started, 3),
    }
    with open(tmp / "meta.json", "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    logger.info(
        "tokenized %d documents in %.1f s: %s train / %s val tokens (%d / %d documents)",
        train.docs + val.docs,
        meta["build_seconds"],
        f"{train.tokens:,}",
        f"{val.tokens:,}",
        train.docs,
        val.docs,
    )


def _move(src: _Split, dst: _Split) -> None:
    """Move ``src``'s candidate document to the end of ``dst``. Only needed for tiny corpora, so reading the
    whole source file into memory is fine."""
    assert src.candidate is not None
    _, offset, length = src.candidate
    data = np.fromfile(src.path, dtype=src.dtype)
    with open(dst.path, "ab") as f:
        data[offset : offset + length].tofile(f)
    np.concatenate([data[:offset], data[offset + length :]]).tofile(src.path)
    src.tokens -= length
    src.docs -= 1
    dst.tokens += length
    dst.docs += 1


def _discard(entry: Path, root: Path) -> None:
    """Move a broken entry out of the way first (atomic), then delete it: readers never see it half-deleted."""
    trash = root / f".tmp-broken-{entry.name}-{os.getpid()}"
    try:
        os.rename(entry, trash)
    except OSError:
        return  # someone else moved or replaced it
    shutil.rmtree(trash, ignore_errors=True)


def _remove_stale_tmp(root: Path) -> None:
    """Delete build directories left by killed processes (untouched for a day: no live build is that idle)."""
    now = time.time()
    for entry in root.glob(".tmp-*"):
        try:
            newest = max([entry.stat().st_mtime] + [p.stat().st_mtime for p in entry.iterdir()])
        except OSError:
            continue
        if now - newest > _STALE_TMP_SECONDS:
            logger.info("removing stale build directory %s", entry)
            shutil.rmtree(entry, ignore_errors=True)
