"""A diverged peer and a stopped peer, with real photon-peer processes on 127.0.0.1.

Proves: a peer whose local model turns NaN (PHOTON_FAULTS nan_update) never offers that update to anyone: it skips
or re-syncs the round, the other peer's theta stays finite, and the two are back in one group with the same theta
afterwards. Ctrl-C (SIGINT to the whole process group, as a terminal sends it) stops a swarm peer between rounds:
exit 130, a checkpoint holding theta, the outer state and the round, no DHT, averager or p2pd left behind, and
``--resume`` continues from that round (SIGTERM stops it the same way, exit 0), while a --resume with other run
settings is refused with a one-line error that names the setting. A far-future round claim that no donor can
serve is ignored after a bounded number of tries; --min-group-size gives up after --quorum-timeout with one line;
a swarm of --client-mode peers says at start that no group can form.
"""

from __future__ import annotations

import math
import signal
import time

import pytest

from photon_p2p.train.checkpoint import latest_checkpoint, load_checkpoint
from tests.helpers.peers import finish, records, rounds, start_bootstrap, start_peer, wait_for_round
from tests.helpers.procs import all_gone, wait_until

pytestmark = pytest.mark.slow


def test_nan_update_is_never_shared_and_the_peer_comes_back(procs, tmp_path):
    cache = tmp_path / "cache"
    entry = start_bootstrap(procs)
    # 20-step rounds, run until the diverged peer has averaged again; then SIGTERM (a clean exit between rounds)
    common = dict(
        run_id="nan",
        cache=cache,
        initial_peers=[entry],
        local_steps=20,
        max_steps=1_000_000,
        extra=["--wait-for-peers", "2", "--eval-every", "100"],
    )
    a = start_peer(procs, "a", **common)
    bad = start_peer(procs, "bad", **common, env={"PHOTON_FAULTS": "nan_update@4"})

    def rejoined() -> bool:
        assert a.alive() and bad.alive(), bad.output()[-3000:]
        return any(r > 4 and rec["outcome"] == "averaged" for r, rec in rounds(bad).items())

    wait_until(rejoined, timeout=240, what="the diverged peer averaging again")
    time.sleep(3)  # let the healthy peer write its record of that round too
    for p in (a, bad):
        p.popen.send_signal(signal.SIGTERM)
    for p in (a, bad):
        finish(p, 60)
    assert "injecting nan_update in round 4" in bad.output(), "the fault was not injected"
    assert "not sharing this round's update" in bad.output()
    bad_r, a_r = rounds(bad), rounds(a)
    assert bad_r[4]["outcome"] in ("skipped", "resynced"), bad_r[4]
    # the healthy peer never averaged with the NaN: round 4 it went on alone or waited, and its theta stayed finite
    assert a_r[4]["group_size"] == 1 or a_r[4]["outcome"] != "averaged", a_r[4]
    assert all(rec["loss"] is None or math.isfinite(rec["loss"]) for rec in a_r.values())
    # and the diverged peer is back: later rounds averaged together, with the same theta
    later = [r for r in set(a_r) & set(bad_r) if r > 4 and a_r[r]["outcome"] == bad_r[r]["outcome"] == "averaged"]
    assert later, f"the peer never rejoined: {[(r, x['outcome']) for r, x in sorted(bad_r.items())]}"
    assert any(a_r[r]["theta_hash"] == bad_r[r]["theta_hash"] for r in later)
    evals = [r["val_loss"] for p in (a, bad) for r in records(p) if r.get("val_loss") is not None]
    assert all(math.isfinite(v) for v in evals)


def test_ctrl_c_saves_between_rounds_and_resume_continues(procs, tmp_path):
    cache, ckpt = tmp_path / "cache", tmp_path / "ckpt"
    extra = ["--checkpoint-dir", str(ckpt), "--checkpoint-every", "1000"]  # only the save on the way out
    peer = start_peer(procs, "peer", run_id="stop", cache=cache, max_steps=100000, extra=extra)
    wait_for_round(peer, 2, timeout=120)
    tree = peer.descendants()
    assert tree, "a swarm peer runs a DHT and an averager process"
    peer.signal_group(signal.SIGINT)
    assert peer.wait(60) == 130, peer.output()[-3000:]
    out = peer.output()
    assert "checkpoint saved" in out and "Traceback" not in out, out[-3000:]
    # p2pd got the SIGINT too and is gone: the peer must notice instead of waiting out hivemind's grace periods
    assert "did not shut down within the grace period" not in out, out[-3000:]
    assert not all_gone(tree, timeout=15), "processes outlived the peer"
    saved = load_checkpoint(latest_checkpoint(ckpt))
    round_saved = max(rounds(peer)) + 1  # the round after the last one it reported
    assert saved.state["round"] == round_saved
    assert "theta" in saved.tensors
    assert saved.state["contribution"]["rounds"] == round_saved  # the leaderboard totals survive a restart
    _export_takes_theta_from_a_ctrl_c_checkpoint(ckpt, tmp_path, saved)
    # other settings (here --max-steps, which shapes the LR schedule) make another run: refused, naming the setting
    other = start_peer(procs, "other", run_id="stop", cache=cache, max_steps=50, extra=extra + ["--resume"])
    assert other.wait(120) == 2, other.output()[-3000:]
    assert "train.max_steps: checkpoint 100000, this run 50" in other.output(), other.output()[-3000:]
    assert "Traceback" not in other.output()
    resumed = start_peer(procs, "resumed", run_id="stop", cache=cache, max_steps=100000, extra=extra + ["--resume"])

    def resumed_rounds() -> dict:
        assert resumed.alive() or rounds(resumed), resumed.output()[-3000:]
        return rounds(resumed)

    first = min(wait_until(resumed_rounds, 120, what="a resumed round"))
    assert first == round_saved, f"resumed at round {first}, the checkpoint was written after round {round_saved - 1}"
    resumed.popen.send_signal(signal.SIGTERM)  # SIGTERM: the same clean stop between rounds, exit 0
    finish(resumed, 60)
    assert "checkpoint saved" in resumed.output()


def _export_takes_theta_from_a_ctrl_c_checkpoint(ckpt, tmp_path, saved) -> None:
    """Saved on Ctrl-C inside a round, the checkpoint's local weights are part-way through that round; photon-export
    must write theta (the swarm's model) unless told --weights local."""
    import torch
    from safetensors.torch import load_file

    from photon_p2p.train.checkpoint import model_from_checkpoint
    from photon_p2p.train.export import hf_state_dict
    from tests.helpers.procs import console
    from tests.helpers.swarm import run_cli

    def exported(*flags: str) -> dict:
        out = tmp_path / f"export{'-'.join(flags)}"
        done = run_cli(console("photon-export") + [str(ckpt), "--output", str(out), *flags], tmp_path)
        assert done.returncode == 0, done.stderr
        return load_file(out / "model.safetensors")

    theta_model, local_model = model_from_checkpoint(saved, "theta"), model_from_checkpoint(saved, "local")
    for p, t in zip(theta_model.parameters(), saved.tensors["theta"].values(), strict=True):
        assert torch.equal(p, t)
    default, local = exported(), exported("--weights", "local")
    want_theta, want_local = hf_state_dict(theta_model), hf_state_dict(local_model)
    assert all(torch.equal(default[k], want_theta[k]) for k in want_theta)
    assert all(torch.equal(local[k], want_local[k]) for k in want_local)
    # (whether theta and the local copy differ depends on where in the round Ctrl-C landed: a lone peer's theta
    # equals its local model between rounds; tests/test_cli_export.py checks a checkpoint where they always differ)


def test_a_far_future_round_claim_that_nobody_can_serve_is_ignored(procs, tmp_path):
    """Before: one validly signed heartbeat claiming round 1000 made every peer re-sync, fail (no donor holds round
    1000), and skip its round without advancing the step: the run never ended. Now a claim is believed only while
    some donor can serve it; after a bounded number of failed downloads it is ignored (one log line) and the run
    ends normally, on one theta."""
    import threading

    from hivemind.utils.timed_storage import get_dht_time

    from photon_p2p.swarm.heartbeat import heartbeat_key
    from photon_p2p.swarm.identity import Identity
    from photon_p2p.swarm.records import Heartbeat, sign_record
    from tests.helpers.swarm import dht_client, heartbeat_fields, wait_for_heartbeats

    cache = tmp_path / "cache"
    entry = start_bootstrap(procs)
    common = dict(
        run_id="liar",
        cache=cache,
        initial_peers=[entry],
        max_steps=40,
        extra=["--min-group-size", "2", "--wait-for-peers", "2"],
    )
    liar = Identity.load_or_create(tmp_path / "liar.key")
    with dht_client(entry) as calls:
        a = start_peer(procs, "a", **common)
        beats = wait_for_heartbeats(calls, "liar", 1, watch=[a])
        manifest_hash = next(iter(beats.values())).manifest_hash
        stop = threading.Event()

        def lie() -> None:  # a live, validly signed peer that claims a round nobody holds, and serves nothing
            while not stop.is_set():
                hb = Heartbeat(
                    **heartbeat_fields(
                        liar.peer_id.to_base58(),
                        run_id="liar",
                        manifest_hash=manifest_hash,
                        round=1000,
                        step=1000,
                        tokens_per_s=0.0,
                        version="0",
                    )
                )
                calls.store(heartbeat_key("liar"), sign_record(hb, liar), get_dht_time() + 12, subkey=hb.peer_id)
                stop.wait(2.0)

        thread = threading.Thread(target=lie, daemon=True)
        thread.start()
        time.sleep(3)
        b = start_peer(procs, "b", **common)
        try:
            for p in (a, b):
                finish(p, 300)
        finally:
            stop.set()
            thread.join(10)
    for p in (a, b):
        assert "claim to be at round 1000" in p.output(), p.output()[-3000:]
        assert "Traceback" not in p.output()
    ra, rb = rounds(a), rounds(b)
    assert max(ra) == max(rb) and ra[max(ra)]["step"] == 40
    assert ra[max(ra)]["theta_hash"] == rb[max(rb)]["theta_hash"]


def test_min_group_size_gives_up_after_quorum_timeout_with_one_line(procs, tmp_path):
    """Before: --min-group-size 2 with nobody else waited forever. Now: one error line naming both flags, exit 2."""
    lonely = start_peer(
        procs,
        "lonely",
        run_id="quorum",
        cache=tmp_path / "cache",
        max_steps=40,
        extra=["--min-group-size", "2", "--quorum-timeout", "8"],
    )
    assert lonely.wait(120) == 2, lonely.output()[-3000:]
    errors = [line for line in lonely.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no group of at least 2 peers formed in 8s" in errors[0], lonely.stderr[-2000:]
    assert "--quorum-timeout" in errors[0] and "Traceback" not in lonely.output()


def test_an_all_client_mode_swarm_says_so_and_trains_on(procs, tmp_path):
    """Before: peers that all run --client-mode (nobody accepts connections) never averaged and never said why."""
    entry = start_bootstrap(procs)
    # they run until each has said it; then the test stops them (SIGTERM: a clean exit between rounds)
    common = dict(
        run_id="hidden",
        cache=tmp_path / "cache",
        initial_peers=[entry],
        max_steps=1_000_000,
        extra=["--client-mode", "--wait-for-peers", "2"],
    )
    peers = [start_peer(procs, name, **common) for name in ("x", "y")]
    line = "every live peer of run 'hidden' is in --client-mode"

    def both_said_it() -> bool:
        for p in peers:
            assert p.alive(), p.output()[-3000:]
        return all(line in p.output() and rounds(p) for p in peers)

    wait_until(both_said_it, timeout=180, what="both client-mode peers saying that no group can form")
    for p in peers:
        p.popen.send_signal(signal.SIGTERM)
    for p in peers:
        finish(p, 60)
        assert all(rec["outcome"] == "alone" for rec in rounds(p).values())
