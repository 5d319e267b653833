"""``--data`` paths resolve to the right files (files, directories, globs, ``default``) and every format (text,
jsonl, parquet, each gzipped or not) reads back as the documents it holds; long text files split into 16-32 Ki
chunks at blank lines; bad input is a one-line DataError naming the path, except that binary files found by a walk
are skipped with a single warning."""

from __future__ import annotations

import gzip
import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from photon_p2p.data.sources import CHUNK_MAX, CHUNK_MIN, iter_chunks, iter_documents, resolve_paths, split_text
from photon_p2p.errors import DataError

BINARY = bytes(range(256)) * 8


def texts(paths: list[str]) -> list[str]:
    return [d.text for d in iter_documents(resolve_paths(paths))]


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode("utf-8") if isinstance(content, str) else content
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def jsonl(*records: object) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


# --------------------------------------------------------------------------------------------------------------
# formats


def test_plain_text_file_is_one_document(tmp_path: Path) -> None:
    f = write(tmp_path / "notes.md", "# Title\n\nSome text.\n")
    odd = write(tmp_path / "poem.verse", "an unknown extension named explicitly is text\n")
    bom = write(tmp_path / "win.txt", b"\xef\xbb\xbfwindows text\r\n")
    docs = list(iter_documents(resolve_paths([str(f), str(odd), str(bom)])))
    assert [(d.source, d.text) for d in docs] == [
        (str(f), "# Title\n\nSome text.\n"),
        (str(odd), "an unknown extension named explicitly is text\n"),
        (str(bom), "windows text\r\n"),
    ]


def test_long_text_splits_at_blank_lines_into_16_to_32_ki_chunks(shared_data: Path) -> None:
    path = shared_data / "tinyshakespeare.txt.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        full = f.read()
    chunks = texts([str(path)])
    assert "".join(chunks) == full  # nothing lost or reordered
    assert len(chunks) > 30
    assert all(CHUNK_MIN <= len(c) <= CHUNK_MAX and c.endswith("\n\n") for c in chunks[:-1])
    assert 0 < len(chunks[-1]) <= CHUNK_MAX


def test_streamed_chunks_equal_whole_text_chunks(shared_data: Path) -> None:
    with gzip.open(shared_data / "tinyshakespeare.txt.gz", "rt", encoding="utf-8") as f:
        full = f.read()[:300_000]
    for size in (1, 777, 40_000, 70_000):
        pieces = (full[i : i + size] for i in range(0, len(full), size))
        assert list(iter_chunks(pieces)) == split_text(full)
    assert list(iter_chunks(["abc", "def"])) == ["abcdef"]


def test_split_without_blank_lines_falls_back_to_line_ends_then_anywhere() -> None:
    lines = "".join(f"line {i:06d} of a file with no paragraphs\n" for i in range(3000))
    chunks = split_text(lines)
    assert "".join(chunks) == lines
    assert all(c.endswith("\n") and len(c) <= CHUNK_MAX for c in chunks)
    blob = "x" * 100_000
    assert [len(c) for c in split_text(blob)] == [CHUNK_MAX, CHUNK_MAX, CHUNK_MAX, 100_000 - 3 * CHUNK_MAX]
    assert split_text("short\n\ntext") == ["short\n\ntext"]


def test_jsonl_one_document_per_non_empty_row(tmp_path: Path) -> None:
    content = jsonl({"text": "first", "id": 1}, {"text": ""}, {"text": "   "}, {"text": "third ünï"}) + "\n  \n"
    for name in ("rows.jsonl", "rows.jsonl.gz"):
        assert texts([str(write(tmp_path / name, content))]) == ["first", "third ünï"]


@pytest.mark.parametrize("bad_line", ['{"text": 5}', '{"body": "x"}', "not json", '["text"]', '{"text": "x"'])
def test_bad_jsonl_line_is_an_error_naming_file_and_line(tmp_path: Path, bad_line: str) -> None:
    f = write(tmp_path / "rows.jsonl", jsonl({"text": "ok"}, {"text": "ok too"}) + bad_line + "\n")
    with pytest.raises(DataError, match=rf"^--data {f} line 3: not JSON with a string 'text' field$"):
        texts([str(f)])


def _parquet(path: Path, table: pa.Table) -> Path:
    if path.name.endswith(".gz"):
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return write(path, sink.getvalue().to_pybytes())
    pq.write_table(table, path)
    return path


def test_parquet_text_column_or_only_string_column(tmp_path: Path) -> None:
    table = pa.table({"id": [1, 2, 3, 4], "text": ["alpha", None, "", "delta"], "lang": ["en"] * 4})
    assert texts([str(_parquet(tmp_path / "a.parquet", table))]) == ["alpha", "delta"]
    assert texts([str(_parquet(tmp_path / "a.parquet.gz", table))]) == ["alpha", "delta"]
    only = pa.table({"n": [1, 2], "body": ["one", "two"]})
    assert texts([str(_parquet(tmp_path / "b.parquet", only))]) == ["one", "two"]


def test_parquet_without_a_usable_column_lists_the_columns(tmp_path: Path) -> None:
    two = _parquet(tmp_path / "two.parquet", pa.table({"title": ["t"], "body": ["b"], "n": [1]}))
    with pytest.raises(DataError, match=r"two\.parquet: no string column 'text'.*title:string, body:string, n:int64"):
        texts([str(two)])
    broken = write(tmp_path / "broken.parquet", b"PAR1 this is not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: not a readable Parquet file"):
        texts([str(broken)])


# --------------------------------------------------------------------------------------------------------------
# directories, globs, default


def test_directory_walk_is_sorted_recursive_and_skips_hidden_and_unknown(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    write(root / "b.txt", "b")
    write(root / "a.md", "a")
    write(root / "sub" / "c.rst.gz", "c")
    write(root / "sub" / "d.jsonl", jsonl({"text": "d"}))
    write(root / "table.csv", "not,read")
    write(root / ".hidden.txt", "hidden")
    write(root / ".git" / "notes.txt", "hidden dir")
    files = resolve_paths([str(root)])
    assert [os.path.relpath(f.path, root) for f in files] == ["a.md", "b.txt", "sub/c.rst.gz", "sub/d.jsonl"]
    assert [f.explicit for f in files] == [False] * 4
    assert texts([str(root)]) == ["a", "b", "c", "d"]
    # the same file reached twice is read once
    assert texts([str(root / "a.md"), str(root)]) == ["a", "b", "c", "d"]


def test_glob_patterns(tmp_path: Path) -> None:
    write(tmp_path / "x" / "one.md", "one")
    write(tmp_path / "x" / "deep" / "two.md", "two")
    write(tmp_path / "x" / "three.txt", "three")
    write(tmp_path / "x" / "log.custom", "a glob takes any extension")
    assert texts([str(tmp_path / "x" / "**" / "*.md")]) == ["two", "one"]
    assert texts([str(tmp_path / "x" / "*.custom")]) == ["a glob takes any extension"]
    with pytest.raises(DataError, match=r"\*\.nothing: pattern matches no usable text files"):
        resolve_paths([str(tmp_path / "x" / "*.nothing")])


def test_default_is_the_standard_library_top_level_sources() -> None:
    files = resolve_paths(["default"])
    assert len(files) > 50
    assert all(f.path.endswith(".py") and f.kind == "text" for f in files)
    assert {Path(f.path).parent for f in files} == {Path(os.__file__).parent}  # not recursive: no Lib/test
    assert any(Path(f.path).name == "os.py" for f in files)
    docs = list(iter_documents(files[:3]))
    assert docs and all(d.text.strip() for d in docs)


# --------------------------------------------------------------------------------------------------------------
# errors and skipping


def test_missing_path_and_no_paths(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(DataError, match=rf"^--data {missing}: no such file or directory$"):
        resolve_paths([str(missing)])
    with pytest.raises(DataError, match="no training data given"):
        resolve_paths([])


@pytest.mark.parametrize(
    "name,content", [("blob.txt", BINARY), ("latin1.txt", "café".encode("latin-1") * 10), ("blob.txt.gz", BINARY)]
)
def test_explicit_binary_or_non_utf8_file_is_an_error(tmp_path: Path, name: str, content: bytes) -> None:
    f = write(tmp_path / name, content)
    with pytest.raises(DataError, match=rf"^--data {f}: not UTF-8 text \(binary file\?\)$"):
        resolve_paths([str(f)])


def test_explicit_corrupt_gzip_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "broken.txt.gz"
    f.write_bytes(gzip.compress(b"hello " * 1000)[:40])
    with pytest.raises(DataError, match=r"broken\.txt\.gz: not a valid gzip file"):
        texts([str(f)])


def test_binary_files_in_a_directory_are_skipped_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "corpus"
    write(root / "good.txt", "good text")
    for i in range(7):
        write(root / f"bin{i}.txt", BINARY)
    # valid for the first 8 KiB, broken after: caught while reading, still only skipped
    write(root / "late.txt", b"a" * 20_000 + b"\xff\xfe")
    with caplog.at_level(logging.WARNING, logger="photon_p2p.data.sources"):
        assert texts([str(root)]) == ["good text"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # one for the 7 sniffed at resolve time, one for the file that broke while read
    assert warnings[0].startswith("skipped 7 file(s)") and "bin0.txt" in warnings[0] and "..." in warnings[0]
    assert "late.txt" in warnings[1]
    explicit_late = root / "late.txt"
    with pytest.raises(DataError, match=r"late\.txt: not UTF-8 text"):
        texts([str(explicit_late)])


def test_directory_with_only_binary_files_is_an_error(tmp_path: Path) -> None:
    write(tmp_path / "d" / "x.txt", BINARY)
    with pytest.raises(DataError, match=r"holds no usable text files \(1 skipped as binary or unreadable\)"):
        resolve_paths([str(tmp_path / "d")])


def test_empty_directory_and_empty_files_are_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: holds no usable text files; looked for \*\.txt"):
        resolve_paths([str(tmp_path / "empty")])
    e1 = write(tmp_path / "e1.txt", "")
    e2 = write(tmp_path / "e2.jsonl", "\n\n")
    with pytest.raises(DataError, match=r"e1\.txt, .*e2\.jsonl: no text found"):
        texts([str(e1), str(e2)])
