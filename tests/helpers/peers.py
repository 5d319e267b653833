"""Launching real photon-peer processes for swarm tests, and reading what they report."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from tests.helpers.procs import LOOPBACK, Proc, ProcessPool, console, wait_until


def peer_args(
    name: str,
    *,
    run_id: str,
    cache: Path,
    initial_peers: list[str] = (),
    data: str = "default",
    model: str = "micro",
    local_steps: int = 5,
    max_steps: int = 60,
    matchmaking_time: float = 3.0,
    extra: list[str] = (),
    host: str = LOOPBACK,
) -> list[str]:
    args = console("photon-peer") + [
        "--data",
        data,
        "--model",
        model,
        "--run-id",
        run_id,
        "--host-maddrs",
        host,
        "--cache-dir",
        str(cache),
        "--metrics-file",
        "metrics.jsonl",
        "--no-progress",
        "--local-steps",
        str(local_steps),
        "--max-steps",
        str(max_steps),
        "--matchmaking-time",
        str(matchmaking_time),
        "--allreduce-timeout",
        "30",
        "--eval-every",
        "0",
        "--eval-batches",
        "2",
        "--batch-size",
        "8",
        "--threads",
        "1",  # three peers share two cores: do not let torch oversubscribe them
    ]
    if initial_peers:
        args += ["--initial-peers", *initial_peers]
    return args + list(extra)


def start_bootstrap(pool: ProcessPool, name: str = "bootstrap", field=None) -> str:
    """A photon-bootstrap node on loopback (or on host ``name`` of a field testbed); returns its multiaddr (what
    peers pass to --initial-peers)."""
    if field is None:
        return pool.start(console("photon-bootstrap") + ["--host-maddrs", LOOPBACK], name).maddr()
    proc = pool.start(field.wrap(name, console("photon-bootstrap") + ["--host-maddrs", field.maddr(name)]), name)
    ip = field.addr(name).replace(".", r"\.")
    return proc.wait_for(rf"/ip4/{ip}/tcp/\d+/p2p/[1-9A-HJ-NP-Za-km-z]+", timeout=60).group(0)


def start_peer(pool: ProcessPool, name: str, env: dict[str, str] | None = None, field=None, **kwargs: Any) -> Proc:
    """A photon-peer on loopback, or in its own namespace of a field testbed (host ``name``: its link and CPU)."""
    if field is None:
        return pool.start(peer_args(name, **kwargs), name, env=env)
    return pool.start(field.wrap(name, peer_args(name, host=field.maddr(name), **kwargs)), name, env=env)


def records(proc: Proc) -> list[dict[str, Any]]:
    return read_metrics(proc.dir / "metrics.jsonl")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every complete record of a metrics file (none if it does not exist yet)."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written right now
            out.append(json.loads(line))
    return out


def rounds(proc: Proc) -> dict[int, dict[str, Any]]:
    """Round records by round number (the last record wins if a round was reported twice)."""
    return {r["round"]: r for r in records(proc) if "outcome" in r}  # round records (not step/eval ones)


def wait_for_round(proc: Proc, round_: int, timeout: float) -> dict[str, Any]:
    def reached():
        if not proc.alive() and round_ not in rounds(proc):
            raise AssertionError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.output()[-4000:]}")
        return rounds(proc).get(round_)

    return wait_until(reached, timeout, what=f"{proc.name} round {round_}")


def finish(proc: Proc, timeout: float) -> int:
    code = proc.wait(timeout)
    assert code == 0, f"{proc.name} exited {code}:\n{proc.output()[-4000:]}"
    return code


def theta_by_round(by_peer: dict[str, dict[int, dict[str, Any]]], round_: int) -> tuple[set[str], set[str]]:
    """(theta hashes of the members that averaged round ``round_`` cleanly, names of those that did not).

    What the round engine guarantees: every reducer sends all members the same bytes, so members that lost no slice
    of the all-reduce (``lost_fraction`` 0) and whose theta merge did not fail part-way hold one theta. A member
    that a reducer failed under load applies no update to that slice (it records ``lost_fraction`` above 0) and is
    merged back at the next round (docs/design.md, "When peers disagree anyway"); that path is allowed, but it must
    be the one reported."""
    clean, faulty = set(), set()
    for name, recs in by_peer.items():
        rec = recs[round_]
        if rec["outcome"] == "averaged" and rec["lost_fraction"] == 0 and not rec.get("reconcile_failed"):
            clean.add(rec["theta_hash"])
        else:
            faulty.add(name)
    return clean, faulty
