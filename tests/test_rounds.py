"""Federated rounds between real photon-peer processes on 127.0.0.1 (DHT, averager and p2pd in each).

Proves: a peer killed with SIGKILL in the middle of
an all-reduce does not stop the others, who finish the round and keep training; a lone peer trains on; a late peer
carries its update into its next round (damped) instead of dropping it, and never pulls the others backwards; a peer
late for the run's last round, after the others finished and left, applies its own update and finishes instead of
waiting for them until --quorum-timeout (and only goodbyes of peers seen taking part say that a round closed).
Faults are injected on purpose (PHOTON_FAULTS, see photon_p2p/swarm/faults.py) and each test checks that the fault
really happened. Full groups with identical theta, and a volunteer joining a running swarm, are proven on shaped
links in tests/test_field.py (they replaced the loopback versions of those tests).
"""

from __future__ import annotations

import math
import re
import signal

import pytest

from tests.helpers.peers import finish, rounds, start_bootstrap, start_peer
from tests.helpers.procs import wait_until

pytestmark = pytest.mark.slow


def test_sigkill_during_allreduce_the_others_finish_the_round(procs, tmp_path):
    """Rounds close on the collective budget, so each round advances the global step by exactly --local-steps:
    --max-steps 300 is rounds 0-14 whatever the machine's speed (the old timed rounds made the count vary). Rounds
    of 20 steps (about a second) are long enough for heartbeats to show who trains which round."""
    cache = tmp_path / "cache"
    entry = start_bootstrap(procs)
    extra = ["--min-group-size", "2", "--compression", "none", "--wait-for-peers", "3"]
    common = dict(run_id="kill", cache=cache, initial_peers=[entry], local_steps=20, max_steps=300, extra=extra)
    a = start_peer(procs, "a", **common)
    b = start_peer(procs, "b", **common)
    victim = start_peer(procs, "victim", **common, env={"PHOTON_FAULTS": "kill_in_allreduce@8"})
    assert victim.wait(180) == -9, "the fault was not injected (the victim should die by SIGKILL)"
    assert "injecting kill_in_allreduce in round 8" in victim.output()
    victim_id = re.search(r"initial-peers /ip4/127\.0\.0\.1/tcp/\d+/p2p/(\w+)", victim.output()).group(1)
    for p in (a, b):
        finish(p, 300)
    ra, rb = rounds(a), rounds(b)
    # the victim died inside an all-reduce (the fault fires while it sends its parts). Either a survivor's round 8
    # finished in that group (the record lists the victim), or the group's all-reduce failed for the survivors and
    # they retried round 8 without it: then their logs name the peer whose parts they lost
    in_group = any(victim_id in r[8]["group_peers"] for r in (ra, rb))
    assert in_group or any(victim_id in p.output() for p in (a, b)), "no survivor was in a group with the victim"
    for recs in (ra, rb):
        assert 8 in recs and recs[8]["allreduce_s"] < 30 + 10, "round 8 hung past the all-reduce timeout"
        assert sorted(recs) == list(range(15)), f"training did not go on after the failure: {sorted(recs)}"
        assert recs[14]["step"] == 300
        assert all(rec["loss"] is None or math.isfinite(rec["loss"]) for rec in recs.values())
    # after the failure the two survivors are back to one theta (merged if the dead reducer left them different)
    assert ra[14]["theta_hash"] == rb[14]["theta_hash"]


def test_lone_peer_trains_on(procs, tmp_path):
    solo = start_peer(procs, "solo", run_id="lone", cache=tmp_path / "cache", max_steps=20)
    finish(solo, 120)
    recs = rounds(solo)
    assert sorted(recs) == [0, 1, 2, 3]
    assert all(rec["outcome"] == "alone" and rec["group_size"] == 1 for rec in recs.values())
    assert recs[3]["loss"] < recs[0]["loss"]


def test_late_peer_carries_its_update_into_the_next_round(procs, tmp_path):
    """A peer stalled after training (PHOTON_FAULTS stall_before_average) for longer than the others' patience: they
    close round 6 without it; it keeps its update, downloads their newer theta, and merges the update into its next
    round, damped by staleness. Nothing of its work is dropped and it never pulls the others back to an old theta."""
    cache = tmp_path / "cache"
    entry = start_bootstrap(procs)
    # no --max-steps to reach: the others must still be running when the late peer wakes up, however fast this
    # machine is, so the test stops everyone (SIGTERM: a clean exit between rounds) once it has seen what it needs
    common = dict(
        run_id="late",
        cache=cache,
        initial_peers=[entry],
        local_steps=20,
        max_steps=1_000_000,
        extra=["--min-group-size", "2", "--wait-for-peers", "3"],
    )
    a = start_peer(procs, "a", **common)
    b = start_peer(procs, "b", **common)
    late = start_peer(procs, "late", **common, env={"PHOTON_FAULTS": "stall_before_average@6:15"})

    def back_on_one_theta() -> list[int]:
        # an averaged round of the late peer after round 6 that ended on the others' theta (the first averaged round
        # may not: an all-reduce can lose a slice on one side only, and the next round merges theta again)
        assert late.alive(), late.output()[-4000:]
        late_r, a_r = rounds(late), rounds(a)
        return [
            r
            for r, rec in late_r.items()
            if r > 6 and rec["outcome"] == "averaged" and r in a_r and a_r[r]["theta_hash"] == rec["theta_hash"]
        ]

    wait_until(back_on_one_theta, timeout=240, what="the late peer averaging again after round 6, on one theta")
    for p in (a, b, late):
        p.popen.send_signal(signal.SIGTERM)
    for p in (a, b, late):
        finish(p, 60)
    assert "injecting stall_before_average in round 6" in late.output()
    late_r, a_r = rounds(late), rounds(a)
    assert late_r[6]["outcome"] == "late", late_r[6]
    assert late_r[6]["carried_tokens"] >= late_r[6]["own_tokens"] > 0 and late_r[6]["staleness"] >= 1
    # the others did round 6 without it
    assert a_r[6]["group_size"] == 2 and a_r[6]["outcome"] == "averaged"
    # its next round starts from a theta the others really held (it downloaded theirs, not the reverse) ...
    assert late_r[6]["theta_hash"] in {rec["theta_hash"] for r, rec in a_r.items() if r >= 6}
    # ... and the work travels on until a round is averaged: with rounds shorter than a re-sync it can be late again
    # (each time carrying everything it holds), but the first averaged round after 6 puts all of it into theta
    nxt = min(r for r, rec in late_r.items() if r > 6 and rec["outcome"] == "averaged")
    chain = [late_r[r] for r in sorted(late_r) if 6 <= r < nxt]
    assert all(rec["outcome"] == "late" for rec in chain), [(r["round"], r["outcome"]) for r in chain]
    assert late_r[nxt]["tokens_in_theta"] == late_r[nxt]["own_tokens"] + chain[-1]["carried_tokens"]
    assert chain[-1]["carried_tokens"] >= late_r[6]["own_tokens"]
    assert "carrying over round 6's late work" in late.output()
    # back on one theta with the others (what the wait above found), and no round of the late peer's was wasted
    assert any(r >= nxt and a_r.get(r, {}).get("theta_hash") == rec["theta_hash"] for r, rec in late_r.items())
    assert all(rec["wasted_tokens"] == 0 for rec in late_r.values())


def test_a_peer_late_for_the_last_round_finishes_once_the_others_have_left(procs, tmp_path):
    """The run's last round closed without one peer (stalled past the others' patience), and the others finished the
    run and left. Before: with --min-group-size 2 it waited for them until --quorum-timeout, then failed (a CI run
    hung 30 minutes). Now it sees from their goodbyes that the round closed, has nobody to re-sync from, applies its
    own update, and finishes the run with exit 0, its work kept."""
    entry = start_bootstrap(procs)
    common = dict(
        run_id="last",
        cache=tmp_path / "cache",
        initial_peers=[entry],
        local_steps=10,
        max_steps=40,  # rounds 0-3
        extra=["--min-group-size", "2", "--wait-for-peers", "3", "--quorum-timeout", "900", "--eval-every", "0"],
    )
    a = start_peer(procs, "a", **common)
    b = start_peer(procs, "b", **common)
    late = start_peer(procs, "late", **common, env={"PHOTON_FAULTS": "stall_before_average@3:20"})
    for p in (a, b):
        finish(p, 400)
    finish(late, 240)  # far below --quorum-timeout: it did not wait for peers that had left
    assert "injecting stall_before_average in round 3" in late.output()
    a_r, b_r, late_r = rounds(a), rounds(b), rounds(late)
    assert a_r[3]["outcome"] == b_r[3]["outcome"] == "averaged" and a_r[3]["group_size"] == 2, (a_r[3], b_r[3])
    assert "round 3: the peers that closed this round have left the run; applying our own update" in late.output()
    assert late_r[3]["outcome"] == "alone" and late_r[3]["tokens_in_theta"] >= late_r[3]["own_tokens"] > 0
    assert late_r[3]["step"] == 40 and all(rec["wasted_tokens"] == 0 for rec in late_r.values())


def test_goodbyes_close_a_round_only_from_peers_seen_taking_part(monkeypatch):
    """SwarmView.closed_round: a goodbye (stage "left") shows the round its peer had reached, so a peer still in an
    earlier round knows that round closed. Only from a peer this view saw take part, at most one round past where it
    was seen: a stranger's goodbye, or one claiming a far-future round, closes nothing."""
    from photon_p2p.swarm import view as view_mod
    from photon_p2p.swarm.records import Heartbeat, RejectCounter
    from tests.helpers.swarm import heartbeat_fields

    beats: dict[str, Heartbeat] = {}
    monkeypatch.setattr(view_mod, "read_heartbeats", lambda *a, **k: dict(beats))
    view = view_mod.SwarmView(None, "r", "0" * 64, "me", RejectCounter())

    def beat(pid: str, **changes) -> None:
        beats[pid] = Heartbeat(**heartbeat_fields(pid, **changes))
        view.refresh()

    beat("Qmapeer1", round=5, stage="averaging")
    beat("Qmbpeer1", round=5, stage="averaging")
    assert view.closed_round() == 5 and view.newest_servable_round() == 5
    beat("Qmapeer1", round=6, stage="left")  # a finished its last round, 5, and left
    assert view.closed_round() == 6 and view.newest_servable_round() == 5
    beat("Qmbpeer1", round=6, stage="left")
    assert view.closed_round() == 6 and view.newest_servable_round() == -1 and not view.peers()
    beat("Qmstranger", round=9, stage="left")  # never seen taking part
    beat("Qmcpeer1", round=6, stage="training")
    beat("Qmcpeer1", round=50, stage="left")  # seen at round 6: a goodbye at 50 is no evidence
    assert view.closed_round() == 6


def test_client_mode_peer_averages_through_peers_that_accept_connections(procs, tmp_path):
    """A volunteer behind NAT (--client-mode: no incoming connections) still contributes: it joins the groups led by
    reachable peers, sends its delta and receives the average, and ends every round with the same theta."""
    cache = tmp_path / "cache"
    entry = start_bootstrap(procs)
    quorum = ["--min-group-size", "2"]
    open_ = start_peer(procs, "open", run_id="nat", cache=cache, initial_peers=[entry], max_steps=30, extra=quorum)
    hidden = start_peer(
        procs,
        "hidden",
        run_id="nat",
        cache=cache,
        initial_peers=[entry],
        max_steps=30,
        extra=quorum + ["--client-mode"],
    )
    for p in (open_, hidden):
        finish(p, 240)
    assert "others can join this run" not in hidden.output(), "a client-mode peer has no address to hand out"
    ro, rh = rounds(open_), rounds(hidden)
    assert sorted(rh) == list(range(6)) and all(r["outcome"] == "averaged" for r in rh.values()), rh
    assert all(ro[r]["theta_hash"] == rh[r]["theta_hash"] for r in rh)
    # its delta really travelled: it sent its update and received the average every round
    assert all(r["bytes_sent"] > 0 and r["bytes_received"] > 0 for r in rh.values())
