"""Tokenizers round-trip real text, agree with their Hugging Face JSON form id for id, fingerprint alike only when
equal, turn bad tokenizer files into one-line errors naming the file, and ``photon-tokenizer`` works end to end as
a real console script (exit code 2 and one ``error:`` line on bad input)."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import tokenizers

from photon_p2p.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    fingerprint_of_json,
    load_tokenizer,
    tokenizer_from_json,
    train_bpe,
)
from photon_p2p.errors import DataError

UNICODE = "naïve — ünïcode 日本 café 🙂 Ω≈ç√"
# every code point up to U+07FF plus some 3- and 4-byte ones: all bytes valid UTF-8 can contain
ALL_BYTES_TEXT = "".join(chr(c) for c in range(1, 0x800) if not 0xD800 <= c < 0xE000) + "\u4e00\uffee\U0001f600"


@pytest.fixture(scope="module")
def shakespeare(shared_data: Path) -> str:
    with gzip.open(shared_data / "tinyshakespeare.txt.gz", "rt", encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def train_file(shakespeare: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "shakespeare_slice.txt"
    path.write_text(shakespeare[:200_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe(train_file: Path, tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    out = tmp_path_factory.mktemp("tok") / "bpe500.json"
    return train_bpe([str(train_file)], 500, str(out), progress=False)


# --------------------------------------------------------------------------------------------------------------
# ByteTokenizer


def test_byte_tokenizer_round_trips_shakespeare(shakespeare: str) -> None:
    tok = ByteTokenizer()
    text = shakespeare + UNICODE
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.vocab_size, tok.eos_id, tok.name) == (257, 256, "byte")
    assert isinstance(tok, Tokenizer)
    assert tok.encode_batch([shakespeare[:100], UNICODE]) == [tok.encode(shakespeare[:100]), tok.encode(UNICODE)]


def test_byte_tokenizer_decode_skips_eos_and_replaces_broken_bytes() -> None:
    tok = ByteTokenizer()
    assert tok.decode([104, 105, 256, 33]) == "hi!"
    assert tok.decode([104, 0xC3]) == "h\ufffd"  # a cut multi-byte character does not raise


def test_byte_to_json_encodes_exactly_like_the_tokenizers_library(shakespeare: str) -> None:
    ours = ByteTokenizer()
    theirs = tokenizers.Tokenizer.from_str(ours.to_json())
    for text in (shakespeare[:50_000] + UNICODE, ALL_BYTES_TEXT, "a <|endoftext|>b", "  leading\n\n\ttabs  "):
        ids = ours.encode(text)
        assert theirs.encode(text).ids == ids
        assert theirs.decode(ids) == ours.decode(ids)
    assert theirs.token_to_id("<|endoftext|>") == ours.eos_id
    assert theirs.get_vocab_size() == ours.vocab_size
    # a literal end-of-text marker in the text is the end-of-text id on both sides (tokenizers' special tokens)
    assert ours.encode("a<|endoftext|>b") == [97, 256, 98]


def test_byte_json_comes_back_as_byte_tokenizer() -> None:
    text = ByteTokenizer().to_json()
    assert isinstance(tokenizer_from_json(text), ByteTokenizer)
    # re-formatted (as after travelling through a manifest) is still recognised
    assert isinstance(tokenizer_from_json(json.dumps(json.loads(text), indent=2)), ByteTokenizer)


# --------------------------------------------------------------------------------------------------------------
# trained BPE


def test_trained_bpe_round_trips_and_compresses(bpe: HFTokenizer, shakespeare: str) -> None:
    held_out = shakespeare[-50_000:]  # not in the 200 kB it was trained on
    for text in (shakespeare[:20_000], held_out, UNICODE, ALL_BYTES_TEXT):
        assert bpe.decode(bpe.encode(text)) == text
    assert len(bpe.encode(held_out)) < 0.6 * len(held_out.encode("utf-8"))
    assert bpe.vocab_size == 500
    assert isinstance(bpe, Tokenizer)
    assert bpe.eos_token == "<|endoftext|>"
    assert bpe.eos_id not in bpe.encode(held_out)  # encode adds no special tokens
    texts = [held_out[:1000], UNICODE, ""]
    assert bpe.encode_batch(texts) == [bpe.encode(t) for t in texts]


def test_trained_bpe_file_and_json_agree(bpe: HFTokenizer, shakespeare: str, tmp_path: Path) -> None:
    path = tmp_path / "copy.json"
    path.write_text(bpe.to_json(), encoding="utf-8")
    from_file = load_tokenizer(str(path))
    from_json = tokenizer_from_json(bpe.to_json())
    theirs = tokenizers.Tokenizer.from_str(bpe.to_json())
    text = shakespeare[-5_000:] + UNICODE
    assert from_file.encode(text) == from_json.encode(text) == theirs.encode(text).ids == bpe.encode(text)
    assert from_file.fingerprint == from_json.fingerprint == bpe.fingerprint


def test_train_bpe_writes_atomically_and_validates_vocab_size(train_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "tok.json"
    tok = train_bpe([str(train_file)], 300, str(out), min_frequency=1, progress=False)
    assert tok.vocab_size == 300
    assert [p.name for p in out.parent.iterdir()] == ["tok.json"]  # no temporary file left behind
    for bad in (257, 2_000_000):
        with pytest.raises(DataError, match="--vocab-size"):
            train_bpe([str(train_file)], bad, str(tmp_path / "never.json"), progress=False)
    assert not (tmp_path / "never.json").exists()
    with pytest.raises(DataError, match="no such file"):
        train_bpe([str(tmp_path / "missing.txt")], 300, str(tmp_path / "never.json"), progress=False)


# --------------------------------------------------------------------------------------------------------------
# fingerprints


def test_fingerprints_equal_only_for_equal_tokenizers(bpe: HFTokenizer, train_file: Path, tmp_path: Path) -> None:
    byte = ByteTokenizer()
    assert byte.fingerprint == ByteTokenizer().fingerprint
    assert HFTokenizer.from_json(byte.to_json()).fingerprint == byte.fingerprint
    pretty = json.dumps(json.loads(bpe.to_json()), indent=4)
    assert fingerprint_of_json(pretty) == bpe.fingerprint  # formatting does not matter
    other = train_bpe([str(train_file)], 400, str(tmp_path / "bpe400.json"), progress=False)
    assert len({byte.fingerprint, bpe.fingerprint, other.fingerprint}) == 3


# --------------------------------------------------------------------------------------------------------------
# loading errors and end-of-text detection


def _word_level(vocab: list[str], *, template: bool = False) -> str:
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=vocab[0]))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    if template:
        tok.post_processor = tokenizers.processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab.index("[CLS]")), ("[SEP]", vocab.index("[SEP]"))]
        )
    return tok.to_str()


def test_load_tokenizer_errors_name_the_file(tmp_path: Path) -> None:
    garbage = tmp_path / "bad.json"
    garbage.write_bytes(b"\x00\x01 definitely not json")
    with pytest.raises(DataError, match=r"--tokenizer .*bad\.json: (not a Hugging Face|cannot read)"):
        load_tokenizer(str(garbage))
    wrong_json = tmp_path / "wrong.json"
    wrong_json.write_text('{"hello": "world"}')
    with pytest.raises(DataError, match=r"wrong\.json: not a Hugging Face tokenizers JSON file"):
        load_tokenizer(str(wrong_json))
    with pytest.raises(DataError, match=r"missing\.json: no such file"):
        load_tokenizer(str(tmp_path / "missing.json"))
    with pytest.raises(DataError, match="is a directory"):
        load_tokenizer(str(tmp_path))
    no_eos = tmp_path / "no_eos.json"
    no_eos.write_text(_word_level(["[UNK]", "hello", "world"]))
    with pytest.raises(DataError, match=r"no_eos\.json has no end-of-text token .*add one as a special token"):
        load_tokenizer(str(no_eos))


def test_end_of_text_is_found_in_priority_order_and_encode_adds_no_special_tokens(tmp_path: Path) -> None:
    path = tmp_path / "bert_like.json"
    path.write_text(_word_level(["[UNK]", "[CLS]", "[SEP]", "</s>", "hello", "world"], template=True))
    tok = load_tokenizer(str(path))
    assert isinstance(tok, HFTokenizer)
    assert (tok.eos_token, tok.eos_id) == ("</s>", 3)  # "</s>" comes before "[SEP]"
    assert tokenizers.Tokenizer.from_file(str(path)).encode("hello world").ids == [1, 4, 5, 2]
    assert tok.encode("hello world") == [4, 5]
    assert tok.encode_batch(["hello", "world hello"]) == [[4], [5, 4]]


# --------------------------------------------------------------------------------------------------------------
# photon-tokenizer, as a real console script


def _cli() -> str:
    script = Path(sys.executable).parent / "photon-tokenizer"
    if not script.exists():
        pytest.skip(f"{script} not installed (pip install -e . --no-deps)")
    return str(script)


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_cli(), *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_cli_train_then_info(train_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "tok.json"
    r = _run(
        "train", "--data", str(train_file), "--vocab-size", "300", "--output", str(out), "--no-progress", cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}: 300 tokens" in r.stdout
    tok = load_tokenizer(str(out))
    r = _run("info", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "vocab size:  300" in r.stdout
    assert "'<|endoftext|>' (id 0)" in r.stdout
    assert f"fingerprint: {tok.fingerprint}" in r.stdout
    assert "round trip: ok" in r.stdout
    # refuses to overwrite without --force
    r = _run("train", "--data", str(train_file), "--vocab-size", "300", "--output", str(out), cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: --output {out} already exists; pass --force to overwrite it"


@pytest.mark.parametrize("case", ["garbage_info", "missing_data", "bad_vocab"])
def test_cli_bad_input_is_one_error_line_and_exit_2(case: str, train_file: Path, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.json"
    garbage.write_text("this is not a tokenizer")
    args = {
        "garbage_info": ["info", str(garbage)],
        "missing_data": ["train", "--data", "nowhere.txt", "--vocab-size", "300", "--output", "t.json"],
        "bad_vocab": ["train", "--data", str(train_file), "--vocab-size", "10", "--output", "t.json"],
    }[case]
    r = _run(*args, cwd=tmp_path)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert {"garbage_info": "garbage.json", "missing_data": "--data nowhere.txt", "bad_vocab": "--vocab-size 10"}[
        case
    ] in lines[0]
    assert not (tmp_path / "t.json").exists()
