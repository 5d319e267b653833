"""How often a peer reads the run's heartbeats (photon_p2p/swarm/view.py, ``poll_interval``).

Every read fetches every peer's record, so a fixed period made the swarm's reads grow as N^2 (bench/scale.py).
Proves: a swarm of up to 5 other peers is read every POLL_S as before; the period then grows by POLL_PER_PEER_S per
peer (each peer reads ~10 records a second) and stops at POLL_MAX_S, one heartbeat period; the view's own loop waits
exactly that period after each read, for the number of peers that read returned (real Heartbeat records; the DHT
read is replaced by a list of them, since what is tested is the loop's timing, not the DHT); PHOTON_VIEW_POLL_S
fixes the period (what bench/scale.py compares with), and a bad value is ignored with one warning.
"""

from __future__ import annotations

import logging

import pytest

from photon_p2p.swarm import view as view_mod
from photon_p2p.swarm.heartbeat import HEARTBEAT_PERIOD
from photon_p2p.swarm.records import Heartbeat, RejectCounter
from photon_p2p.swarm.view import POLL_ENV, POLL_MAX_S, POLL_S, SwarmView, poll_interval
from tests.helpers.swarm import heartbeat_fields


@pytest.fixture(autouse=True)
def _no_override(monkeypatch):
    monkeypatch.delenv(POLL_ENV, raising=False)


def test_period_is_fixed_for_small_swarms_then_grows_with_the_swarm_up_to_a_heartbeat_period():
    assert [poll_interval(n) for n in range(6)] == [POLL_S] * 6
    assert poll_interval(8) == pytest.approx(0.8)
    assert poll_interval(16) == pytest.approx(1.6)
    assert poll_interval(30) == POLL_MAX_S == HEARTBEAT_PERIOD
    assert poll_interval(1000) == POLL_MAX_S
    # what it buys: records read per second by one peer stay flat from 5 peers on, until the cap
    assert [round(n / poll_interval(n), 6) for n in (5, 8, 16, 30)] == [10.0] * 4


class _Stop:
    """Stands in for the view's stop event: records each wait's timeout and stops the loop after ``reads`` reads."""

    def __init__(self, reads: int):
        self.reads, self.waits = reads, []

    def is_set(self) -> bool:
        return len(self.waits) >= self.reads

    def wait(self, timeout: float) -> bool:
        self.waits.append(timeout)
        return self.is_set()


@pytest.mark.parametrize("others", [2, 16, 40])
def test_the_view_waits_the_period_for_the_peers_it_read(monkeypatch, others):
    ids = [f"QmPeerNr{i + 1}".replace("0", "z") for i in range(others)]  # base58: no 0
    beats = {pid: Heartbeat(**heartbeat_fields(pid)) for pid in ids}
    reads = []
    monkeypatch.setattr(view_mod, "read_heartbeats", lambda *a, **k: reads.append(1) or dict(beats))
    view = SwarmView(None, "r", "0" * 64, "me", RejectCounter())
    view._stop = _Stop(reads=3)
    view._loop()
    assert len(reads) == 3 and len(view.peers()) == others
    assert view._stop.waits == [poll_interval(others)] * 3


def test_env_fixes_the_period_and_a_bad_value_is_ignored_with_one_warning(monkeypatch, caplog):
    monkeypatch.setenv(POLL_ENV, "0.5")
    assert poll_interval(16) == 0.5
    monkeypatch.setenv(POLL_ENV, "soon")
    with caplog.at_level(logging.WARNING, logger="photon_p2p.swarm.view"):
        assert poll_interval(16) == pytest.approx(1.6)
        assert poll_interval(16) == pytest.approx(1.6)
    assert [r.getMessage() for r in caplog.records] == [f"ignoring {POLL_ENV}='soon': not a positive number of seconds"]
