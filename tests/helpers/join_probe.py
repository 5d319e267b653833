"""A stand-in for photon-peer's join, for the one-swarm test: join exactly as a peer does, beat, count who we see.

Per iteration i it waits for the file ``<workdir>/go-<i>`` (the barrier that makes all probes start at the same
instant), then does what ``photon_p2p.peer.run_swarm_peer`` does to join and announce itself - ``start_dht`` with
the bootstrap as initial peer, a fresh RSA identity, loopback address; ``agree_on_manifest`` on a new run (refused
if another probe's conflicting proposal wins); a ``HeartbeatPublisher`` - and polls ``read_heartbeats`` until it
sees ``--expect`` peer IDs or ``--timeout`` passes. It prints one JSON line per iteration, then keeps beating until
``<workdir>/stop-<i>`` appears (so slower probes can still see it), and shuts its DHT down before the next
iteration. Importing torch and hivemind once for all iterations is what makes ten rounds of four joins affordable on
two cores.

    python tests/helpers/join_probe.py --bootstrap MADDR --workdir DIR --name p0 --expect 4 --iterations 10
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def wait_for_file(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


async def _routing_table(_dht, node) -> list[str]:
    return sorted(peer_id.to_base58() for peer_id in node.protocol.routing_table.uid_to_peer_id.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bootstrap",
        required=True,
        help="multiaddr of the bootstrap node, or @FILE: read it from FILE when iteration 0 starts "
        "(so the probes can import torch and hivemind while the bootstrap node starts)",
    )
    parser.add_argument("--workdir", required=True, type=Path, help="where the go-/stop- barrier files appear")
    parser.add_argument("--name", required=True, help="this probe's name (for the log)")
    parser.add_argument("--expect", type=int, default=4, help="peers (this one included) that must be seen")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to see everyone, per iteration")
    parser.add_argument("--run-prefix", default="probe", help="iteration i uses run id <prefix><i>")
    parser.add_argument(
        "--local-steps",
        type=int,
        default=5,
        help="the --local-steps this probe asks for explicitly when it agrees on the run's manifest "
        "(give the probes different values to make them conflict)",
    )
    args = parser.parse_args()

    from photon_p2p.cli.common import setup_logging
    from photon_p2p.runtime import quiet_hivemind

    setup_logging("warning")
    quiet_hivemind("warning")
    from photon_p2p.errors import SwarmError
    from photon_p2p.swarm.dht import DHTCalls, start_dht, stop_dht, visible_maddrs
    from photon_p2p.swarm.heartbeat import HeartbeatPublisher, read_heartbeats
    from photon_p2p.swarm.identity import Identity
    from photon_p2p.swarm.manifest import agree_on_manifest
    from photon_p2p.swarm.records import RejectCounter
    from tests.helpers.swarm import micro_manifest

    print(json.dumps({"ready": args.name}), flush=True)
    for i in range(args.iterations):
        if not wait_for_file(args.workdir / f"go-{i}", timeout=600):
            print(json.dumps({"iteration": i, "name": args.name, "error": "no go file"}), flush=True)
            return 1
        started = time.monotonic()
        if args.bootstrap.startswith("@"):
            args.bootstrap = Path(args.bootstrap[1:]).read_text().strip()
        run_id = f"{args.run_prefix}{i}"
        dht = publisher = None
        scratch = tempfile.TemporaryDirectory(prefix="probe-")
        try:
            identity = Identity.ephemeral(scratch.name)
            dht = start_dht(
                initial_peers=[args.bootstrap], host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity=identity, join_timeout=30
            )
            joined_s = time.monotonic() - started
            calls = DHTCalls(dht)
            proposal = micro_manifest(run_id, local_steps=args.local_steps)
            try:  # exactly what photon-peer does with its own settings, --local-steps given explicitly
                run = agree_on_manifest(calls, identity, proposal, {"round.local_steps"})
            except SwarmError as e:
                print(
                    json.dumps(
                        {"iteration": i, "name": args.name, "peer": identity.peer_id.to_base58(), "refused": str(e)}
                    ),
                    flush=True,
                )
                wait_for_file(args.workdir / f"stop-{i}", timeout=args.timeout + 60)
                continue
            publisher = HeartbeatPublisher(
                calls, identity, run, device="cpu", client_mode=False, maddrs=visible_maddrs(dht)
            ).start()
            seen: dict = {}
            reads = 0
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                seen = read_heartbeats(calls, run_id, RejectCounter())
                reads += 1
                if len(seen) >= args.expect:
                    break
                time.sleep(0.25)
            routing = dht.run_coroutine(_routing_table)
            print(
                json.dumps(
                    {
                        "iteration": i,
                        "name": args.name,
                        "peer": identity.peer_id.to_base58(),
                        "manifest": run.hash,
                        "saw": sorted(seen),
                        "routing_table": routing,
                        "join_s": round(joined_s, 2),
                        "reads": reads,
                        "seconds": round(time.monotonic() - started, 2),
                    }
                ),
                flush=True,
            )
            wait_for_file(args.workdir / f"stop-{i}", timeout=args.timeout + 60)
        finally:
            if publisher is not None:
                publisher.stop()
            stop_dht(dht)
            scratch.cleanup()
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for tests.helpers
    sys.exit(main())
