"""Run identity: a run is named by its id and its owner's key, so a back-dated manifest cannot hijack it.

One real DHT node (with photon's record validators) in this process; manifests published the way peers publish
them, by several real identities. Proves: with --run-owner, the owner's manifest is chosen even when another one
claims to be older, and a run owned by someone else is refused with one line naming the signer; a pinned owner
(from a checkpoint) behaves the same; with nothing pinned, manifests with different settings from different
creators are refused with the list of candidates (created_at is the signer's choice, so "earliest" would let a
back-dated one win); identical settings from two creators still just work; a manifest dated in the future is
dropped and counted; a bad --run-owner is a one-line config error naming the flag.
"""

from __future__ import annotations

import time

import pytest

from photon_p2p.errors import ConfigError, SwarmError
from tests.helpers.procs import LOOPBACK
from tests.helpers.swarm import micro_manifest, signed_run

RUN = "owned"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from photon_p2p.swarm.dht import DHTCalls, start_dht, stop_dht
    from photon_p2p.swarm.identity import Identity

    work = tmp_path_factory.mktemp("identity")
    dht = start_dht(initial_peers=[], host_maddrs=[LOOPBACK], identity=None)
    try:
        yield DHTCalls(dht), [Identity.ephemeral(work) for _ in range(4)]
    finally:
        stop_dht(dht)


def _agree(calls, me, run_id, **kwargs):
    from photon_p2p.swarm.manifest import agree_on_manifest

    return agree_on_manifest(calls, me, micro_manifest(run_id), set(), settle_s=0.5, **kwargs)


def test_owner_decides_and_a_contested_run_is_refused(world):
    from photon_p2p.swarm.manifest import publish

    calls, (owner, hijacker, volunteer, _) = world
    run_id = f"{RUN}-a"
    genuine = signed_run(micro_manifest(run_id), owner)
    forged = signed_run(micro_manifest(run_id, local_steps=7), hijacker, created_at=time.time() - 7200)
    assert publish(calls, genuine) and publish(calls, forged)
    o, h = owner.peer_id.to_base58(), hijacker.peer_id.to_base58()

    with pytest.raises(SwarmError) as e:  # nothing pinned: do not trust the back-dated one, list both
        _agree(calls, volunteer, run_id)
    msg = str(e.value)
    assert "\n" not in msg and o in msg and h in msg and "--run-owner" in msg, msg
    assert _agree(calls, volunteer, run_id, owner=o).record.creator == o
    assert _agree(calls, volunteer, run_id, pinned_owner=o).record.creator == o
    assert _agree(calls, volunteer, run_id, owner=h).record.creator == h  # the user's explicit choice
    stranger = volunteer.peer_id.to_base58()
    for kwargs, source in ((dict(owner=stranger), "--run-owner"), (dict(pinned_owner=stranger), "checkpoint")):
        with pytest.raises(SwarmError) as e:
            _agree(calls, owner, run_id, **kwargs)
        assert f"is not the one owned by {stranger}" in str(e.value) and source in str(e.value), str(e.value)


def test_identical_settings_from_two_creators_just_work(world):
    from photon_p2p.swarm.manifest import publish

    calls, (a, b, volunteer, _) = world
    run_id = f"{RUN}-b"
    first = signed_run(micro_manifest(run_id), a, created_at=time.time() - 3600)
    assert publish(calls, first) and publish(calls, signed_run(micro_manifest(run_id), b))
    chosen = _agree(calls, volunteer, run_id)
    assert chosen.hash == first.hash and chosen.record.creator == a.peer_id.to_base58()


def test_manifest_dated_in_the_future_is_dropped(world):
    from photon_p2p.swarm.manifest import fetch_manifests, publish
    from photon_p2p.swarm.records import RejectCounter

    calls, (a, b, _, _) = world
    run_id = f"{RUN}-c"
    assert publish(calls, signed_run(micro_manifest(run_id), a))
    future = signed_run(micro_manifest(run_id, local_steps=9), b, created_at=time.time() + 3600)
    # every node refuses to store it; our reader would drop it too (checked on the record itself)
    assert not publish(calls, future)
    rejects = RejectCounter()
    assert [c.record.creator for c in fetch_manifests(calls, run_id, rejects)] == [a.peer_id.to_base58()]


def test_owner_creates_its_own_run_and_others_join_it(world):
    calls, (owner, _, volunteer, _) = world
    run_id = f"{RUN}-d"
    o = owner.peer_id.to_base58()
    created = _agree(calls, owner, run_id, owner=o)  # an owner starting its run with --run-owner itself
    assert created.record.creator == o
    assert _agree(calls, volunteer, run_id, owner=o).hash == created.hash
    started = time.monotonic()
    with pytest.raises(SwarmError, match="no manifest signed by its owner"):
        _agree(calls, volunteer, f"{RUN}-none", owner=o, owner_wait_s=3)
    assert time.monotonic() - started >= 3  # it waited for the owner before giving up


def test_a_peer_that_starts_before_its_owner_waits_for_the_owners_manifest(world):
    """Peers of a resumed run restart in any order: one whose checkpoint pins another peer as owner must wait for
    that owner's manifest, not fail (seen in CI: photon-swarm's rerun, the non-owner up first)."""
    import threading

    calls, (owner, _, volunteer, _) = world
    run_id, o = f"{RUN}-wait", owner.peer_id.to_base58()
    joined: list = []
    waiter = threading.Thread(
        target=lambda: joined.append(_agree(calls, volunteer, run_id, pinned_owner=o, owner_wait_s=60))
    )
    waiter.start()
    time.sleep(3)
    assert waiter.is_alive() and not joined  # nothing to join yet: still waiting, not refused
    created = _agree(calls, owner, run_id)
    waiter.join(60)
    assert joined and joined[0].hash == created.hash and joined[0].record.creator == o


@pytest.mark.parametrize("bad", ["not a peer id", "0OIl", "Qm" + "x" * 200])
def test_bad_run_owner_names_the_flag(bad):
    from photon_p2p.config import SwarmConfig

    with pytest.raises(ConfigError, match="--run-owner"):
        SwarmConfig(run_owner=bad).validate()
