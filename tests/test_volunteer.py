"""A volunteer needs nothing but an address, the run id and their own data: the rest comes from the run's manifest.

The creator starts run ``vol`` with a BPE tokenizer file of its own, the micro model, 4 local steps, a 24-step
budget, a smaller batch, another learning rate and DiLoCo's Nesterov outer optimizer. The volunteer runs
``photon-peer --initial-peers ADDR --run-id vol --data ITS_OWN_TEXT`` plus per-peer choices only (where to listen,
threads, checkpoint and metrics files), in a directory that holds no tokenizer file. Proves that the volunteer
trains with the creator's tokenizer (same fingerprint, from the manifest's bytes), model and recipe, averages its
rounds with the creator and ends each of them with the same theta (a round that failed on one side is carried over,
never dropped), and that its checkpoint records the run's settings. Both peers write per-step metrics records in
swarm mode (and TensorBoard files under DIR/RUN_ID/PEER), and after both have left, ``photon-status --json`` still
lists each one's signed contribution (rounds, rounds averaged, tokens that entered theta), matching their own round
records.
"""

from __future__ import annotations

import json
import math

import pytest

from tests.helpers.peers import finish, records, rounds, start_bootstrap
from tests.helpers.procs import LOOPBACK, console
from tests.helpers.swarm import run_cli, write_corpus

pytestmark = pytest.mark.slow


def test_volunteer_gets_model_tokenizer_and_recipe_from_the_manifest(procs, tmp_path):
    from photon_p2p.data import load_tokenizer
    from photon_p2p.train.checkpoint import latest_checkpoint, load_checkpoint

    creator_data = write_corpus(tmp_path / "creator-text", seed=1)
    volunteer_data = write_corpus(tmp_path / "volunteer-text", seed=2)
    tok = tmp_path / "creator-only" / "tok.json"
    made = run_cli(
        console("photon-tokenizer")
        + ["train", "--data", str(creator_data), "--vocab-size", "320", "--output", str(tok)],
        tmp_path / "tokenizer",
    )
    assert made.returncode == 0, made.stderr
    entry = start_bootstrap(procs)
    per_peer = [
        "--host-maddrs",
        LOOPBACK,
        "--threads",
        "1",
        "--no-progress",
        "--metrics-file",
        "metrics.jsonl",
        "--log-every",
        "2",
        "--tensorboard-dir",
        str(tmp_path / "tb"),
        "--checkpoint-dir",
        "ckpt",
        "--min-group-size",
        "2",
        "--eval-every",
        "0",
        "--eval-batches",
        "2",
    ]
    creator = procs.start(
        console("photon-peer")
        + [
            "--initial-peers",
            entry,
            "--run-id",
            "vol",
            "--data",
            str(creator_data),
            "--tokenizer",
            str(tok),
            "--model",
            "micro",
            "--local-steps",
            "4",
            "--max-steps",
            "24",
            "--batch-size",
            "4",
            "--lr",
            "2e-3",
            "--outer-optimizer",
            "nesterov",
            "--compression",
            "none",
            "--cache-dir",
            str(tmp_path / "c1"),
            *per_peer,
        ],
        "creator",
    )
    creator.wait_for(r"started run 'vol'", 120)
    volunteer = procs.start(
        console("photon-peer")
        + [
            "--initial-peers",
            entry,
            "--run-id",
            "vol",
            "--data",
            str(volunteer_data),
            "--cache-dir",
            str(tmp_path / "c2"),
            *per_peer,
        ],
        "volunteer",
    )
    for p in (creator, volunteer):
        finish(p, 300)
    assert "joining run 'vol' created by" in volunteer.output()
    assert not list(volunteer.dir.glob("*.json")), "the volunteer's directory should hold no tokenizer file"

    rc, rv = rounds(creator), rounds(volunteer)
    assert sorted(rv) == list(range(6)), f"24 steps of 4 are six rounds: {sorted(rv)}"
    for r, rec in rv.items():
        assert rec["step"] == 4 * (r + 1), rec
        # a hiccup of the machine can make one all-reduce fail on one side (hivemind's matchmaking is not atomic):
        # then the volunteer's round is late and its work carried into the next round, never dropped
        assert (rec["outcome"], rec["group_size"]) == ("averaged", 2) or (
            rec["outcome"] == "late" and rec["carried_tokens"] >= rec["own_tokens"] > 0
        ), rec
        assert rec["wasted_tokens"] == 0, rec
    together = [
        r
        for r, rec in rv.items()
        if rec["outcome"] == rc[r]["outcome"] == "averaged" and rec["lost_fraction"] == rc[r]["lost_fraction"] == 0
    ]
    assert together, f"the volunteer never averaged a whole round with the creator:\n{rv}\n{rc}"
    for r in together:
        assert rv[r]["theta_hash"] == rc[r]["theta_hash"], f"round {r}: different theta\n{rv[r]}\n{rc[r]}"

    for p in (creator, volunteer):  # per-step records in swarm mode, every --log-every steps
        steps = [r for r in records(p) if r.get("kind") == "step"]
        assert steps and all(r["step"] % 2 == 0 for r in steps), steps
        for r in steps:
            assert 0 <= r["round"] <= 5 and math.isfinite(r["loss"]) and r["lr"] > 0 and r["tokens_per_s"] > 0, r
            assert r["grad_norm"] > 0 and r["peak_mem_mb"] > 0 and r["mfu"] is None, r  # no known peak on a CPU

    # TensorBoard: one writer per peer, grouped under the run id
    writers = sorted(p.name for p in (tmp_path / "tb" / "vol").iterdir())
    assert len(writers) == 2 and all(w.startswith("peer-") for w in writers), writers

    # the leaderboard outlives the peers (signed records kept for days; heartbeats expire in seconds)
    status = run_cli(console("photon-status") + ["--initial-peers", entry, "--run-id", "vol", "--json"], tmp_path)
    assert status.returncode == 0, status.stderr
    board = json.loads(status.stdout)["leaderboard"]
    assert len(board) == 2 and all(row["rounds"] == 6 and not row["live"] for row in board), board
    claimed = sorted((row["tokens"], row["rounds_averaged"]) for row in board)
    reported = sorted(
        (sum(r["tokens_in_theta"] for r in rs.values()), sum(r["outcome"] == "averaged" for r in rs.values()))
        for rs in (rc, rv)
    )
    assert claimed == reported and min(claimed)[0] > 0, (board, reported)

    ckpt = load_checkpoint(latest_checkpoint(volunteer.dir / "ckpt"))
    assert ckpt.meta["tokenizer"] == load_tokenizer(str(tok)).fingerprint
    assert json.loads((ckpt.path / "tokenizer.json").read_text()) == json.loads(tok.read_text())
    cfg = ckpt.meta["config"]
    assert cfg["model"]["preset"] == "micro"
    assert cfg["round"]["local_steps"] == 4 and cfg["round"]["outer_optimizer"] == "nesterov"
    assert cfg["round"]["compression"] == "none"
    assert cfg["train"]["max_steps"] == 24 and cfg["train"]["batch_size"] == 4 and cfg["train"]["lr"] == 2e-3
    assert ckpt.meta["model_args"]["vocab_size"] == 320  # the tokenizer's 320 tokens, already a multiple of 64
    assert ckpt.state["round"] == 6 and ckpt.state["progress"]["step"] == 24
