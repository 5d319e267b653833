"""``photon-peer --local-only`` as a user runs it: real subprocesses of the installed console script.

Proves: a small run exits 0, logs the parameter count and one line per evaluation, writes a metrics record per
logging step (step, loss, lr, tokens, tokens_per_s) and per evaluation (val_loss, val_ppl), checkpoints every N steps,
and its loss falls; --fresh discards an old run. Every bad input of the issue (missing, empty or binary data, a
tokenizer that does not parse, a vocabulary larger than --vocab-size, a checkpoint of another model shape, a
truncated or corrupt checkpoint, existing checkpoints without --resume/--fresh, an unknown TOML key, a bad flag
value, ...) exits 2 with exactly one ``error:`` line naming the file or flag, no traceback, and leaves nothing
half-written (no new checkpoint directory or metrics file, no temporary shard directory, old checkpoints untouched).
Ctrl-C stops after the current step, saves it and exits 130; SIGTERM does the same and exits 0.
"""

from __future__ import annotations

import math
import shutil
import signal
from pathlib import Path

import pytest

from photon_p2p.train.checkpoint import load_checkpoint
from tests.helpers.local import assert_one_line_error, read_metrics, run_cli, write_corpus
from tests.helpers.procs import console, wait_until

BASE = ["--local-only", "--model", "micro", "--batch-size", "4", "--eval-batches", "2", "--no-progress"]
ONE_THREAD = ["--threads", "1"]  # a micro model gains nothing from more, and a busy machine makes OpenMP crawl


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    write_corpus(root / "corpus")
    return root


@pytest.fixture(scope="module")
def happy(work):
    """One complete small run, inspected by several tests."""
    out = work / "happy"
    out.mkdir()
    proc = run_cli(
        "photon-peer",
        BASE
        + [
            "--data",
            work / "corpus",
            "--max-steps",
            "12",
            "--log-every",
            "2",
            "--eval-every",
            "6",
            "--lr",
            "3e-3",
            "--checkpoint-dir",
            out / "ck",
            "--checkpoint-every",
            "6",
            "--metrics-file",
            out / "metrics.jsonl",
            "--cache-dir",
            work / "cache",
        ],
        cwd=out,
    )
    return proc, out


def peer(work: Path, tmp_path: Path, *args) -> tuple:
    """photon-peer with a bad input: run it in tmp_path with the module's corpus and shard cache."""
    proc = run_cli(
        "photon-peer", BASE + ONE_THREAD + ["--max-steps", "3", "--cache-dir", work / "cache", *args], cwd=tmp_path
    )
    return proc


def assert_nothing_written(tmp_path: Path, work: Path) -> None:
    assert not (tmp_path / "ck").exists()
    assert not (tmp_path / "metrics.jsonl").exists()
    if (work / "cache").exists():
        assert not [p for p in (work / "cache").iterdir() if p.name.startswith(".tmp")]


# --------------------------------------------------------------------------------------------------------------
# the happy path


def test_small_run_succeeds_and_reports(happy):
    proc, out = happy
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "micro: 0.13M parameters (0.11M non-embedding)" in proc.stderr  # the parameter count is logged
    eval_lines = [line for line in proc.stderr.splitlines() if "val ppl" in line]
    assert len(eval_lines) == 2 and "step 6/12" in eval_lines[0] and "step 12/12" in eval_lines[1]
    assert "tok/s" in eval_lines[1]


def test_metrics_file_has_step_and_eval_records(happy):
    proc, out = happy
    assert proc.returncode == 0, proc.stderr
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 10, 12]
    for r in steps:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= set(r)
        assert r["tokens"] == r["step"] * 4 * 64  # batch 4 x seq_len 64 per step
        assert r["tokens_per_s"] > 0 and 0 < r["lr"] <= 3e-3 and math.isfinite(r["loss"])
    assert steps[-1]["lr"] < steps[1]["lr"]  # the cosine decays
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3  # it learns
    assert [r["step"] for r in evals] == [6, 12]
    for r in evals:
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
    assert evals[1]["val_loss"] < evals[0]["val_loss"]


def test_checkpoints_are_written(happy):
    proc, out = happy
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (out / "ck").iterdir()) == ["step-00000006", "step-00000012"]
    ckpt = load_checkpoint(out / "ck" / "step-00000012")
    assert ckpt.state["progress"]["step"] == 12 and ckpt.meta["config"]["model"]["preset"] == "micro"


def test_fresh_discards_an_old_run(happy, work, tmp_path):
    _, out = happy
    ck = tmp_path / "ck"
    shutil.copytree(out / "ck", ck)
    proc = peer(
        work,
        tmp_path,
        "--data",
        work / "corpus",
        "--max-steps",
        "2",
        "--checkpoint-dir",
        ck,
        "--fresh",
        "--eval-every",
        "0",
    )
    assert proc.returncode == 0, proc.stderr
    assert "--fresh: deleted 2 checkpoint(s)" in proc.stderr
    assert sorted(p.name for p in ck.iterdir()) == ["step-00000002"]


# --------------------------------------------------------------------------------------------------------------
# bad input: each a one-line error, exit 2, nothing half-written


def test_missing_data_path(work, tmp_path):
    missing = tmp_path / "nope"
    proc = peer(
        work,
        tmp_path,
        "--data",
        missing,
        "--checkpoint-dir",
        tmp_path / "ck",
        "--metrics-file",
        tmp_path / "metrics.jsonl",
    )
    assert_one_line_error(proc, f"--data {missing}", "no such file or directory")
    assert_nothing_written(tmp_path, work)


def test_no_data_flag(work, tmp_path):
    proc = peer(work, tmp_path, "--checkpoint-dir", tmp_path / "ck")
    assert_one_line_error(proc, "--data is required")
    assert_nothing_written(tmp_path, work)


def test_empty_data_file(work, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    proc = peer(
        work,
        tmp_path,
        "--data",
        empty,
        "--checkpoint-dir",
        tmp_path / "ck",
        "--metrics-file",
        tmp_path / "metrics.jsonl",
    )
    assert_one_line_error(proc, str(empty), "no text found")
    assert_nothing_written(tmp_path, work)


def test_empty_data_dir(work, tmp_path):
    empty = tmp_path / "corpus"
    empty.mkdir()
    (empty / "image.png").write_bytes(b"\x89PNG\r\n")  # not a text suffix: ignored by the walk
    proc = peer(work, tmp_path, "--data", empty, "--checkpoint-dir", tmp_path / "ck")
    assert_one_line_error(proc, f"--data {empty}", "no usable text files")
    assert_nothing_written(tmp_path, work)


def test_binary_data_file(work, tmp_path):
    binary = tmp_path / "weights.txt"
    binary.write_bytes(bytes(range(256)) * 40)
    proc = peer(work, tmp_path, "--data", binary, "--checkpoint-dir", tmp_path / "ck")
    assert_one_line_error(proc, f"--data {binary}", "not UTF-8 text")
    assert_nothing_written(tmp_path, work)


@pytest.mark.parametrize("content", ['{"model": {"type": "BPE"', "not json at all", '{"version": "1.0"}'])
def test_tokenizer_that_does_not_parse(work, tmp_path, content):
    tok = tmp_path / "tok.json"
    tok.write_text(content)
    proc = peer(work, tmp_path, "--data", work / "corpus", "--tokenizer", tok, "--checkpoint-dir", tmp_path / "ck")
    assert_one_line_error(proc, f"--tokenizer {tok}", "not a Hugging Face tokenizers JSON file")
    assert_nothing_written(tmp_path, work)


def test_missing_tokenizer_file(work, tmp_path):
    proc = peer(work, tmp_path, "--data", work / "corpus", "--tokenizer", tmp_path / "tok.json")
    assert_one_line_error(proc, f"--tokenizer {tmp_path / 'tok.json'}", "no such file")


def test_vocab_size_smaller_than_the_tokenizer(work, tmp_path):
    proc = peer(
        work,
        tmp_path,
        "--data",
        work / "corpus",
        "--vocab-size",
        "100",
        "--checkpoint-dir",
        tmp_path / "ck",
        "--metrics-file",
        tmp_path / "metrics.jsonl",
    )
    assert_one_line_error(proc, "--vocab-size 100", "smaller than the tokenizer's vocabulary (257")
    assert_nothing_written(tmp_path, work)


def copy_checkpoints(happy, tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    """A copy of the happy run's checkpoints, and a snapshot of their bytes to prove nothing was touched."""
    _, out = happy
    ck = tmp_path / "ck"
    shutil.copytree(out / "ck", ck)
    return ck, snapshot(ck)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_resume_with_another_model_shape(happy, work, tmp_path):
    ck, before = copy_checkpoints(happy, tmp_path)
    proc = peer(
        work,
        tmp_path,
        "--data",
        work / "corpus",
        "--model",
        "tiny",
        "--checkpoint-dir",
        ck,
        "--resume",
        "--max-steps",
        "20",
        "--metrics-file",
        tmp_path / "metrics.jsonl",
    )
    line = assert_one_line_error(
        proc,
        f"checkpoint {ck / 'step-00000012'}",
        "different model",
        "d_model 64 (checkpoint) != 128 (now)",
        "n_layers 2 (checkpoint) != 4 (now)",
    )
    assert "--model" in line  # what to do about it
    assert snapshot(ck) == before
    assert not (tmp_path / "metrics.jsonl").exists()


def test_resume_from_a_truncated_checkpoint(happy, work, tmp_path):
    ck, _ = copy_checkpoints(happy, tmp_path)
    weights = ck / "step-00000012" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    before = snapshot(ck)
    proc = peer(work, tmp_path, "--data", work / "corpus", "--checkpoint-dir", ck, "--resume", "--max-steps", "20")
    assert_one_line_error(proc, str(ck / "step-00000012"), "model.safetensors is truncated or modified")
    assert snapshot(ck) == before


def test_resume_from_a_corrupt_meta(happy, work, tmp_path):
    ck, _ = copy_checkpoints(happy, tmp_path)
    (ck / "step-00000012" / "meta.json").write_text('{"format": 1, "fi')
    proc = peer(work, tmp_path, "--data", work / "corpus", "--checkpoint-dir", ck, "--resume", "--max-steps", "20")
    assert_one_line_error(proc, str(ck / "step-00000012"), "meta.json is corrupt")


def test_existing_checkpoints_without_resume_or_fresh(happy, work, tmp_path):
    ck, before = copy_checkpoints(happy, tmp_path)
    proc = peer(
        work, tmp_path, "--data", work / "corpus", "--checkpoint-dir", ck, "--metrics-file", tmp_path / "metrics.jsonl"
    )
    assert_one_line_error(proc, f"--checkpoint-dir {ck}", "already holds checkpoints", "--resume", "--fresh")
    assert snapshot(ck) == before
    assert not (tmp_path / "metrics.jsonl").exists()


def test_unknown_toml_key(work, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("[train]\nmax_step = 3\n")
    proc = peer(work, tmp_path, "--data", work / "corpus", "--config", toml, "--checkpoint-dir", tmp_path / "ck")
    assert_one_line_error(proc, str(toml), "unknown key 'train.max_step'", "did you mean 'max_steps'?")
    assert_nothing_written(tmp_path, work)


def test_bad_toml_value(work, tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[train]\nlr = "high"\n')
    proc = peer(work, tmp_path, "--data", work / "corpus", "--config", toml)
    assert_one_line_error(proc, str(toml), "train.lr = 'high': expected a number")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--batch-size", "x"], ["argument --batch-size: invalid int value: 'x'"]),
        (["--inner-optimizer", "sgd"], ["argument --inner-optimizer: invalid choice: 'sgd'"]),
        (["--bogus-flag"], ["unrecognized arguments: --bogus-flag"]),
        (["--lr", "5"], ["--lr (TOML train.lr) = 5.0: must be in (0, 1)"]),
        (["--batch-size", "6", "--micro-batch-size", "4"], ["--micro-batch-size", "must divide --batch-size (6)"]),
        (["--model", "huge"], ["--model (TOML model.preset) = 'huge': unknown preset"]),
        (["--resume"], ["--resume needs --checkpoint-dir"]),
    ],
    ids=["int", "choice", "unknown", "lr", "micro-batch", "preset", "resume"],
)
def test_bad_flag_value(work, tmp_path, args, needles):
    proc = peer(work, tmp_path, "--data", work / "corpus", "--metrics-file", tmp_path / "metrics.jsonl", *args)
    assert_one_line_error(proc, *needles)
    assert "usage:" not in proc.stderr
    assert_nothing_written(tmp_path, work)


# --------------------------------------------------------------------------------------------------------------
# signals


@pytest.mark.parametrize(
    ("sig", "code", "said"), [(signal.SIGINT, 130, "Ctrl-C"), (signal.SIGTERM, 0, "SIGTERM")], ids=["ctrl-c", "sigterm"]
)
def test_signal_saves_a_checkpoint_after_the_current_step(work, procs, tmp_path, sig, code, said):
    ck, metrics = tmp_path / "ck", tmp_path / "metrics.jsonl"
    proc = procs.start(
        console("photon-peer")
        + [
            str(a)
            for a in BASE
            + ONE_THREAD
            + [
                "--data",
                work / "corpus",
                "--cache-dir",
                work / "cache",
                "--max-steps",
                "100000",
                "--log-every",
                "1",
                "--eval-every",
                "0",
                "--checkpoint-dir",
                ck,
                "--checkpoint-every",
                "100000",
                "--metrics-file",
                metrics,
            ]
        ],
        name="peer",
    )
    wait_until(lambda: metrics.exists() and len(read_metrics(metrics)) >= 3, timeout=90, what="training to start")
    proc.popen.send_signal(sig)  # to the process only, as `kill` does
    assert proc.wait(timeout=60) == code, proc.stderr
    err = proc.stderr
    assert "Traceback" not in err, err
    last = read_metrics(metrics)[-1]["step"]
    assert f"{said} at step {last}: saved {ck / f'step-{last:08d}'}" in err
    assert err.rstrip().endswith("interrupted" if sig == signal.SIGINT else "stopped")
    (saved,) = ck.iterdir()
    assert saved.name == f"step-{last:08d}"
    assert load_checkpoint(saved).state["progress"]["step"] == last
