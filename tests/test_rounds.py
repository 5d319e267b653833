"""Federated rounds between real photon-peer processes on 127.0.0.1 (DHT, averager and p2pd in each).

Proves: rounds complete and every member of a group leaves each round with the same theta (same hash); a peer
joining at round 3 downloads the state, catches up and then contributes; a peer killed with SIGKILL in the middle of
an all-reduce does not stop the others, who finish the round and keep training; a lone peer trains on; a late peer
carries its update into its next round (damped) instead of dropping it, and never pulls the others backwards.
Faults are injected on purpose (PHOTON_FAULTS, see photon_p2p/swarm/faults.py) and each test checks that the fault
really happened.
"""

from __future__ import annotations

import math
import signal

import pytest

from tests.helpers.peers import finish, records, rounds, start_bootstrap, start_peer, wait_for_round
from tests.helpers.procs import wait_until

pytestmark = pytest.mark.slow


def _same_theta_in_shared_groups(procs_, first_round: int = 0) -> int:
    """For every round where peers averaged in the same group, their theta hashes after it must be equal.
    Returns how many (round, group) pairs were checked."""
    checked = 0
    by_round: dict[int, list[dict]] = {}
    for p in procs_:
        for r, rec in rounds(p).items():
            if r >= first_round and rec["outcome"] == "averaged":
                by_round.setdefault(r, []).append(rec)
    for r, recs in by_round.items():
        groups: dict[tuple, set] = {}
        for rec in recs:
            groups.setdefault(tuple(sorted(rec["group_peers"])), set()).add(rec["theta_hash"])
        for group, hashes in groups.items():
            if sum(1 for rec in recs if tuple(sorted(rec["group_peers"])) == group) > 1:
                assert len(hashes) == 1, f"round {r}: group {group} left with different theta {hashes}"
                checked += 1
    return checked


def test_three_peers_average_every_round_with_identical_theta(procs, tmp_path):
    """With a quorum of three (--min-group-size 3) every round is a full group and theta stays identical."""
    cache = tmp_path / "cache"
    entry = start_bootstrap(procs)
    quorum = ["--min-group-size", "3"]
    a = start_peer(procs, "a", run_id="ident", cache=cache, initial_peers=[entry], max_steps=40, extra=quorum)
    b = start_peer(procs, "b", run_id="ident", cache=cache, initial_peers=[entry], max_steps=40, extra=quorum)
    c = start_peer(procs, "c", run_id="ident", cache=cache, initial_peers=[entry], max_steps=40, extra=quorum)
    for p in (a, b, c):
        finish(p, 240)
    recs = {p.name: rounds(p) for p in (a, b, c)}
    for name, by_round in recs.items():
        sizes = [(r, x["group_size"], x["outcome"]) for r, x in sorted(by_round.items())]
        assert sorted(by_round) == list(range(8)), f"{name} skipped rounds: {sizes}"
        assert all(x["group_size"] == 3 for x in by_round.values()), f"{name}: a round below the quorum: {sizes}"
    assert _same_theta_in_shared_groups([a, b, c]) == 8
    last = max(recs["a"])
    assert recs["a"][last]["theta_hash"] == recs["b"][last]["theta_hash"] == recs["c"][last]["theta_hash"]
    # the final evaluation is of the shared theta, on the same held-out documents: identical numbers
    finals = [[r for r in records(p) if r.get("val_loss") is not None][-1]["val_loss"] for p in (a, b, c)]
    assert finals[0] == finals[1] == finals[2]
    for rec in recs["a"].values():
        if rec["outcome"] == "averaged":
            assert rec["bytes_sent"] > 0 and rec["bytes_received"] > 0 and rec["allreduce_s"] > 0


TIMED = ["--round-seconds", "0.5", "--min-group-size", "2"]  # rounds long enough to outlast start-up jitter


def test_peer_joining_at_round_3_catches_up_and_contributes(procs, tmp_path):
    cache = tmp_path / "cache"
    entry = start_bootstrap(procs)
    # no --max-steps to reach: how many rounds fit before the late peer is up depends on the machine's speed, so the
    # peers run until the test has seen what it needs and then stops them (SIGTERM: a clean exit between rounds)
    endless = dict(run_id="join", cache=cache, initial_peers=[entry], max_steps=1_000_000, extra=TIMED)
    a = start_peer(procs, "a", **endless)
    b = start_peer(procs, "b", **endless)
    wait_for_round(a, 3, timeout=120)
    c = start_peer(procs, "c", **endless)
    c.wait_for(r"downloaded theta for round (\d+)", timeout=120)

    def contributed() -> list[int]:
        assert c.alive(), c.output()[-4000:]
        return [r for r, rec in rounds(c).items() if rec["outcome"] == "averaged" and rec["group_size"] == 3]

    joint = wait_until(contributed, timeout=120, what="the late peer averaging with both others")
    for p in (a, b, c):
        p.popen.send_signal(signal.SIGTERM)
    for p in (a, b, c):
        finish(p, 60)
    c_rounds = rounds(c)
    assert min(c_rounds) >= 3, f"the late peer should start at the swarm's round, not 0: {sorted(c_rounds)}"
    assert _same_theta_in_shared_groups([a, b, c], first_round=min(joint)) >= 1


def test_sigkill_during_allreduce_the_others_finish_the_round(procs, tmp_path):
    """Rounds close on the collective budget, so each round advances the global step by exactly --local-steps:
    --max-steps 75 is rounds 0-14 whatever the machine's speed (the old timed rounds made the count vary)."""
    cache = tmp_path / "cache"
    entry = start_bootstrap(procs)
    extra = ["--min-group-size", "2", "--compression", "none", "--wait-for-peers", "3"]
    common = dict(run_id="kill", cache=cache, initial_peers=[entry], max_steps=75, extra=extra)
    a = start_peer(procs, "a", **common)
    b = start_peer(procs, "b", **common)
    victim = start_peer(procs, "victim", **common, env={"PHOTON_FAULTS": "kill_in_allreduce@8"})
    assert victim.wait(180) == -9, "the fault was not injected (the victim should die by SIGKILL)"
    assert "injecting kill_in_allreduce in round 8" in victim.output()
    for p in (a, b):
        finish(p, 300)
    ra, rb = rounds(a), rounds(b)
    assert ra[8]["group_size"] == 3 or rb[8]["group_size"] == 3, "the victim was not in a group when it died"
    for recs in (ra, rb):
        assert 8 in recs and recs[8]["allreduce_s"] < 30 + 10, "round 8 hung past the all-reduce timeout"
        assert sorted(recs) == list(range(15)), f"training did not go on after the failure: {sorted(recs)}"
        assert recs[14]["step"] == 75
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
    common = dict(run_id="late", cache=cache, initial_peers=[entry], max_steps=1_000_000,
                  extra=["--min-group-size", "2", "--wait-for-peers", "3"])
    a = start_peer(procs, "a", **common)
    b = start_peer(procs, "b", **common)
    late = start_peer(procs, "late", **common, env={"PHOTON_FAULTS": "stall_before_average@6:15"})

    def merged_after_round_6() -> list[int]:
        assert late.alive(), late.output()[-4000:]
        return [r for r, rec in rounds(late).items() if r > 6 and rec["outcome"] == "averaged"]

    wait_until(merged_after_round_6, timeout=240, what="the late peer averaging again after round 6")
    for p in (a, b, late):
        p.popen.send_signal(signal.SIGTERM)
    for p in (a, b, late):
        finish(p, 60)
    assert "injecting stall_before_average in round 6" in late.output()
    late_r, a_r = rounds(late), rounds(a)
    assert late_r[6]["outcome"] == "late", late_r[6]
    assert late_r[6]["carried_tokens"] == late_r[6]["own_tokens"] > 0 and late_r[6]["staleness"] >= 1
    # the others did round 6 without it
    assert a_r[6]["group_size"] == 2 and a_r[6]["outcome"] == "averaged"
    # its next round starts from a theta the others really held (it downloaded theirs, not the reverse) ...
    nxt = min(r for r in late_r if r > 6)
    assert late_r[6]["theta_hash"] in {rec["theta_hash"] for r, rec in a_r.items() if r >= 6}
    # ... and that round's update carries round 6's tokens into theta
    assert late_r[nxt]["outcome"] == "averaged", late_r[nxt]
    assert late_r[nxt]["tokens_in_theta"] == late_r[nxt]["own_tokens"] + late_r[6]["carried_tokens"]
    assert "carrying over round 6's late work" in late.output()
    # back on one theta with the others, and no round of the late peer's was wasted
    assert late_r[nxt]["theta_hash"] == a_r[nxt]["theta_hash"]
    assert all(rec["wasted_tokens"] == 0 for rec in late_r.values())


def test_client_mode_peer_averages_through_peers_that_accept_connections(procs, tmp_path):
    """A volunteer behind NAT (--client-mode: no incoming connections) still contributes: it joins the groups led by
    reachable peers, sends its delta and receives the average, and ends every round with the same theta."""
    cache = tmp_path / "cache"
    entry = start_bootstrap(procs)
    quorum = ["--min-group-size", "2"]
    open_ = start_peer(procs, "open", run_id="nat", cache=cache, initial_peers=[entry], max_steps=30, extra=quorum)
    hidden = start_peer(procs, "hidden", run_id="nat", cache=cache, initial_peers=[entry], max_steps=30,
                        extra=quorum + ["--client-mode"])
    for p in (open_, hidden):
        finish(p, 240)
    assert "others can join this run" not in hidden.output(), "a client-mode peer has no address to hand out"
    ro, rh = rounds(open_), rounds(hidden)
    assert sorted(rh) == list(range(6)) and all(r["outcome"] == "averaged" for r in rh.values()), rh
    assert all(ro[r]["theta_hash"] == rh[r]["theta_hash"] for r in rh)
    # its delta really travelled: it sent its update and received the average every round
    assert all(r["bytes_sent"] > 0 and r["bytes_received"] > 0 for r in rh.values())
