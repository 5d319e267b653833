"""photon-swarm: a bootstrap node and N peers on this machine, each with its share of the data."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from photon_p2p.cli.common import ArgumentParser, run_main, setup_logging
from photon_p2p.runtime import progress_enabled

DESCRIPTION = """\
Start a whole swarm on this machine: a photon-bootstrap node and --peers photon-peer processes on 127.0.0.1,
each with its own share of --data, its own checkpoints and metrics under --workdir. Every other flag is passed
to each photon-peer (see photon-peer --help), e.g. --model, --max-steps, --local-steps, --compression.
Ctrl-C stops every process; run the same command again (without --fresh) to resume from the checkpoints.

With --simulate, no process is started: the same peers (same data shares, model, seeds, inner loop, outer
optimizer and round rules) run one after the other in this process with exact averaging (hivemind's codecs
emulate --compression). It is the fast way to sweep hyper-parameters, and the yardstick for the real swarm: a
healthy swarm with the same flags ends no more than ~2% above its val loss (lower when short rounds overshoot
--local-steps; photon_p2p/swarm/simulate.py)."""

EPILOG = """\
examples:
  photon-swarm --peers 3 --data default --model tiny --max-steps 600 --local-steps 50
  photon-swarm --peers 4 --data corpus/ --split by-file --outer-optimizer nesterov --workdir runs/nesterov
  photon-swarm --simulate --peers 4 --data default --model micro --max-steps 200 --local-steps 20 --lr 1e-2"""

# the launcher sets these per peer; accepting them from the user would silently break the swarm
RESERVED = (
    "--initial-peers",
    "--host-maddrs",
    "--checkpoint-dir",
    "--metrics-file",
    "--data-partition",
    "--local-only",
    "--resume",
    "--fresh",
    "--data",
)


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="photon-swarm",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--peers", type=int, default=3, metavar="N", help="number of peers (default: 3)")
    p.add_argument(
        "--data",
        nargs="+",
        required=True,
        metavar="PATH",
        help="the corpus to share out: files, directories, globs, or 'default' (the Python standard library's sources)",
    )
    p.add_argument(
        "--split",
        choices=("iid", "by-file"),
        default="iid",
        help="iid: every peer gets a disjoint 1/N of the sequences of the whole corpus; by-file: the files "
        "are dealt out, so peers see different documents (default: iid)",
    )
    p.add_argument(
        "--workdir",
        default="runs/swarm",
        metavar="DIR",
        help="per-peer checkpoints, metrics and logs go here (default: runs/swarm)",
    )
    p.add_argument("--fresh", action="store_true", help="delete --workdir first instead of resuming from it")
    p.add_argument(
        "--simulate",
        action="store_true",
        help="run the peers in this process instead (exact averaging, no network): for hyper-parameter sweeps and "
        "as the yardstick for the real swarm; writes --workdir/simulated.jsonl, resumes nothing",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="torch threads per peer (default: the CPU cores divided among the peers)",
    )
    p.add_argument(
        "--log-level",
        default="info",
        choices=("debug", "info", "warning", "error"),
        help="log level of this launcher (default: info)",
    )
    return p


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    from photon_p2p.cli.peer import build_parser as peer_parser
    from photon_p2p.errors import ConfigError

    args, rest = build_parser().parse_known_args(argv)
    if args.peers < 1:
        raise ConfigError(f"--peers {args.peers}: must be at least 1")
    for flag in rest:
        if flag.split("=")[0] in RESERVED:
            raise ConfigError(f"{flag.split('=')[0]} is set by photon-swarm for each peer; remove it")
    # validate the pass-through flags once, here, instead of N times in N failing peers
    peer_parser().parse_args(["--data", "x", *rest])
    if args.simulate and "--round-seconds" in {f.split("=")[0] for f in rest}:
        raise ConfigError(
            "--round-seconds cannot be simulated (time-based rounds are not reproducible); use --local-steps"
        )
    return args, rest


def run_simulation(args: argparse.Namespace, rest: list[str]) -> int:
    """--simulate: the same peers in this process (swarm/simulate.py); one line per round, then the final figures."""
    from photon_p2p.cli.peer import parse_config
    from photon_p2p.errors import ConfigError
    from photon_p2p.swarm.simulate import Simulator
    from photon_p2p.train.metrics import MetricsWriter

    if args.threads:
        rest = [*rest, "--threads", str(args.threads)]
    cfg, _ = parse_config(["--data", *args.data, *rest])
    workdir = Path(args.workdir)
    path = workdir / "simulated.jsonl"
    if path.exists():
        if not args.fresh:
            raise ConfigError(f"{path} exists: pass --fresh to replace it, or another --workdir")
        path.unlink()
    sim = Simulator(cfg, data=args.data, peers=args.peers, split=args.split, progress=progress_enabled(True))
    print(
        f"photon-swarm --simulate: {args.peers} peers in one process, data split {args.split}, "
        f"{sim.sessions[0].model_args.n_layers}-layer model, metrics in {path}",
        file=sys.stderr,
        flush=True,
    )
    metrics = MetricsWriter(str(path))
    try:
        result = sim.run(lambda rec: (metrics.write(rec), print(f"sim | {_row(rec)}", file=sys.stderr, flush=True)))
    finally:
        metrics.close()
    print(
        f"\nsummary: {len(result.rounds)} rounds, {result.tokens:,} tokens in {result.seconds:.0f}s; "
        f"final val loss {result.val_loss:.4f}, val ppl {result.val_ppl:.2f}",
        file=sys.stderr,
    )
    return 0


class Display:
    """A live table on a terminal; one line per round otherwise (logs, CI)."""

    def __init__(self, live: bool):
        self.live = live
        self.lines_drawn = 0
        self.last: dict[str, dict[str, Any]] = {}

    def started(self, entry: str, peers: list, plan: Any) -> None:
        print(
            f"photon-swarm: bootstrap {entry}\n{len(peers)} peers, data split {plan.split}, logs and checkpoints "
            f"in {plan.workdir}/",
            file=sys.stderr,
            flush=True,
        )

    def record(self, peer: Any, rec: dict[str, Any]) -> None:
        if "outcome" not in rec:  # only round records ('step' and 'eval' records carry a round number too)
            return
        previous = self.last.get(peer.name, {})
        self.last[peer.name] = {**previous, **{k: v for k, v in rec.items() if v is not None}}
        if not self.live:
            print(f"{peer.name} | {_row(rec)}", file=sys.stderr, flush=True)

    def refresh(self, peers: list) -> None:
        if not self.live:
            return
        width = shutil.get_terminal_size((120, 20)).columns
        rows = [
            f"{'peer':8} {'state':8} {'round':>5} {'step':>7} {'outcome':9} {'group':>5} {'loss':>8} "
            f"{'val ppl':>8} {'tok/s':>8}"
        ]
        for p in peers:
            r = self.last.get(p.name, {})
            state = "running" if p.alive() else f"exit {p.popen.returncode}"
            rows.append(
                f"{p.name:8} {state:8} {r.get('round', '-'):>5} {r.get('step', '-'):>7} "
                f"{r.get('outcome', '-'):9} {r.get('group_size', '-'):>5} {_num(r.get('loss')):>8} "
                f"{_num(r.get('val_ppl'), 2):>8} {_num(r.get('tokens_per_s'), 0):>8}"
            )
        out = ("\x1b[F" * self.lines_drawn) + "\n".join("\x1b[2K" + row[:width] for row in rows) + "\n"
        sys.stderr.write(out)
        sys.stderr.flush()
        self.lines_drawn = len(rows)


def _num(x: Any, digits: int = 3) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def _row(r: dict[str, Any]) -> str:
    ppl = f" | val ppl {_num(r['val_ppl'], 2)}" if r.get("val_ppl") is not None else ""
    return (
        f"round {r['round']} | step {r['step']} | {r['outcome']} | group {r['group_size']} | "
        f"{r.get('tokens', 0):,} tok | loss {_num(r.get('loss'))}{ppl} | "
        f"all-reduce {r.get('allreduce_s', 0):.2f}s | sent {r.get('bytes_sent', 0):,} B"
    )


def print_summary(summary: dict[str, Any]) -> None:
    print("\nsummary:", file=sys.stderr)
    for name, p in summary["peers"].items():
        ppl = f", val ppl {p['val_ppl']:.2f}" if p.get("val_ppl") else ""
        loss = (
            f", loss {p['first_loss']:.3f} -> {p['last_loss']:.3f}"
            if p.get("first_loss") is not None and p.get("last_loss") is not None
            else ""
        )
        print(f"  {name}: {p['rounds']} rounds, {p['steps']} steps{loss}{ppl}", file=sys.stderr)
    sent = summary["bytes_sent_total"]
    if summary.get("communication_saved"):
        print(
            f"  communication: {sent / 1e6:.1f} MB sent by all peers; per-step data parallelism would have sent "
            f"{summary['bytes_sent_data_parallel'] / 1e6:,.0f} MB: {summary['communication_saved']:.0f}x less",
            file=sys.stderr,
        )
    for name, code in summary.get("failed", {}).items():
        print(f"  {name} exited with code {code}: see its log", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        from photon_p2p.launch import SwarmPlan, run_swarm

        args, rest = parse(argv)
        setup_logging(args.log_level)
        if args.simulate:
            return run_simulation(args, rest)
        plan = SwarmPlan(
            peers=args.peers,
            data=args.data,
            split=args.split,
            workdir=Path(args.workdir),
            peer_args=rest,
            fresh=args.fresh,
            threads=args.threads,
        )
        summary = run_swarm(plan, Display(live=progress_enabled(True)))
        print_summary(summary)
        return 1 if summary.get("failed") else 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
