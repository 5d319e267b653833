"""The bootstrap node: a long-lived DHT node that does not train, so a swarm always has a stable place to meet.

It is a plain hivemind DHT node with a persistent identity (the same ``/p2p/<peer ID>`` across restarts, so the
addresses you handed out keep working), listening on a fixed port over TCP and QUIC. It stores nothing of its own;
it answers DHT queries, keeps peers' records (manifests, heartbeats) like any other node, and - with relaying on -
relays connections for peers behind NAT. Several bootstrap nodes given each other as ``--initial-peers`` back each
other up: peers may list all of them, and any one that answers is enough.

Operating it: it prints the ``photon-peer --initial-peers ...`` line to hand out on start, then one status line
every ``--status-period`` seconds (DHT peers in the routing table, runs seen). SIGINT/SIGTERM stop it cleanly
(exit 0, no ``p2pd`` left behind); an unexpected death of its DHT process exits non-zero, so a supervisor
(systemd ``Restart=on-failure``) restarts it. See ``bootstrap/`` for a config file, a systemd unit and a container.
``--serve [HOST:]PORT`` adds a web dashboard of the runs it sees (photon_p2p/dashboard).
"""

from __future__ import annotations

import logging
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TextIO

from photon_p2p.config import Section, opt
from photon_p2p.dashboard.server import SERVE_HINT, parse_serve
from photon_p2p.errors import ConfigError, SwarmError
from photon_p2p.runtime import quiet_hivemind

logger = logging.getLogger(__name__)

DEFAULT_PORT = 31337
# TCP, and QUIC on the same port number (UDP): QUIC often gets through NATs that block inbound TCP. hivemind 1.1.12's
# p2pd speaks QUIC v1 only: it listens on ".../quic-v1" and silently ignores the old draft-29 ".../quic" addresses.
DEFAULT_HOST_MADDRS = (f"/ip4/0.0.0.0/tcp/{DEFAULT_PORT}", f"/ip4/0.0.0.0/udp/{DEFAULT_PORT}/quic-v1")


@dataclass(kw_only=True)
class BootstrapConfig(Section):
    """A DHT node that does not train: the stable entry point that peers pass as --initial-peers."""

    SECTION: ClassVar[str] = "bootstrap"

    host_maddrs: list[str] = opt(
        default_factory=lambda: list(DEFAULT_HOST_MADDRS),
        metavar="MULTIADDR",
        help="where to listen (default: all interfaces, TCP port 31337 and QUIC on UDP port "
        "31337: " + " ".join(DEFAULT_HOST_MADDRS) + "); open these ports in the "
        "firewall",
    )
    announce_maddrs: list[str] = opt(
        default_factory=list,
        metavar="MULTIADDR",
        help="public addresses to announce instead of the ones this machine sees, e.g. "
        "/ip4/203.0.113.5/tcp/31337 behind port forwarding (explicit ports only)",
    )
    identity_path: str | None = opt(
        None,
        metavar="FILE",
        help="private key file: keeps the same peer ID (and so the same addresses) across "
        "restarts; created with mode 0600 if missing. Without it, every start gets a "
        "new peer ID and the addresses handed out stop working",
    )
    initial_peers: list[str] = opt(
        default_factory=list,
        metavar="MULTIADDR",
        help="other bootstrap nodes (or any live peer) to join, so several bootstrap nodes "
        "back each other up (default: start a new swarm)",
    )
    relay: bool = opt(
        True,
        help="circuit relay: relay connections for peers behind NAT that cannot accept "
        "connections (once this node knows it is publicly reachable), and reach such peers "
        "through relays; --no-relay turns both off",
    )
    use_auto_relay: bool = opt(
        False,
        help="only if THIS node is behind NAT: look for relays to become reachable "
        "through them (a bootstrap node should rather have a public address)",
    )
    force_reachability: Literal["auto", "public", "private"] = opt(
        "auto",
        metavar="MODE",
        help="auto (let AutoNAT find out whether other peers can dial this node), public (skip the check: on a "
        "server with a public address, so it serves as a relay right away) or private (behind NAT)",
    )
    join_timeout: float = opt(
        30.0, metavar="SEC", help="with --initial-peers: give up if none of them answers within this time"
    )
    status_period: float = opt(
        60.0, metavar="SEC", help="seconds between status log lines (DHT peers in the routing table, runs seen)"
    )
    log_level: Literal["debug", "info", "warning", "error"] = opt(
        "info", metavar="LEVEL", help="debug, info, warning or error"
    )
    serve: str | None = opt(
        None,
        metavar="[HOST:]PORT",
        help="serve a live web dashboard of the runs announced in the DHT (pick one; peers, throughput, loss per "
        "round, theta agreement, contributions) at http://HOST:PORT/; HOST defaults to 127.0.0.1. Another host "
        "makes the page public: it has no authentication",
    )
    serve_period: float = opt(5.0, metavar="SEC", help="with --serve: seconds between the dashboard's DHT reads")
    token: str | None = opt(
        None,
        metavar="FILE",
        help="make this node serve one private run: the token its owner issued for this node's peer ID "
        "(photon-bootstrap issue-token --peer-identity THIS_IDENTITY_FILE ...); needs --identity-path. The node "
        "then answers only peers holding valid tokens of that run, and stops when its own token expires",
    )

    def validate(self) -> None:
        self.require("host_maddrs", bool(self.host_maddrs), "give at least one address to listen on")
        self.require(
            "force_reachability",
            self.force_reachability in ("auto", "public", "private"),
            "choose auto, public or private",
        )
        self.require("join_timeout", self.join_timeout > 0, "must be > 0")
        self.require("status_period", self.status_period >= 1, "must be at least 1 second")
        self.require(
            "log_level", self.log_level in ("debug", "info", "warning", "error"), "choose debug, info, warning or error"
        )
        if self.serve is not None:
            try:
                parse_serve(self.serve)
            except ConfigError:
                self.fail("serve", SERVE_HINT)
        self.require("serve_period", self.serve_period >= 1, "must be at least 1 second")
        if self.token is not None and not self.identity_path:
            self.fail("token", "needs --identity-path: a token is issued for one peer ID, i.e. one identity file")


SECTIONS: tuple[type[Section], ...] = (BootstrapConfig,)


def check_addresses(cfg: BootstrapConfig) -> None:
    """Every multiaddr and every port, before anything is created or started: a bad one is a one-line error."""
    from hivemind.utils.multiaddr import Multiaddr

    from photon_p2p.swarm.dht import check_ports_free, validate_maddrs

    validate_maddrs(cfg.host_maddrs, flag="--host-maddrs", need_peer_id=False)
    validate_maddrs(cfg.initial_peers, flag="--initial-peers", need_peer_id=True)
    for addr in validate_maddrs(cfg.announce_maddrs, flag="--announce-maddrs", need_peer_id=False):
        maddr = Multiaddr(addr)
        if any(proto in maddr and maddr.value_for_protocol(proto) == "0" for proto in ("tcp", "udp")):
            raise ConfigError(f"--announce-maddrs {addr}: announce the real port, not port 0")
    check_ports_free(cfg.host_maddrs)


# --------------------------------------------------------------------------------------------------------------
# status reports (these coroutines run inside the DHT process, via DHT.run_coroutine)


async def _routing_table_peers(_dht: Any, node: Any) -> list[str]:
    """Peer IDs in this node's routing table. Like hivemind-dht, also look up a random key: that contacts peers
    and drops the ones that stopped answering, so a long-lived node does not collect dead entries."""
    await node.get(f"photon.ping.{secrets.token_hex(8)}", latest=True)
    return sorted(peer_id.to_base58() for peer_id in node.protocol.routing_table.uid_to_peer_id.values())


class StatusReporter:
    """Builds the periodic status line; remembers the previous routing table to report arrivals and departures."""

    def __init__(self, dht: Any, calls: Any):
        from photon_p2p.swarm.records import RejectCounter

        self.dht, self.calls = dht, calls
        self.rejects = RejectCounter()
        self.known: set[str] | None = None

    def line(self, timeout: float = 20.0) -> str:
        from photon_p2p.swarm.manifest import list_runs

        # through DHTCalls: the DHT's control pipe is not thread-safe, and the dashboard polls from its own thread
        peers = set(self.calls.run_coroutine(_routing_table_peers, timeout=timeout))
        change = ""
        if self.known is not None:
            joined, left = len(peers - self.known), len(self.known - peers)
            change = f" (+{joined} -{left} since the last report)" if joined or left else " (no change)"
        self.known = peers
        runs = list_runs(self.calls, self.rejects)
        runs_text = ", ".join(f"{r.run_id} (manifest {r.manifest_hash[:12]})" for r in runs) if runs else "none"
        dropped = f"; {self.rejects.total} invalid records dropped so far" if self.rejects.total else ""
        count = f"{len(peers)} DHT peer{'' if len(peers) == 1 else 's'}"
        return f"{count} in the routing table{change}; runs seen: {runs_text}{dropped}"


# --------------------------------------------------------------------------------------------------------------
# the service


def paste_line(maddrs: list[str]) -> str:
    return "photon-peer --initial-peers " + " ".join(maddrs)


def run_bootstrap(cfg: BootstrapConfig, *, out: TextIO | None = None) -> int:
    """Run the node until SIGINT/SIGTERM (exit 0); raise SwarmError if it cannot start or its DHT process dies."""
    quiet_hivemind(cfg.log_level)
    from photon_p2p.swarm.access import format_time, install_log_filter, open_access, start_dht_with_access
    from photon_p2p.swarm.dht import DHTCalls, stop_dht, visible_maddrs
    from photon_p2p.swarm.identity import Identity

    install_log_filter()
    out = out or sys.stdout
    dht = dashboard = None
    try:
        # everything that can fail on bad local input fails here, before any file is written or process started
        check_addresses(cfg)
        if cfg.identity_path:
            identity = Identity.load_or_create(cfg.identity_path)
        else:
            identity = None
            logger.warning(
                "no --identity-path: this node gets a new peer ID on every start, so the addresses it "
                "prints stop working after a restart; pass --identity-path FILE for a stable one"
            )
        access = open_access(cfg.token, identity, alone=not cfg.initial_peers, who="this node")
        reachability = None if cfg.force_reachability == "auto" else cfg.force_reachability
        dht = start_dht_with_access(
            access,
            identity,
            initial_peers=cfg.initial_peers,
            host_maddrs=cfg.host_maddrs,
            announce_maddrs=cfg.announce_maddrs,
            client_mode=False,
            use_relay=cfg.relay,
            use_auto_relay=cfg.use_auto_relay,
            join_timeout=cfg.join_timeout,
            force_reachability=reachability,
        )
        if access is not None:
            logger.info(
                "private run %s (owner %s): only peers with its tokens are answered; this node's token expires %s",
                access.run_id,
                access.token.owner,
                format_time(access.token.expires_at),
            )
        maddrs = visible_maddrs(dht)
        peer_id = maddrs[0].rsplit("/p2p/", 1)[-1]
        logger.info(
            "bootstrap node %s is up%s; peers join with the line below (on stdout)",
            peer_id,
            f" (identity {identity.path})" if identity is not None else "",
        )
        print(paste_line(maddrs), file=out, flush=True)
        calls = DHTCalls(dht)
        if cfg.serve is not None:
            dashboard = start_dashboard(calls, *parse_serve(cfg.serve), period=cfg.serve_period)
            print(f"dashboard at {dashboard.url} (Ctrl-C to stop)", file=out, flush=True)
        _serve(dht, calls, cfg.status_period, access)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM (GracefulExit): the normal way to stop a service
        logger.info("shutting down")
    finally:
        if dashboard is not None:
            dashboard.stop()
        stop_dht(dht)
    return 0


def start_dashboard(calls: Any, host: str, port: int, *, period: float) -> Any:
    """--serve: the web dashboard (photon_p2p/dashboard) of the runs announced in the DHT; the page picks one."""
    from photon_p2p.dashboard.server import Dashboard
    from photon_p2p.status import gather
    from photon_p2p.swarm.manifest import list_runs
    from photon_p2p.swarm.records import RejectCounter

    manifests: dict[str, Any] = {}  # the last manifest seen of each run, kept if its record briefly disappears

    def snapshot(run_id: str) -> dict[str, Any]:
        status = gather(calls, run_id, attempts=1, known=manifests.get(run_id))
        manifests[run_id] = status["manifest"]
        return status

    def runs() -> list[dict[str, Any]]:
        return [
            {"run_id": a.run_id, "manifest_hash": a.manifest_hash, "time": a.time}
            for a in list_runs(calls, RejectCounter())
        ]

    return Dashboard(snapshot, list_runs=runs, period=period).start(host, port)


def _serve(dht: Any, calls: Any, period: float, access: Any = None) -> None:
    reporter = StatusReporter(dht, calls)
    next_report = time.monotonic()
    while True:
        if access is not None and access.token.expires_at <= time.time():
            from photon_p2p.swarm.access import format_time

            raise SwarmError(
                f"run {access.run_id}: this node's token expired {format_time(access.token.expires_at)}; ask the "
                f"run's owner for a new one (photon-bootstrap issue-token --peer-identity {access.identity.path}) "
                f"and restart with --token NEW_FILE"
            )
        if not dht.is_alive():
            raise SwarmError(
                f"the DHT process died unexpectedly (exit code {dht.exitcode}); restart photon-bootstrap "
                f"(run it with --log-level debug to see why)"
            )
        if time.monotonic() >= next_report:
            try:
                logger.info(reporter.line())
            except Exception as e:  # a slow or failed lookup is worth a line, never the node
                logger.warning("status lookup failed (%s); still serving", e or type(e).__name__)
            next_report = time.monotonic() + period
        time.sleep(min(1.0, period))
