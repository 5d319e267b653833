"""Garbage in, never a traceback: every DHT record schema fuzzed with hypothesis (issue 16, point 7 for records).

For each schema a peer reads from others (heartbeats, contributions, manifests, run announcements, state metadata,
round gathers): random msgpack bodies, valid bodies with one field replaced by a value of another type, envelopes
with a byte flipped or a part swapped, and raw junk. Proves that ``open_record`` only ever raises ``RecordRejected``
(a counted rejection), that the store-time validator (validators.check_record) only ever returns a verdict and
refuses everything that is not a well-formed signed record, and that the readers (heartbeats, contributions,
manifests, run list) drop and count what they cannot use without raising. Signatures are real (one RSA key per
module); the DHT itself is not needed here (tests/test_hostile_records.py stores such records into a live swarm).
"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from photon_p2p.swarm.records import (
    Contribution,
    Heartbeat,
    ManifestRecord,
    RecordRejected,
    RejectCounter,
    RoundGather,
    RunAnnouncement,
    StateMeta,
    canonical,
    open_record,
)

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=40),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def me(tmp_path_factory):
    from photon_p2p.swarm.identity import Identity

    return Identity.ephemeral(tmp_path_factory.mktemp("fuzz"))


def _valid_bodies(pid: str) -> dict[type, dict[str, Any]]:
    from tests.helpers.swarm import heartbeat_fields, micro_manifest

    now = time.time()
    return {
        Heartbeat: heartbeat_fields(pid, round=1, step=5, tokens=10, time=now),
        Contribution: dict(peer_id=pid, run_id="r", tokens=1, rounds=1, rounds_averaged=1, first_seen=now, time=now),
        RunAnnouncement: dict(run_id="r", manifest_hash="0" * 64, time=now),
        ManifestRecord: dict(manifest=micro_manifest("r").model_dump(), creator=pid, created_at=now),
        StateMeta: dict(run_id="r", manifest_hash="0" * 64, round=1, step=1, theta_hash="ab", num_tensors=3),
        RoundGather: dict(round=1, theta_hash="ab", tokens=1, steps=1, loss=None),
    }


def _sign_raw(identity, body: Any) -> bytes:
    packed = msgpack.packb(canonical(body), use_bin_type=True)
    return msgpack.packb({"b": packed, "k": identity.public_key_der, "s": identity.sign(packed)}, use_bin_type=True)


def _verdict(raw: Any, schema: type, signer: str | None) -> str:
    try:
        open_record(raw, schema, signer=signer)
    except RecordRejected as e:
        return e.reason
    return ""


SCHEMAS = [Heartbeat, Contribution, RunAnnouncement, ManifestRecord, StateMeta, RoundGather]


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
@FUZZ
@given(data=st.data())
def test_mutated_bodies_are_rejected_or_valid(me, schema, data):
    """A valid body with one field set to an arbitrary value, or extra/missing fields, signed for real."""
    body = dict(_valid_bodies(me.peer_id.to_base58())[schema])
    action = data.draw(st.sampled_from(["replace", "drop", "add"]))
    field = data.draw(st.sampled_from(sorted(body)))
    if action == "replace":
        body[field] = data.draw(values)
    elif action == "drop":
        del body[field]
    else:
        body[data.draw(st.text(min_size=1, max_size=8).filter(lambda k: k not in body))] = data.draw(values)
    verdict = _verdict(_sign_raw(me, body), schema, me.peer_id.to_base58())
    assert verdict in ("", "schema")


@pytest.mark.parametrize("schema", SCHEMAS, ids=lambda s: s.__name__)
@FUZZ
@given(body=values, junk=st.binary(max_size=300))
def test_random_bodies_and_junk_never_raise(me, schema, body, junk):
    assert _verdict(_sign_raw(me, body), schema, None) in ("", "schema")
    assert _verdict(junk, schema, None) != ""
    assert _verdict(body, schema, None) != ""  # not even bytes


@FUZZ
@given(part=st.sampled_from(["b", "k", "s"]), pos=st.integers(min_value=0), bit=st.integers(0, 7), swap=values)
def test_mutated_envelopes_are_rejected(me, part, pos, bit, swap):
    from photon_p2p.swarm.validators import check_envelope

    pid = me.peer_id.to_base58()
    raw = _sign_raw(me, _valid_bodies(pid)[Heartbeat])
    env = msgpack.unpackb(raw)
    flipped = bytearray(env[part])
    flipped[pos % len(flipped)] ^= 1 << bit
    for mutated in ({**env, part: bytes(flipped)}, {**env, part: swap}, {k: v for k, v in env.items() if k != part}):
        data = msgpack.packb(mutated, use_bin_type=True)
        assert _verdict(data, Heartbeat, pid) != ""
        assert check_envelope(data, pid, time.time() + 5, time.time()) != ""


@FUZZ
@given(
    subkey=values,
    value=values,
    expiration=st.floats(allow_nan=True, allow_infinity=True),
    raw_sub=st.binary(max_size=60),
)
def test_store_time_validator_never_raises_and_accepts_only_known_shapes(me, subkey, value, expiration, raw_sub):
    from hivemind.dht.protocol import DHTProtocol

    from photon_p2p.swarm.validators import check_record

    ser = DHTProtocol.serializer.dumps
    now = time.time()
    for sub in (ser(subkey), raw_sub, DHTProtocol.IS_REGULAR_VALUE):
        verdict = check_record(b"k" * 20, sub, ser(value), expiration, now)
        assert isinstance(verdict, str)
        if verdict == "":  # only hivemind's averager entries can pass without a signature
            assert value is None or type(value) in (bool, int, float)


class _Calls:
    """What a reader gets from ``DHTCalls.get``: a dict of subkey -> entry with ``.value``, as hivemind returns."""

    def __init__(self, entries: Any):
        self.entries = entries

    def get(self, key: str, *, latest: bool = True, timeout: float = 10.0) -> Any:
        return SimpleNamespace(value=self.entries, expiration_time=time.time() + 10)


@FUZZ
@given(
    entries=st.one_of(
        values,
        st.dictionaries(
            values.filter(lambda v: isinstance(v, (str, bytes, int))),
            st.builds(SimpleNamespace, value=values),
            max_size=4,
        ),
    )
)
def test_readers_drop_and_count_garbage(me, entries):
    from photon_p2p.swarm.heartbeat import read_contributions, read_heartbeats
    from photon_p2p.swarm.manifest import fetch_manifests, list_runs

    rejects = RejectCounter()
    calls = _Calls(entries)
    assert read_heartbeats(calls, "r", rejects, include_left=True) == {}
    assert read_contributions(calls, "r", rejects) == {}
    assert fetch_manifests(calls, "r", rejects) == []
    assert list_runs(calls, rejects) == []
    assert rejects.total == (4 * len(entries) if isinstance(entries, dict) else 0)


def test_readers_drop_stale_future_and_replayed_heartbeats(me):
    """Heartbeats dated beyond the clock skew ahead, or older than their TTL, are dropped and counted; a real
    SwarmView refuses a peer's heartbeat older than one it has already read (a replay cannot roll a peer's round
    back or bring back a peer that said goodbye)."""
    from photon_p2p.swarm.records import Heartbeat, sign_record
    from photon_p2p.swarm.view import SwarmView

    pid = me.peer_id.to_base58()
    body = _valid_bodies(pid)[Heartbeat]

    def entry(**changes):
        return {pid: SimpleNamespace(value=sign_record(Heartbeat(**{**body, **changes}), me))}

    from photon_p2p.swarm.heartbeat import read_heartbeats

    for when, reason in (
        (time.time() + 3600, "heartbeat: dated in the future"),
        (time.time() - 3600, "heartbeat: too old"),
    ):
        rejects = RejectCounter()
        assert read_heartbeats(_Calls(entry(time=when)), "r", rejects) == {}
        assert rejects.counts == {reason: 1}

    calls = _Calls(entry(round=5, time=time.time()))
    rejects = RejectCounter()
    view = SwarmView(calls, "r", "0" * 64, "someone-else", rejects)
    view.refresh()
    assert view.peers()[pid].hb.round == 5
    calls.entries = entry(round=2, time=time.time() - 5)  # an older heartbeat of the same peer, replayed
    view.refresh()
    assert view.peers()[pid].hb.round == 5 and rejects.counts == {"heartbeat: older than one already seen": 1}
    calls.entries = entry(round=6, stage="left", time=time.time())  # goodbye
    view.refresh()
    assert pid not in view.peers()
    calls.entries = entry(round=5, time=time.time() - 3)  # a replay from before the goodbye
    view.refresh()
    assert pid not in view.peers(), "a replayed heartbeat brought back a peer that left"
    calls.entries = entry(round=7, time=time.time())  # the peer really comes back (newer record)
    view.refresh()
    assert view.peers()[pid].hb.round == 7


def test_a_joiner_sees_whether_the_swarm_agrees_on_one_state(tmp_path):
    """SwarmView.state_agreed (what a joiner waits for before downloading, swarm/rounds.py catch_up): after a failed
    all-reduce two live peers at round 17 hold different theta, so no state there has a voucher besides its donor;
    once they average together again (round 18, one hash) it has."""
    from photon_p2p.swarm.identity import Identity
    from photon_p2p.swarm.records import Heartbeat, sign_record
    from photon_p2p.swarm.view import SwarmView

    ids = [Identity.ephemeral(tmp_path) for _ in range(2)]

    def beats(*states):
        out = {}
        for ident, (round_, theta) in zip(ids, states, strict=True):
            pid = ident.peer_id.to_base58()
            body = {**_valid_bodies(pid)[Heartbeat], "round": round_, "theta_hash": theta, "time": time.time()}
            out[pid] = SimpleNamespace(value=sign_record(Heartbeat(**body), ident))
        return out

    calls = _Calls(beats((17, "a" * 16), (17, "b" * 16)))
    view = SwarmView(calls, "r", "0" * 64, "the-joiner", RejectCounter())
    view.refresh()
    assert view.state_agreed(17, peers=1)  # a lone donor would do
    assert not view.state_agreed(17, peers=2), "two different thetas count as agreement"
    time.sleep(0.01)
    calls.entries = beats((18, "c" * 16), (18, "c" * 16))
    view.refresh()
    assert view.state_agreed(17, peers=2) and view.state_agreed(18, peers=2)
    assert not view.state_agreed(19, peers=1)  # nobody is at round 19
