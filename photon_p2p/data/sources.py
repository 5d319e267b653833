"""Where training text comes from: ``--data`` paths resolved to files, and files read as documents.

A ``--data`` path is a file, a directory (walked recursively in sorted order, hidden entries skipped, keeping
``.txt .text .md .rst .py .jsonl .parquet`` and each of those with ``.gz``), a glob pattern (``**`` recurses; every
matching file is taken whatever its extension, matching directories are walked), or ``default``: the Python standard
library's own top-level ``*.py`` files, which exist on every machine (its test suites are left out on purpose: they
hold deliberately mis-encoded files).

Formats:

- plain text (``.txt .text .md .rst .py`` and any other extension named explicitly): UTF-8;
- ``.jsonl``: one JSON object per line with a string ``"text"`` field;
- ``.parquet``: the ``"text"`` column, else the only string column;
- any of these with ``.gz``: gzip-compressed.

Documents are the unit of the train/validation split, so their size matters:

- ``.jsonl`` and ``.parquet``: one document per non-empty row;
- plain text: one document per file, except that a file of more than 64 Ki characters is cut into chunks of about
  16-32 Ki characters, each ending at a blank line where one exists (else at a line end, else anywhere). A one-file
  corpus (Shakespeare) can so still hold out whole documents for validation.

Binary or non-UTF-8 files that a directory walk or a glob found are skipped with a single warning (one stray file
must not kill a 10 GB build); a file named explicitly must be text, or it is an error.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import logging
import os
import re
import sysconfig
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Literal

from tqdm import tqdm

from photon_p2p.errors import DataError

logger = logging.getLogger(__name__)

TEXT_SUFFIXES = (".txt", ".text", ".md", ".rst", ".py")
KNOWN_SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
SPLIT_ABOVE = 64 * 1024  # characters; smaller plain-text files are one document
CHUNK_MIN = 16 * 1024
CHUNK_MAX = 32 * 1024
SNIFF_BYTES = 8192
_READ_BLOCK = 1 << 20
_SHOW_SKIPPED = 5

Kind = Literal["text", "jsonl", "parquet"]


@dataclass(frozen=True)
class SourceFile:
    """One input file. ``explicit``: named on the command line (errors are fatal) rather than found by a walk."""

    path: str
    kind: Kind
    gzipped: bool
    explicit: bool
    size: int  # bytes on disk, for progress bars


@dataclass(frozen=True, slots=True)
class Document:
    source: str
    text: str


class _NotText(Exception):
    """A file is binary, not UTF-8 or a broken gzip; fatal only if the user named it."""


def _kind_of(path: str) -> tuple[Kind, bool, bool]:
    """(kind, gzipped, known extension) from the file name."""
    name = path.lower()
    gzipped = name.endswith(".gz")
    if gzipped:
        name = name[:-3]
    if name.endswith(".jsonl"):
        return "jsonl", gzipped, True
    if name.endswith(".parquet"):
        return "parquet", gzipped, True
    return "text", gzipped, name.endswith(TEXT_SUFFIXES)


def _source(path: str, *, explicit: bool) -> SourceFile:
    kind, gzipped, _ = _kind_of(path)
    return SourceFile(path=path, kind=kind, gzipped=gzipped, explicit=explicit, size=os.path.getsize(path))


def _sniff(f: SourceFile) -> None:
    """Raise _NotText unless the first 8 KiB look like UTF-8 text; reading all of a 10 GB corpus twice would hurt."""
    if f.kind == "parquet":
        return
    try:
        with _Reader(f) as r:
            head = r.stream.read(SNIFF_BYTES)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise _NotText(f"not a valid gzip file ({e})") from None
    if b"\0" in head:
        raise _NotText("not UTF-8 text (binary file?)")
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a character cut at 8 KiB is fine
    except UnicodeDecodeError:
        raise _NotText("not UTF-8 text (binary file?)") from None


def _walk(directory: str) -> Iterator[str]:
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and _kind_of(name)[2]:
                yield os.path.join(root, name)


def _default_paths() -> list[str]:
    # not recursive: Lib/test holds deliberately mis-encoded files
    return sorted(glob.glob(os.path.join(glob.escape(sysconfig.get_paths()["stdlib"]), "*.py")))


def resolve_paths(paths: list[str]) -> list[SourceFile]:
    """Expand ``--data`` paths into the files to read, in a deterministic order, each file once."""
    if not paths:
        raise DataError("--data: no training data given; pass files, directories or globs (or 'default')")
    out: list[SourceFile] = []
    seen: set[str] = set()
    skipped: list[tuple[str, str]] = []
    for spec in paths:
        if spec == "default":
            found, explicit = _default_paths(), False
        elif os.path.isfile(spec):
            found, explicit = [spec], True
        elif os.path.isdir(spec):
            found, explicit = list(_walk(spec)), False
        elif glob.has_magic(spec):
            found, explicit = [], False
            for match in sorted(glob.glob(spec, recursive=True)):
                found.extend(_walk(match) if os.path.isdir(match) else [match])
        elif os.path.exists(spec):
            raise DataError(f"--data {spec}: not a regular file or directory")
        else:
            raise DataError(f"--data {spec}: no such file or directory")

        usable, skipped_before = 0, len(skipped)
        for path in found:
            real = os.path.realpath(path)
            if real in seen:
                usable += 1
                continue
            try:
                f = _source(path, explicit=explicit)
                _sniff(f)
            except (_NotText, OSError) as e:
                reason = str(e) if isinstance(e, _NotText) else f"cannot read ({e.strerror or e})"
                if explicit:
                    raise DataError(f"--data {path}: {reason}") from None
                skipped.append((path, reason))
                continue
            seen.add(real)
            out.append(f)
            usable += 1
        if usable == 0:
            what = "pattern matches" if glob.has_magic(spec) and spec != "default" else "holds"
            n_skipped = len(skipped) - skipped_before
            why = f" ({n_skipped} skipped as binary or unreadable)" if n_skipped else ""
            raise DataError(
                f"--data {spec}: {what} no usable text files{why}; looked for "
                f"{' '.join('*' + s for s in KNOWN_SUFFIXES)} (optionally .gz)"
            )
    _warn_skipped(skipped)
    return out


def _warn_skipped(skipped: list[tuple[str, str]]) -> None:
    if skipped:
        names = ", ".join(p for p, _ in skipped[:_SHOW_SKIPPED]) + (", ..." if len(skipped) > _SHOW_SKIPPED else "")
        logger.warning("skipped %d file(s) that are binary, not UTF-8 or unreadable: %s", len(skipped), names)


# --------------------------------------------------------------------------------------------------------------
# reading: each reader yields (text, bytes of the file consumed so far) so the progress bar can move inside a file


def _cut(buf: str, start: int) -> int:
    """Where the chunk starting at ``start`` ends: the first blank line after 16 Ki characters, else the last line
    end before 32 Ki, else at 32 Ki. Looks only at ``buf[start:start + CHUNK_MAX]``, so streaming gives the same
    cuts as reading the whole file at once."""
    window = buf[start + CHUNK_MIN : start + CHUNK_MAX]
    blank = _BLANK_LINE.search(window)
    if blank:
        return start + CHUNK_MIN + blank.end()
    newline = window.rfind("\n")
    return start + CHUNK_MIN + (newline + 1 if newline >= 0 else len(window))


_BLANK_LINE = re.compile(r"\n[ \t\r]*\n")


def iter_chunks(pieces: Iterable[str]) -> Iterator[str]:
    """The documents of a plain text arriving in ``pieces``: the whole text if it has at most 64 Ki characters,
    else 16-32 Ki-character chunks (see the module docstring). Joined, they give back the text."""
    buf, start, splitting = "", 0, False
    for piece in pieces:
        buf = buf[start:] + piece  # drop what was yielded, so memory stays ~ one piece
        start = 0
        splitting = splitting or len(buf) > SPLIT_ABOVE
        while splitting and len(buf) - start > CHUNK_MAX:
            cut = _cut(buf, start)
            yield buf[start:cut]
            start = cut
    if len(buf) > start:
        yield buf[start:]


def split_text(text: str) -> list[str]:
    return list(iter_chunks([text]))


class _Reader:
    """A file's bytes (gunzipped if need be), remembering how many bytes of the file itself were consumed."""

    def __init__(self, f: SourceFile) -> None:
        self.raw = open(f.path, "rb")  # noqa: SIM115 (closed in __exit__)
        self.stream: io.BufferedIOBase = gzip.GzipFile(fileobj=self.raw, mode="rb") if f.gzipped else self.raw

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.raw.close()  # GzipFile never closes a file object it was given


def _read_text(f: SourceFile) -> Iterator[tuple[str, int]]:
    with _Reader(f) as r:
        decoder = codecs.getincrementaldecoder("utf-8-sig")()  # -sig: drop the byte-order mark Windows editors add

        def pieces() -> Iterator[str]:
            while block := r.stream.read(_READ_BLOCK):
                yield decoder.decode(block)
            yield decoder.decode(b"", final=True)  # raises on a truncated character at the very end

        try:
            for chunk in iter_chunks(pieces()):
                if chunk.strip():
                    yield chunk, r.raw.tell()
        except UnicodeDecodeError:
            raise _NotText("not UTF-8 text (binary file?)") from None
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise _NotText(f"not a valid gzip file ({e})") from None


def _read_jsonl(f: SourceFile) -> Iterator[tuple[str, int]]:
    with _Reader(f) as r:
        try:
            for lineno, line in enumerate(io.TextIOWrapper(r.stream, encoding="utf-8-sig"), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    text = record["text"]
                    if not isinstance(text, str):
                        raise TypeError
                except (ValueError, KeyError, TypeError):
                    raise DataError(f"--data {f.path} line {lineno}: not JSON with a string 'text' field") from None
                if text.strip():
                    yield text, r.raw.tell()
        except UnicodeDecodeError:
            raise _NotText("not UTF-8 text (binary file?)") from None
        except (gzip.BadGzipFile, EOFError, zlib.error) as e:
            raise _NotText(f"not a valid gzip file ({e})") from None


def _read_parquet(f: SourceFile) -> Iterator[tuple[str, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if f.gzipped:  # Parquet needs random access, which gzip streams lack: decompress into memory
            with gzip.open(f.path, "rb") as g:
                source: object = pa.BufferReader(g.read())
        else:
            source = f.path
        pf = pq.ParquetFile(source)
    except (OSError, EOFError, zlib.error, pa.ArrowException) as e:
        raise DataError(f"--data {f.path}: not a readable Parquet file ({' '.join(str(e).split())[:200]})") from None
    schema = pf.schema_arrow
    strings = [fld.name for fld in schema if pa.types.is_string(fld.type) or pa.types.is_large_string(fld.type)]
    if "text" in strings:
        column = "text"
    elif len(strings) == 1:
        column = strings[0]
    else:
        columns = ", ".join(f"{fld.name}:{fld.type}" for fld in schema)
        raise DataError(
            f"--data {f.path}: no string column 'text' and not exactly one string column "
            f"(columns: {columns}); name the text column 'text'"
        )
    total = max(pf.metadata.num_rows, 1)
    rows = 0
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        values = batch.column(0).to_pylist()
        rows += len(values)
        pos = f.size * rows // total
        for text in values:
            if text and text.strip():
                yield text, pos


_READERS = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet}


def iter_documents(files: list[SourceFile], *, progress: bool = False, desc: str = "reading") -> Iterator[Document]:
    """Yield the documents of ``files`` in order; DataError if they hold no text at all."""
    skipped: list[tuple[str, str]] = []
    count = 0
    with tqdm(total=sum(f.size for f in files), unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        for f in files:
            done = 0
            try:
                for text, pos in _READERS[f.kind](f):
                    bar.update(pos - done)
                    done = pos
                    count += 1
                    yield Document(f.path, text)
            except _NotText as e:
                # a walked file whose bad bytes start after the sniffed 8 KiB: drop the rest of it, as resolve does
                if f.explicit:
                    raise DataError(f"--data {f.path}: {e}") from None
                skipped.append((f.path, str(e)))
            except OSError as e:
                raise DataError(f"--data {f.path}: cannot read ({e.strerror or e})") from None
            bar.update(f.size - done)
    _warn_skipped(skipped)
    if count == 0:
        names = ", ".join(f.path for f in files[:_SHOW_SKIPPED]) + (", ..." if len(files) > _SHOW_SKIPPED else "")
        raise DataError(f"--data {names}: no text found (empty or whitespace only); point --data at real text")
