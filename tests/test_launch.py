"""photon-swarm on one machine: Ctrl-C stops the bootstrap and every peer cleanly (each saves a checkpoint, nothing is
left running), and the same command run again without --fresh resumes every peer from its checkpoint instead of
starting over. Also: --split by-file deals the files out, and flags photon-swarm sets itself are refused.
"""

from __future__ import annotations

import signal
from pathlib import Path

import psutil
import pytest

from photon_p2p.errors import ConfigError
from photon_p2p.launch import split_data
from tests.helpers.peers import read_metrics
from tests.helpers.procs import all_gone, console, wait_until

ARGS = [
    "--peers",
    "2",
    "--data",
    "default",
    "--model",
    "micro",
    "--max-steps",
    "300",
    "--local-steps",
    "10",
    "--eval-every",
    "0",
    "--checkpoint-every",
    "10",
    "--batch-size",
    "8",
]


def _rounds(path) -> list[dict]:
    return [r for r in read_metrics(path) if "outcome" in r]  # round records


@pytest.mark.slow
def test_ctrl_c_stops_everything_and_a_rerun_resumes(procs, tmp_path):
    workdir = tmp_path / "run"
    cache = ["--cache-dir", str(tmp_path / "cache")]
    swarm = procs.start(console("photon-swarm") + ARGS + ["--workdir", str(workdir), "--fresh", *cache], "swarm")
    metrics = [workdir / f"peer-{k}" / "metrics.jsonl" for k in range(2)]
    wait_until(lambda: all(len(_rounds(m)) >= 2 for m in metrics), timeout=240, what="two rounds on both peers")
    tree = swarm.descendants()
    children = psutil.Process(swarm.pid).children()  # the bootstrap and the peers (their forks are below them)
    assert sorted(Path(p.cmdline()[1]).name for p in children) == ["photon-bootstrap", "photon-peer", "photon-peer"]
    swarm.popen.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal delivers to the launcher
    assert swarm.wait(60) == 130, swarm.output()[-3000:]
    left = all_gone(tree, timeout=20)
    assert not left, f"left running: {[(p.pid, p.name()) for p in left]}"
    stopped_at = {k: _rounds(m)[-1]["round"] for k, m in enumerate(metrics)}
    assert all(r < 29 for r in stopped_at.values()), f"the run finished before the interrupt: {stopped_at}"
    for k in range(2):
        assert any((workdir / f"peer-{k}" / "checkpoints").glob("step-*")), f"peer-{k} saved no checkpoint"

    again = procs.start(console("photon-swarm") + ARGS + ["--workdir", str(workdir), *cache], "again")
    assert again.wait(400) == 0, again.output()[-4000:]
    for k, m in enumerate(metrics):
        rounds = _rounds(m)
        resumed = [r for r in rounds if r["round"] <= stopped_at[k]]
        # the records from before the interrupt are kept, the rerun did not restart at round 0, and it ended at
        # --max-steps
        assert [r["round"] for r in rounds].count(0) == 1, f"peer-{k} started over: {[r['round'] for r in rounds]}"
        assert resumed and rounds[-1]["step"] == 300
    assert "communication:" in again.stderr


def test_by_file_split_deals_files_and_needs_enough_of_them(tmp_path):
    files = []
    for i in range(5):
        f = tmp_path / f"f{i}.txt"
        f.write_text(f"document {i}\n")
        files.append(f)
    shares = split_data([str(tmp_path)], 2, "by-file")
    dealt = [s[1:] for s in shares]
    assert sorted(sum(dealt, [])) == sorted(str(f) for f in files)
    assert not set(dealt[0]) & set(dealt[1])
    assert split_data(["x"], 3, "iid")[2] == ["--data", "x", "--data-partition", "2/3"]
    with pytest.raises(ConfigError, match="at least one file per peer"):
        split_data([str(files[0])], 2, "by-file")


@pytest.mark.parametrize("flag", ["--checkpoint-dir", "--initial-peers", "--data-partition", "--resume"])
def test_flags_the_launcher_sets_are_refused(flag, capsys):
    from photon_p2p.cli.swarm import main

    assert main(["--data", "default", flag, "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and flag in err and err.count("\n") == 1
