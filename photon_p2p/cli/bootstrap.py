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
  photon-bootstrap --host-maddrs /ip4/127.0.0.1/tcp/0 --identity-path /tmp/b.key   # local tests

private runs (README, "Private runs"): the owner issues a token per peer ID, and the bootstrap gets one too:
  photon-bootstrap issue-token --owner-key owner.key --peer-identity b.key --run-id my-run --out b.token
  photon-bootstrap --identity-path b.key --token b.token
  photon-bootstrap issue-token --owner-key owner.key --peer 12D3KooW... --run-id my-run --expires 7d --out p.token
  (photon-bootstrap issue-token --help for its flags)"""

ISSUE_DESCRIPTION = """\
Issue a token that lets one peer into a private run until it expires: the run owner's Ed25519 signature over the
run id, the peer's ID and the expiry. The peer passes it as photon-peer --token FILE (a bootstrap node as
photon-bootstrap --token FILE). Tokens are not secret: only the peer whose key matches the ID can use one. They
cannot be recalled, only expire: issue short ones and renew them. The owner key is created (mode 0600) if the
file does not exist; keep it private, and off the machines that run peers."""

ISSUE_EPILOG = """\
examples:
  photon-bootstrap issue-token --owner-key ~/.config/photon-p2p/owner.key --peer 12D3KooW... --run-id my-run \\
      --expires 7d --out alice.token
  photon-bootstrap issue-token --owner-key owner.key --peer-identity bootstrap.key --run-id my-run --out b.token"""


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


def build_issue_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="photon-bootstrap issue-token",
        description=ISSUE_DESCRIPTION,
        epilog=ISSUE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--owner-key",
        required=True,
        metavar="FILE",
        help="the run owner's private key (created with mode 0600 if missing)",
    )
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--peer", metavar="PEER_ID", help="the peer's ID, as its refusal line or its start-up log prints")
    who.add_argument(
        "--peer-identity",
        metavar="FILE",
        help="or the peer's identity file (its --identity-path; created if missing), e.g. for a bootstrap node",
    )
    parser.add_argument("--run-id", required=True, metavar="NAME", help="the private run's --run-id")
    parser.add_argument(
        "--expires",
        default="7d",
        metavar="DURATION",
        help="validity: 7d, 12h, 30m, 90s (default 7d)",
    )
    parser.add_argument("--out", required=True, metavar="FILE", help="where to write the token (JSON)")
    return parser


def issue_token_main(argv: list[str]) -> int:
    """photon-bootstrap issue-token: one line on stdout saying what was issued (the key itself is never printed)."""
    import os
    import time
    from pathlib import Path

    from photon_p2p.config import RUN_ID_PATTERN
    from photon_p2p.errors import ConfigError
    from photon_p2p.swarm.access import (
        check_peer_id,
        format_time,
        issue_token,
        load_or_create_owner_key,
        owner_public_text,
        parse_duration,
    )

    args = build_issue_parser().parse_args(argv)
    if not RUN_ID_PATTERN.match(args.run_id):
        raise ConfigError(f"--run-id {args.run_id!r}: use 1-64 letters, digits, '-' or '_'")
    seconds = parse_duration(args.expires, flag="--expires")
    if args.peer is not None:
        peer_id = check_peer_id(args.peer, flag="--peer")
    else:
        from photon_p2p.swarm.identity import Identity

        peer_id = Identity.load_or_create(args.peer_identity, flag="--peer-identity").peer_id.to_base58()
    key, created = load_or_create_owner_key(args.owner_key)
    if created:
        print(f"created owner key {args.owner_key} (mode 0600): keep it private", file=sys.stderr)
    token = issue_token(key, run_id=args.run_id, peer_id=peer_id, expires_at=time.time() + seconds)
    out = Path(args.out).expanduser()
    tmp = out.with_name(out.name + ".tmp")
    try:
        tmp.write_text(token.to_json() + "\n")
        os.replace(tmp, out)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot write ({e.strerror})") from None
    print(
        f"issued a token for peer {peer_id} in private run {args.run_id}, valid until "
        f"{format_time(token.expires_at)}, owner {owner_public_text(key.public_key())}: {out}",
        flush=True,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["issue-token"]:
        return run_main(lambda: issue_token_main(argv[1:]))

    def body() -> int:
        cfg = parse_config(argv)
        setup_logging(cfg.log_level)
        from photon_p2p.bootstrap import run_bootstrap  # hivemind is imported only after the flags parse

        return run_bootstrap(cfg)

    return run_main(body)


if __name__ == "__main__":
    sys.exit(main())
