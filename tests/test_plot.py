"""``photon-plot``: training curves from real --metrics-file files, drawn by the real console script.

Proves: the metrics file of a real ``photon-peer --local-only`` run, a swarm file of the old format (round records
without ``kind``) and one of the new (step, eval and round records, its last line truncated) overlay in one valid
PNG, and the printed summary counts the records used and the bad line skipped; --x tokens/time, --label, --title,
--smooth and the .svg and .pdf formats work; a panel without data says "no data" instead of failing; the pure
functions read leniently (truncated and garbage lines are counted, never fatal), accumulate a peer's own round
tokens for --x tokens, draw each panel from one kind of record (the finest a file has), and let a resumed run's
later record win. Every user error (missing file,
directory, no records, unknown extension, unwritable output, --label count, bad --smooth/--x) is one ``error:``
line, exit 2, no traceback, nothing written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from photon_p2p.plot import build_curves, draw, load_records, moving_average, record_kind, x_positions
from tests.helpers.local import assert_one_line_error, read_metrics, run_cli, write_corpus

T0 = 1_800_000_000.0

# photon-swarm's files before records had a kind: one record per round (swarm/report.py RoundResult.record())
OLD_SWARM = [
    dict(
        round=r,
        step=5 * (r + 1),
        outcome="averaged",
        group_size=2,
        tokens=5120,
        own_tokens=2560,
        loss=4.0 - r / 2,
        val_loss=v,
        val_ppl=None if v is None else math.exp(v),
        train_s=1.0,
        matchmaking_s=0.2,
        allreduce_s=0.1,
        tokens_per_s=2500.0 + r,
        time=T0 + 10 * r,
    )
    for r, v in ((0, None), (1, 3.2), (2, 3.0))
]
# and now (swarm/rounds.py, swarm/loop.py): step records during a round, an eval record, then the round record
NEW_SWARM = [
    dict(kind="step", step=2, round=0, loss=4.4, lr=1e-3, tokens=1024, tokens_per_s=2700.0, time=T0 + 1),
    dict(kind="step", step=4, round=0, loss=4.2, lr=1e-3, tokens=2048, tokens_per_s=2650.0, time=T0 + 2),
    dict(kind="eval", step=5, round=0, val_loss=3.4, val_ppl=30.0, tokens=2560, time=T0 + 3),
    dict(
        kind="round",
        round=0,
        step=5,
        outcome="averaged",
        group_size=2,
        tokens=5120,
        own_tokens=2560,
        loss=4.2,
        val_loss=3.4,
        val_ppl=30.0,
        tokens_per_s=2640.0,
        time=T0 + 4,
    ),
    dict(kind="step", step=7, round=1, loss=3.9, lr=1e-3, tokens=3584, tokens_per_s=2600.0, time=T0 + 5),
    dict(kind="step", step=9, round=1, loss=3.8, lr=1e-3, tokens=4608, tokens_per_s=2610.0, time=T0 + 6),
    dict(kind="eval", step=10, round=1, val_loss=3.1, val_ppl=22.2, tokens=5120, time=T0 + 7),
    dict(
        kind="round",
        round=1,
        step=10,
        outcome="averaged",
        group_size=2,
        tokens=5120,
        own_tokens=2560,
        loss=3.8,
        val_loss=3.1,
        val_ppl=22.2,
        tokens_per_s=2620.0,
        time=T0 + 8,
    ),
]


def write_jsonl(path: Path, records: list[dict], tail: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A real local-only run's metrics file and two swarm files (old and new format), one cut mid-record."""
    root = tmp_path_factory.mktemp("plot")
    corpus = write_corpus(root / "corpus", files=3, lines=80)
    solo = root / "solo" / "metrics.jsonl"
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
            "12",
            "--batch-size",
            "4",
            "--log-every",
            "2",
            "--eval-every",
            "6",
            "--eval-batches",
            "1",
            "--no-progress",
            "--threads",
            "1",
            "--metrics-file",
            solo,
        ],
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr
    old = write_jsonl(root / "old-swarm" / "peer0.jsonl", OLD_SWARM)
    new = write_jsonl(root / "swarm" / "peer0.jsonl", NEW_SWARM, tail=json.dumps(NEW_SWARM[0])[:37])  # killed
    return {"root": root, "solo": solo, "old": old, "new": new}


def assert_png(path: Path) -> None:
    from PIL import Image  # matplotlib's own dependency

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[-8:-4] == b"IEND", "not a complete PNG"
    assert len(data) > 20_000, f"suspiciously small image: {len(data)} bytes"
    with Image.open(path) as im:
        im.verify()  # decodes every chunk and checks the CRCs
    with Image.open(path) as im:
        assert im.size[0] >= 600 and im.size[1] >= 600


def plot(args: list, cwd: Path):
    return run_cli("photon-plot", args, cwd=cwd, timeout=120)


# --------------------------------------------------------------------------------------------------------------
# the console script


def test_real_run_and_swarm_files_overlay_in_one_png(files):
    root, solo, old, new = files["root"], files["solo"], files["old"], files["new"]
    n_solo = len(read_metrics(solo))
    assert n_solo == 6 + 2  # a step record every 2 steps, an evaluation at 6 and 12
    out = root / "curves.png"
    proc = plot([solo, old, new, "-o", out], cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert_png(out)
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith(f"wrote {out} (x: step)"), proc.stdout
    assert f"{solo}: {n_solo} of {n_solo} records;" in proc.stdout
    assert f"{old}: 3 of 3 records;" in proc.stdout
    # the round records of the new format add nothing: its step and eval records are finer
    assert f"{new}: 6 of 8 records, 1 bad line(s) skipped" in proc.stdout
    assert f"{new}: skipped 1 line(s) that are not JSON records (line 9)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_axes_labels_title_smoothing_and_formats(files):
    root, solo, new = files["root"], files["solo"], files["new"]
    svg, pdf = root / "out" / "tokens.svg", root / "out" / "time.pdf"  # out/ does not exist yet: it is created
    labels = ["--label", "alone", "--label", "swarm"]
    proc = plot([solo, new, "--x", "tokens", *labels, "--title", "micro", "--smooth", "3", "-o", svg], cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert "(x: tokens)" in proc.stdout
    text = svg.read_text()
    assert text.startswith("<?xml") and "<svg" in text and text.rstrip().endswith("</svg>")
    proc = plot([new, "--x", "time", "--log-level", "error", "-o", pdf], cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # --log-level error hides the warning about the truncated line
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF") and b"%%EOF" in data[-64:]
    assert sorted(p.name for p in (root / "out").iterdir()) == ["time.pdf", "tokens.svg"]  # no temporary left


def test_panel_without_data_says_so(files, tmp_path):
    """Only training loss: the perplexity and throughput panels read "no data" (SVG text kept as text to check)."""
    import matplotlib

    only_loss = tmp_path / "loss.jsonl"
    only_loss.write_text("".join(json.dumps(dict(step=s, loss=5.0 - s / 10, time=T0 + s)) + "\n" for s in range(20)))
    proc = plot([only_loss, "-o", tmp_path / "a.png"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_png(tmp_path / "a.png")
    assert f"{only_loss}: 20 of 20 records" in proc.stdout

    curves = [build_curves(load_records(only_loss), "step", "only loss")]
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        draw(curves, tmp_path / "b.svg", axis="step")
    assert (tmp_path / "b.svg").read_text().count(">no data<") == 2


# --------------------------------------------------------------------------------------------------------------
# the pure functions


def test_lenient_loading(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"step": 1, "loss": 2.0}\n\nnot json\n[1, 2]\n{"step": 2, "loss": \xff\xfe}\n{"step": 3, "lo')
    f = load_records(p)
    assert [r["step"] for r in f.records] == [1]
    assert f.skipped == 4 and f.skipped_lines == [3, 4, 5, 6]  # blank lines are not errors


def test_kinds_and_token_axis():
    assert [record_kind(r) for r in OLD_SWARM] == ["round"] * 3
    assert [record_kind(r) for r in NEW_SWARM] == ["step", "step", "eval", "round"] * 2
    assert record_kind({"step": 3, "val_ppl": 9.0}) == "step"  # an old --local-only evaluation
    assert record_kind({"kind": "heartbeat", "step": 3}) is None  # a kind we do not know is left out
    # round records: running sum of this peer's own tokens (of the group's where own_tokens is missing)
    assert x_positions(OLD_SWARM, "tokens") == [2560, 5120, 7680]
    assert x_positions([{"round": 0, "tokens": 100}, {"round": 1, "tokens": 50}], "tokens") == [100, 150]
    # step and eval records carry their cumulative count; a new file's round records accumulate alike
    assert x_positions(NEW_SWARM, "tokens") == [1024, 2048, 2560, 2560, 3584, 4608, 5120, 5120]
    assert x_positions(NEW_SWARM, "time") == pytest.approx([i / 3600 for i in range(8)])
    assert x_positions(NEW_SWARM, "step") == [2, 4, 5, 5, 7, 9, 10, 10]


def test_each_panel_takes_the_finest_records_a_file_has(tmp_path):
    new = build_curves(load_records(write_jsonl(tmp_path / "new.jsonl", NEW_SWARM)), "step", "new")
    assert new.series["loss"].x == [2, 4, 7, 9]  # the per-step records, not the coarser round losses
    assert new.series["val_ppl"].x == [5, 10] and new.series["val_ppl"].y == [30.0, 22.2]  # the eval records
    assert new.series["tokens_per_s"].y == [2700.0, 2650.0, 2600.0, 2610.0]
    assert new.used == 6
    old = build_curves(load_records(write_jsonl(tmp_path / "old.jsonl", OLD_SWARM)), "tokens", "old")
    assert old.series["loss"].x == [2560, 5120, 7680] and old.series["loss"].y == [4.0, 3.5, 3.0]
    assert old.series["val_ppl"].x == [5120, 7680]  # round 0 was not evaluated (null)
    assert old.used == 3


def test_resumed_run_and_derived_perplexity(tmp_path):
    p = tmp_path / "m.jsonl"
    rows = [
        dict(step=1, loss=5.0),
        dict(step=2, loss=4.0),
        dict(step=3, loss=3.9),  # crashed after step 3
        dict(step=2, loss=4.1),
        dict(step=3, loss=3.5),
        dict(step=3, val_loss=math.log(30.0)),
        dict(step=4, loss=float("nan")),
    ]  # NaN is written as null by MetricsWriter; a raw NaN is skipped too
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    c = build_curves(load_records(p), "step", "x")
    assert c.series["loss"].x == [1, 2, 3] and c.series["loss"].y == [5.0, 4.1, 3.5]
    assert c.series["val_ppl"].y == [pytest.approx(30.0)]
    assert moving_average([1.0, 2.0, 3.0, 4.0], 2) == [1.0, 1.5, 2.5, 3.5]
    assert moving_average([1.0, 2.0], 1) == [1.0, 2.0]


# --------------------------------------------------------------------------------------------------------------
# errors


def test_user_errors_are_one_line(files, tmp_path):
    solo = files["solo"]
    out = tmp_path / "c.png"
    missing = tmp_path / "missing.jsonl"
    assert_one_line_error(plot([solo, missing, "-o", out], cwd=tmp_path), str(missing), "no such file")
    assert_one_line_error(plot([tmp_path, "-o", out], cwd=tmp_path), str(tmp_path), "is a directory")
    empty, garbage = tmp_path / "empty.jsonl", tmp_path / "garbage.jsonl"
    empty.write_text("")
    garbage.write_text("not json\n{truncat")
    assert_one_line_error(plot([empty, garbage, "-o", out], cwd=tmp_path), "no records in", str(garbage))
    no_x = tmp_path / "no_x.jsonl"
    no_x.write_text('{"loss": 1.0}\n')
    assert_one_line_error(plot([no_x, "--x", "tokens", "-o", out], cwd=tmp_path), "'tokens' value")
    assert_one_line_error(plot([solo, "-o", tmp_path / "c.jpg"], cwd=tmp_path), "c.jpg", "'.jpg'", ".png")
    assert_one_line_error(plot([solo, "-o", tmp_path / "curves"], cwd=tmp_path), "(no extension)")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_one_line_error(plot([solo, "-o", blocker / "c.png"], cwd=tmp_path), "cannot write")
    assert_one_line_error(
        plot([solo, "--label", "a", "--label", "b", "-o", out], cwd=tmp_path),
        "--label given 2 time(s) for 1 metrics file(s)",
    )
    assert_one_line_error(plot([solo, "--smooth", "0", "-o", out], cwd=tmp_path), "--smooth", "at least 1")
    assert_one_line_error(plot([solo, "--x", "epoch", "-o", out], cwd=tmp_path), "--x", "invalid choice")
    assert_one_line_error(plot([solo], cwd=tmp_path), "--output")
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "empty.jsonl", "garbage.jsonl", "no_x.jsonl"]
