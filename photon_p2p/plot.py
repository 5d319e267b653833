"""Training curves from ``--metrics-file`` JSONL files: lenient loading, one series per metric, a matplotlib figure.

Three kinds of records share these files (photon_p2p/train/metrics.py, photon_p2p/swarm/report.py):

* ``step`` records, every --log-every inner steps: ``step``, ``loss``, ``tokens`` (this peer's, cumulative),
  ``tokens_per_s``, ...;
* ``eval`` records: ``step``, ``val_loss``, ``val_ppl`` (of theta in a swarm) and ``tokens`` (cumulative);
* ``round`` records, one per swarm round: ``step``, ``loss``, ``val_ppl`` (when evaluated), ``tokens`` (the
  group's tokens this round, not cumulative), ``own_tokens`` (this peer's, this round), ``tokens_per_s``.

Older files have no ``kind``: a record with a ``round`` key is a round record, any other a step record (their
evaluations were step records with ``val_ppl``). Records of a kind not listed here are ignored.

Each panel takes its points from the first kind, in the order step, eval, round, whose records in that file carry
the panel's metric: round records only fill what a file has no finer records for (files written before per-step
records existed), and one line never mixes two granularities.

The x axis is one of ``step``, ``tokens`` or ``time``:

* ``tokens`` is the tokens this peer has trained on: the ``tokens`` field of step and eval records (already
  cumulative), and for round records the running sum of ``own_tokens`` (or of ``tokens`` where a record has no
  ``own_tokens``). So a swarm file written before per-step records and one written after agree, and a peer's curve
  compares with a --local-only run at equal compute per peer; the swarm's total is the sum over its peers' files.
* ``time`` is wall-clock hours since the first record of the same file.

A resumed run appends records again from its checkpoint's step: the last record at an x value wins, and points are
drawn in x order, so the line does not zigzag back.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from photon_p2p.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

X_AXES = ("step", "tokens", "time")
FORMATS = (".png", ".svg", ".pdf")
# (metric, panel title, y-axis label); the metric name is the record key
PANELS = (
    ("loss", "training loss", "loss"),
    ("val_ppl", "validation perplexity", "perplexity"),
    ("tokens_per_s", "throughput", "tokens/s"),
)
X_LABELS = {"step": "step", "tokens": "tokens", "time": "wall-clock hours"}

Record = dict[str, Any]


# --------------------------------------------------------------------------------------------------------------
# loading


@dataclass
class MetricsFile:
    """The records of one metrics file, and how many of its lines could not be parsed."""

    path: Path
    records: list[Record]
    skipped: int = 0
    skipped_lines: list[int] = field(default_factory=list)  # 1-based line numbers, the first few only


def load_records(path: str | Path) -> MetricsFile:
    """Every JSON object of a JSONL file. Lines that are not a JSON object (a truncated last line of a run still
    writing or killed mid-write, an edited file) are skipped and counted, never fatal; blank lines are ignored."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file; give the --metrics-file of a photon-peer or photon-swarm run")
    if p.is_dir():
        raise DataError(f"{p}: is a directory; give a metrics .jsonl file")
    out = MetricsFile(path=p, records=[])
    try:
        # errors="replace": a torn multi-byte character must cost one line, not the whole file
        with p.open(encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError:
                    record = None
                if isinstance(record, dict):
                    out.records.append(record)
                else:
                    out.skipped += 1
                    if len(out.skipped_lines) < 5:
                        out.skipped_lines.append(number)
    except OSError as e:
        raise DataError(f"{p}: cannot read ({e.strerror or e})") from None
    return out


KINDS = ("step", "eval", "round")  # also the order of preference of a panel's source


def record_kind(record: Record) -> str | None:
    """The kind of a record: step, eval, round, or None for a kind this module does not plot."""
    kind = record.get("kind")
    if kind is None:  # files written before records had a kind
        return "round" if "round" in record else "step"
    return kind if kind in KINDS else None


def _number(value: Any) -> float | None:
    """A finite number, or None (missing values, nulls written for NaN, strings, booleans)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _metric(record: Record, metric: str) -> float | None:
    value = _number(record.get(metric))
    if value is None and metric == "val_ppl":  # older or hand-written records may hold only the loss
        val_loss = _number(record.get("val_loss"))
        if val_loss is not None and val_loss < 700:  # exp() overflows beyond ~709
            value = math.exp(val_loss)
    return value


# --------------------------------------------------------------------------------------------------------------
# series


@dataclass
class Series:
    x: list[float] = field(default_factory=list)
    y: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.x)


@dataclass
class Curves:
    """One file's lines, one per panel metric, and how many of its records they use."""

    label: str
    source: MetricsFile
    series: dict[str, Series]
    used: int


def x_positions(records: list[Record], axis: str) -> list[float | None]:
    """The x value of every record (None where it has none) on ``axis`` (see the module docstring)."""
    if axis not in X_AXES:
        raise ValueError(f"axis must be one of {X_AXES}, not {axis!r}")
    if axis == "step":
        return [_number(r.get("step")) for r in records]
    if axis == "time":
        times = [_number(r.get("time")) for r in records]
        start = next((t for t in times if t is not None), None)
        return [None if t is None or start is None else (t - start) / 3600.0 for t in times]
    out: list[float | None] = []
    round_total = 0.0
    for r in records:
        kind = record_kind(r)
        if kind == "round":
            added = _number(r.get("own_tokens")) if "own_tokens" in r else _number(r.get("tokens"))
            round_total += added or 0.0
            out.append(round_total)
        else:
            out.append(None if kind is None else _number(r.get("tokens")))
    return out


def build_curves(source: MetricsFile, axis: str, label: str) -> Curves:
    """The points of every panel for one file; ``used`` counts the records that gave at least one point."""
    records = source.records
    xs = x_positions(records, axis)
    kinds = [record_kind(r) for r in records]
    series: dict[str, Series] = {}
    used: set[int] = set()
    for metric, _, _ in PANELS:
        points: dict[str, list[tuple[int, float, float]]] = {kind: [] for kind in KINDS}
        for i, (record, kind, x) in enumerate(zip(records, kinds, xs, strict=True)):
            y = _metric(record, metric)
            if kind is not None and x is not None and y is not None:
                points[kind].append((i, x, y))
        chosen = next((points[kind] for kind in KINDS if points[kind]), [])  # one kind only: see the docstring
        last_at_x: dict[float, tuple[int, float]] = {}
        for i, x, y in chosen:
            last_at_x[x] = (i, y)  # a resumed run's later record for the same x wins
        s = Series()
        for x in sorted(last_at_x):
            i, y = last_at_x[x]
            s.x.append(x)
            s.y.append(y)
            used.add(i)
        series[metric] = s
    return Curves(label=label, source=source, series=series, used=len(used))


def moving_average(values: list[float], n: int) -> list[float]:
    """Trailing mean over the last ``n`` points (fewer at the start), so the line keeps every x value."""
    if n <= 1:
        return list(values)
    out: list[float] = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= n:
            total -= values[i - n]
        out.append(total / min(i + 1, n))
    return out


def default_label(path: Path) -> str:
    """``<parent directory>/<file stem>``: runs usually differ by directory and all name the file metrics.jsonl."""
    parent = path.resolve().parent.name
    return f"{parent}/{path.stem}" if parent else path.stem


def labels_for(paths: list[Path], given: list[str] | None) -> list[str]:
    if not given:
        return [default_label(p) for p in paths]
    if len(given) != len(paths):
        raise ConfigError(
            f"--label given {len(given)} time(s) for {len(paths)} metrics file(s); give it once per "
            f"file, in the same order, or not at all"
        )
    return list(given)


# --------------------------------------------------------------------------------------------------------------
# drawing


def output_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ConfigError(
            f"--output {path}: unknown image format {suffix or '(no extension)'!r}; end the name with "
            f"{', '.join(FORMATS)}"
        )
    return suffix[1:]


def draw(
    curves: Iterable[Curves], output: Path, *, axis: str = "step", title: str | None = None, smooth: int = 1
) -> None:
    """Draw the panels (loss, validation perplexity, throughput) with one line per file and write ``output``.

    The image is written to a temporary file that is renamed into place: ``output`` is never half-written."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must come before pyplot
    import matplotlib.pyplot as plt

    curves = list(curves)
    fmt = output_format(output)
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(9, 3.2 * len(PANELS)), sharex=True, squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    try:
        for ax, (metric, panel_title, y_label) in zip(axes[:, 0], PANELS, strict=True):
            ax.set_title(panel_title, fontsize=11)
            ax.set_ylabel(y_label)
            ax.grid(True, alpha=0.3)
            drawn = False
            for n, c in enumerate(curves):
                s = c.series[metric]
                if not len(s):
                    continue
                color = colors[n % len(colors)]
                if metric == "loss" and smooth > 1:
                    ax.plot(s.x, s.y, color=color, alpha=0.25, linewidth=0.8)
                    ax.plot(s.x, moving_average(s.y, smooth), color=color, label=f"{c.label} (mean of {smooth})")
                else:
                    marker = "o" if len(s) < 30 else None  # evaluations are sparse: show where they were taken
                    ax.plot(s.x, s.y, color=color, label=c.label, marker=marker, markersize=3)
                drawn = True
            if not drawn:
                ax.text(
                    0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray", fontsize=14
                )
                continue
            if metric == "val_ppl":
                _log_scale_if_wide(ax, [y for c in curves for y in c.series[metric].y])
            elif metric == "tokens_per_s":
                ax.set_ylim(bottom=0)  # a dip should look like its real size, not fill the panel
            ax.legend(fontsize=8, loc="best")
        axes[-1, 0].set_xlabel(X_LABELS[axis])
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        _save(fig, output, fmt)
    finally:
        plt.close(fig)


def _log_scale_if_wide(ax: Any, values: list[float]) -> None:
    """Perplexity falls by orders of magnitude early on: a log axis then keeps the late, small gains visible."""
    from matplotlib.ticker import FuncFormatter, LogFormatter

    if not values or min(values) <= 0 or max(values) / min(values) < 5:
        return
    ax.set_yscale("log")
    # plain numbers (20, 300), not 2x10^1; minor ticks labelled only where the axis spans few decades
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False, minor_thresholds=(2, 0.5)))


def _save(fig: Any, output: Path, fmt: str) -> None:
    tmp = output.with_name(f".{output.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, format=fmt, dpi=120)
        os.replace(tmp, output)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        where = f"{e.filename}: " if e.filename and str(e.filename) != str(tmp) else ""  # e.g. a parent that is a file
        raise ConfigError(f"--output {output}: cannot write ({where}{e.strerror or e})") from None
