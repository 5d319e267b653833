"""Heartbeats: each peer's signed progress report, republished every few seconds with a short expiry.

They feed ``photon-status``, let a peer notice that the swarm has moved on without it (stragglers re-sync), and
carry the short hash of the global parameters so peers can tell whether they hold the same ``theta``. The
publisher thread also keeps the run's manifest and its entry in the list of runs alive in the DHT.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from photon_p2p import __version__
from photon_p2p.swarm.dht import DHTCalls
from photon_p2p.swarm.identity import Identity
from photon_p2p.swarm.manifest import RunManifest, announce_run, publish
from photon_p2p.swarm.records import (
    MAX_CLOCK_SKEW_S,
    Contribution,
    Heartbeat,
    RecordRejected,
    RejectCounter,
    open_record,
    sign_record,
)

logger = logging.getLogger(__name__)

HEARTBEAT_PERIOD = 3.0
HEARTBEAT_TTL = 12.0  # a peer that stops beating disappears from everyone's view within this many seconds
REPUBLISH_EVERY = 10  # heartbeats between manifest / run-list / contribution refreshes
CONTRIBUTION_TTL = 7 * 24 * 3600.0  # the leaderboard remembers a peer for a week after its last round
CONTRIBUTION_PERIOD = 30.0  # seconds between contribution updates in the DHT (and one more at every stop)


def heartbeat_key(run_id: str) -> str:
    return f"photon.{run_id}.peers"


def contribution_key(run_id: str) -> str:
    return f"photon.{run_id}.contributions"


def _read_per_peer(
    calls: DHTCalls, key: str, schema: type, what: str, run_id: str, rejects: RejectCounter, max_age: float
) -> dict:
    """Signed per-peer records under ``key`` by peer ID: each signed by the peer its subkey names, about this run,
    dated neither ahead of our clock (beyond MAX_CLOCK_SKEW_S) nor more than ``max_age`` (+ skew) ago.
    Malformed, forged, mislabelled or out-of-date ones are dropped and counted as ``what``."""
    found = calls.get(key, latest=True)
    entries = found.value if found is not None and isinstance(found.value, dict) else {}
    now = time.time()
    out = {}
    for subkey, item in entries.items():
        if not isinstance(subkey, str):
            rejects.add(what, "subkey is not a peer ID")
            continue
        try:
            rec, _ = open_record(getattr(item, "value", None), schema, signer=subkey)
            if rec.peer_id != subkey or rec.run_id != run_id:
                raise RecordRejected("peer or run id does not match its key")
            if rec.time > now + MAX_CLOCK_SKEW_S:
                raise RecordRejected("dated in the future")
            if rec.time < now - max_age - MAX_CLOCK_SKEW_S:
                raise RecordRejected("too old")
        except RecordRejected as e:
            rejects.add(what, e.reason)
            continue
        out[subkey] = rec
    return out


def read_contributions(calls: DHTCalls, run_id: str, rejects: RejectCounter) -> dict[str, Contribution]:
    """Every peer's signed contribution record (the leaderboard), by peer ID; invalid ones dropped and counted."""
    return _read_per_peer(
        calls, contribution_key(run_id), Contribution, "contribution", run_id, rejects, CONTRIBUTION_TTL
    )


def read_heartbeats(
    calls: DHTCalls, run_id: str, rejects: RejectCounter, *, include_left: bool = False
) -> dict[str, Heartbeat]:
    """Live peers of a run by peer ID (and, with ``include_left``, the goodbyes of those that left). Malformed,
    forged or mislabelled records are dropped and counted."""
    beats = _read_per_peer(calls, heartbeat_key(run_id), Heartbeat, "heartbeat", run_id, rejects, HEARTBEAT_TTL)
    return {k: hb for k, hb in beats.items() if include_left or hb.stage != "left"}


class HeartbeatPublisher:
    """Publishes this peer's heartbeat from a daemon thread; the training loop just calls ``update()``."""

    def __init__(
        self,
        calls: DHTCalls,
        identity: Identity,
        run: RunManifest,
        *,
        device: str,
        client_mode: bool,
        maddrs: list[str],
        period: float = HEARTBEAT_PERIOD,
        ttl: float = HEARTBEAT_TTL,
    ):
        self.calls, self.identity, self.run = calls, identity, run
        self.period, self.ttl = period, ttl
        self._fields: dict[str, Any] = dict(
            round=0, step=0, tokens=0, tokens_per_s=0.0, loss=None, val_ppl=None, theta_hash="", stage="starting"
        )
        self._static = dict(
            peer_id=identity.peer_id.to_base58(),
            run_id=run.manifest.run_id,
            manifest_hash=run.hash,
            device=device[:64],
            version=__version__,
            client_mode=client_mode,
            maddrs=maddrs[:8],
        )
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="photon-heartbeat", daemon=True)
        self.failures = 0
        self._contribution: dict[str, Any] | None = None  # set by contribute(); published with the heartbeats
        self._contribution_dirty = False
        self._contribution_sent = -math.inf

    def start(self) -> HeartbeatPublisher:
        self._thread.start()
        return self

    def update(self, *, publish_now: bool = False, **fields: Any) -> None:
        with self._lock:
            self._fields.update(fields)
        if publish_now:
            self._wake.set()

    def contribute(self, *, tokens: int, rounds: int, rounds_averaged: int, first_seen: float) -> None:
        """This peer's running totals (the leaderboard entry). Published by the heartbeat thread at most every
        CONTRIBUTION_PERIOD seconds (short rounds must not multiply DHT stores), and once more on the way out."""
        with self._lock:
            self._contribution = dict(
                tokens=tokens, rounds=rounds, rounds_averaged=rounds_averaged, first_seen=first_seen
            )
            self._contribution_dirty = True

    def publish_contribution(self, timeout: float = 10.0) -> bool:
        from hivemind.utils.timed_storage import get_dht_time

        with self._lock:
            fields, self._contribution_dirty = self._contribution, False
        if fields is None:
            return False
        rec = Contribution(peer_id=self._static["peer_id"], run_id=self._static["run_id"], **fields, time=time.time())
        try:
            return self.calls.store(
                contribution_key(rec.run_id),
                sign_record(rec, self.identity),
                get_dht_time() + CONTRIBUTION_TTL,
                subkey=rec.peer_id,
                timeout=timeout,
            )
        except Exception as e:
            logger.debug("contribution not published: %r", e)
            return False

    def _record(self) -> Heartbeat:
        with self._lock:
            return Heartbeat(**self._static, **self._fields, time=time.time())

    def publish_once(self, ttl: float | None = None, timeout: float = 10.0) -> bool:
        from hivemind.utils.timed_storage import get_dht_time

        hb = self._record()
        try:
            return self.calls.store(
                heartbeat_key(hb.run_id),
                sign_record(hb, self.identity),
                get_dht_time() + (ttl or self.ttl),
                subkey=hb.peer_id,
                timeout=timeout,
            )
        except Exception as e:  # the DHT being briefly unavailable must not kill the training process
            self.failures += 1
            logger.debug("heartbeat not published: %r", e)
            return False

    def _loop(self) -> None:
        beats = 0
        while not self._stop.is_set():
            self.publish_once()
            now = time.monotonic()
            due = self._contribution_dirty and now - self._contribution_sent >= CONTRIBUTION_PERIOD
            if due or beats % REPUBLISH_EVERY == 0:
                self._contribution_sent = now
                self.publish_contribution()
            if beats % REPUBLISH_EVERY == 0:
                try:
                    publish(self.calls, self.run)
                    announce_run(self.calls, self.identity, self.run)
                except Exception as e:
                    logger.debug("manifest not republished: %r", e)
            beats += 1
            self._wake.wait(self.period)
            self._wake.clear()

    def stop(self) -> None:
        """Stop beating and tell the others we left (instead of waiting for the record to expire)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.update(stage="left")
        if self._contribution_dirty:
            self.publish_contribution(timeout=3.0)
        self.publish_once(ttl=self.ttl, timeout=3.0)  # a goodbye is a courtesy: never hold up the exit for it
