"""Hostile DHT records: every photon node refuses them at store time, and a run under attack still finds and trains.

The swarm test runs a photon-bootstrap, a real photon-peer creating run ``t``, and an attacker: a raw hivemind DHT
node in this test process, without any validator, that stores straight into the swarm. It stores, each with an
absurd (far-future) expiration where that is the point: plain values at the run's peers, manifest and contributions
keys and at the run's hivemind averager keys (state sharing and the matchmaking keys of rounds 0-15), a heartbeat
signed by the attacker under the real peer's ID, an unsigned body under the real peer's ID, a 30 KiB junk value
(hivemind's DHT pipe takes no much larger one; larger sizes are unit-tested), its own validly signed heartbeat that
would live for years, a manifest of another creator (other settings) dated in the future, and a replay of the real
peer's old heartbeat with a fresh expiration. The test asserts that each store happened (the attacker's own node
holds each record, and hivemind sent it to the others), then asks the bootstrap and the real peer *directly* what
they hold: no plain value, no forged or oversized entry, no expiration beyond 8 days (contributions live 7), the
real peer's own newest heartbeat. Then a newcomer that only knows the bootstrap and the run id (``--join-existing``)
finds the run and averages a round with the first peer, while the attacker's node still answers searches with its
garbage (every node also validates what it retrieves).

The unit tests check the validator's rules one by one on real signed records (no DHT needed) and the reader's
replay guard on a real ``SwarmView``; tests/test_record_fuzz.py fuzzes every schema.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time

import msgpack
import pytest

from tests.helpers.peers import rounds, start_bootstrap, start_peer
from tests.helpers.procs import LOOPBACK, wait_until

RUN = "t"
FAR = 10 * 365 * 24 * 3600.0  # "absurd": ten years


async def _store(_dht, node, key: str, value: bytes | None, expiration: float, subkey, zeros: int = 0) -> bool:
    """Store from inside the attacker's DHT process; ``zeros``: store that many zero bytes, built here. A large value
    must not cross hivemind's pipe into that process: hivemind reads that pipe through a non-blocking socket, and a
    message that arrives in parts kills the DHT process (BlockingIOError, then EOFError; hivemind PR #660). It
    happened once here, in a fresh-clone run, with the 30 KiB junk value below."""
    return await node.store(key, b"\x00" * zeros if zeros else value, expiration, subkey=subkey)


async def _ask(_dht, node, peer: str | None, keys: list[str]) -> dict:
    """What one node holds under ``keys``: {key: None | ("plain", expiration) | {subkey: (value, expiration)}}.
    Runs in the attacker's DHT process (no validator, so nothing is filtered on the way back); ``peer`` None: the
    attacker's own storage."""
    from hivemind.dht.routing import DHTID
    from hivemind.p2p import PeerID
    from hivemind.utils.serializer import MSGPackSerializer

    ids = [DHTID.generate(source=k) for k in keys]
    if peer is None:
        found = {i: (node.protocol.storage.get(i), None) for i in ids}
    else:
        found = await node.protocol.call_find(PeerID.from_base58(peer), ids)
    if found is None:
        return None  # no answer in time (two loaded cores): the caller asks again
    out = {}
    for key, key_id in zip(keys, ids, strict=True):
        entry, _ = found[key_id]
        if entry is None:
            out[key] = None
        elif isinstance(entry.value, bytes):
            out[key] = ("plain", entry.expiration_time)
        else:
            out[key] = {
                sub: (MSGPackSerializer.loads(item.value), item.expiration_time) for sub, item in entry.value.items()
            }
    return out


def _signed_heartbeat(identity, **changes):
    from photon_p2p.swarm.records import Heartbeat, sign_record
    from tests.helpers.swarm import heartbeat_fields

    return sign_record(Heartbeat(**heartbeat_fields(identity.peer_id.to_base58(), run_id=RUN, **changes)), identity)


@pytest.mark.slow
def test_hostile_records_are_refused_by_every_node_and_a_newcomer_still_trains(procs, tmp_path):
    import hivemind
    from hivemind.utils.timed_storage import get_dht_time

    from photon_p2p.swarm.heartbeat import contribution_key, heartbeat_key
    from photon_p2p.swarm.identity import Identity
    from photon_p2p.swarm.manifest import manifest_key
    from photon_p2p.swarm.records import Contribution, Heartbeat, open_record
    from tests.helpers.swarm import micro_manifest, signed_run

    boot = start_bootstrap(procs)
    boot_id = boot.rsplit("/p2p/", 1)[1]
    common = dict(run_id=RUN, initial_peers=[boot], max_steps=100000, local_steps=3, matchmaking_time=2.0)
    a = start_peer(procs, "a", cache=tmp_path / "cache", **common)
    h12 = a.wait_for(r"started run 't' \(manifest ([0-9a-f]{12})\)", 120).group(1)
    a_id = a.wait_for(r"initial-peers /ip4/127\.0\.0\.1/tcp/\d+/p2p/(\w+)", 10).group(1)
    prefix = f"photon_{RUN}_{h12}"
    keys = dict(
        peers=heartbeat_key(RUN),
        manifest=manifest_key(RUN),
        contributions=contribution_key(RUN),
        donors=f"{prefix}.all_averagers",
        **{f"group{r}": f"{prefix}.0b{r:b}" for r in range(16)},
    )
    attacker = hivemind.DHT(initial_peers=[boot], host_maddrs=[LOOPBACK], start=True)
    try:
        # the peer's first heartbeats, to replay later
        def a_beat():
            found = attacker.get(keys["peers"], latest=True)
            entry = found.value.get(a_id) if found is not None and isinstance(found.value, dict) else None
            return entry.value if entry is not None else None

        old_raw = wait_until(a_beat, 60, what="a's heartbeat")
        old_beat, _ = open_record(old_raw, Heartbeat, signer=a_id)
        wait_until(lambda: time.time() > old_beat.time + 25, 60)  # the peer has published newer ones since

        me, other, third = (Identity.ephemeral(tmp_path) for _ in range(3))
        now = get_dht_time()
        attacks = [
            (keys["peers"], _signed_heartbeat(me), now + 60, a_id),  # signed by me, under the real peer's ID
            (keys["peers"], _signed_heartbeat(me), now + FAR, me.peer_id.to_base58()),  # valid, lives for years
            (keys["contributions"], msgpack.packb({"peer_id": a_id}), now + FAR, a_id),  # unsigned
            (keys["manifest"], b"\x00" * (30 << 10), now + 60, third.peer_id.to_base58()),  # 30 KiB of junk
        ]
        replay = [(keys["peers"], old_raw, now + 61, a_id)]  # the peer's own heartbeat of 25 s ago, re-stored
        hijack = signed_run(micro_manifest(RUN, local_steps=7), other, created_at=time.time() + 3600)
        attacks.append((keys["manifest"], hijack.raw, now + 300, other.peer_id.to_base58()))  # dated in the future
        plain = [(key, b"squat", now + 2 * FAR, None) for key in keys.values()]  # blocks later subkeys: stored last
        for batch in (attacks, replay, plain):
            for key, value, expiration, subkey in batch:
                # hivemind sends each store to the nodes nearest to the key (here: all of them) and keeps a copy;
                # what it returns is only the last node's verdict, and a loaded node may answer late
                zeros = len(value) if len(value) > 8192 else 0
                assert not zeros or value == bytes(zeros)  # only zeros are built inside (see _store)
                call = functools.partial(
                    _store, key=key, value=None if zeros else value, expiration=expiration, subkey=subkey, zeros=zeros
                )
                with contextlib.suppress(TimeoutError):
                    attacker.run_coroutine(call, return_future=True).result(timeout=20)

            def all_held(batch=batch):  # the attack happened: the attacker's node holds each record
                ask = functools.partial(_ask, peer=None, keys=list(keys.values()))
                mine = attacker.run_coroutine(ask, return_future=True).result(timeout=60)  # never hang the test
                return all(
                    (mine[k] == ("plain", e)) if sub is None else (mine[k] or {}).get(sub) == (v, e)
                    for k, v, e, sub in batch
                )

            wait_until(all_held, 60, what="the attacker's node holding every hostile record")

        def ask(peer: str) -> dict:
            ask = functools.partial(_ask, peer=peer, keys=list(keys.values()))
            return attacker.run_coroutine(ask, return_future=True).result(timeout=60)

        held = {
            name: wait_until(functools.partial(ask, peer), 60, what=f"an answer from {name}")
            for name, peer in (("bootstrap", boot_id), ("peer a", a_id))
        }
        horizon = get_dht_time() + 8 * 24 * 3600  # contributions live 7 days; the attacker asked for 10 years
        for name, found in held.items():
            for key, entries in found.items():
                assert not isinstance(entries, tuple), f"{name} kept a plain value at {key}"
                for sub, (value, expiration) in (entries or {}).items():
                    assert expiration < horizon, f"{name} kept {key}/{sub!r} until {expiration}"
                    if isinstance(value, bytes):
                        assert len(value) < 16 << 10, f"{name} kept an oversized value at {key}"
            peers, manifests = found[keys["peers"]], found[keys["manifest"]]
            assert set(peers) <= {a_id} and set(manifests) == {a_id}, (name, peers.keys(), manifests.keys())
            beat, _ = open_record(peers[a_id][0], Heartbeat, signer=a_id)
            assert beat.time > old_beat.time, f"{name}: the replayed heartbeat displaced a newer one"
            for value, _ in (found[keys["contributions"]] or {}).values():
                open_record(value, Contribution, signer=a_id)  # the real one (or none yet), never the unsigned body

        # a newcomer that knows only the bootstrap and the run id finds the run and trains with the first peer,
        # while the attacker's node is still up and serves its garbage to searches
        b = start_peer(procs, "b", cache=tmp_path / "cache", extra=["--join-existing"], **common)
        b.wait_for(r"joining run 't' created by", 120)

        def averaged_together():
            assert a.alive() and b.alive(), (a.output()[-3000:], b.output()[-3000:])
            return [r for r in rounds(b).values() if r["outcome"] == "averaged" and r["group_size"] == 2]

        together = wait_until(averaged_together, 240, what="a round averaged by both peers")
        assert together[0]["lost_fraction"] == 0, together
        assert a.alive() and "Traceback" not in a.stderr + b.stderr
    finally:
        attacker.shutdown()


# --------------------------------------------------------------------------------------------------------------
# the validator's rules, one by one, on real signed records


@pytest.fixture(scope="module")
def ids(tmp_path_factory):
    from photon_p2p.swarm.identity import Identity

    work = tmp_path_factory.mktemp("ids")
    return [Identity.ephemeral(work) for _ in range(2)]


def _check(value, subkey, expiration_in: float, *, checked_later: float = 0.0) -> str:
    """check_record on a value stored now to expire in ``expiration_in`` s, checked ``checked_later`` s from now."""
    from hivemind.dht.protocol import DHTProtocol

    from photon_p2p.swarm.validators import check_record

    now = time.time()
    ser = DHTProtocol.serializer.dumps
    sub = subkey if isinstance(subkey, bytes) and subkey in DHTProtocol.RESERVED_SUBKEYS else ser(subkey)
    return check_record(b"k" * 20, sub, ser(value), now + expiration_in, now + checked_later)


def test_validator_rules(ids):
    from hivemind.dht.protocol import DHTProtocol

    from photon_p2p.swarm.heartbeat import CONTRIBUTION_TTL, HEARTBEAT_TTL
    from photon_p2p.swarm.manifest import MANIFEST_TTL
    from photon_p2p.swarm.records import MAX_RECORD_BYTES, Contribution, RunAnnouncement, sign_record
    from tests.helpers.swarm import micro_manifest, signed_run

    me, other = ids
    pid, other_pid = me.peer_id.to_base58(), other.peer_id.to_base58()
    beat = _signed_heartbeat(me)
    assert _check(beat, pid, HEARTBEAT_TTL) == ""
    assert _check(beat, DHTProtocol.IS_REGULAR_VALUE, 10) == "plain value (only subkeys are used)"
    assert _check(beat, other_pid, 10) == "signed by another peer than its subkey names"
    assert _check(beat, pid, HEARTBEAT_TTL + 30) == "expiration too far ahead"
    assert _check(_signed_heartbeat(me, time=time.time() + 600), pid, 10) == "dated in the future"
    # a replay of a heartbeat written 60 s ago cannot get an expiration later than the original's
    assert _check(_signed_heartbeat(me, time=time.time() - 60), pid, 10) == "expiration too far ahead"
    assert _check(b"\x00" * 100, pid, 10) == "not msgpack"
    assert _check(b"\x00" * (MAX_RECORD_BYTES + 100), pid, 10) == "too large"
    assert _check(msgpack.packb({"b": b"x", "k": b"y", "s": b"z"}), pid, 10) == "bad signature"
    assert _check({"a": 1}, pid, 10) == "unknown value type"
    assert _check("text", pid, 10) == "unknown value type"
    big = sign_record(
        Contribution(peer_id=pid, run_id="r", tokens=1, rounds=1, rounds_averaged=1, first_seen=0, time=time.time()),
        me,
    )
    assert _check(big, pid, CONTRIBUTION_TTL) == ""
    assert _check(big, pid, CONTRIBUTION_TTL + 60) == "expiration too far ahead"
    ann = sign_record(RunAnnouncement(run_id="r", manifest_hash="0" * 64, time=time.time()), other)
    assert _check(ann, "r", 100) == "" and _check(ann, "q", 100) == "run announcement under another run id"
    run = signed_run(micro_manifest("r"), me, created_at=time.time() - 7 * 24 * 3600)  # old runs stay valid
    assert _check(run.raw, pid, MANIFEST_TTL) == ""
    assert _check(run.raw, other_pid, MANIFEST_TTL) == "signed by another peer than its subkey names"
    assert _check(run.raw, pid, MANIFEST_TTL + 3600) == "expiration too far ahead"
    future = signed_run(micro_manifest("r"), me, created_at=time.time() + 3600)
    assert _check(future.raw, pid, MANIFEST_TTL) == "dated in the future"
    # hivemind's own averager records: a peer ID subkey, a bool (matchmaking) or a priority (state sharing)
    peer_bytes = me.peer_id.to_bytes()
    assert _check(True, peer_bytes, 15) == "" and _check(False, peer_bytes, 15) == ""
    assert _check(3.0, peer_bytes, 10) == "" and _check(None, peer_bytes, 10) == ""
    assert _check(math.nan, peer_bytes, 10) == "averager priority not finite"
    assert _check(True, b"not a peer id", 15) == "averager declaration without a peer ID subkey"
    assert _check(True, "a string", 15) == "averager declaration without a peer ID subkey"
    assert _check(True, peer_bytes, FAR) == "expiration too far ahead"
    assert _check(True, DHTProtocol.IS_REGULAR_VALUE, 15) == "plain value (only subkeys are used)"


def test_validator_applies_the_same_rules_on_retrieval_forever(ids):
    """hivemind validates what it retrieves too: a record accepted once must stay valid as time passes (or a node
    would later drop a whole dictionary it had accepted)."""
    from tests.helpers.swarm import micro_manifest, signed_run

    me = ids[0]
    pid = me.peer_id.to_base58()
    beat, run = _signed_heartbeat(me), signed_run(micro_manifest("r"), me)
    for later in (0, 60, 3600, 30 * 24 * 3600):
        assert _check(beat, pid, 12, checked_later=later) == ""
        assert _check(run.raw, pid, 600, checked_later=later) == ""
        assert _check(True, me.peer_id.to_bytes(), 30, checked_later=later) == ""
