"""A diverged peer and a stopped peer, with real photon-peer processes on 127.0.0.1.

Proves: a peer whose local model turns NaN (PHOTON_FAULTS nan_update) never offers that update to anyone: it skips
or re-syncs the round, the other peer's theta stays finite, and the two are back in one group with the same theta
afterwards. Ctrl-C (SIGINT to the whole process group, as a terminal sends it) stops a swarm peer between rounds:
exit 130, a checkpoint holding theta, the outer state and the round, no DHT, averager or p2pd left behind, and
``--resume`` continues from that round (SIGTERM stops it the same way, exit 0), while a --resume with other run
settings is refused with a one-line error that names the setting.
"""

from __future__ import annotations

import math
import signal

import pytest

from photon_p2p.train.checkpoint import latest_checkpoint, load_checkpoint
from tests.helpers.peers import finish, records, rounds, start_bootstrap, start_peer, wait_for_round
from tests.helpers.procs import all_gone, wait_until

pytestmark = pytest.mark.slow

TIMED = ["--round-seconds", "0.5", "--min-group-size", "2"]


def test_nan_update_is_never_shared_and_the_peer_comes_back(procs, tmp_path):
    cache = tmp_path / "cache"
    entry = start_bootstrap(procs)
    a = start_peer(procs, "a", run_id="nan", cache=cache, initial_peers=[entry], max_steps=300, extra=TIMED)
    bad = start_peer(procs, "bad", run_id="nan", cache=cache, initial_peers=[entry], max_steps=300, extra=TIMED,
                     env={"PHOTON_FAULTS": "nan_update@4"})
    for p in (a, bad):
        finish(p, 300)
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
    finals = [[r for r in records(p) if r.get("val_loss") is not None][-1]["val_loss"] for p in (a, bad)]
    assert all(math.isfinite(v) for v in finals)


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
