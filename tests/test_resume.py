"""A resumed run reproduces the uninterrupted one, step for step, through the real ``photon-peer --local-only``.

Proves, with per-step losses from the metrics JSONL (--log-every 1) compared exactly: resuming from the checkpoint a
run wrote at step N/2 reproduces that run's steps N/2+1..N (the cosine schedule, optimizer moments, sampler position
and RNG all come back); a run stopped by Ctrl-C at an arbitrary moment, then resumed with the same flags, does too
(the signal is honoured between steps, so the saved state is never half a step); and a run trained to N/2 with
--max-steps N/2 and extended with --max-steps N --resume matches the uninterrupted N-step run when the schedule
does not depend on --max-steps (explicit warm-up, alpha_f 1), with a warning whenever the schedule does change.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from tests.helpers.local import losses_by_step, read_metrics, run_cli, write_corpus
from tests.helpers.procs import console, wait_until

N = 80  # steps of the reference run (micro preset: ~15 ms each on 2 cores)
HALF = N // 2


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    write_corpus(root / "corpus")
    return root


def flags(work: Path, ck: Path, metrics: Path, *extra) -> list[str]:
    # one thread: a micro model gains nothing from two, and on a busy machine OpenMP threads waiting for each other
    # at every small op make the run several times slower
    return [
        str(a)
        for a in [
            "--local-only",
            "--data",
            work / "corpus",
            "--cache-dir",
            work / "cache",
            "--model",
            "micro",
            "--batch-size",
            "8",
            "--micro-batch-size",
            "4",
            "--lr",
            "3e-3",
            "--log-every",
            "1",
            "--eval-every",
            "20",
            "--eval-batches",
            "2",
            "--checkpoint-dir",
            ck,
            "--checkpoint-every",
            HALF,
            "--keep-checkpoints",
            "5",
            "--metrics-file",
            metrics,
            "--no-progress",
            "--threads",
            "1",
            *extra,
        ]
    ]


def train(work: Path, name: str, *extra) -> tuple[Path, Path]:
    out = work / name
    out.mkdir(exist_ok=True)
    ck, metrics = out / "ck", out / "metrics.jsonl"
    proc = run_cli("photon-peer", flags(work, ck, metrics, *extra), cwd=out, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return ck, metrics


@pytest.fixture(scope="module")
def reference(work):
    """The uninterrupted run: N steps of cosine schedule, checkpoints at N/2 and N."""
    ck, metrics = train(work, "reference", "--max-steps", N)
    records = read_metrics(metrics)
    return ck, records


def assert_same_steps(reference: list[dict], resumed: list[dict], after: int) -> None:
    ref = {r["step"]: r for r in reference if "loss" in r}
    got = {r["step"]: r for r in resumed if "loss" in r and r["step"] > after}
    assert sorted(got) == list(range(after + 1, N + 1))
    for step, r in got.items():
        assert r["loss"] == ref[step]["loss"], (step, r["loss"], ref[step]["loss"])  # exact: same ops, same order
        assert r["lr"] == ref[step]["lr"] and r["tokens"] == ref[step]["tokens"], step
    ref_eval = [r for r in reference if "val_loss" in r and r["step"] > after]
    got_eval = [r for r in resumed if "val_loss" in r and r["step"] > after]
    assert [(r["step"], r["val_loss"]) for r in got_eval] == [(r["step"], r["val_loss"]) for r in ref_eval]


def test_resume_from_the_mid_run_checkpoint(work, reference):
    ref_ck, ref_records = reference
    assert sorted(p.name for p in ref_ck.iterdir()) == [f"step-{HALF:08d}", f"step-{N:08d}"]
    out = work / "from-half"
    out.mkdir()
    shutil.copytree(ref_ck / f"step-{HALF:08d}", out / "ck" / f"step-{HALF:08d}")  # the run as it was at N/2
    _, metrics = train(work, "from-half", "--max-steps", N, "--resume")
    assert_same_steps(ref_records, read_metrics(metrics), HALF)


def test_resume_after_ctrl_c_at_any_moment(work, reference, procs):
    _, ref_records = reference
    out = work / "ctrl-c"
    out.mkdir()
    ck, metrics = out / "ck", out / "metrics.jsonl"
    proc = procs.start(console("photon-peer") + flags(work, ck, metrics, "--max-steps", N), name="interrupted")
    wait_until(lambda: metrics.exists() and len(read_metrics(metrics)) >= 7, timeout=120, interval=0.02, what="7 steps")
    proc.popen.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, proc.output()
    stopped_at = max(losses_by_step(read_metrics(metrics)))
    assert 7 <= stopped_at < N, "the signal should land mid-run"
    assert f"Ctrl-C at step {stopped_at}: saved" in proc.stderr and "Traceback" not in proc.stderr

    train(work, "ctrl-c", "--max-steps", N, "--resume")
    assert_same_steps(ref_records, read_metrics(metrics), stopped_at)


def test_stop_at_half_then_extend_the_run(work):
    constant = ["--warmup-steps", "10", "--alpha-f", "1.0"]  # the learning rate no longer depends on --max-steps
    _, uninterrupted = train(work, "const-full", "--max-steps", N, *constant)
    train(work, "const-split", "--max-steps", HALF, *constant)
    out = work / "const-split"
    proc = run_cli(
        "photon-peer",
        flags(work, out / "ck", out / "metrics.jsonl", "--max-steps", N, "--resume", *constant),
        cwd=out,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"resuming from {out / 'ck' / f'step-{HALF:08d}'}" in proc.stderr
    assert "different learning-rate schedule" in proc.stderr and f"--max-steps {HALF} -> {N}" in proc.stderr
    assert_same_steps(read_metrics(uninterrupted), read_metrics(out / "metrics.jsonl"), HALF)
