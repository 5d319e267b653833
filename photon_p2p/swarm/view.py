"""What this peer knows about the others in its run: live heartbeats, read in the background, and which claims to
believe.

The round engine asks many small questions while it trains and averages ("how many tokens has my round trained
together?", "is anyone still training my round?", "has the swarm moved on, and can anyone serve that state?").
Asking the DHT each time would put its latency inside the training loop, so a daemon thread polls the run's
heartbeats and the engine reads the cached snapshot. It reads every ``POLL_S`` in a small swarm, less often as the
swarm grows (``poll_interval``): every read fetches every peer's record (from several DHT nodes), so a fixed period
made the swarm's reads grow as N^2 (docs/design.md, "A round").

Claims are not facts. A heartbeat is validly signed by its peer, but the round it reports may be wrong (a bug, a
hostile peer) or unservable (a ``--client-mode`` peer ahead of us accepts no connections, so it can never send us
its state). A round claim counts for re-syncing only when it comes from a peer that can serve state, and a peer
whose claimed round no donor could serve after ``DISTRUST_AFTER`` tries is ignored (for rounds at or above that
claim), with one log line: otherwise one bad record makes every peer re-sync forever and the run never ends
(docs/design.md, "Claims that nobody can serve"). The distrust expires (``DISTRUST_S``, doubling each time the same
peer earns it again, up to ``DISTRUST_MAX_S``): downloads also fail for honest reasons (a donor frozen or gone
mid-transfer, a slow link), and a peer that ignored the honest swarm's claims for good would never re-sync and train
behind it for the rest of the run. A lying peer costs one failed download per expiry.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import threading
import time
from dataclasses import dataclass

from photon_p2p.swarm.dht import DHTCalls
from photon_p2p.swarm.heartbeat import HEARTBEAT_PERIOD, read_heartbeats
from photon_p2p.swarm.records import Heartbeat, RejectCounter

logger = logging.getLogger(__name__)

POLL_S = 0.5  # the shortest period: it bounds how late a peer of a small swarm notices a round closing
POLL_PER_PEER_S = 0.1  # above 5 peers, the period grows with the swarm: ~10 heartbeat records read a second
POLL_MAX_S = HEARTBEAT_PERIOD  # the longest period: peers republish this often, so reads never miss one for long
DISTRUST_AFTER = 2  # failed downloads of a claimed round before the claim is ignored
# how long the claims are then ignored: longer than a round of a 125m model (minutes), doubling for a repeat offender
DISTRUST_S = 300.0
DISTRUST_MAX_S = 3600.0
# a fixed period instead (seconds), for comparing with the old fixed 0.5 s: set in bench/scale.py's environment
POLL_ENV = "PHOTON_VIEW_POLL_S"
ACTIVE_STAGES = ("ready", "training", "averaging")
CANNOT_VOUCH = ("syncing", "starting")  # stages of a peer that holds no state of the swarm's round yet
STALE_AFTER_S = 4 * HEARTBEAT_PERIOD  # a peer that takes part in rounds (not syncing or starting)
VOUCH_MEMORY_S = 300.0  # how long a (round, theta hash) a peer's heartbeat showed counts as vouched by it


def poll_interval(n_peers: int) -> float:
    """How long the view waits between two reads of the run's heartbeats, seeing ``n_peers`` other peers.

    A read returns every peer's record (~1-3 KB each) from each DHT node it asks, and the nodes that store the key
    answer every peer's reads: at a fixed period the swarm's traffic and CPU grow as N^2 (measured with
    bench/scale.py: at 16 peers on one machine the DHT processes used more CPU than training). Growing the period
    with N keeps each peer's reads at ~1/POLL_PER_PEER_S records a second up to POLL_MAX_S, where a read every
    heartbeat period is the least that still sees every heartbeat. Swarms of up to 5 peers keep POLL_S. The cost
    is noticing a round's end up to the period later; the engine extrapolates the others' tokens between reads
    (PeerView.tokens_now), and rounds of a real model last minutes."""
    raw = os.environ.get(POLL_ENV)
    fixed = _fixed_period(raw) if raw else None
    return fixed if fixed is not None else min(POLL_MAX_S, max(POLL_S, n_peers * POLL_PER_PEER_S))


@functools.lru_cache(maxsize=8)  # parsed once per value, so a bad one is reported once
def _fixed_period(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if math.isfinite(value) and value > 0:
        return value
    logger.warning("ignoring %s=%r: not a positive number of seconds", POLL_ENV, raw)
    return None


@dataclass(frozen=True)
class PeerView:
    """One live peer as last seen, with the local time its heartbeat was read."""

    hb: Heartbeat
    seen: float  # time.monotonic() when read

    def tokens_now(self, wall_now: float) -> int:
        """Tokens this peer has trained in its current round, extrapolated from its last heartbeat at its speed
        (heartbeats come every few seconds; without this every peer would close its round late). The age is taken
        from the record's own timestamp, clamped to a heartbeat period or two, so a skewed clock cannot make it
        absurd; when we first read the record would lag the publication by up to a poll."""
        if self.hb.stage != "training":
            return self.hb.round_tokens
        age = min(max(0.0, wall_now - self.hb.time), 2 * HEARTBEAT_PERIOD + POLL_S)
        return self.hb.round_tokens + int(self.hb.tokens_per_s * age)


class SwarmView:
    """Background reader of the run's heartbeats (this peer excluded, other manifests ignored)."""

    def __init__(self, calls: DHTCalls, run_id: str, manifest_hash: str, peer_id: str, rejects: RejectCounter):
        self.calls, self.run_id, self.manifest_hash, self.peer_id = calls, run_id, manifest_hash, peer_id
        self.rejects = rejects
        self._peers: dict[str, PeerView] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._fresh = threading.Event()
        # peer ID -> (claims of this round or later are ignored, until this time.monotonic())
        self._distrust: dict[str, tuple[int, float]] = {}
        self._distrusted_times: dict[str, int] = {}  # peer ID -> how often it was distrusted (the period doubles)
        self._clock = time.monotonic  # tests step it
        self._failed_claims: dict[tuple[str, int], int] = {}
        # (round, theta hash) -> {peer ID: when last seen}: peers move on while a joiner downloads, so a state is
        # vouched for by the peers whose signed heartbeats showed it recently, not only by those showing it now
        self._vouched: dict[tuple[int, str], dict[str, float]] = {}
        self._newest: dict[str, float] = {}  # peer ID -> time of the newest heartbeat read (goodbyes included)
        self._left_round = -1  # the newest round a peer we saw take part had reached when it said goodbye
        self._thread = threading.Thread(target=self._loop, name="photon-swarm-view", daemon=True)

    def start(self) -> SwarmView:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def refresh(self) -> None:
        """Read the heartbeats now (the first read, and tests)."""
        try:
            beats = read_heartbeats(self.calls, self.run_id, self.rejects, include_left=True)
        except Exception as e:  # a slow DHT must never stop training: keep the last snapshot
            logger.debug("could not read heartbeats: %r", e)
            return
        now = time.monotonic()
        with self._lock:
            previous = self._peers
            peers = {}
            for pid, hb in beats.items():
                newest = self._newest.get(pid, float("-inf"))
                if hb.time < newest:
                    # a peer's heartbeats only move forward: an older one now is a replay (or a lagging DHT node).
                    # Believing it would roll the peer's round back, or bring back a peer that said goodbye
                    self.rejects.add("heartbeat", "older than one already seen")
                    if pid in previous:
                        peers[pid] = previous[pid]
                    continue
                self._newest[pid] = hb.time
                if pid == self.peer_id or hb.manifest_hash != self.manifest_hash:
                    continue
                old = previous.get(pid)
                if hb.stage == "left":
                    # a goodbye shows the round the peer had reached: the rounds before it closed, with it. Only
                    # from a peer we saw take part, and at most one round past where we saw it (a peer that
                    # leaves after its last all-reduce), so a stranger's goodbye cannot claim a far-future round
                    if old is not None and old.hb.stage in ACTIVE_STAGES and hb.round <= old.hb.round + 1:
                        self._left_round = max(self._left_round, hb.round)
                    continue
                # the DHT returns the same record until the peer republishes: keep when we first saw it
                seen = old.seen if old is not None and old.hb == hb else now
                peers[pid] = PeerView(hb, seen)
            # one read can miss a record (a DHT node that has not got it yet): keep a peer we saw recently unless it
            # said goodbye, rather than believe for a moment that it vanished
            for pid, old in previous.items():
                if pid not in peers and pid not in beats and now - old.seen < STALE_AFTER_S:
                    peers[pid] = old
            self._peers = peers
            for pid, v in peers.items():
                if v.hb.theta_hash:
                    self._vouched.setdefault((v.hb.round, v.hb.theta_hash), {})[pid] = now
            for key in [k for k, seen in self._vouched.items() if now - max(seen.values()) > VOUCH_MEMORY_S]:
                del self._vouched[key]
        self._fresh.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            with self._lock:
                n = len(self._peers)
            self._stop.wait(poll_interval(n))

    def wait_fresh(self, timeout: float = 10.0) -> None:
        """Block until a read newer than this call has completed (after a state change that others report)."""
        self._fresh.clear()
        self._fresh.wait(timeout)

    # ------------------------------------------------------------------------------------------------------
    # questions the round engine asks

    def peers(self) -> dict[str, PeerView]:
        with self._lock:
            return dict(self._peers)

    def believed_round(self, view: PeerView) -> bool:
        entry = self._distrust.get(view.hb.peer_id)
        return entry is None or view.hb.round < entry[0] or self._clock() >= entry[1]

    def at_round(self, round_: int, stages: tuple[str, ...] = ACTIVE_STAGES) -> dict[str, PeerView]:
        """Peers at ``round_`` in one of ``stages`` whose heartbeat is still being renewed. A live peer republishes
        every HEARTBEAT_PERIOD; a record that has not changed for STALE_AFTER_S is a peer that died or froze (its
        record would linger in the DHT until it expires; we stop waiting for it sooner, by our own clock)."""
        now = time.monotonic()
        return {
            pid: v
            for pid, v in self.peers().items()
            if v.hb.round == round_ and v.hb.stage in stages and now - v.seen < STALE_AFTER_S
        }

    def vouchers(self, round_: int, theta_hash: str) -> set[str]:
        """Peers whose heartbeats (signed; swarm/heartbeat.py) showed ``theta_hash`` at ``round_`` lately."""
        now = time.monotonic()
        with self._lock:
            seen = self._vouched.get((round_, theta_hash), {})
            return {pid for pid, t in seen.items() if now - t <= VOUCH_MEMORY_S}

    def possible_vouchers(self) -> int:
        """Live peers that can vouch for a state: not those catching up themselves ("syncing") or still starting,
        which hold no state of the swarm's round. Counting them deadlocked two stuck peers, each waiting for the
        other's vouch (a frozen peer that fell behind and a joiner, in a CI run of tests/test_chaos.py)."""
        return sum(1 for v in self.peers().values() if v.hb.stage not in CANNOT_VOUCH)

    def state_agreed(self, min_round: int, peers: int) -> bool:
        """Whether at least ``peers`` peers' heartbeats lately showed one (round, theta hash) at ``min_round`` or
        later: a download of it can then be vouched for (swarm/sync.py). After a failed all-reduce the live peers
        can hold different theta for a round, until they next average together."""
        now = time.monotonic()
        with self._lock:
            return any(
                r >= min_round and sum(1 for t in seen.values() if now - t <= VOUCH_MEMORY_S) >= peers
                for (r, _), seen in self._vouched.items()
            )

    def newest_servable_round(self) -> int:
        """The newest round that a peer able to send its state claims (believed claims only); -1 if none."""
        return max(
            (
                v.hb.round
                for v in self.peers().values()
                if not v.hb.client_mode and v.hb.stage in ACTIVE_STAGES and self.believed_round(v)
            ),
            default=-1,
        )

    def closed_round(self) -> int:
        """The newest round the swarm has reached, as far as we know: the newest servable claim, or the round that a
        peer had reached when it left (the run's last peers leave when it ends, and a peer still in its last round
        must then know that round closed without it rather than wait for them); -1 if neither."""
        with self._lock:
            left = self._left_round
        return max(self.newest_servable_round(), left)

    def tokens_in_round(self, round_: int) -> tuple[int, int]:
        """(tokens the others have trained in ``round_`` by now, how many of them train it)."""
        wall_now = time.time()
        members = self.at_round(round_)  # a peer about to start the round ("ready") will train its share too
        return sum(v.tokens_now(wall_now) for v in members.values()), len(members)

    def reachable_peers(self) -> int:
        """Live peers that accept incoming connections (a group needs at least one, as its meeting point)."""
        return sum(1 for v in self.peers().values() if not v.hb.client_mode)

    def claim_failed(self, round_: int) -> list[str]:
        """No donor could serve ``round_``: count it against every peer that claims it (or later); after
        DISTRUST_AFTER failures those claims are ignored for a while (once a distrust expired, a single failure
        renews it, for twice as long). Returns the peers newly distrusted."""
        newly = []
        for pid, v in self.peers().items():
            if v.hb.round < round_ or not self.believed_round(v):
                continue
            key = (pid, round_)
            self._failed_claims[key] = self._failed_claims.get(key, 0) + 1
            if self._failed_claims[key] >= DISTRUST_AFTER:
                times = self._distrusted_times.get(pid, 0)
                period = min(DISTRUST_S * 2**times, DISTRUST_MAX_S)
                self._distrusted_times[pid] = times + 1
                self._distrust[pid] = (round_, self._clock() + period)
                newly.append(pid)
                logger.warning(
                    "ignoring %s's claim to be at round %d for %.0f s: no peer could send that state after %d tries",
                    pid[:16],
                    v.hb.round,
                    period,
                    DISTRUST_AFTER,
                )
        return newly
