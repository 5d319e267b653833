"""``prepare_dataset`` packs every document plus an end-of-text token into train/val token files, splits by whole
documents (deterministically, never leaving a side empty), picks the narrowest dtype, and caches by content: a
second call reuses the entry untouched, moved data still hits, an edited file misses, and a failed or concurrent
build never leaves a broken or half-written entry."""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from photon_p2p.data.shards import TokenDataset, prepare_dataset
from photon_p2p.data.tokenizer import ByteTokenizer, HFTokenizer
from photon_p2p.errors import DataError

BYTE = ByteTokenizer()


def split_docs(tokens: np.ndarray, eos: int) -> list[list[int]]:
    """Documents of a packed split (each ends with eos)."""
    arr = np.asarray(tokens)
    assert arr[-1] == eos
    ends = np.flatnonzero(arr == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [arr[s:e].tolist() for s, e in zip(starts, ends, strict=True)]


def decoded(tokens: np.ndarray) -> list[str]:
    return [BYTE.decode(d) for d in split_docs(tokens, BYTE.eos_id)]


def make_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    return path


def entries(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.iterdir()) if cache.exists() else []


@pytest.fixture
def shakespeare(shared_data: Path) -> Path:
    return shared_data / "tinyshakespeare.txt.gz"


def test_shakespeare_byte_shards(shakespeare: Path, tmp_path: Path) -> None:
    start = time.perf_counter()
    ds = prepare_dataset([str(shakespeare)], BYTE, cache_dir=str(tmp_path), val_fraction=0.05, progress=False)
    assert time.perf_counter() - start < 5.0
    with gzip.open(shakespeare, "rt", encoding="utf-8") as f:
        text = f.read()
    m = ds.meta
    docs = m["train_documents"] + m["val_documents"]
    assert len(ds.train) + len(ds.val) == len(text.encode("utf-8")) + docs  # every byte plus one eos per document
    assert (m["train_tokens"], m["val_tokens"]) == (len(ds.train), len(ds.val))
    assert ds.train.dtype == np.uint16 and m["dtype"] == "uint16"
    assert ds.vocab_size_needed == 257
    assert m["tokenizer"]["fingerprint"] == BYTE.fingerprint
    assert m["sources"][0]["path"] == str(shakespeare)
    chunks = decoded(ds.train) + decoded(ds.val)
    assert sorted(chunks) == sorted(c for c in chunks if c in text) and len(chunks) == docs
    with pytest.raises(ValueError, match="read-only"):
        ds.train[0] = 1


def test_val_and_train_are_disjoint_whole_documents(tmp_path: Path) -> None:
    docs = [f"document number {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(300)]
    ds = prepare_dataset(
        [str(make_jsonl(tmp_path / "d.jsonl", docs))],
        BYTE,
        cache_dir=str(tmp_path / "c"),
        val_fraction=0.1,
        progress=False,
    )
    train, val = decoded(ds.train), decoded(ds.val)
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(docs)
    assert 10 <= len(val) <= 55  # ~30 expected


def test_split_does_not_depend_on_file_order(tmp_path: Path) -> None:
    a = make_jsonl(tmp_path / "a.jsonl", [f"alpha {i}" for i in range(60)])
    b = make_jsonl(tmp_path / "b.jsonl", [f"beta {i}" for i in range(60)])
    ab = prepare_dataset([str(a), str(b)], BYTE, cache_dir=str(tmp_path / "c"), val_fraction=0.2, progress=False)
    ba = prepare_dataset([str(b), str(a)], BYTE, cache_dir=str(tmp_path / "c"), val_fraction=0.2, progress=False)
    assert ab.path != ba.path  # different packing order, different entry...
    assert sorted(decoded(ab.val)) == sorted(decoded(ba.val))  # ...same held-out documents


@pytest.mark.parametrize("val_fraction", [1e-12, 0.999999])
def test_neither_side_is_ever_empty(tmp_path: Path, val_fraction: float) -> None:
    docs = ["the first of two documents", "the second one, a bit longer than the first"]
    ds = prepare_dataset(
        [str(make_jsonl(tmp_path / "two.jsonl", docs))],
        BYTE,
        cache_dir=str(tmp_path / "c"),
        val_fraction=val_fraction,
        progress=False,
    )
    assert (ds.meta["train_documents"], ds.meta["val_documents"]) == (1, 1)
    assert sorted(decoded(ds.train) + decoded(ds.val)) == sorted(docs)


def test_single_document_is_an_error(tmp_path: Path) -> None:
    f = tmp_path / "tiny.txt"
    f.write_text("just one short document\n")
    with pytest.raises(DataError, match="only one document; add more text so a validation document can be held"):
        prepare_dataset([str(f)], BYTE, cache_dir=str(tmp_path / "c"), val_fraction=0.02, progress=False)
    assert entries(tmp_path / "c") == []


def test_cache_hit_does_not_rebuild_and_survives_moving_the_data(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    docs = [f"cached doc {i} " * 20 for i in range(40)]
    data = make_jsonl(tmp_path / "data" / "corpus.jsonl", docs)
    cache = tmp_path / "cache"
    first = prepare_dataset([str(data)], BYTE, cache_dir=str(cache), val_fraction=0.1, progress=False)
    stat = (first.path / "train.bin").stat()
    caplog.clear()  # only what the cached calls log
    with caplog.at_level(logging.INFO, logger="photon_p2p.data.shards"):
        again = prepare_dataset([str(data)], BYTE, cache_dir=str(cache), val_fraction=0.1, progress=False)
        moved = tmp_path / "elsewhere" / "renamed.jsonl"
        moved.parent.mkdir()
        shutil.move(data, moved)
        after_move = prepare_dataset([str(moved)], BYTE, cache_dir=str(cache), val_fraction=0.1, progress=False)
    for ds in (again, after_move):
        assert ds.path == first.path
        assert ds.meta["created"] == first.meta["created"]
        now = (ds.path / "train.bin").stat()
        assert (now.st_ino, now.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert sum("using cached token shards" in r.getMessage() for r in caplog.records) == 2
    assert not any("tokenized" in r.getMessage() for r in caplog.records)
    assert entries(cache) == [first.path.name]


def test_editing_a_file_or_changing_settings_misses_the_cache(tmp_path: Path) -> None:
    data = make_jsonl(tmp_path / "corpus.jsonl", [f"version one, doc {i}" for i in range(30)])
    cache = tmp_path / "cache"
    first = prepare_dataset([str(data)], BYTE, cache_dir=str(cache), val_fraction=0.1, progress=False)
    make_jsonl(data, [f"version two, doc {i}" for i in range(30)])
    edited = prepare_dataset([str(data)], BYTE, cache_dir=str(cache), val_fraction=0.1, progress=False)
    assert edited.path != first.path
    assert all(d.startswith("version two") for d in decoded(edited.train))
    other_fraction = prepare_dataset([str(data)], BYTE, cache_dir=str(cache), val_fraction=0.2, progress=False)
    assert len({first.path, edited.path, other_fraction.path}) == 3
    assert TokenDataset.load(first.path).meta["key"] == first.meta["key"]  # the old entry is still intact


def test_uint32_for_vocabularies_over_65536(tmp_path: Path) -> None:
    words = ["<|endoftext|>", *(f"w{i}" for i in range(70_000))]
    hf = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    hf.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = HFTokenizer.from_json(hf.to_str())
    docs = [f"w{i} w{69_999 - i} w{40_000 + i}" for i in range(50)]
    ds = prepare_dataset(
        [str(make_jsonl(tmp_path / "w.jsonl", docs))],
        tok,
        cache_dir=str(tmp_path / "c"),
        val_fraction=0.2,
        progress=False,
    )
    assert ds.train.dtype == np.uint32
    assert ds.vocab_size_needed == 70_001  # "w69999" is id 70000
    got = sorted(" ".join(f"w{i - 1}" for i in d) for d in split_docs(np.concatenate([ds.train, ds.val]), 0))
    assert got == sorted(docs)


def test_failed_build_leaves_no_cache_entry(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    make_jsonl(corpus / "a_good.jsonl", [f"good document {i} " * 50 for i in range(200)])
    bad = corpus / "b_bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n{broken\n" + json.dumps({"text": "never read"}) + "\n")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"b_bad\.jsonl line 2"):
        prepare_dataset([str(corpus)], BYTE, cache_dir=str(cache), val_fraction=0.1, progress=False)
    assert entries(cache) == []  # no entry and no temporary build directory


def test_broken_entry_is_rebuilt_and_stale_build_dirs_are_removed(tmp_path: Path) -> None:
    data = make_jsonl(tmp_path / "corpus.jsonl", [f"doc {i}" for i in range(30)])
    cache = tmp_path / "cache"
    first = prepare_dataset([str(data)], BYTE, cache_dir=str(cache), val_fraction=0.1, progress=False)
    with open(first.path / "train.bin", "r+b") as f:
        f.truncate(10)  # as a disk error might
    stale, fresh = cache / ".tmp-stale-from-a-killed-build", cache / ".tmp-fresh-concurrent-build"
    for d in (stale, fresh):
        d.mkdir()
        (d / "train.bin").write_bytes(b"\0" * 8)
    day_ago = time.time() - 2 * 24 * 3600
    for p in (stale / "train.bin", stale):
        os.utime(p, (day_ago, day_ago))
    rebuilt = prepare_dataset([str(data)], BYTE, cache_dir=str(cache), val_fraction=0.1, progress=False)
    assert rebuilt.path == first.path
    assert len(rebuilt.train) == first.meta["train_tokens"]
    assert entries(cache) == sorted([first.path.name, fresh.name])


def test_cache_dir_defaults_to_photon_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PHOTON_CACHE_DIR", str(tmp_path / "envcache"))
    data = make_jsonl(tmp_path / "corpus.jsonl", [f"doc {i}" for i in range(10)])
    ds = prepare_dataset([str(data)], BYTE, cache_dir=None, val_fraction=0.1, progress=False)
    assert ds.path.parent == tmp_path / "envcache"


BUILD = """
import logging, sys
logging.basicConfig(level=logging.INFO)
from photon_p2p.data import ByteTokenizer, prepare_dataset
ds = prepare_dataset([sys.argv[1]], ByteTokenizer(), cache_dir=sys.argv[2], val_fraction=0.02, progress=False)
print(ds.path, len(ds.train), len(ds.val))
"""


def test_concurrent_builders_of_one_entry_both_succeed(shared_data: Path, tmp_path: Path) -> None:
    data, cache = str(shared_data / "austen_6_novels.txt.gz"), str(tmp_path / "cache")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD, data, cache], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in outs]
    assert outs[0][0] == outs[1][0]
    logs = outs[0][1] + outs[1][1]
    # both started together, so usually both build and the slower one discards its copy
    if logs.count("tokenized 238 documents") == 2:
        assert logs.count("another process built") == 1
    assert len(entries(Path(cache))) == 1
    TokenDataset.load(outs[0][0].split()[0])
