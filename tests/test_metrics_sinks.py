"""TensorBoard and Weights & Biases get the same records as the metrics file, with no network and no account.

A real ``photon-peer --local-only`` run with ``--tensorboard-dir`` and ``--wandb-project`` (offline mode, the
default) writes: TensorBoard event files under DIR/local/local-only with ``step/loss`` at every --log-every step and
``eval/val_ppl`` at every evaluation, the same values as the JSONL file; and an offline W&B run (project, group,
name and tag as documented) whose history holds the same records. A missing optional package or an unwritable
directory is one line, exit 2 (checked for TensorBoard). The swarm side (group = run id, one writer per peer) is
covered in tests/test_volunteer.py.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.helpers.local import assert_one_line_error, read_metrics, run_cli, write_corpus


def wandb_records(path: Path) -> list:
    """The protobuf records of an offline ``run-*.wandb`` file: wandb's log format (LevelDB-style 32 KiB blocks of
    checksum/length/type-framed chunks after a 7-byte header), parsed here because wandb no longer ships a reader."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    block, pos, chunks, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block  # zero padding at the end of a block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            out.append(record)
            chunks = b""
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    root = tmp_path_factory.mktemp("sinks")
    corpus = write_corpus(root / "corpus")
    proc = run_cli(
        "photon-peer",
        [
            "--local-only",
            "--data",
            corpus,
            "--cache-dir",
            root / "cache",
            "--model",
            "micro",
            "--max-steps",
            "6",
            "--log-every",
            "2",
            "--batch-size",
            "4",
            "--eval-every",
            "3",
            "--eval-batches",
            "1",
            "--no-progress",
            "--threads",
            "1",
            "--metrics-file",
            root / "m.jsonl",
            "--tensorboard-dir",
            root / "tb",
            "--wandb-project",
            "photon-test",
        ],
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr
    return root, read_metrics(root / "m.jsonl")


def test_tensorboard_has_the_metrics_file_values(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, records = run
    events = EventAccumulator(str(root / "tb" / "local" / "local-only"))
    events.Reload()
    steps = [r for r in records if r["kind"] == "step"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in steps] == [2, 4, 6] and [r["step"] for r in evals] == [3, 6]
    assert {e.step: e.value for e in events.Scalars("step/loss")} == pytest.approx(
        {r["step"]: r["loss"] for r in steps}
    )
    assert {e.step: e.value for e in events.Scalars("eval/val_ppl")} == pytest.approx(
        {r["step"]: r["val_ppl"] for r in evals}
    )
    assert {"step/lr", "step/grad_norm", "step/tokens_per_s", "step/peak_mem_mb"} <= set(events.Tags()["scalars"])


def test_wandb_offline_run_has_the_metrics_file_values(run):
    root, records = run
    [path] = (root / "wandb").glob("offline-run-*/run-*.wandb")
    recs = wandb_records(path)
    [info] = [r.run for r in recs if r.WhichOneof("record_type") == "run"]
    assert (info.project, info.run_group, info.display_name, list(info.tags)) == (
        "photon-test",
        "local",
        "local-only",
        ["local-only"],
    )
    history = [
        {item.key or "/".join(item.nested_key): item.value_json for item in r.history.item}
        for r in recs
        if r.WhichOneof("record_type") == "history"
    ]
    losses = {int(h["step"]): float(h["step/loss"]) for h in history if "step/loss" in h}
    assert losses == pytest.approx({r["step"]: r["loss"] for r in records if r["kind"] == "step"})
    assert any("eval/val_ppl" in h for h in history)


def test_unwritable_tensorboard_dir_is_one_line(tmp_path):
    pytest.importorskip("tensorboard")
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    corpus = write_corpus(tmp_path / "corpus", files=4, lines=40)
    proc = run_cli(
        "photon-peer",
        [
            "--local-only",
            "--data",
            corpus,
            "--model",
            "micro",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--tensorboard-dir",
            blocker / "tb",
            "--no-progress",
        ],
        cwd=tmp_path,
    )
    assert_one_line_error(proc, "--tensorboard-dir")
