"""Successive ``gather()`` snapshots of one run, accumulated into the time series the dashboard draws.

Pure and bounded: ``History.add(snapshot, at)`` folds one snapshot in, ``History.to_dict()`` is the JSON the page
reads. Nothing here does I/O, so it is tested by feeding it fabricated snapshots.

What a snapshot tells about rounds: a peer's heartbeat carries the round it is in and its latest training loss (a
*provisional* value for that round, overwritten by every newer snapshot), and - from peers new enough - a
``last_round`` summary of the round it finished (*final*: its loss, validation perplexity, and where its time went).
Both are keyed by (peer, round), so a summary seen in many snapshots counts once, and a final value is never
replaced by a provisional one. A heartbeat's ``val_ppl`` is the peer's latest evaluation, repeated until the next
one, so it is attributed only to the round in which a new value first shows up.

Everything in a snapshot comes from other peers: values of the wrong type or non-finite numbers are ignored, strings
are truncated, and memory is bounded however long the dashboard runs or however many peers lie about rounds.
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict, deque
from typing import Any

MAX_POINTS = 2000  # per time series (throughput, theta agreement): ~2.8 hours at the default 5 s period
MAX_ROUNDS = 500  # rounds kept; the least recently updated go first, so made-up round numbers age out too
MAX_PEERS_PER_ROUND = 256
MAX_HASHES = 8  # distinct theta hashes kept per point; the rest are summed up as "other"
MAX_TRACKED_PEERS = 4096  # peers whose last validation perplexity we remember
TIMING_FIELDS = ("train_s", "matchmaking_s", "allreduce_s")


def number(value: Any) -> float | None:
    """A finite number, or None for anything else (bool, str, NaN, inf, missing)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def round_number(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def text(value: Any, limit: int = 64) -> str | None:
    return value[:limit] if isinstance(value, str) else None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def theta_agreement(status: dict[str, Any]) -> dict[str, Any] | None:
    """How many live peers hold each theta hash, most common first: ``{"hashes": [[hash, n], ...], "other": n}``.
    Taken from the snapshot's ``theta_agreement`` if it has one, else counted from the peers' ``theta_hash``;
    None if neither is there (peers too old to report it)."""
    counts: Counter[str] = Counter()
    given = status.get("theta_agreement")
    if isinstance(given, dict):
        for key, n in given.items():
            if isinstance(key, str) and key and round_number(n):
                counts[key[:64]] += n
    else:
        for peer in status.get("peers") or []:
            h = text(peer.get("theta_hash")) if isinstance(peer, dict) else None
            if h:
                counts[h] += 1
    if not counts:
        return None
    ranked = counts.most_common()
    return {"hashes": [[h, n] for h, n in ranked[:MAX_HASHES]], "other": sum(n for _, n in ranked[MAX_HASHES:])}


class History:
    """The time series of one run. ``add()`` snapshots in the order they were taken."""

    def __init__(self, *, max_points: int = MAX_POINTS, max_rounds: int = MAX_ROUNDS):
        self.max_rounds = max_rounds
        self.throughput: deque[dict[str, Any]] = deque(maxlen=max_points)
        self.theta: deque[dict[str, Any]] = deque(maxlen=max_points)
        self._rounds: OrderedDict[int, dict[str, dict[str, Any]]] = OrderedDict()  # round -> peer id -> entry
        self._last_ppl: OrderedDict[str, float] = OrderedDict()
        self.snapshots = 0
        self.first_at: float | None = None
        self.updated_at: float | None = None
        self._cached: dict[str, Any] | None = None

    def add(self, status: dict[str, Any], at: float | None = None) -> None:
        at = time.time() if at is None else at
        peers = [p for p in status.get("peers") or [] if isinstance(p, dict) and isinstance(p.get("peer_id"), str)]
        total = number(status.get("total_tokens_per_s"))
        if total is None:
            total = sum(number(p.get("tokens_per_s")) or 0.0 for p in peers)
        self.throughput.append({"t": at, "tokens_per_s": total, "peers": len(peers)})
        agreement = theta_agreement(status)
        if agreement is not None:
            self.theta.append({"t": at, "peers": len(peers), **agreement})
        for peer in peers:
            self._add_peer(peer)
        self.snapshots += 1
        self.first_at = at if self.first_at is None else self.first_at
        self.updated_at = at
        self._cached = None

    def _add_peer(self, peer: dict[str, Any]) -> None:
        pid = peer["peer_id"][:128]
        last = peer.get("last_round")
        if isinstance(last, dict) and (done := round_number(last.get("round"))) is not None:
            entry: dict[str, Any] = {
                "final": True,
                "loss": number(last.get("loss")),
                "val_ppl": number(last.get("val_ppl")),
                "tokens": number(last.get("tokens")),
                "outcome": text(last.get("outcome"), 16),
            }
            entry.update({name: number(last.get(name)) for name in TIMING_FIELDS})
            earlier = self._rounds.get(done, {}).get(pid) or {}
            for name in ("loss", "val_ppl"):  # a summary without a value keeps what the heartbeats showed
                if entry[name] is None:
                    entry[name] = earlier.get(name)
            self._put(done, pid, entry)
        current = round_number(peer.get("round"))
        if current is None:
            return
        ppl = number(peer.get("val_ppl"))
        fresh_ppl = ppl if ppl is not None and self._last_ppl.get(pid) != ppl else None
        if ppl is not None:
            self._last_ppl[pid] = ppl
            self._last_ppl.move_to_end(pid)
            if len(self._last_ppl) > MAX_TRACKED_PEERS:
                self._last_ppl.popitem(last=False)
        known = self._rounds.get(current, {}).get(pid)
        if known is not None and known["final"]:
            return  # the peer's own summary of that round wins over what its heartbeat said during it
        loss = number(peer.get("loss"))
        if loss is None and fresh_ppl is None:
            return
        entry = dict(known or {"final": False})
        if loss is not None:
            entry["loss"] = loss
        if fresh_ppl is not None:
            entry["val_ppl"] = fresh_ppl
        self._put(current, pid, entry)

    def _put(self, rnd: int, pid: str, entry: dict[str, Any]) -> None:
        peers = self._rounds.get(rnd)
        if peers is None:
            peers = self._rounds[rnd] = {}
            while len(self._rounds) > self.max_rounds:
                self._rounds.popitem(last=False)
        else:
            self._rounds.move_to_end(rnd)
        if pid in peers or len(peers) < MAX_PEERS_PER_ROUND:
            peers[pid] = entry

    def rounds(self) -> list[dict[str, Any]]:
        """One row per round, in round order: loss (mean/min/max over the peers that reported the round), mean
        validation perplexity, and the mean time per phase over the peers that summarised the round."""
        rows = []
        for rnd in sorted(self._rounds):
            entries = list(self._rounds[rnd].values())
            losses = [e["loss"] for e in entries if e.get("loss") is not None]
            ppls = [e["val_ppl"] for e in entries if e.get("val_ppl") is not None]
            final = [e for e in entries if e["final"]]
            row: dict[str, Any] = {
                "round": rnd,
                "peers": len(entries),
                "summarised": len(final),
                "loss_mean": _mean(losses),
                "loss_min": min(losses, default=None),
                "loss_max": max(losses, default=None),
                "val_ppl": _mean(ppls),
                "tokens": sum(e["tokens"] for e in final if e.get("tokens") is not None) if final else None,
                "outcomes": dict(Counter(e["outcome"] for e in final if e.get("outcome"))),
            }
            for name in TIMING_FIELDS:
                row[name] = _mean([e[name] for e in final if e.get(name) is not None])
            rows.append(row)
        return rows

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; cached until the next ``add()`` (the page asks for it every few seconds)."""
        if self._cached is None:
            self._cached = {
                "snapshots": self.snapshots,
                "first_at": self.first_at,
                "updated_at": self.updated_at,
                "throughput": list(self.throughput),
                "theta": list(self.theta),
                "rounds": self.rounds(),
            }
        return self._cached
