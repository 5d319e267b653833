"""Claims that nobody can serve (photon_p2p/swarm/view.py): a peer whose claimed round no donor could serve is ignored
for a while, not for good.

Proves, on the SwarmView the round engine reads (real Heartbeat records, the view's own clock stepped by the test):
one failed download of a claimed round changes nothing; the second makes the claimant's claims at or above that round
ignored (its older rounds still count, and other peers' claims are untouched), so the engine stops re-syncing to it;
the distrust expires after DISTRUST_S, so an honest swarm whose state failed to arrive twice (a donor frozen or gone
mid-transfer) is followed again instead of being trained behind for the rest of the run; a claim that still cannot be
served is distrusted again after ONE more failure, for twice as long, capped at DISTRUST_MAX_S.
"""

from __future__ import annotations

import time

from photon_p2p.swarm.records import Heartbeat, RejectCounter
from photon_p2p.swarm.view import DISTRUST_AFTER, DISTRUST_MAX_S, DISTRUST_S, PeerView, SwarmView
from tests.helpers.swarm import heartbeat_fields

LIAR, HONEST = "QmLiarPeer1", "QmHonestPeer1"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _view(claims: dict[str, int]) -> tuple[SwarmView, Clock]:
    view = SwarmView(None, "r", "0" * 64, "me", RejectCounter())
    view._peers = {
        pid: PeerView(Heartbeat(**heartbeat_fields(pid, round=r, step=10 * r, stage="training")), time.monotonic())
        for pid, r in claims.items()
    }
    clock = Clock()
    view._clock = clock
    return view, clock


def _fail(view: SwarmView, round_: int, times: int) -> list[str]:
    newly: list[str] = []
    for _ in range(times):
        newly += view.claim_failed(round_)
    return newly


def test_a_claim_is_ignored_only_after_repeated_failures_and_only_at_or_above_it():
    view, _ = _view({LIAR: 9, HONEST: 3})
    assert view.newest_servable_round() == 9
    assert _fail(view, 9, DISTRUST_AFTER - 1) == []
    assert view.newest_servable_round() == 9  # one failure may be bad luck: still believed
    assert _fail(view, 9, 1) == [LIAR]
    assert view.newest_servable_round() == 3  # the honest peer's claim below it is untouched
    # the liar's claim of an older round than the one that failed is believed (it is not what failed)
    view._peers[LIAR] = PeerView(Heartbeat(**heartbeat_fields(LIAR, round=2, stage="training")), time.monotonic())
    assert view.believed_round(view._peers[LIAR])


def test_distrust_expires_and_doubles_for_a_repeat_offender(caplog):
    view, clock = _view({LIAR: 9})
    caplog.set_level("WARNING", logger="photon_p2p.swarm.view")
    assert _fail(view, 9, DISTRUST_AFTER) == [LIAR]
    assert view.newest_servable_round() == -1
    assert f"for {DISTRUST_S:.0f} s" in caplog.text
    assert _fail(view, 9, 3) == []  # ignored claims are not counted again while ignored

    clock.now += DISTRUST_S - 1
    assert view.newest_servable_round() == -1
    clock.now += 1
    assert view.newest_servable_round() == 9  # expired: the engine will try that state once more

    # still unservable: a single failure distrusts it again, for twice as long
    assert _fail(view, 9, 1) == [LIAR]
    assert view.newest_servable_round() == -1
    clock.now += 2 * DISTRUST_S - 1
    assert view.newest_servable_round() == -1
    clock.now += 1
    assert view.newest_servable_round() == 9

    # the period is capped, so even a long-lived liar is retried now and then (one failed download each time)
    periods = []
    for _ in range(8):
        assert _fail(view, 9, 1) == [LIAR]
        start = clock.now
        while view.newest_servable_round() == -1:
            clock.now += 60.0
        periods.append(clock.now - start)
    assert periods[-1] == DISTRUST_MAX_S
    assert all(p <= DISTRUST_MAX_S for p in periods)


def test_an_honest_swarm_whose_state_failed_to_arrive_is_followed_again():
    """The case the expiry is for: two honest peers at round 12; this peer's two downloads failed (the donor froze
    mid-transfer). Without expiry it would ignore both for the rest of the run and never re-sync."""
    view, clock = _view({"QmHonestA1": 12, "QmHonestB1": 12})
    assert sorted(_fail(view, 12, DISTRUST_AFTER)) == ["QmHonestA1", "QmHonestB1"]
    assert view.closed_round() == -1
    clock.now += DISTRUST_S
    assert view.closed_round() == 12
