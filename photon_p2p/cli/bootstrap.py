"""photon-bootstrap: run a long-lived DHT node that peers join through (it does not train)."""

from __future__ import annotations

import argparse
import sys

from photon_p2p import __version__
from photon_p2p.bootstrap import SECTIONS, BootstrapConfig
from photon_p2p.cli.common import ArgumentParser, run_main, setup_logging
from photon_p2p.config import add_section_arguments, build_config

DESCRIPTION = """\
Run a bootstrap node: a DHT node that does not train, the stable address volunteers pass to photon-peer
--initial-peers. On start it prints that line, ready to paste; then a status line every --status-period seconds.
It runs with zero peers and as peers come and go; SIGINT/SIGTERM stop it cleanly (exit 0).

Every flag can also be set in a TOML file (--config) under a [bootstrap] table, with the flag's name as key
(host_maddrs, identity_path, ...); flags win over the file. bootstrap/ has a commented example."""

EPILOG = """\
examples:
  photon-bootstrap --identity-path ~/.config/photon-p2p/bootstrap.key
  photon-bootstrap --config bootstrap/photon-bootstrap.toml
  photon-bootstrap --identity-path b.key --serve 8080   # plus a web dashboard at http://127.0.0.1:8080/
  photon-bootstrap --identity-path b2.key --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/QmXYZ...
  photon-bootstrap --host-maddrs /ip4/127.0.0.1/tcp/0 --identity-path /tmp/b.key   # local tests"""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="photon-bootstrap",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE.toml", help="read settings from a TOML file (flags override it)")
    parser.add_argument("--version", action="version", version=f"photon-p2p {__version__}")
    add_section_arguments(parser, SECTIONS)
    return parser


def parse_config(argv: list[str] | None = None) -> BootstrapConfig:
    args = build_parser().parse_args(argv)
    sections, _ = build_config(args, SECTIONS, args.config)
    cfg = sections[BootstrapConfig.SECTION]
    assert isinstance(cfg, BootstrapConfig)
    return cfg


def main(argv: list[str] | None = None) -> int:
    def body() -> int:
        cfg = parse_config(argv)
        setup_logging(cfg.log_level)
        from photon_p2p.bootstrap import run_bootstrap  # hivemind is imported only after the flags parse

        return run_bootstrap(cfg)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
