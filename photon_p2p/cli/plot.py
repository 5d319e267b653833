"""``photon-plot``: training curves (loss, validation perplexity, throughput) from --metrics-file JSONL files.

    photon-plot runs/solo/metrics.jsonl -o curves.png
    photon-plot runs/solo/metrics.jsonl runs/swarm/peer0.jsonl --x tokens -o compare.svg --smooth 20
    photon-plot a.jsonl b.jsonl --label "local only" --label "4 peers" --x time --title "micro, 4 peers" -o out.pdf

Several files overlay as several lines. --x tokens is the tokens each peer trained on (the cumulative ``tokens``
of its records; for swarm files written before per-step records, the running sum of each round's ``own_tokens``);
--x time is wall-clock hours since each file's first record. Unparsable lines (such as the truncated last line of
a run that is still writing) are skipped and counted.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from photon_p2p.cli.common import ArgumentParser, run_main, setup_logging
from photon_p2p.errors import DataError
from photon_p2p.plot import X_AXES  # photon_p2p.plot imports matplotlib only when drawing

logger = logging.getLogger("photon_p2p.cli.plot")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="photon-plot",
        description="Plot training loss, validation perplexity and throughput from the --metrics-file JSONL "
        "files of photon-peer or photon-swarm runs, one line per file.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "metrics",
        nargs="+",
        metavar="METRICS.jsonl",
        help="one or more metrics files (--metrics-file of photon-peer / photon-swarm)",
    )
    parser.add_argument(
        "--output",
        "-o",
        required=True,
        metavar="FILE",
        help="image to write; the format follows the extension: .png, .svg or .pdf (replaced if it exists)",
    )
    parser.add_argument(
        "--x",
        default="step",
        choices=X_AXES,
        help="x axis: step, tokens (cumulative tokens this peer trained on) or time (wall-clock "
        "hours since each file's first record) (default: step)",
    )
    parser.add_argument(
        "--label",
        action="append",
        metavar="TEXT",
        help="legend label of a file; give it once per file, in order (default: the file's parent "
        "directory and name, e.g. solo/metrics)",
    )
    parser.add_argument("--title", default=None, metavar="TEXT", help="figure title (default: none)")
    parser.add_argument(
        "--smooth",
        type=_positive_int,
        default=1,
        metavar="N",
        help="draw the training loss as a moving average over N points, the raw curve faintly "
        "behind it (default: 1, no smoothing)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="debug, info, warning or error (default: info)",
    )
    return parser


def plot(args: argparse.Namespace) -> int:
    from photon_p2p.plot import build_curves, draw, labels_for, load_records, output_format

    output = Path(args.output)
    output_format(output)  # a bad extension fails before any file is read
    paths = [Path(p) for p in args.metrics]
    labels = labels_for(paths, args.label)
    files = [load_records(p) for p in paths]
    for f in files:
        if f.skipped:
            lines = ", ".join(str(n) for n in f.skipped_lines) + (", ..." if f.skipped > len(f.skipped_lines) else "")
            logger.warning("%s: skipped %d line(s) that are not JSON records (line %s)", f.path, f.skipped, lines)
        if not f.records:
            logger.warning("%s: holds no records", f.path)
    if not any(f.records for f in files):
        raise DataError(
            f"no records in {', '.join(str(p) for p in paths)}: nothing to plot (is it the "
            f"--metrics-file of a run that has logged at least one step?)"
        )
    curves = [build_curves(f, args.x, label) for f, label in zip(files, labels, strict=True)]
    if not any(c.used for c in curves):
        raise DataError(
            f"no record in {', '.join(str(p) for p in paths)} has both a '{args.x}' value (--x "
            f"{args.x}) and a loss, val_ppl or tokens_per_s"
        )
    draw(curves, output, axis=args.x, title=args.title, smooth=args.smooth)
    summary = "; ".join(
        f"{c.source.path}: {c.used} of {len(c.source.records)} records"
        + (f", {c.source.skipped} bad line(s) skipped" if c.source.skipped else "")
        for c in curves
    )
    print(f"wrote {output} (x: {args.x}) from {summary}")
    return 0


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        args = build_parser().parse_args(argv)
        setup_logging(args.log_level)
        return plot(args)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
