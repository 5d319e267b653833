"""State download sized to the link (photon_p2p/swarm/transfer.py), with real hivemind DHTs and averagers on 127.0.0.1.

Proves: a client gets the donor's tensors bit for bit (several dtypes, a scalar, an empty tensor) and its metadata;
a stream dropped mid-way resumes at the byte it reached from the same donor (its cached snapshot), and a stalled
donor is left after ``stall_timeout`` for a second donor holding the identical snapshot, re-downloading less than
30% of the state (bytes counted by the donors); a donor announcing more bytes than expected is refused before
sending anything, a donor whose bytes do not match its block hashes is refused, and the client finishes from an
honest donor; with no donor, or only an unreachable one, the download returns None within a bounded time with one
reason line (no traceback in this process), and a second concurrent download is refused at once; forged
descriptions and messages (sizes, ids, headers, types, a donor's error text) are refused without the network.
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing as mp
import re
import threading
import time

import hivemind
import pytest
import torch
from hivemind.compression import NoCompression
from hivemind.utils import get_dht_time

from photon_p2p.swarm.averager import PhotonAverager
from photon_p2p.swarm.transfer import StateTransferMixin

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
META = dict(run_id="t", manifest_hash="0123456789abcdef", round=3, step=30, theta_hash="abc", num_tensors=6)

# PhotonAverager may already include the mixin (then listing it again would make an impossible MRO)
_Base = (
    PhotonAverager
    if issubclass(PhotonAverager, StateTransferMixin)
    else type("_MixedAverager", (StateTransferMixin, PhotonAverager), {})
)


class _TestAverager(_Base):
    """Counts the bytes it serves; ``fault`` ("drop@F", "stall@F", "corrupt@F") acts once, at fraction F of the
    snapshot. Both live in shared memory, so the test process sets and reads them while the averager process serves."""

    def __init__(self, *args, **kwargs):
        self._fault, self._served = mp.Array(ctypes.c_char, 32), mp.Value(ctypes.c_int64, 0)
        super().__init__(*args, **kwargs)

    def reset(self, fault: str = "") -> None:
        self._fault.value, self._served.value = fault.encode(), 0

    @property
    def served(self) -> int:
        return self._served.value

    async def _transfer_send_hook(self, offset: int, data: bytes) -> bytes | None:
        if self._fault.value:
            kind, frac = self._fault.value.decode().split("@")
            if offset >= float(frac) * max(s.size for s in self._transfer_cache.values()):
                self._fault.value = b""  # once
                if kind == "drop":
                    return None
                if kind == "stall":
                    await asyncio.sleep(3600)  # cancelled when the client leaves this stream
                if kind == "corrupt":
                    data = bytes([data[0] ^ 1]) + data[1:]
        self._served.value += len(data)
        return data


def _state(extra: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = [
        torch.randn(3_000_000, generator=g),
        torch.randn(1000, 1000, generator=g),
        torch.randn(700, 300, generator=g).to(torch.bfloat16),
        torch.randint(0, 1 << 40, (1001,), generator=g),
        torch.tensor(2.5),
        torch.zeros(0, 5),
    ]
    return tensors + [torch.ones(extra)] if extra else tensors


STATE = _state()
TOTAL = sum(t.numel() * t.element_size() for t in STATE)


class _Swarm:
    """Started once for the module (process start-up dominates the run time): a root DHT that the client's averager
    uses, and three donors with their own DHTs. Each test picks its donors through priorities above every earlier
    test's and ``min_priority``, so entries left by earlier tests never count."""

    def __init__(self):
        self.dhts, self.avgs = [hivemind.DHT(start=True, host_maddrs=LOOPBACK)], []
        self.root = self.dhts[0]
        self.client = self._averager(STATE, self.root, share=False)
        self.honest, self.twin = self._averager(STATE), self._averager(STATE)  # identical state and metadata
        self.big = self._averager(_state(extra=300_000))  # 1.2 MB more than expected

    def _averager(self, state, dht=None, share: bool = True) -> _TestAverager:
        if dht is None:
            dht = hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=self.root.get_visible_maddrs())
            self.dhts.append(dht)
        avg = _TestAverager(
            [torch.zeros(1)],
            [t.clone() for t in state],
            dht,
            prefix="xfer",
            compression=NoCompression(),
            get_state_meta=lambda: dict(META),
            start=True,
            allow_state_sharing=share,
            request_timeout=1.0,
        )
        self.avgs.append(avg)
        return avg

    def announce(self, priorities: dict[_TestAverager, float], timeout: float = 20.0) -> None:
        """Set these donors' priorities, reset faults and counters, and wait until the DHT shows them."""
        for avg, priority in priorities.items():
            avg.reset()
            avg.state_sharing_priority = priority
        want = {avg.peer_id.to_bytes(): p for avg, p in priorities.items()}
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.root.get("xfer.all_averagers", latest=True)
            seen = {k: v.value for k, v in found.value.items()} if found is not None else {}
            if all(seen.get(k) == p for k, p in want.items()):
                return
            time.sleep(0.2)
        raise AssertionError("the donors' priorities never appeared in the DHT")

    def close(self):
        for avg in self.avgs:
            avg.shutdown()
        for dht in self.dhts:
            dht.shutdown()


@pytest.fixture(scope="module")
def swarm():
    s = _Swarm()
    yield s
    s.close()


def _download(swarm: _Swarm, min_priority: float, **kwargs):
    kwargs = dict(expected_bytes=TOTAL, min_priority=min_priority, stall_timeout=5.0, show_progress=False) | kwargs
    return swarm.client.download_state(**kwargs)


def _assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g.contiguous().view(-1).view(torch.uint8), w.contiguous().view(-1).view(torch.uint8))


def test_round_trip_is_bit_exact(swarm):
    swarm.announce({swarm.honest: 10.0})
    result = _download(swarm, 10.0)
    assert result is not None, swarm.client.last_download_error
    metadata, tensors = result
    assert metadata == META
    _assert_same(tensors, STATE)
    assert swarm.client.last_download_problems == ()
    assert 0 <= swarm.honest.served - TOTAL < 64 * len(STATE)  # the whole snapshot once: tensors + alignment


def test_dropped_stream_resumes_from_the_same_donor(swarm):
    swarm.announce({swarm.twin: 20.0})
    swarm.twin.reset("drop@0.4")
    result = _download(swarm, 20.0)
    assert result is not None, swarm.client.last_download_error
    _assert_same(result[1], STATE)
    problems = swarm.client.last_download_problems
    # the donor stops at a message boundary, but p2pd may cut data still in flight when the stream closes: the reader
    # then sees the end mid-message (seen in a fresh-clone run); either way one drop, then the resume
    assert len(problems) == 1 and re.search(r"closed the stream (mid-message )?at", problems[0]), problems
    assert TOTAL <= swarm.twin.served < 1.3 * TOTAL, (swarm.twin.served, TOTAL)


def test_stalled_donor_is_left_for_another_with_the_same_snapshot(swarm):
    swarm.announce({swarm.twin: 31.0, swarm.honest: 30.0})  # the twin is fresher: asked first
    swarm.twin.reset("stall@0.4")
    t0 = time.monotonic()
    result = _download(swarm, 30.0, stall_timeout=2.0)
    assert result is not None, swarm.client.last_download_error
    _assert_same(result[1], STATE)
    problems = swarm.client.last_download_problems
    assert len(problems) == 1 and "stalled for 2 s at" in problems[0], problems
    a, b = swarm.twin.served, swarm.honest.served
    assert a > 0.3 * TOTAL and b > 0.3 * TOTAL and a + b < 1.3 * TOTAL, (a, b, TOTAL)
    assert time.monotonic() - t0 < 20


def test_lying_donors_are_refused_and_an_honest_one_finishes(swarm):
    swarm.announce({swarm.big: 42.0, swarm.twin: 41.0, swarm.honest: 40.0})
    swarm.twin.reset("corrupt@0.5")  # same snapshot as the honest donor, one flipped bit
    result = _download(swarm, 40.0)
    assert result is not None, swarm.client.last_download_error
    _assert_same(result[1], STATE)
    problems = swarm.client.last_download_problems
    assert len(problems) == 2, problems
    assert "more than the expected" in problems[0] and "does not match its hash" in problems[1], problems
    assert swarm.big.served == 0


def test_no_reachable_donor_gives_up_with_one_reason(swarm, capfd):
    client, second = swarm.client, []
    # no donor that fresh; meanwhile a second download is refused at once
    thread = threading.Thread(
        target=lambda: second.append(
            (_download(swarm, 1000.0, stall_timeout=1.0, max_attempts=3), client.last_download_error)
        )
    )
    t0 = time.monotonic()
    thread.start()
    time.sleep(1.0)
    t1 = time.monotonic()
    assert client.download_state(expected_bytes=1, show_progress=False) is None
    assert time.monotonic() - t1 < 2 and client.last_download_error == "another state download is already running"
    thread.join(30)
    assert second[0][0] is None and "no donor at round >= 1000 announced its state (3 attempts" in second[0][1]
    assert time.monotonic() - t0 < 15

    # a donor announced in the DHT whose peer is gone
    gone = hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=swarm.root.get_visible_maddrs())
    gone_id = gone.peer_id
    gone.shutdown()
    swarm.root.store("xfer.all_averagers", subkey=gone_id.to_bytes(), value=2000.0, expiration_time=get_dht_time() + 60)
    t0 = time.monotonic()
    assert _download(swarm, 2000.0, stall_timeout=2.0, max_attempts=2) is None
    assert time.monotonic() - t0 < 15
    reason = client.last_download_error
    assert "\n" not in reason and "did not answer" in reason and "(2 attempts" in reason, reason
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err


def test_untrusted_descriptions_and_messages_are_checked_strictly():
    """No network: what a donor could send instead of an honest description or message."""
    from photon_p2p.swarm.transfer import BLOCK, _pack, _parse_description, _Refused, _Snapshot, _snapshot_id, _unpack

    snap = _Snapshot(_pack(META), STATE)
    honest = {"id": snap.id, "size": snap.size, "header": snap.header, "digests": snap.digests}
    tensors, meta = _parse_description(honest, TOTAL)
    assert meta == META and [tuple(s) for _, s in tensors] == [tuple(t.shape) for t in STATE]

    def consistent(header: bytes, size: int) -> dict:  # a lie whose id matches: only the checks below catch it
        digests = b"\0" * 32 * -(-size // BLOCK)
        return {"id": _snapshot_id(header, size, digests), "size": size, "header": header, "digests": digests}

    huge = _pack({"v": 1, "meta": _pack(META), "tensors": [["float32", [1 << 39, 1 << 39]]]})
    small = _pack({"v": 1, "meta": _pack(META), "tensors": [["float32", [10]]]})
    lies = {
        "more than the expected": [dict(honest, size=TOTAL + (2 << 20)), consistent(huge, snap.size)],
        "malformed": [dict(honest, digests=honest["digests"][:-1])],
        "does not match its hashes": [dict(honest, header=honest["header"].replace(b"float32", b"float64", 1))],
        "does not match the schema": [
            consistent(b"\xc1garbage", 64),
            consistent(_pack({"v": 2}), 64),
            consistent(_pack({"v": 1, "meta": b"", "tensors": [["complex64", [1]]]}), 8),
        ],
        "size that does not match": [consistent(small, 44)],
    }
    for why, descriptions in lies.items():
        for description in descriptions:
            with pytest.raises(_Refused, match=why):
                _parse_description(description, TOTAL)
    assert _unpack(_pack({"offset": 5}), {"offset": int}, 64) == {"offset": 5}
    for raw in (
        _pack({"offset": True}),
        _pack({"offset": 5, "x": 1}),
        _pack([5]),
        b"\xc1",
        _pack({"offset": 1.0}),
        _pack({"offset": 5, "pad": b"x" * 100}),
    ):
        with pytest.raises(_Refused):
            _unpack(raw, {"offset": int}, 64)
    with pytest.raises(ConnectionError, match="^busy now$"):  # a donor's error text reaches our log as one line
        _unpack(_pack({"error": "busy\x1b\nnow"}), {"offset": int}, 64)
