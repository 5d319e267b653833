"""Tokenizers: the built-in byte-level one, Hugging Face ``tokenizers`` files, and training a byte-level BPE.

Every tokenizer can describe itself as a Hugging Face ``tokenizers`` JSON string (``to_json``) that encodes text to
exactly the same ids. That string is how a tokenizer travels: in the run manifest to other peers, and next to
exported models. Its ``fingerprint`` (sha256 of the canonicalised JSON) is what peers compare to agree that they
tokenize alike, so equal tokenizers have equal fingerprints whichever class holds them.

A literal ``<|endoftext|>`` inside a text is encoded as the end-of-text id by every tokenizer here, because that is
what ``tokenizers`` does with special tokens and all our tokenizers must agree with their JSON form. Corpora that
separate documents with that marker therefore keep their document boundaries.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import secrets
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from photon_p2p.errors import DataError

logger = logging.getLogger(__name__)

EOS_TEXT = "<|endoftext|>"
# Searched in this order: the first one present in a vocabulary is the end-of-text token.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
MIN_VOCAB_SIZE = 257 + 1  # the 256 bytes, the end-of-text token, and room for at least one merge
MAX_VOCAB_SIZE = 1_000_000


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer. ``encode`` never adds special tokens."""

    name: str
    vocab_size: int
    eos_id: int

    @property
    def fingerprint(self) -> str: ...

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def to_json(self) -> str: ...


def fingerprint_of_json(text: str) -> str:
    """sha256 of a tokenizer JSON with keys sorted and whitespace removed, so formatting never matters."""
    canonical = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------------------
# the built-in byte-level tokenizer


@functools.cache
def _gpt2_byte_symbols() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte, the alphabet of the ``ByteLevel`` pre-tokenizer (index = byte)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    symbols: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in symbols:
            symbols[b] = chr(256 + extra)
            extra += 1
    return tuple(symbols[b] for b in range(256))


@functools.cache
def _byte_tokenizer_json() -> str:
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTok

    vocab = {symbol: byte for byte, symbol in enumerate(_gpt2_byte_symbols())}
    tok = HFTok(models.BPE(vocab=vocab, merges=[]))
    # no regex splitting: the whole text is one "word" of byte symbols, and with no merges each maps to its byte
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS_TEXT, special=True, normalized=False)])
    assert tok.token_to_id(EOS_TEXT) == 256
    return tok.to_str()


class ByteTokenizer:
    """Ids 0..255 are the UTF-8 bytes of the text, 256 is ``<|endoftext|>``. Needs no files and never fails."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    @property
    def fingerprint(self) -> str:
        return _byte_fingerprint()

    def encode(self, text: str) -> list[int]:
        if EOS_TEXT not in text:  # the common case: one C-speed conversion
            return list(text.encode("utf-8"))
        ids: list[int] = []
        for i, part in enumerate(text.split(EOS_TEXT)):
            if i:
                ids.append(self.eos_id)
            ids.extend(part.encode("utf-8"))
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(i for i in ids if i != self.eos_id).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return _byte_tokenizer_json()

    def __repr__(self) -> str:
        return "ByteTokenizer()"


@functools.cache
def _byte_fingerprint() -> str:
    return fingerprint_of_json(_byte_tokenizer_json())


# --------------------------------------------------------------------------------------------------------------
# Hugging Face tokenizers


class HFTokenizer:
    """A Hugging Face ``tokenizers.Tokenizer`` (e.g. from ``photon-tokenizer train``); ``origin`` names it in errors."""

    def __init__(self, tok: object, *, name: str, origin: str) -> None:
        from tokenizers import Tokenizer as HFTok

        if not isinstance(tok, HFTok):
            raise TypeError(f"expected tokenizers.Tokenizer, got {type(tok).__name__}")
        self._tok = tok
        self.name = name
        vocab = tok.get_vocab(with_added_tokens=True)
        # ids need not be dense; the embedding must cover the largest one
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        eos = next((t for t in EOS_CANDIDATES if t in vocab), None)
        if eos is None:
            raise DataError(
                f"{origin} has no end-of-text token ({', '.join(EOS_CANDIDATES)}); add one as a special token"
            )
        self.eos_token = eos
        self.eos_id = vocab[eos]
        self._fingerprint: str | None = None

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, flag: str = "--tokenizer") -> HFTokenizer:
        p = Path(path)
        origin = f"{flag} {p}" if flag else str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise DataError(
                f"{origin}: no such file (use 'byte' or a tokenizer JSON made by photon-tokenizer)"
            ) from None
        except IsADirectoryError:
            raise DataError(f"{origin}: is a directory, not a tokenizer JSON file") from None
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{origin}: cannot read ({e})") from None
        return cls.from_json(text, name=p.name, origin=origin)

    @classmethod
    def from_json(cls, text: str, *, name: str | None = None, origin: str = "tokenizer JSON") -> HFTokenizer:
        from tokenizers import Tokenizer as HFTok

        try:
            tok = HFTok.from_str(text)
        except Exception as e:  # tokenizers raises plain Exception for every parse problem
            detail = " ".join(str(e).split())[:200]
            raise DataError(f"{origin}: not a Hugging Face tokenizers JSON file ({detail})") from None
        if name is None:
            model = json.loads(text).get("model", {}).get("type", "model")
            name = f"{str(model).lower()}-{tok.get_vocab_size(with_added_tokens=True)}"
        return cls(tok, name=name, origin=origin)

    @property
    def fingerprint(self) -> str:
        if self._fingerprint is None:
            self._fingerprint = fingerprint_of_json(self.to_json())
        return self._fingerprint

    @property
    def hf(self) -> object:
        """The wrapped ``tokenizers.Tokenizer`` (for token strings, offsets, ...)."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # encode_batch_fast skips offset tracking, which we never use; both run in parallel in Rust
        encode = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)  # _fast: tokenizers >= 0.21
        encodings = encode(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def to_json(self) -> str:
        return self._tok.to_str()

    def __repr__(self) -> str:
        return f"HFTokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos={self.eos_token!r})"


# --------------------------------------------------------------------------------------------------------------
# loading


def load_tokenizer(spec: str, *, flag: str = "--tokenizer") -> Tokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; anything else is the path of a Hugging Face tokenizers JSON file."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer.from_file(spec, flag=flag)


def tokenizer_from_json(text: str, *, origin: str = "tokenizer JSON") -> Tokenizer:
    """A tokenizer received as JSON (from a run manifest). The byte tokenizer's JSON gives a real
    :class:`ByteTokenizer`, so the sender and the receiver run the very same code."""
    hf = HFTokenizer.from_json(text, origin=origin)
    if hf.fingerprint == _byte_fingerprint():
        return ByteTokenizer()
    return hf


# --------------------------------------------------------------------------------------------------------------
# training


def train_bpe(
    paths: list[str], vocab_size: int, output: str, *, min_frequency: int = 2, progress: bool = True
) -> HFTokenizer:
    """Train a byte-level BPE (GPT-2 style) on the documents of ``paths`` and write it to ``output`` atomically.

    Every byte is in the initial alphabet, so any text encodes without unknown tokens. Increase ``vocab_size`` for
    shorter sequences (more text per token) at the cost of a larger embedding; 8k-32k suits small models.
    """
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from photon_p2p.data.sources import iter_documents, resolve_paths

    if not MIN_VOCAB_SIZE <= vocab_size <= MAX_VOCAB_SIZE:
        raise DataError(
            f"--vocab-size {vocab_size}: must be between {MIN_VOCAB_SIZE} (256 bytes + end-of-text + "
            f"one merge) and {MAX_VOCAB_SIZE:,}"
        )
    if min_frequency < 1:
        raise DataError(f"--min-frequency {min_frequency}: must be at least 1")
    out = Path(output)
    files = resolve_paths(paths)

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=progress,
        special_tokens=[EOS_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    docs = (doc.text for doc in iter_documents(files, progress=progress, desc="reading"))
    tok.train_from_iterator(docs, trainer=trainer)
    got = tok.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:
        logger.warning(
            "the data only supports %d tokens (asked for %d); lower --min-frequency or add text to get more",
            got,
            vocab_size,
        )

    text = tok.to_str(pretty=True)
    _write_atomically(out, text)
    logger.info("wrote %s: byte-level BPE with %d tokens", out, got)
    return HFTokenizer.from_json(text, name=out.name, origin=f"--output {out}")


def _write_atomically(path: Path, text: str) -> None:
    """Write through a temporary file in the same directory, so readers never see half a tokenizer."""
    # a unique name opened with "x" (not mkstemp, whose files are private): the result gets the usual permissions
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise DataError(f"--output {path}: cannot write ({e.strerror or e})") from None
        raise
