"""photon-peer: train on your own data, alone or as one peer of a swarm."""

from __future__ import annotations

import argparse
import sys

from photon_p2p import __version__
from photon_p2p.cli.common import ArgumentParser, run_main, setup_logging
from photon_p2p.config import SECTIONS, RunConfig, add_section_arguments, build_config

DESCRIPTION = """\
Train a language model on your own text. With --initial-peers, join a swarm: peers train their own copy for
--local-steps steps, then merge the copies with Butterfly All-Reduce (no central server). Without it, start a new
swarm that others can join (the addresses to give them are printed), or train alone with --local-only.

Every flag can also be set in a TOML file (--config); flags win over the file."""

EPILOG = """\
examples:
  photon-peer --data default --model tiny --max-steps 300 --local-only
  photon-peer --data ~/corpus --run-id my-run --checkpoint-dir ckpt --metrics-file metrics.jsonl
  photon-peer --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/12D3KooW... --run-id my-run --data ~/corpus"""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="photon-peer", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file (flags override it)")
    parser.add_argument("--version", action="version", version=f"photon-p2p {__version__}")
    add_section_arguments(parser, SECTIONS)
    return parser


def parse_config(argv: list[str] | None = None) -> tuple[RunConfig, set[str]]:
    args = build_parser().parse_args(argv)
    sections, explicit = build_config(args, SECTIONS, args.config)
    return RunConfig(**sections), explicit


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        cfg, explicit = parse_config(argv)
        setup_logging(cfg.log.log_level)
        from photon_p2p.peer import run_peer  # heavy imports (torch, hivemind) only after flags parse

        run_peer(cfg, explicit)
        return 0

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
