"""photon-status against a live run, and what a reader does with records it must not trust.

One swarm serves the whole module: a photon-bootstrap, a raw hivemind DHT in this test process (our attacker),
and one real photon-peer. Before the peer starts, the attacker publishes two bad manifests for its run: a *forged*
one (a valid body that claims to be older and has --local-steps 7, carrying a signature made over another body)
and an *unsigned* one. Proves that the peer ignores both and creates the genuine run (it would otherwise have been
refused for its --local-steps 5), and that photon-status --json lists that live peer with the genuine manifest
(neither record reaches its reader: every validating node refused them). Then the attacker writes malformed
heartbeats (garbage bytes, a dict, an unsigned body, a record signed by one key under another peer's ID, an extra
field, a NaN tokens/s, a non-string subkey): photon-status still lists only the real peer (every validating node
refused the records, swarm/validators.py), and the peer keeps training. Also: the table and --watch output
(Ctrl-C exits 0), an unknown run id (the error lists the runs seen), a peer whose explicit settings conflict with
the run (refused with the differing fields), and bad addresses. Pure functions
(parameter count, rendering of hostile strings) are checked without a swarm.
"""

from __future__ import annotations

import json
import math
import re
import signal
import time

import msgpack
import pytest

from photon_p2p.status import CLEAR_SCREEN, count_parameters, human_count, render, short_peer_id
from tests.helpers.procs import LOOPBACK, ProcessPool, all_gone, console
from tests.helpers.swarm import (
    assert_one_line_error,
    heartbeat_fields,
    micro_manifest,
    peer_args,
    run_cli_batch,
    signed_run,
    start_bootstrap,
    wait_for_heartbeats,
    write_corpus,
)

RUN = "t"


def _store(dht, key: str, value, subkey, ttl: float = 300.0) -> None:
    from hivemind.utils.timed_storage import get_dht_time

    # the attacker's own node keeps it either way; what hivemind returns is the verdict of the last node it asked,
    # and every validating node refuses these (swarm/validators.py)
    dht.store(key, value, get_dht_time() + ttl, subkey=subkey)


def _bad_manifests(dht, work) -> None:
    """A forged manifest (signature over another body) and an unsigned one, under the run's manifest key."""
    from photon_p2p.swarm.identity import Identity
    from photon_p2p.swarm.manifest import manifest_key
    from photon_p2p.swarm.records import encode_body

    forger = Identity.ephemeral(work)
    genuine = signed_run(micro_manifest(RUN), forger, created_at=time.time() - 3600)
    tampered = signed_run(micro_manifest(RUN, local_steps=7), forger, created_at=time.time() - 3600)
    envelope = msgpack.unpackb(genuine.raw)
    envelope["b"] = encode_body(tampered.record)  # the body says local_steps 7; the signature covers local_steps 5
    _store(dht, manifest_key(RUN), msgpack.packb(envelope, use_bin_type=True), forger.peer_id.to_base58())
    unsigned = Identity.ephemeral(work)
    _store(
        dht,
        manifest_key(RUN),
        encode_body(signed_run(micro_manifest(RUN), unsigned).record),
        unsigned.peer_id.to_base58(),
    )


def _malformed_heartbeats(dht, work) -> list[str]:
    """Every way a heartbeat can be wrong, stored under the run's heartbeat key; returns the reasons to count."""
    from photon_p2p.swarm.heartbeat import heartbeat_key
    from photon_p2p.swarm.identity import Identity
    from photon_p2p.swarm.records import Heartbeat, canonical, sign_record

    key = heartbeat_key(RUN)
    ids = [Identity.ephemeral(work) for _ in range(7)]  # one per record: a subkey holds one value
    pid = [i.peer_id.to_base58() for i in ids]

    def beat(identity, **changes) -> dict:
        this_run = dict(run_id=RUN, round=1, step=5, tokens=100, tokens_per_s=10.0)
        return heartbeat_fields(identity.peer_id.to_base58(), **{**this_run, **changes})

    def sign_raw(identity, body: dict) -> bytes:  # a valid signature over whatever body we like, schema or not
        packed = msgpack.packb(canonical(body), use_bin_type=True)
        return msgpack.packb({"b": packed, "k": identity.public_key_der, "s": identity.sign(packed)}, use_bin_type=True)

    _store(dht, key, b"\x00garbage\xff", pid[0])
    _store(dht, key, {"peer_id": pid[1], "tokens_per_s": 1e9}, pid[1])
    _store(dht, key, msgpack.packb(beat(ids[2]), use_bin_type=True), pid[2])  # a body without any signature
    _store(dht, key, sign_record(Heartbeat(**beat(ids[0])), ids[0]), pid[3])  # peer 0's record under peer 3's ID
    _store(dht, key, sign_raw(ids[4], {**beat(ids[4]), "admin": True}), pid[4])
    _store(dht, key, sign_raw(ids[5], beat(ids[5], tokens_per_s=math.nan)), pid[5])
    _store(dht, key, sign_raw(ids[6], beat(ids[6])), 12345)
    return [
        "heartbeat: not msgpack",
        "heartbeat: not bytes or too large",
        "heartbeat: not a signed envelope",
        "heartbeat: signed by another peer",
        "heartbeat: schema",
        "heartbeat: subkey is not a peer ID",
    ]


def _one_shot_commands(maddr: str, work) -> dict[str, list[str]]:
    status = console("photon-status")
    made_up = "/ip4/127.0.0.1/tcp/9/p2p/QmbMExRXwcK3vMoz1geMPzPq2XxGQLbkLQYDvkn6XKcpPj"
    return {
        "json": status + ["--initial-peers", maddr, "--run-id", RUN, "--json"],
        "table": status + ["--initial-peers", maddr, "--run-id", RUN],
        "unknown": status + ["--initial-peers", maddr, "--run-id", "no-such-run"],
        "bad_maddr": status + ["--initial-peers", "/ip4/127.0.0.1/tcp/31337/p2p", "--run-id", RUN],
        "no_peer_id": status + ["--initial-peers", "/ip4/127.0.0.1/tcp/31337", "--run-id", RUN],
        "unreachable": status + ["--initial-peers", made_up, "--run-id", RUN, "--join-timeout", "2"],
        "bad_run_id": status + ["--initial-peers", maddr, "--run-id", "no spaces"],
        "conflict": peer_args(maddr, work / "corpus", work / "cache2", "--model", "tiny", "--local-steps", "7"),
    }


@pytest.fixture(scope="module")
def live_run(tmp_path_factory):
    import hivemind

    work = tmp_path_factory.mktemp("status")
    pool = ProcessPool(work)
    dht = None
    try:
        boot, boot_maddr = start_bootstrap(pool, work)
        dht = hivemind.DHT(initial_peers=[boot_maddr], host_maddrs=[LOOPBACK], start=True)
        _bad_manifests(dht, work)
        peer = pool.start(peer_args(boot_maddr, write_corpus(work / "corpus"), work / "cache"), name="peer")
        peer_id = peer.wait_for(r"initial-peers /ip4/127\.0\.0\.1/tcp/\d+/p2p/(\w+)", 90).group(1)
        from photon_p2p.swarm.dht import DHTCalls

        wait_for_heartbeats(DHTCalls(dht), RUN, 1, watch=[peer])
        expected_rejects = _malformed_heartbeats(dht, work)
        # the long-running watchers first, then every one-shot command side by side (each mostly pays for
        # importing torch and hivemind, so together they take about half the time)
        watchers = {
            name: pool.start(
                console("photon-status") + ["--initial-peers", boot_maddr, "--run-id", RUN, "--watch", "1", *extra],
                name=name,
            )
            for name, extra in (("watch", []), ("watch-json", ["--json"]))
        }
        runs = run_cli_batch(_one_shot_commands(boot_maddr, work), work / "cli")
        yield dict(
            work=work,
            boot=boot,
            maddr=boot_maddr,
            dht=dht,
            peer=peer,
            peer_id=peer_id,
            runs=runs,
            watchers=watchers,
            expected_rejects=expected_rejects,
        )
    finally:
        if dht is not None:
            dht.shutdown()
        pool.close()


@pytest.fixture(scope="module")
def status(live_run):
    result = live_run["runs"]["json"]
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_forged_and_unsigned_manifests_are_ignored(live_run, status):
    assert "started run 't'" in live_run["peer"].stderr, "the peer created the genuine run"
    manifest = status["manifest"]
    assert manifest["creator"] == live_run["peer_id"], "the forged record (claiming to be older) must not win"
    assert manifest["local_steps"] == 5 and manifest["candidates"] == 1
    # every node refuses both at store time and on retrieval (swarm/validators.py): they never reach the reader,
    # whose own counting of bad records is fuzzed in tests/test_record_fuzz.py
    assert not any(r.startswith("manifest") for r in status["rejected_reasons"]), status["rejected_reasons"]


def test_json_lists_the_live_peer(live_run, status):
    assert set(status) >= {"run_id", "manifest", "peers", "total_tokens_per_s", "rejected_records"}
    assert status["run_id"] == RUN
    [row] = status["peers"]
    assert set(row) == {
        "peer_id",
        "stage",
        "round",
        "step",
        "tokens",
        "tokens_per_s",
        "loss",
        "val_ppl",
        "device",
        "version",
        "last_seen_s",
        "client_mode",
        "theta_hash",
        "last_round",
    }
    assert isinstance(status["leaderboard"], list) and isinstance(status["theta_agreement"], dict)
    assert row["peer_id"] == live_run["peer_id"] and row["device"] == "cpu" and row["version"] == "0.1.0"
    assert row["last_seen_s"] < 15 and row["client_mode"] is False
    assert status["total_tokens_per_s"] == pytest.approx(row["tokens_per_s"], abs=0.1)
    m = status["manifest"]
    assert m["model_preset"] == "micro" and m["tokenizer"] == "byte" and m["tokenizer_vocab"] == 257
    assert m["outer_optimizer"] == "fedavg" and m["outer_lr"] == 1.0 and m["compression"] == "fp16"
    assert m["max_steps"] == 10000 and m["model"]["vocab_size"] == 320
    assert m["parameters"] == count_parameters(_shape(m["model"]))


def _shape(model: dict):
    from photon_p2p.swarm.records import ModelShape

    return ModelShape(**model)


def test_malformed_heartbeats_are_dropped_and_counted(live_run, status):
    assert [p["peer_id"] for p in status["peers"]] == [live_run["peer_id"]]
    # refused by every node that validates (the attacker's own node still holds them and answers searches with
    # them; readers' nodes drop those answers), so nothing bad reaches photon-status's reader
    assert not any(r.startswith("heartbeat") for r in status["rejected_reasons"]), status["rejected_reasons"]
    assert live_run["peer"].alive(), "bad records never crash a peer that reads them"


def test_table(live_run):
    result = live_run["runs"]["table"]
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"run {RUN}  manifest " in out and "model micro: 127.30k parameters" in out
    assert "tokenizer byte (257 tokens)" in out and "5 local steps per round, outer fedavg lr 1" in out
    assert re.search(r"PEER\s+STAGE\s+ROUND\s+STEP\s+TOKENS/S\s+LOSS\s+VAL PPL\s+DEVICE\s+SEEN", out)
    assert short_peer_id(live_run["peer_id"]) in out
    assert "1 live peer, total throughput" in out


def test_unknown_run_lists_runs_seen(live_run):
    result = live_run["runs"]["unknown"]
    assert_one_line_error(result, "run 'no-such-run' was not found in the swarm (runs seen: t)")
    assert result.returncode == 2


@pytest.mark.parametrize(
    "case, needles",
    [
        ("bad_maddr", ("--initial-peers", "not a valid multiaddr")),
        ("no_peer_id", ("--initial-peers", "missing the /p2p/<peer ID> part")),
        ("unreachable", ("none of the initial peers answered within 2s", "/tcp/9/p2p/QmbMEx")),
        ("bad_run_id", ("--run-id 'no spaces'",)),
    ],
)
def test_bad_input(live_run, case, needles):
    assert_one_line_error(live_run["runs"][case], *needles)


def test_conflicting_settings_are_refused(live_run):
    line = assert_one_line_error(live_run["runs"]["conflict"], "run 't' exists with different settings")
    assert "model.d_model: run 64, yours 128" in line and "round.local_steps: run 5, yours 7" in line
    assert live_run["peer"].alive()


def test_watch_redraws_until_ctrl_c(live_run):
    proc = live_run["watchers"]["watch"]
    proc.wait_for(f"(?s)({re.escape(CLEAR_SCREEN)}.*){{3}}", 60)
    assert "refreshing every 1s; Ctrl-C to quit" in proc.stdout
    assert short_peer_id(live_run["peer_id"]) in proc.stdout.rsplit(CLEAR_SCREEN, 1)[1]
    children = proc.descendants()
    proc.popen.send_signal(signal.SIGINT)
    assert proc.wait(30) == 0, proc.output()[-3000:]
    assert all_gone(children) == []


def test_json_watch_prints_one_object_per_refresh(live_run):
    proc = live_run["watchers"]["watch-json"]
    proc.wait_for(r"(?s)\{.*\n\{.*\n", 60)
    children = proc.descendants()
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert all_gone(children) == []
    objects = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(objects) >= 2 and all(o["run_id"] == RUN and o["peers"] for o in objects)


# --------------------------------------------------------------------------------------------------------------
# pure functions


@pytest.mark.parametrize(
    "preset, kwargs", [("micro", {}), ("tiny", {"tie_embeddings": False}), ("125m", {"seq_len": 512})]
)
def test_parameter_count_matches_the_model(preset, kwargs):
    import torch

    from photon_p2p.model import Transformer, build_model_args
    from photon_p2p.swarm.records import ModelShape

    args = build_model_args(preset, vocab_size=320, **kwargs)
    with torch.device("meta"):
        expected = Transformer(args).num_params()
    assert count_parameters(ModelShape(**args.to_dict())) == expected


def test_parameter_count_with_grouped_query_attention():
    import torch

    from photon_p2p.model import ModelArgs, Transformer
    from photon_p2p.swarm.records import ModelShape

    args = ModelArgs(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=32)
    with torch.device("meta"):
        assert count_parameters(ModelShape(**args.to_dict())) == Transformer(args).num_params()


def _status(**peer_changes) -> dict:
    peer = dict(
        peer_id="QmZwA7hXFpweo4o6g76bhKNrueWevg1k1BVW7R4UUZ32Kg",
        stage="training",
        round=3,
        step=15,
        tokens=15360,
        tokens_per_s=1234.5,
        loss=5.5,
        val_ppl=None,
        device="cpu",
        version="0.1.0",
        last_seen_s=1.0,
        client_mode=False,
    )
    peer.update(peer_changes)
    manifest = dict(
        hash="ab" * 32,
        creator=peer["peer_id"],
        created_at=time.time() - 90,
        protocol=1,
        software="0.1.0",
        model_preset="micro",
        parameters=127296,
        model=dict(n_layers=2, d_model=64, max_seq_len=64),
        tokenizer="byte",
        tokenizer_vocab=257,
        tokenizer_fingerprint="cd" * 32,
        local_steps=5,
        round_seconds=None,
        outer_optimizer="fedavg",
        outer_lr=1.0,
        outer_momentum=0.9,
        compression="fp16",
        max_steps=10000,
        batch_size=16,
        lr=1e-3,
        candidates=1,
    )
    return dict(
        run_id="t",
        manifest=manifest,
        peers=[peer],
        total_tokens_per_s=peer["tokens_per_s"],
        rejected_records=0,
        rejected_reasons={},
    )


def test_render_strips_terminal_escapes_from_untrusted_strings():
    text = render(_status(stage="\x1b[2J\x1b]0;pwned\x07", device="cpu\nFAKE ROW"))
    assert "\x1b" not in text and "\x07" not in text and "FAKE ROW" not in text.splitlines()[0]
    assert not any(line.startswith("FAKE ROW") for line in text.splitlines())


def test_render_rows_and_totals():
    text = render(_status())
    lines = text.splitlines()
    assert lines[0].startswith("run t  manifest abababababab  created by QmZw..UZ32Kg 90s ago")
    assert "1,234" in text and "5.5000" in text and "1 live peer, total throughput 1,234 tokens/s" in text
    assert "dropped" not in text
    empty = _status()
    empty["peers"], empty["rejected_records"], empty["rejected_reasons"] = [], 3, {"heartbeat: schema": 3}
    text = render(empty)
    assert "no live peers" in text and "dropped 3 invalid records: heartbeat: schema (3)" in text


def test_render_theta_agreement_and_leaderboard():
    status = _status(theta_hash="1a2b3c4d5e6f7a8b")
    status["theta_agreement"] = {"1a2b3c4d5e6f7a8b": 1}
    now = time.time()
    status["leaderboard"] = [
        dict(
            peer_id="QmZwA7hXFpweo4o6g76bhKNrueWevg1k1BVW7R4UUZ32Kg",
            tokens=123456,
            rounds=9,
            rounds_averaged=8,
            live=True,
            first_seen=now - 600,
            last_update=now,
        ),
        dict(
            peer_id="QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
            tokens=4096,
            rounds=2,
            rounds_averaged=2,
            live=False,
            first_seen=now - 900,
            last_update=now - 300,
        ),
    ]
    text = render(status)
    assert "theta: the peers at the newest round agree (1 on 1a2b3c4d5e6f)" in text
    board = text[text.index("CONTRIBUTIONS") :].splitlines()
    assert re.match(r"PEER\s+TOKENS\s+ROUNDS\s+AVERAGED", board[1])
    assert re.search(r"QmZw\.\.UZ32Kg\s+123,456\s+9\s+8\s+live", board[2])
    assert re.search(r"QmYy\.\.Wjhx5N\s+4,096\s+2\s+2\s+left 5m ago", board[3])
    status["theta_agreement"] = {"1a2b3c4d5e6f7a8b": 2, "ffffffffffffffff": 1}
    assert "the swarm holds 2 different models: 1a2b3c4d5e6f (2), ffffffffffff (1)" in render(status)


def test_theta_agreement_counts_the_peers_at_the_newest_round():
    from photon_p2p.status import theta_agreement

    def peer(round_, stage, h):
        return dict(round=round_, stage=stage, theta_hash=h)

    peers = [
        peer(5, "training", "aa" * 8),
        peer(5, "ready", "aa" * 8),
        peer(4, "averaging", "bb" * 8),
        peer(9, "syncing", "cc" * 8),
        peer(5, "averaging", "dd" * 8),
    ]
    assert theta_agreement(peers) == {"aa" * 8: 2, "dd" * 8: 1}
    assert theta_agreement([peer(0, "starting", "aa" * 8)]) == {}


def test_small_formatters():
    assert human_count(127296) == "127.30k" and human_count(1.3e9) == "1.30B" and human_count(12) == "12"
    assert short_peer_id("QmZwA7hXFpweo4o6g76bhKNrueWevg1k1BVW7R4UUZ32Kg") == "QmZw..UZ32Kg"
