"""The state-transfer wire format (swarm/transfer.py speaks it): snapshots, their description, bounded framing.

A donor's snapshot is a header plus one contiguous byte buffer hashed in 4 MiB blocks; everything a donor says about
it is checked (schema, sizes against the caller's expected bytes, hashes) before a data byte is accepted, and every
frame is read through a reader that refuses lengths over a limit. Nothing here touches the network or the averager.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from typing import Any, NamedTuple

import msgpack
import numpy as np
import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2

CHUNK = 1 << 20  # data bytes per stream message
BLOCK = 4 << 20  # bytes per verified block
ALIGN = 64  # every tensor starts at a multiple of this, so the received buffer is viewed as tensors without a copy
SIZE_SLACK = 1 << 20  # allowance for alignment over the caller's expected tensor bytes
MAX_HEADER = 4 << 20
MAX_DESCRIBE = 16 << 20  # header + 32 bytes per 4 MiB block: room for ~1.5 TB of state
MAX_TENSORS, MAX_DIMS = 1 << 16, 8
CACHE_SNAPSHOTS, CACHE_TTL = 2, 180.0
MAX_DONORS = 16  # anyone can write the DHT entry: never consider more than this many
DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float64,
        torch.int64,
        torch.int32,
        torch.uint8,
        torch.bool,
    )
}
_LIMITS = dict(
    raw=False, strict_map_key=True, max_str_len=1 << 12, max_array_len=MAX_TENSORS, max_map_len=64, max_ext_len=0
)
DONE, TOTAL, RATE = range(3)  # slots of the shared progress array


class TransferFailed(Exception):
    """The download gave up; ``reason`` is one line saying why."""

    def __init__(self, reason: str, problems: tuple[str, ...] = ()):
        super().__init__(reason, problems)  # both in args: it crosses to the host process pickled
        self.reason, self.problems = reason, problems


class StateDownload(NamedTuple):  # what the averager process hands to the host
    metadata: Any
    tensors: list[torch.Tensor]
    donor: str
    seconds: float
    nbytes: int
    problems: tuple[str, ...]


class _Refused(Exception):
    """The donor broke the protocol or lied: not asked again during this download. args: (why[, donors])."""


class _Stalled(Exception):
    """No bytes for stall_timeout seconds."""


def _check(ok: bool, why: str) -> None:  # not `assert`: these checks must survive python -O
    if not ok:
        raise _Refused(why)


def _printable(text: str) -> str:
    """A peer's error text as one short log-safe line (no control characters, no newlines)."""
    return " ".join("".join(c if c.isprintable() else " " for c in text[:400]).split())[:200]


def _pack(obj: dict) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _unpack(raw: bytes, schema: dict[str, type], limit: int) -> dict[str, Any]:
    """A small msgpack dict with exactly ``schema``'s keys and types (bool is not an int here)."""
    _check(len(raw) <= limit, f"sent a {len(raw)}-byte message (limit {limit})")
    try:
        obj = msgpack.unpackb(raw, max_bin_len=limit, **_LIMITS)
    except Exception:  # msgpack raises many types on garbage
        raise _Refused("sent a message that is not msgpack") from None
    if isinstance(obj, dict) and set(obj) == {"error"} and isinstance(obj["error"], str):
        raise ConnectionError(_printable(obj["error"]))
    _check(
        isinstance(obj, dict) and set(obj) == set(schema) and all(type(obj[k]) is t for k, t in schema.items()),
        "sent a message that does not match the schema",
    )
    return obj


def _layout(tensors: list[tuple[str, list[int]]]) -> tuple[list[tuple[int, int]], int, int]:
    """(offset, nbytes) per tensor, the total size with alignment, and the tensor bytes without it."""
    slots, pos, raw = [], 0, 0
    for name, shape in tensors:
        nbytes = math.prod(shape) * DTYPES[name].itemsize
        pos = -(-pos // ALIGN) * ALIGN
        slots.append((pos, nbytes))
        pos, raw = pos + nbytes, raw + nbytes
    return slots, pos, raw


def _snapshot_id(header: bytes, size: int, digests: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=32, person=b"photon-state-v1")
    for part in (len(header).to_bytes(8, "big"), header, size.to_bytes(8, "big"), BLOCK.to_bytes(8, "big"), digests):
        h.update(part)
    return h.digest()


class _Snapshot:
    """A donor's frozen state: header plus one contiguous byte buffer, hashed block by block. Built in a thread."""

    def __init__(self, meta: bytes, tensors: list[torch.Tensor]):
        names = [str(t.dtype).removeprefix("torch.") for t in tensors]
        if unknown := set(names) - set(DTYPES):
            raise TypeError(f"cannot share tensors of dtype {sorted(unknown)}")
        described = [(name, list(t.shape)) for name, t in zip(names, tensors, strict=True)]
        self.header = _pack({"v": 1, "meta": meta, "tensors": described})
        slots, self.size, _ = _layout(described)
        self.data = np.zeros(self.size, dtype=np.uint8)  # zeros: the padding must be deterministic for the hash
        for t, (offset, nbytes) in zip(tensors, slots, strict=True):
            if nbytes:
                self.data[offset : offset + nbytes] = t.detach().contiguous().view(-1).view(torch.uint8).numpy()
        view = memoryview(self.data)
        self.digests = b"".join(
            hashlib.blake2b(view[i : i + BLOCK], digest_size=32).digest() for i in range(0, self.size, BLOCK)
        )
        self.id = _snapshot_id(self.header, self.size, self.digests)
        self.used = time.monotonic()


class _Incoming:
    """A snapshot being received, in order, into shared memory; each block is checked as soon as it completes."""

    def __init__(self, description: dict[str, Any], tensors: list, meta: Any, priority: float):
        self.id, self.size, self.digests = description["id"], description["size"], description["digests"]
        self.tensors, self.meta, self.priority = tensors, meta, priority
        self.buffer = torch.zeros(self.size, dtype=torch.uint8).share_memory_()  # reaches the host without a copy
        self.view, self.offset, self.holders = self.buffer.numpy(), 0, set()
        self._hasher, self._senders = hashlib.blake2b(digest_size=32), set()

    def feed(self, donor: PeerID, data: bytes) -> None:
        data, pos = memoryview(data), 0
        while pos < len(data):
            block_end = min((self.offset // BLOCK + 1) * BLOCK, self.size)
            piece = data[pos : pos + block_end - self.offset]
            self.view[self.offset : self.offset + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
            self._hasher.update(piece)
            self._senders.add(donor)
            self.offset, pos = self.offset + len(piece), pos + len(piece)
            if self.offset == block_end:
                index = (block_end - 1) // BLOCK
                ok = self._hasher.digest() == self.digests[32 * index : 32 * index + 32]
                senders, self._hasher, self._senders = self._senders, hashlib.blake2b(digest_size=32), set()
                if not ok:  # fetch the block again, from someone else
                    self.offset = index * BLOCK
                    raise _Refused(f"sent block {index}, which does not match its hash", senders)

    def result(self) -> tuple[Any, list[torch.Tensor]]:
        slots, _, _ = _layout(self.tensors)
        return self.meta, [
            self.buffer[o : o + n].view(DTYPES[name]).view(shape)
            for (name, shape), (o, n) in zip(self.tensors, slots, strict=True)
        ]


def _parse_description(d: dict[str, Any], expected_bytes: int) -> tuple[list, Any]:
    """Everything a donor says about its snapshot, checked before a single data byte is accepted."""
    size, header, mb = d["size"], d["header"], expected_bytes / 1e6
    _check(0 <= size <= expected_bytes + SIZE_SLACK, f"announced {size / 1e6:.1f} MB, more than the expected {mb:.1f}")
    _check(
        len(d["id"]) == 32 and len(d["digests"]) == 32 * -(-size // BLOCK) and len(header) <= MAX_HEADER,
        "sent a malformed snapshot description",
    )
    _check(_snapshot_id(header, size, d["digests"]) == d["id"], "sent an id that does not match its hashes")
    why = "sent a snapshot header that does not match the schema"
    try:
        h = msgpack.unpackb(header, max_bin_len=MAX_HEADER, **_LIMITS)
        meta = msgpack.unpackb(h["meta"], max_bin_len=MAX_HEADER, **_LIMITS)
    except Exception:
        raise _Refused(why) from None
    _check(
        isinstance(h, dict) and set(h) == {"v", "meta", "tensors"} and h["v"] == 1 and isinstance(h["tensors"], list),
        why,
    )
    for item in h["tensors"]:
        _check(
            isinstance(item, list)
            and len(item) == 2
            and item[0] in DTYPES
            and isinstance(item[1], list)
            and len(item[1]) <= MAX_DIMS
            and all(type(x) is int and 0 <= x < 1 << 40 for x in item[1]),
            why,
        )
    _, total, raw = _layout(h["tensors"])
    _check(raw <= expected_bytes, f"holds {raw / 1e6:.1f} MB of tensors, more than the expected {mb:.1f}")
    _check(total == size, "announced a size that does not match its header")
    return h["tensors"], meta


async def _read_message(reader: asyncio.StreamReader, limit: int, timeout: float) -> averaging_pb2.DownloadData | None:
    """One hivemind stream frame (marker, 8-byte length, protobuf), refusing lengths over ``limit``; None at the end.
    ``timeout`` restarts with every piece that arrives: a stall is "no bytes", not "a slow message"."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeout) as deadline:
            try:
                marker = await reader.readexactly(1)
            except asyncio.IncompleteReadError:
                return None
            length = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
            _check(length <= limit, f"sent a {length}-byte message (limit {limit})")
            buf = bytearray()
            while len(buf) < length:
                piece = await reader.read(length - len(buf))
                if not piece:
                    raise ConnectionError("closed the stream mid-message")
                buf += piece
                deadline.reschedule(loop.time() + timeout)
    except TimeoutError:
        raise _Stalled() from None
    except asyncio.IncompleteReadError:
        raise ConnectionError("closed the stream mid-message") from None
    if marker == P2P.ERROR_MARKER:  # an exception in the donor's handler
        raise ConnectionError(_printable(runtime_pb2.RPCError.FromString(bytes(buf)).message))
    _check(marker == P2P.MESSAGE_MARKER, "broke the stream framing")
    try:
        return averaging_pb2.DownloadData.FromString(bytes(buf))
    except Exception:
        raise _Refused("sent a message that is not a DownloadData protobuf") from None
