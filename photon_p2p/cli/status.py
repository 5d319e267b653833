"""photon-status: a run's live peers and manifest, read from the DHT (joins as a client, trains nothing)."""

from __future__ import annotations

import argparse
import logging
import sys

from photon_p2p import __version__
from photon_p2p.cli.common import ArgumentParser, run_main, setup_logging
from photon_p2p.config import RUN_ID_PATTERN
from photon_p2p.dashboard.server import parse_serve
from photon_p2p.errors import ConfigError
from photon_p2p.runtime import quiet_hivemind
from photon_p2p.status import StatusOptions, run_status

DESCRIPTION = """\
Show a run's live peers (stage, round, step, tokens/s, loss, validation perplexity, device, last seen), its
manifest (model, tokenizer, local steps, outer optimizer, compression, max steps) and the swarm's total
throughput. It joins the DHT as a client with a throw-away identity, reads the records, and leaves."""

EPILOG = """\
examples:
  photon-status --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/QmXYZ... --run-id my-run
  photon-status --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/QmXYZ... --run-id my-run --watch
  photon-status --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/QmXYZ... --run-id my-run --json | jq .peers
  photon-status --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/QmXYZ... --run-id my-run --serve 8080

exit codes: 0 ok (also when --watch or --serve ends with Ctrl-C), 2 a problem to fix (bad address, nobody
answered, unknown run id: the error lists the run ids seen)"""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="photon-status",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--initial-peers",
        nargs="+",
        required=True,
        metavar="MULTIADDR",
        help="multiaddrs of any live peer or bootstrap node, e.g. "
        "/ip4/203.0.113.5/tcp/31337/p2p/QmXYZ... (printed by photon-bootstrap and every peer)",
    )
    parser.add_argument("--run-id", required=True, metavar="NAME", help="which run to show")
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (keys: run_id, manifest, peers, total_tokens_per_s, "
        "rejected_records, rejected_reasons) instead of the table; with --watch, one per line",
    )
    output.add_argument(
        "--serve",
        metavar="[HOST:]PORT",
        help="serve a live web dashboard (peers, throughput, loss and perplexity per round, round timeline, theta "
        "agreement, contributions) at http://HOST:PORT/ until Ctrl-C, instead of printing; HOST defaults to "
        "127.0.0.1. Another host makes the page public: it has no authentication",
    )
    parser.add_argument(
        "--serve-period",
        type=float,
        default=5.0,
        metavar="SEC",
        help="with --serve: seconds between reads of the DHT (default: 5)",
    )
    parser.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=5.0,
        default=None,
        metavar="SECONDS",
        help="refresh in place every SECONDS (default 5) until Ctrl-C",
    )
    parser.add_argument(
        "--join-timeout",
        type=float,
        default=15.0,
        metavar="SEC",
        help="give up if no initial peer answers within this time (default: 15)",
    )
    parser.add_argument(
        "--host-maddrs",
        nargs="+",
        default=["/ip4/127.0.0.1/tcp/0"],
        metavar="MULTIADDR",
        help="where this client's node listens (default: /ip4/127.0.0.1/tcp/0; it only makes "
        "outgoing connections, so loopback is enough)",
    )
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default="warning",
        metavar="LEVEL",
        help="debug, info, warning or error (default: warning)",
    )
    parser.add_argument("--version", action="version", version=f"photon-p2p {__version__}")
    return parser


def parse_options(argv: list[str] | None = None) -> tuple[StatusOptions, str]:
    args = build_parser().parse_args(argv)
    if not RUN_ID_PATTERN.match(args.run_id):
        raise ConfigError(f"--run-id {args.run_id!r}: use 1-64 letters, digits, '-' or '_'")
    if args.watch is not None and not args.watch > 0:
        raise ConfigError(f"--watch {args.watch:g}: must be > 0 seconds")
    serve = parse_serve(args.serve) if args.serve is not None else None
    if serve is not None and args.watch is not None:
        raise ConfigError("--watch: --serve refreshes by itself (every --serve-period seconds); drop --watch")
    if not args.serve_period >= 1:
        raise ConfigError(f"--serve-period {args.serve_period:g}: must be at least 1 second")
    if not args.join_timeout > 0:
        raise ConfigError(f"--join-timeout {args.join_timeout:g}: must be > 0")
    opts = StatusOptions(
        initial_peers=args.initial_peers,
        run_id=args.run_id,
        as_json=args.json,
        watch=args.watch,
        join_timeout=args.join_timeout,
        host_maddrs=args.host_maddrs,
        serve=serve,
        serve_period=args.serve_period,
    )
    return opts, args.log_level


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        opts, log_level = parse_options(argv)
        setup_logging(log_level)
        quiet_hivemind(log_level)
        if log_level != "debug":
            # invalid records are counted in the output itself; a log line for each kind would only repeat it
            logging.getLogger("photon_p2p.swarm.records").setLevel(logging.ERROR)
        return run_status(opts)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
