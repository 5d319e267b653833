"""Private runs (issue 16 point 5): only peers holding a token issued by the run's owner get in.

What this proves:
- ``photon-bootstrap issue-token`` creates the owner key with mode 0600, prints one line (never the key), and writes
  a token that verifies against the owner's key; bad flags are one-line errors.
- The token checks on real keys: a valid token passes; an expired one, one signed by another key, one for another
  peer ID and one for another run are each refused with a reason.
- At the protocol level, between real hivemind DHT nodes: the DHT of a private run refuses a store and a get sent
  without a token, with an expired one, with a forged one and with another peer's (each call reaches the node and
  comes back with the refusal line), while a member's store and get work and its record stays intact.
- With real processes: a private bootstrap and two token-holding peers train and average; a peer without a token
  and peers with an expired and a forged token each exit with the one refusal line (no traceback)
  after really trying (the bootstrap logs the refused DHT requests); an outsider that reaches a member's averager
  directly is refused at rpc_join_group, rpc_download_state and the state-transfer RPC and gets no theta; a peer
  whose token expires mid-run says so and stops cleanly with its checkpoint.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers.procs import LOOPBACK, console
from tests.helpers.swarm import start_bootstrap, write_corpus

RUN = "priv"
SECRET_KEY = f"photon.{RUN}.contributions"  # a key of the run the members write, an outsider must not
REFUSAL = re.compile(r"run priv is private: this peer has no valid token \(([^)]*)\)")


def issue(
    tmp: Path, owner: str, out: str, *who: str, expires: str = "1h", run: str = RUN
) -> subprocess.CompletedProcess:
    return subprocess.run(
        console("photon-bootstrap")
        + ["issue-token", "--owner-key", str(tmp / owner), *who, "--run-id", run, "--expires", expires, "--out", out],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=120,
    )


# ---------------------------------------------------------------------------------------------------------------
# tokens and the CLI


def write_token(tmp: Path, owner: str, name: str, seconds: float) -> None:
    """``name``.token for identity ``name``.key, as issue-token writes it (in this process: no CLI start-up)."""
    from photon_p2p.swarm.access import issue_token, load_or_create_owner_key
    from photon_p2p.swarm.identity import Identity

    key, _ = load_or_create_owner_key(tmp / owner)
    peer_id = Identity.load_or_create(tmp / f"{name}.key").peer_id.to_base58()
    token = issue_token(key, run_id=RUN, peer_id=peer_id, expires_at=time.time() + seconds)
    (tmp / f"{name}.token").write_text(token.to_json())


def test_issue_token_cli(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from photon_p2p.swarm.access import load_token, parse_owner_public
    from photon_p2p.swarm.identity import Identity

    result = issue(tmp_path, "owner.key", "b.token", "--peer-identity", str(tmp_path / "b.key"), expires="7d")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("issued a token for peer "), result.stdout
    assert stat.S_IMODE((tmp_path / "owner.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "b.key").stat().st_mode) == 0o600
    pem = (tmp_path / "owner.key").read_text()
    secret = "".join(pem.strip().splitlines()[1:-1])
    assert secret not in result.stdout + result.stderr  # the private key is never printed
    token = load_token(tmp_path / "b.token")
    assert token.peer_id == Identity.load_or_create(tmp_path / "b.key").peer_id.to_base58()
    assert token.run_id == RUN and token.signed_by(parse_owner_public(token.owner))
    assert 6.9 * 86400 < token.expires_at - time.time() <= 7 * 86400

    # bad input: one line each, exit 2 (in this process: the CLI's main(), as the console script calls it)
    def fails(*argv: str) -> str:
        from photon_p2p.cli.bootstrap import main

        capsys.readouterr()
        assert main(["issue-token", "--owner-key", str(tmp_path / "owner.key"), "--out", "x", *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("error: ") and not (tmp_path / "x").exists(), err
        return err

    b_key = str(tmp_path / "b.key")
    assert "--peer 'not-a-peer-id'" in fails("--peer", "not-a-peer-id", "--run-id", RUN)
    assert "--expires 'soon'" in fails("--peer-identity", b_key, "--run-id", RUN, "--expires", "soon")
    assert "--run-id 'a b'" in fails("--peer-identity", b_key, "--run-id", "a b")
    os.chmod(tmp_path / "owner.key", 0o644)
    assert "chmod 600" in fails("--peer-identity", b_key, "--run-id", RUN)


def _keys(tmp_path):
    from photon_p2p.swarm.access import load_or_create_owner_key
    from photon_p2p.swarm.identity import Identity

    owner, _ = load_or_create_owner_key(tmp_path / "owner.key")
    other, _ = load_or_create_owner_key(tmp_path / "other.key")
    return owner, other, Identity.load_or_create(tmp_path / "a.key"), Identity.load_or_create(tmp_path / "b.key")


def test_token_checks(tmp_path):
    from photon_p2p.swarm.access import RunAccess, Token, issue_token

    owner, other, a, b = _keys(tmp_path)
    later = time.time() + 3600
    mine = issue_token(owner, run_id=RUN, peer_id=a.peer_id.to_base58(), expires_at=later)
    access = RunAccess(mine, a)
    assert access.own_problem() is None
    b_id = b.peer_id.to_base58()
    assert access.why_invalid(issue_token(owner, run_id=RUN, peer_id=b_id, expires_at=later), b_id) is None
    assert access.why_invalid(None, b_id) == "none given"
    expired = issue_token(owner, run_id=RUN, peer_id=b_id, expires_at=time.time() - 5)
    assert access.why_invalid(expired, b_id).startswith("expired 20")
    forged = issue_token(other, run_id=RUN, peer_id=b_id, expires_at=later)
    assert "signed by another key" in access.why_invalid(forged, b_id)
    assert "issued for peer" in access.why_invalid(mine, b_id)  # a's token presented by b
    assert "issued for run other" in access.why_invalid(
        issue_token(owner, run_id="other", peer_id=b_id, expires_at=later), b_id
    )
    # a token whose terms were edited after signing (a later expiry) no longer verifies
    edited = Token(
        RUN,
        b_id,
        int(later) + 10**6,
        mine.owner,
        issue_token(owner, run_id=RUN, peer_id=b_id, expires_at=later).signature,
    )
    assert access.why_invalid(edited, b_id) == "not signed by the run owner key"
    assert Token.from_json(mine.to_json()) == mine
    for garbage in (b"", b"{}", b"[1]", b"x" * 5000, json.dumps({"kind": "photon-p2p-run-token"}).encode()):
        with pytest.raises(ValueError):
            Token.from_json(garbage)


# ---------------------------------------------------------------------------------------------------------------
# the DHT, at the protocol level


async def _call(p2p, peer, method, request, response_type):
    return await asyncio.wait_for(p2p.call_protobuf_handler(peer, f"DHTProtocol.{method}", request, response_type), 20)


@pytest.mark.slow
def test_private_dht_refuses_store_and_get(tmp_path):
    from hivemind.p2p import P2P, P2PHandlerError
    from hivemind.proto import dht_pb2
    from hivemind.utils.serializer import MSGPackSerializer

    from photon_p2p.swarm.access import PrivateRunAuthorizer, RunAccess, issue_token
    from photon_p2p.swarm.dht import DHTCalls, start_dht, stop_dht, visible_maddrs
    from photon_p2p.swarm.identity import Identity
    from photon_p2p.swarm.records import Contribution, sign_record

    owner, other, a, b = _keys(tmp_path)
    later = time.time() + 3600
    access_a = RunAccess(issue_token(owner, run_id=RUN, peer_id=a.peer_id.to_base58(), expires_at=later), a)
    access_b = RunAccess(issue_token(owner, run_id=RUN, peer_id=b.peer_id.to_base58(), expires_at=later), b)
    c = Identity.load_or_create(tmp_path / "c.key")
    c_id = c.peer_id.to_base58()
    outsiders = {
        "none given": None,
        "expired": RunAccess(issue_token(owner, run_id=RUN, peer_id=c_id, expires_at=time.time() - 60), c),
        "issued for peer": RunAccess(
            issue_token(owner, run_id=RUN, peer_id=a.peer_id.to_base58(), expires_at=later), c
        ),
        "not signed by the run owner key": RunAccess(issue_token(other, run_id=RUN, peer_id=c_id, expires_at=later), c),
    }
    node_a = node_b = None
    try:
        node_a = start_dht(
            initial_peers=[], host_maddrs=[LOOPBACK], identity=a, authorizer=PrivateRunAuthorizer(access_a)
        )
        maddr = visible_maddrs(node_a)[0]
        node_b = start_dht(
            initial_peers=[maddr], host_maddrs=[LOOPBACK], identity=b, authorizer=PrivateRunAuthorizer(access_b)
        )
        calls_b = DHTCalls(node_b)
        # a real record of the run (every node also validates records at store time: no plain values)
        b_id = b.peer_id.to_base58()
        now = time.time()
        secret = sign_record(
            Contribution(peer_id=b_id, run_id=RUN, tokens=1, rounds=1, rounds_averaged=1, first_seen=now, time=now),
            b,
        )
        assert calls_b.store(SECRET_KEY, secret, now + 600, subkey=b_id)

        def held(calls: DHTCalls) -> bytes | None:
            found = calls.get(SECRET_KEY)
            entry = found.value.get(b_id) if found is not None and isinstance(found.value, dict) else None
            return getattr(entry, "value", None)

        assert held(DHTCalls(node_a)) == secret

        async def attack() -> dict[str, list[str]]:
            from hivemind.dht.routing import DHTID

            p2p = await P2P.create(initial_peers=[maddr])
            refusals: dict[str, list[str]] = {}
            try:
                for name, access in outsiders.items():
                    authorizer = PrivateRunAuthorizer(access) if access is not None else None
                    key = DHTID.generate(source=SECRET_KEY).to_bytes()
                    store = dht_pb2.StoreRequest(
                        keys=[key],
                        values=[MSGPackSerializer.dumps("hijacked")],
                        expiration_time=[time.time() + 10**6],
                        subkeys=[MSGPackSerializer.dumps(None)],
                        in_cache=[False],
                    )
                    find = dht_pb2.FindRequest(keys=[key])
                    for method, request, reply in (
                        ("rpc_store", store, dht_pb2.StoreResponse),
                        ("rpc_find", find, dht_pb2.FindResponse),
                    ):
                        if authorizer is not None:
                            await authorizer.sign_request(request, None)
                        with pytest.raises(P2PHandlerError) as refused:
                            await _call(p2p, node_a.peer_id, method, request, reply)
                        refusals.setdefault(name, []).append(str(refused.value))
            finally:
                await p2p.shutdown()
            return refusals

        refusals = asyncio.run(attack())
        for name, errors in refusals.items():
            assert len(errors) == 2  # the store and the get both reached node a, and both were refused
            for error in errors:
                assert f"run {RUN} is private: this peer has no valid token ({name}" in error, error
        # the members lost nothing: the record is still theirs, and they still talk to each other
        assert held(DHTCalls(node_a)) == secret
        assert held(calls_b) == secret
    finally:
        stop_dht(node_b)
        stop_dht(node_a)


# ---------------------------------------------------------------------------------------------------------------
# real processes: a private bootstrap, two members, four refused peers, an outsider at the averager


async def _attack_averager(member_maddr: str, prefix: str) -> dict[str, str]:
    """Reach a member's averager directly (as if the DHT had been bypassed): join, download, describe."""
    import msgpack
    from hivemind.p2p import P2P, PeerID
    from hivemind.proto import averaging_pb2

    member = PeerID.from_base58(member_maddr.rsplit("/p2p/", 1)[1])
    p2p = await P2P.create(initial_peers=[member_maddr])
    outcome: dict[str, str] = {}
    calls = {
        "join": (
            "rpc_join_group",
            averaging_pb2.JoinRequest(expiration=time.time() + 30),
            averaging_pb2.MessageFromLeader,
        ),
        "download": ("rpc_download_state", averaging_pb2.DownloadRequest(), averaging_pb2.DownloadData),
        "describe": (
            "rpc_photon_state_describe",
            averaging_pb2.DownloadData(metadata=msgpack.packb({"want": b""})),
            averaging_pb2.DownloadData,
        ),
    }
    try:
        for what, (method, request, reply) in calls.items():
            received = []
            try:
                stream = await p2p.iterate_protobuf_handler(
                    member, f"{prefix}::PhotonAverager.{method}", request, reply
                )
                async for message in stream:
                    received.append(message)
                outcome[what] = f"no error; received {len(received)} messages"
            except Exception as e:
                outcome[what] = f"{e} (received {len(received)} messages)"
    finally:
        await p2p.shutdown()
    return outcome


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_private_run_with_real_processes(procs, tmp_path):
    from tests.helpers.peers import rounds
    from tests.helpers.procs import wait_until
    from tests.helpers.swarm import assert_one_line_error, peer_args, run_cli_batch

    data, cache = write_corpus(tmp_path / "data"), tmp_path / "cache"
    for name, expires, owner in (
        ("boot", 3600, "owner.key"),
        ("alice", 3600, "owner.key"),
        ("late", -60, "owner.key"),  # expired
        ("forger", 3600, "other-owner.key"),  # signed by a self-made owner key
    ):
        write_token(tmp_path, owner, name, expires)
    boot, maddr = start_bootstrap(
        procs, tmp_path, "bootstrap", "--token", str(tmp_path / "boot.token"), identity=tmp_path / "boot.key"
    )
    # bob's token expires mid-run (issued last, so that the run has time to average first): bob must stop cleanly
    write_token(tmp_path, "owner.key", "bob", 300)
    members = {}
    for name in ("alice", "bob"):
        args = peer_args(
            maddr,
            data,
            cache,
            "--identity-path",
            str(tmp_path / f"{name}.key"),
            "--token",
            str(tmp_path / f"{name}.token"),
            "--matchmaking-time",
            "3",
            "--metrics-file",
            "metrics.jsonl",
            "--checkpoint-dir",
            str(tmp_path / f"{name}-ckpt"),
            "--threads",
            "1",
            # never the end of the run: alice is stopped by SIGTERM and bob by his token's expiry, however fast
            "--max-steps",
            "1000000",
            run_id=RUN,
        )
        members[name] = procs.start(args, name=name)
    alice, bob = members["alice"], members["bob"]
    manifest = alice.wait_for(rf"run '{RUN}'.*\(manifest ([0-9a-f]{{12}})\)", 180).group(1)
    alice_maddr = alice.wait_for(r"initial-peers (/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+)", 60).group(1)

    # refused peers, side by side (each tries the bootstrap's DHT, which refuses it)
    refused = {
        "no-token": ["--identity-path", str(tmp_path / "nobody.key")],
        "expired": ["--identity-path", str(tmp_path / "late.key"), "--token", str(tmp_path / "late.token")],
        "forged": ["--identity-path", str(tmp_path / "forger.key"), "--token", str(tmp_path / "forger.token")],
    }
    results = run_cli_batch(
        {name: peer_args(maddr, data, cache, *extra, "--threads", "1", run_id=RUN) for name, extra in refused.items()},
        tmp_path / "refused",
        timeout=240,
    )
    reasons = {}
    for name, result in results.items():
        line = assert_one_line_error(result, f"run {RUN} is private: this peer has no valid token (")
        reasons[name] = REFUSAL.search(line).group(1)
    assert reasons["no-token"] == "none given"
    assert reasons["expired"].startswith("expired 20")
    assert reasons["forged"] == "not signed by the run owner key"
    # they really tried: the bootstrap refused their DHT requests, one log line per reason
    boot.wait_for(r"refused a DHT request: run priv is private and the sender has no valid token \(none given\)", 30)
    boot.wait_for(r"refused a DHT request: .*\(expired 20", 30)
    boot.wait_for(r"refused a DHT request: .*\(not signed by the run owner key\)", 30)

    # an outsider who reaches alice's averager directly is refused at every door and gets no theta
    attack = asyncio.run(_attack_averager(alice_maddr, f"photon_{RUN}_{manifest}"))
    for what in ("join", "download", "describe"):
        assert f"run {RUN} is private: this peer has no valid token (none given)" in attack[what], attack
        assert "(received 0 messages)" in attack[what], attack
    alice.wait_for(r"refused to let \w+ join its averaging group: run priv is private", 30)
    alice.wait_for(r"refused to let \w+ download its state", 30)

    # the members lost nothing: they average together (as before the attacks), then alice leaves cleanly
    def averaged_after(n: int):
        return [r for r in rounds(alice).values() if r["outcome"] == "averaged" and r.get("group_size") == 2][n:]

    seen = len(averaged_after(0))
    wait_until(lambda: averaged_after(seen), 240, what="alice and bob average after the attacks")
    alice.signal_group(signal.SIGTERM)
    assert alice.wait(120) == 0, alice.output()[-4000:]
    assert "Traceback" not in alice.stderr and "Traceback" not in boot.stderr

    # bob's token expires mid-run: it says so and stops cleanly, checkpoint saved
    assert bob.wait(400) == 0, bob.output()[-4000:]
    assert re.search(r"run priv: this peer's token expired 20.*: stopping", bob.output()), bob.output()[-3000:]
    assert "checkpoint saved" in bob.output()
    assert any((tmp_path / "bob-ckpt").iterdir())
