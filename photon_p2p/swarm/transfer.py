"""State download for joining peers, sized to the link: resumable, timed by progress, verified block by block.

hivemind's ``load_state_from_peers`` streams the whole state under one wall-clock timeout and restarts from zero
after a failure, so a 680 MB state on a 100 Mbit/s link never arrives. Here a donor freezes a snapshot (cached by its
hash) and serves byte ranges of it; the client leaves a donor only when *no bytes* arrive for ``stall_timeout`` s,
and resumes at the byte it reached, from the same donor or any donor whose snapshot has the same hash.

Wiring: ``class PhotonAverager(StateTransferMixin, DecentralizedAverager)``, nothing else: the mixin's cooperative
``__init__`` creates the shared progress counters before hivemind forks the averager process, and hivemind registers
the ``rpc_photon_state_*`` methods itself. Host side: ``download_state(...)`` returns ``(metadata, tensors)``, or
None with ``last_download_error`` set to one line saying why. One download at a time: a call made while another
runs returns None at once.

The wire format (snapshots, descriptions, bounded frames) lives in swarm/snapshot.py. Donors rate-limit each
requester (its authenticated peer ID): DESCRIBES_PER_MINUTE describes (each may copy the whole state) and
READS_PER_REQUESTER concurrent read streams; over that, the request gets a one-line in-band error.

Protocol: two RPCs, each a response stream of ``averaging_pb2.DownloadData`` whose ``metadata`` bytes carry a small
msgpack dict (checked strictly; nothing is ever unpickled); errors come back in-band as ``{"error": str}``.

- describe ``{"want": id | b""}`` -> ``{"id", "size", "header", "digests"}``: the cached snapshot ``want`` (exact
  resume) or a fresh one. ``header`` = msgpack ``{"v": 1, "meta": msgpack bytes, "tensors": [[dtype, shape]..]}``;
  the data are the raw bytes of each tensor, each at a multiple of 64 bytes; ``digests`` = blake2b-256 of each
  4 MiB block; ``id`` = blake2b-256(header, size, block size, digests).
- read ``{"id", "offset"}`` -> ``{"offset"}`` + ``tensor_part.buffer`` (<= 1 MiB per message) up to the end.

The client refuses a size over ``expected_bytes`` before downloading, recomputes the id, reads frames through its own
bounded reader (hivemind's allocates whatever length a peer announces), checks every offset and verifies each block
as it completes: donors that sent bytes of a mismatching block are refused and the block is fetched again from
another. Once the last block matches, the whole snapshot matches its id.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import math
import multiprocessing as mp
import random
import sys
import time
from contextlib import closing
from typing import Any, AsyncIterator  # noqa: UP035 (see StateTransferMixin's rpc_* methods)

import torch
from hivemind.p2p import P2P, P2PContext, PeerID
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import MPFuture, ValueWithExpiration

from photon_p2p.swarm.dht import remote_result
from photon_p2p.swarm.snapshot import (  # noqa: F401 - BLOCK, _pack, ... are also used by tests through here
    BLOCK,
    CACHE_SNAPSHOTS,
    CACHE_TTL,
    CHUNK,
    DONE,
    MAX_DESCRIBE,
    MAX_DONORS,
    RATE,
    TOTAL,
    StateDownload,
    TransferFailed,
    _check,
    _Incoming,
    _pack,
    _parse_description,
    _printable,
    _read_message,
    _Refused,
    _Snapshot,
    _snapshot_id,
    _Stalled,
    _unpack,
)

logger = logging.getLogger(__name__)

# per requester (its peer ID, which the p2p layer authenticates): a describe may take a fresh snapshot (a copy of
# theta and the outer state), a read holds a stream open; honest downloads stay far below both
DESCRIBES_PER_MINUTE = 10
READS_PER_REQUESTER = 2
# every handler that answers on a stream (a leader's join, a reducer's parts, a donor's description and chunks) keeps
# it open after its last message until the other end closes it, at most this long: when a handler returns, p2pd
# closes the stream, that close resets it, and a reset discards what the other end's daemon has not yet passed on
# (see PhotonAverager.rpc_join_group). The reading side closes as soon as it has read what it expects.
LINGER_S = 10.0


class StateTransferMixin:
    """Serves and downloads state snapshots (see the module docstring); mixed into a DecentralizedAverager."""

    last_download_error: str | None = None  # why the last download_state returned None: one line, for the caller
    last_download_problems: tuple[str, ...] = ()  # every failed attempt or refused donor of the last download
    last_download_donor: str | None = None  # who sent the last successful download (its vouchers exclude it)

    def __init__(self, *args: Any, **kwargs: Any):
        # created before DecentralizedAverager.__init__ forks, so both processes see the same memory
        self._transfer_progress = mp.RawArray(ctypes.c_double, 3)
        self._transfer_cache: dict[bytes, _Snapshot] = {}
        self._transfer_building: asyncio.Future | None = None
        self._transfer_reaper: asyncio.Task | None = None
        self._transfer_busy = False
        self._transfer_asked: dict[PeerID, list[float]] = {}  # requester -> times of its describes this minute
        self._transfer_reading: dict[PeerID, int] = {}  # requester -> read streams open
        super().__init__(*args, **kwargs)

    @classmethod
    def _collect_rpc_handlers(cls) -> None:
        # hivemind caches the handler list on the first class that collects it, and a subclass inherits the list of
        # a parent collected before it (without the subclass's own rpc_* methods)
        if "_rpc_handlers" not in cls.__dict__:
            cls._rpc_handlers = None
        super()._collect_rpc_handlers()

    # ---- donor side (averager process)
    async def _transfer_send_hook(self, offset: int, data: bytes) -> bytes | None:
        """Test seam: the bytes about to be sent at ``offset``; None drops the stream."""
        return data

    async def _transfer_build(self) -> _Snapshot:
        """A fresh snapshot from the host process (PhotonAverager.get_current_state copies under its lock)."""
        meta, tensors, _infos = await self._get_current_state_from_host_process()
        snap = await asyncio.get_running_loop().run_in_executor(None, _Snapshot, meta, list(tensors))
        snap = self._transfer_cache.setdefault(snap.id, snap)  # unchanged state: keep serving the cached object
        snap.used = time.monotonic()
        while len(self._transfer_cache) > CACHE_SNAPSHOTS:  # evict the least recently used (never the new one)
            del self._transfer_cache[
                min((k for k in self._transfer_cache if k != snap.id), key=lambda k: self._transfer_cache[k].used)
            ]
        if self._transfer_reaper is None or self._transfer_reaper.done():
            self._transfer_reaper = asyncio.create_task(self._transfer_reap())
        return snap

    async def _transfer_reap(self) -> None:
        """Free snapshots nobody asked for in CACHE_TTL seconds: each one holds the whole state."""
        while self._transfer_cache:
            await asyncio.sleep(CACHE_TTL / 6)
            for key in [k for k, s in self._transfer_cache.items() if time.monotonic() - s.used > CACHE_TTL]:
                del self._transfer_cache[key]

    def _transfer_admit(self, requester: PeerID) -> None:
        """Rate limit on describes: no requester makes us take more than DESCRIBES_PER_MINUTE snapshots a minute."""
        now = time.monotonic()
        if len(self._transfer_asked) > 4096:  # many requesters: forget those idle for a minute
            self._transfer_asked = {p: t for p, t in self._transfer_asked.items() if t and now - t[-1] < 60.0}
        recent = [t for t in self._transfer_asked.get(requester, ()) if now - t < 60.0]
        if len(recent) >= DESCRIBES_PER_MINUTE:
            self._transfer_asked[requester] = recent
            raise ConnectionError(f"rate limited: at most {DESCRIBES_PER_MINUTE} state requests a minute per peer")
        self._transfer_asked[requester] = recent + [now]

    # typing.AsyncIterator, not collections.abc's: hivemind tells a streaming rpc_* by the hint's `_name`, and with
    # the other one it silently registers a unary handler that can never answer
    async def rpc_photon_state_describe(
        self, request: averaging_pb2.DownloadData, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        try:
            want = _unpack(request.metadata, {"want": bytes}, 256)["want"]
            if not self.allow_state_sharing:
                raise ConnectionError("this peer does not share its state")
            self._transfer_admit(context.remote_id)
            snap = self._transfer_cache.get(want)
            if snap is None:
                if self._transfer_building is None or self._transfer_building.done():
                    # describes arriving while a snapshot is being taken share it instead of taking one each
                    self._transfer_building = asyncio.ensure_future(self._transfer_build())
                snap = await asyncio.shield(self._transfer_building)
            snap.used = time.monotonic()
            reply = {"id": snap.id, "size": snap.size, "header": snap.header, "digests": snap.digests}
        except (_Refused, ConnectionError) as e:
            reply = {"error": str(e.args[0])}
        except Exception as e:
            logger.debug("state snapshot failed", exc_info=True)
            reply = {"error": f"could not take a snapshot: {e!r}"[:200]}
        yield averaging_pb2.DownloadData(metadata=_pack(reply))
        await asyncio.sleep(LINGER_S)  # the requester closes after this one message (see LINGER_S)

    async def rpc_photon_state_read(
        self, request: averaging_pb2.DownloadData, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        requester = context.remote_id
        try:
            fields = _unpack(request.metadata, {"id": bytes, "offset": int}, 256)
            snap = self._transfer_cache.get(fields["id"])
            if snap is None or not 0 <= fields["offset"] < snap.size:
                raise ConnectionError("snapshot expired from the donor's cache" if snap is None else "bad offset")
            if self._transfer_reading.get(requester, 0) >= READS_PER_REQUESTER:
                raise ConnectionError(f"rate limited: at most {READS_PER_REQUESTER} concurrent state reads per peer")
        except (_Refused, ConnectionError) as e:
            yield averaging_pb2.DownloadData(metadata=_pack({"error": str(e.args[0])}))
            await asyncio.sleep(LINGER_S)
            return
        self._transfer_reading[requester] = self._transfer_reading.get(requester, 0) + 1
        try:
            for pos in range(fields["offset"], snap.size, CHUNK):
                snap.used = time.monotonic()
                data = await self._transfer_send_hook(pos, snap.data[pos : pos + CHUNK].tobytes())
                if data is None:
                    return
                yield averaging_pb2.DownloadData(
                    metadata=_pack({"offset": pos}), tensor_part=runtime_pb2.Tensor(buffer=data)
                )
        finally:
            left = self._transfer_reading.pop(requester, 1) - 1
            if left > 0:
                self._transfer_reading[requester] = left
        # the requester closes after the last chunk; until then the stream stays open (no longer counted as a read)
        await asyncio.sleep(LINGER_S)

    # ---- client side (averager process)
    async def _transfer_donors(self, min_priority: float | None) -> dict[PeerID, float]:
        """Donors hivemind's state sharing announced (priority = their round), freshest first, ties shuffled."""
        key = f"{self._matchmaking.group_key_manager.prefix}.all_averagers"
        found = await self.dht.get(key, latest=True, return_future=True)
        donors = {}
        for subkey, entry in found.value.items() if found is not None and isinstance(found.value, dict) else ():
            value = entry.value if isinstance(entry, ValueWithExpiration) else None  # untrusted: anyone can write
            if (
                isinstance(subkey, bytes)
                and len(subkey) <= 128
                and type(value) in (int, float)
                and math.isfinite(value)
                and (min_priority is None or value >= min_priority)
            ):
                donors[PeerID(subkey)] = float(value)
        donors.pop(self.peer_id, None)
        return dict(sorted(donors.items(), key=lambda kv: (-kv[1], random.random()))[:MAX_DONORS])

    async def _transfer_call(self, donor: PeerID, method: str, fields: dict, timeout: float):
        """Open a stream to our handler on ``donor`` and send the one request, as hivemind's stub would."""
        handle = type(self)._get_handle_name(self.prefix, method)
        async with asyncio.timeout(timeout):
            _, reader, writer = await self._p2p.call_binary_stream_handler(donor, handle)
        try:
            async with asyncio.timeout(timeout):
                await P2P.send_protobuf(averaging_pb2.DownloadData(metadata=_pack(fields)), writer)
                await P2P.send_protobuf(P2P.END_OF_STREAM, writer)
        except BaseException:
            writer.close()
            raise
        return reader, writer

    async def _transfer_describe(self, donor: PeerID, want: bytes, expected_bytes: int, stall_timeout: float):
        reader, writer = await self._transfer_call(donor, "rpc_photon_state_describe", {"want": want}, stall_timeout)
        with closing(writer):
            # the donor first copies and hashes its state: allow it ~100 MB/s of its own memory bandwidth
            msg = await _read_message(reader, MAX_DESCRIBE + 4096, stall_timeout + expected_bytes / 100e6)
        if msg is None:
            raise ConnectionError("does not serve state downloads")
        d = _unpack(msg.metadata, {"id": bytes, "size": int, "header": bytes, "digests": bytes}, MAX_DESCRIBE)
        return d, *_parse_description(d, expected_bytes)

    async def _transfer_stream(self, donor: PeerID, snap: _Incoming, stall_timeout: float, future: MPFuture) -> None:
        """Read from snap.offset to the end (or until the host cancels), verifying as bytes arrive."""
        progress = self._transfer_progress
        fields = {"id": snap.id, "offset": snap.offset}
        reader, writer = await self._transfer_call(donor, "rpc_photon_state_read", fields, stall_timeout)
        with closing(writer):
            mark, marked = time.monotonic(), snap.offset
            while snap.offset < snap.size and not future.cancelled():
                msg = await _read_message(reader, CHUNK + 4096, stall_timeout)
                if msg is None:
                    raise ConnectionError("closed the stream")
                offset, data = _unpack(msg.metadata, {"offset": int}, 64)["offset"], msg.tensor_part.buffer
                _check(
                    offset == snap.offset and 0 < len(data) <= min(CHUNK, snap.size - offset),
                    f"sent {len(data)} bytes at offset {offset}, expected offset {snap.offset}",
                )
                snap.feed(donor, data)
                progress[DONE] = snap.offset
                if (now := time.monotonic()) - mark >= 0.5:  # EMA of bytes/s, for the ETA
                    sample = (snap.offset - marked) / (now - mark)
                    progress[RATE] = sample if not progress[RATE] else 0.7 * progress[RATE] + 0.3 * sample
                    mark, marked = now, snap.offset

    async def _transfer_download(self, future: MPFuture, **kwargs: Any) -> None:
        """Runs in the averager process, started through the pipe by download_state."""
        if self._transfer_busy:
            future.set_exception(TransferFailed("another state download is already running"))
            return
        self._transfer_busy = True
        self._transfer_progress[:] = [0.0] * len(self._transfer_progress)
        try:
            result = await self._transfer_run(future, **kwargs)
        except Exception as e:
            logger.debug("state download failed", exc_info=True)
            result = e if isinstance(e, TransferFailed) else TransferFailed(f"state download failed: {e!r}")
        finally:
            self._transfer_busy = False
        if future.done():  # the host cancelled it
            return
        if isinstance(result, TransferFailed):
            future.set_exception(result)
        else:
            future.set_result(result)

    async def _transfer_run(
        self, future: MPFuture, expected_bytes: int, min_priority: float | None, stall_timeout: float, max_attempts: int
    ) -> StateDownload:
        t0, snap, progress = time.monotonic(), None, self._transfer_progress
        refused: set[PeerID] = set()
        fails: dict[PeerID, int] = {}
        problems: list[str] = []
        idle = attempts = 0
        while idle < max_attempts and not future.cancelled():
            attempts += 1
            if idle:
                await asyncio.sleep(min(0.5 * 2**idle, 8.0))
            try:
                donors = await asyncio.wait_for(self._transfer_donors(min_priority), stall_timeout)
            except Exception as e:  # our own DHT process is gone or overloaded
                problems.append(f"could not read the donors from the DHT ({e!r})")
                idle += 1
                continue
            donors = {d: p for d, p in donors.items() if d not in refused}
            if not donors:
                idle += 1
                at = "" if min_priority is None else f" at round >= {min_priority:g}"
                problems.append(f"no donor{at} announced its state" + (" (others were refused)" if refused else ""))
                continue
            # least-failed first, then holders of our partial snapshot, then the freshest
            donor = min(donors, key=lambda d: (fails.get(d, 0), snap is None or d not in snap.holders, -donors[d]))
            start, name, where = snap.offset if snap else 0, "…" + donor.to_base58()[-8:], ""
            try:
                d, tensors, meta = await self._transfer_describe(
                    donor, snap.id if snap else b"", expected_bytes, stall_timeout
                )
                if snap is None or d["id"] != snap.id:
                    if snap is not None:  # a partial download is only dropped for a fresher donor or a dead one
                        snap.holders.discard(donor)
                        tired = all(fails.get(h, 0) >= 2 or h not in donors for h in snap.holders)
                        if snap.offset and donors[donor] <= snap.priority and not tired:
                            raise ConnectionError("holds another snapshot; trying the holders of ours first")
                    snap, start = _Incoming(d, tensors, meta, donors[donor]), 0
                    progress[TOTAL], progress[DONE] = snap.size, 0
                snap.holders.add(donor)
                where = "stream"
                if snap.offset < snap.size:  # an empty state has nothing to stream
                    await self._transfer_stream(donor, snap, stall_timeout, future)
                if snap.offset < snap.size:
                    break  # cancelled by the host
                meta, tensors = snap.result()
                return StateDownload(
                    meta, tensors, donor.to_base58(), time.monotonic() - t0, snap.size, tuple(problems)
                )
            except _Refused as e:
                refused.update(e.args[1] if len(e.args) > 1 else {donor})
                problems.append(f"refused donor {name}: it {e.args[0]}")
                logger.warning("state download: %s", problems[-1])
            except _Stalled:
                problems.append(
                    f"transfer stalled for {stall_timeout:g} s at {snap.offset / 1e6:.1f} of "
                    f"{snap.size / 1e6:.1f} MB (donor {name})"
                    if where
                    else f"donor {name} did not answer (no reply in time)"
                )
            except Exception as e:  # dial errors, closed streams, donor-side errors: try again
                why = _printable(str(e)) or type(e).__name__  # one line, even for p2pd's multi-line dial errors
                problems.append(
                    f"donor {name} {why} at {snap.offset / 1e6:.1f} of {snap.size / 1e6:.1f} MB"
                    if where
                    else f"donor {name} did not answer ({why})"
                )
            logger.debug("state download attempt %d: %s", attempts, problems[-1])
            fails[donor] = fails.get(donor, 0) + 1
            idle = 0 if snap is not None and snap.offset > start else idle + 1
        last = "cancelled" if future.cancelled() else problems[-1]
        raise TransferFailed(f"{last} ({attempts} attempts, the last {idle} without progress)", tuple(problems))

    # ---- host side
    def download_state(
        self,
        *,
        expected_bytes: int,
        min_priority: float | None = None,
        stall_timeout: float = 30.0,
        max_attempts: int = 8,
        show_progress: bool = True,
    ) -> tuple[Any, list[torch.Tensor]] | None:
        """(metadata, tensors) from the freshest donor whose priority (its round) is >= ``min_priority``, or None.

        No wall-clock limit while bytes flow: a donor that sends nothing for ``stall_timeout`` s is left and the
        download resumes where it stopped. After ``max_attempts`` attempts in a row without new bytes it returns
        None and ``last_download_error`` says why (not logged here: the caller logs it, once). A tqdm bar on a
        terminal, else a log line every 10 s. The tensors are untrusted: run ``validate_downloaded_state``."""
        progress, bar, next_log = self._transfer_progress, None, time.monotonic() + 10.0
        self.last_download_error, self.last_download_problems = None, ()
        future = MPFuture()
        self._outer_pipe.send(
            (
                "_transfer_download",
                [],
                dict(
                    future=future,
                    expected_bytes=int(expected_bytes),
                    min_priority=min_priority,
                    stall_timeout=float(stall_timeout),
                    max_attempts=int(max_attempts),
                ),
            )
        )
        try:
            while True:
                try:
                    result: StateDownload = remote_result(future, 0.5)
                    break
                except TimeoutError:
                    pass
                if not self.is_alive():
                    raise TransferFailed("the averager process is not running")
                done, total, rate = progress[DONE], progress[TOTAL], progress[RATE]
                if show_progress and total and sys.stderr.isatty():
                    if bar is None or bar.total != int(total):  # a new snapshot restarts the bar
                        from tqdm.auto import tqdm

                        if bar is not None:
                            bar.close()
                        bar = tqdm(total=int(total), unit="B", unit_scale=True, desc="state download", leave=False)
                    bar.update(int(done) - bar.n)
                elif show_progress and total and time.monotonic() >= next_log:
                    eta = f", ETA {(total - done) / rate:.0f} s" if rate > 0 else ""
                    logger.info(
                        "state download: %.1f of %.1f MB, %.1f MB/s%s", done / 1e6, total / 1e6, rate / 1e6, eta
                    )
                    next_log = time.monotonic() + 10.0
        except TransferFailed as e:
            self.last_download_error, self.last_download_problems = e.reason, e.problems
            return None
        except BaseException:
            future.cancel()  # the averager process sees it (shared state) and stops
            raise
        finally:
            if bar is not None:
                bar.close()
        self.last_download_problems, self.last_download_donor = result.problems, result.donor
        logger.info(
            "downloaded %.1f MB of state in %.1f s (%.1f MB/s) from %s%s",
            result.nbytes / 1e6,
            result.seconds,
            result.nbytes / 1e6 / max(result.seconds, 1e-9),
            result.donor,
            f" after {len(result.problems)} failed attempts" if result.problems else "",
        )
        return result.metadata, result.tensors
