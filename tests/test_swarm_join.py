"""Joining: peers started at the same instant form one swarm, hivemind-dht works as a bootstrap, bad addresses fail.

hivemind issue #624 reports DHTs that split when several nodes start together on localhost. The one-swarm test
starts four join probes (tests/helpers/join_probe.py: exactly photon-peer's join and heartbeat code, without the
training) through one photon-bootstrap at the same instant - a barrier file releases them together - and checks
that every probe sees all four heartbeats and that all four agreed on one manifest; ten times in a row, each time
with fresh nodes and identities. Four probes creating one run at the same instant with conflicting settings end
with one run and three refusals naming the differing field. Then four
real photon-peer processes started at once must also end up as one run (one manifest, four live peers in
photon-status). A plain ``hivemind-dht`` (what people already run) serves as the bootstrap for photon-peer and
photon-status. A malformed or unreachable --initial-peers makes photon-peer exit with one ``error:`` line.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from tests.helpers.procs import LOOPBACK, console
from tests.helpers.swarm import (
    assert_one_line_error,
    dht_client,
    peer_args,
    python_script,
    run_cli_batch,
    start_bootstrap,
    status_json,
    wait_for_heartbeats,
    write_corpus,
)

PROBE = Path(__file__).resolve().parent / "helpers" / "join_probe.py"
PROBES, ITERATIONS = 4, 10
QUIET_TORCH = {"OMP_NUM_THREADS": "1"}  # several processes share two cores


def _json_lines(proc) -> list[dict]:
    out = []
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


class Probes:
    """Four join probes released together by barrier files (see tests/helpers/join_probe.py), one result each per
    iteration. They import torch and hivemind while the bootstrap node starts."""

    def __init__(self, procs, tmp_path, iterations: int, per_probe=lambda k: []):
        self.barrier = tmp_path / "barrier"
        self.barrier.mkdir()
        address = self.barrier / "bootstrap-address"
        self.procs = [
            procs.start(
                python_script(PROBE)
                + [
                    "--bootstrap",
                    f"@{address}",
                    "--workdir",
                    str(self.barrier),
                    "--name",
                    f"p{k}",
                    "--iterations",
                    str(iterations),
                    "--timeout",
                    "30",
                    *per_probe(k),
                ],
                name=f"probe{k}",
                env=QUIET_TORCH,
            )
            for k in range(PROBES)
        ]
        _, boot_maddr = start_bootstrap(procs, tmp_path)
        address.write_text(boot_maddr)
        for probe in self.procs:
            probe.wait_for(r'\{"ready"', 120)  # imports done: from here on, the start is simultaneous

    def iteration(self, i: int) -> list[dict]:
        """Release every probe for iteration ``i`` and collect their results."""
        (self.barrier / f"go-{i}").touch()
        deadline = time.monotonic() + 60
        while True:
            results = [[r for r in _json_lines(p) if r.get("iteration") == i] for p in self.procs]
            if all(results):
                break
            for p in self.procs:
                assert p.alive(), f"{p.name} died in iteration {i}:\n{p.output()[-3000:]}"
            assert time.monotonic() < deadline, f"iteration {i}: no result from every probe"
            time.sleep(0.1)
        (self.barrier / f"stop-{i}").touch()
        return [r[0] for r in results]

    def finish(self) -> None:
        for probe in self.procs:
            assert probe.wait(60) == 0, probe.output()[-3000:]


@pytest.mark.slow
def test_simultaneous_joins_form_one_swarm_ten_times(procs, tmp_path):
    probes = Probes(procs, tmp_path, ITERATIONS, lambda k: ["--expect", str(PROBES)])
    report = []
    for i in range(ITERATIONS):
        results = probes.iteration(i)
        ids = sorted(r["peer"] for r in results)
        assert len(set(ids)) == PROBES
        for r in results:
            assert r["saw"] == ids, f"iteration {i}: split swarm, {r['name']} saw {len(r['saw'])}: {results}"
        assert len({r["manifest"] for r in results}) == 1, f"iteration {i}: a split run: {results}"
        # diagnostic only: how many of the other probes each one knows directly (its DHT routing table)
        known = min(len(set(r["routing_table"]) & (set(ids) - {r["peer"]})) for r in results)
        report.append((max(r["seconds"] for r in results), known))
    probes.finish()
    print(
        f"one swarm in all {ITERATIONS} iterations; (slowest probe's seconds to see all, fewest other probes in a "
        f"routing table) per iteration: {report}"
    )


@pytest.mark.slow
def test_simultaneous_creators_with_conflicting_settings_all_but_one_refused(procs, tmp_path):
    """Four probes create the same new run at the same instant, each asking for another --local-steps: exactly one
    proposal becomes the run, and each other probe is refused with the field that differs (three times)."""
    iterations = 3
    probes = Probes(
        procs, tmp_path, iterations, lambda k: ["--expect", "1", "--local-steps", str(5 + k), "--run-prefix", "clash"]
    )
    for i in range(iterations):
        results = probes.iteration(i)
        accepted = [r for r in results if "manifest" in r]
        assert len(accepted) == 1, f"iteration {i}: {len(accepted)} runs instead of one: {results}"
        winner_steps = 5 + int(accepted[0]["name"][1:])
        for r in results:
            if "refused" in r:
                mine = 5 + int(r["name"][1:])
                assert f"run 'clash{i}' exists with different settings" in r["refused"], r
                assert f"round.local_steps: run {winner_steps}, yours {mine}" in r["refused"], r
    probes.finish()


@pytest.mark.slow
def test_four_real_peers_started_at_once_form_one_run(procs, tmp_path):
    _, boot_maddr = start_bootstrap(procs, tmp_path)
    data = write_corpus(tmp_path / "corpus")
    # started back to back, one torch thread each (four peers share two cores)
    peers = [
        procs.start(peer_args(boot_maddr, data, tmp_path / f"cache{k}"), name=f"peer{k}", env=QUIET_TORCH)
        for k in range(4)
    ]
    with dht_client(boot_maddr) as calls:
        wait_for_heartbeats(calls, "t", 4, watch=peers, timeout=150)
    # four peers on two cores: a heartbeat (12 s expiry) can lapse for a moment while its peer is starved; the
    # guarantee is that all four are seen, so look again a few times
    for attempt in range(3):
        status = status_json(boot_maddr, "t", tmp_path / f"status{attempt}")
        if len(status["peers"]) == 4:
            break
    assert len(status["peers"]) == 4, status
    manifests = set()
    for peer in peers:
        m = peer.wait_for(r"run 't'.*\(manifest ([0-9a-f]{12})\)", 10)
        manifests.add(m.group(1))
    assert manifests == {status["manifest"]["hash"][:12]}, "every peer agreed on the one manifest"
    assert len({p["peer_id"] for p in status["peers"]}) == 4


@pytest.mark.slow
def test_hivemind_dht_works_as_bootstrap(procs, tmp_path):
    # it logs "... use --initial_peers /ip4/127.0.0.1/tcp/N/p2p/12D3KooW..." at INFO: say so explicitly, whatever
    # HIVEMIND_LOGLEVEL this test process happens to hold
    dht = procs.start(
        console("hivemind-dht") + ["--host_maddrs", LOOPBACK], name="hivemind-dht", env={"HIVEMIND_LOGLEVEL": "INFO"}
    )
    boot_maddr = dht.maddr(timeout=60)
    peer = procs.start(peer_args(boot_maddr, write_corpus(tmp_path / "corpus"), tmp_path / "cache"), name="peer")
    peer_id = peer.wait_for(r"initial-peers /ip4/127\.0\.0\.1/tcp/\d+/p2p/(\w+)", 90).group(1)
    with dht_client(boot_maddr) as calls:
        wait_for_heartbeats(calls, "t", 1, watch=[peer, dht], timeout=90)
    status = status_json(boot_maddr, "t", tmp_path / "status")
    assert [p["peer_id"] for p in status["peers"]] == [peer_id]
    assert status["manifest"]["creator"] == peer_id and status["manifest"]["model_preset"] == "micro"
    assert dht.alive()


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bad_peer_runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("bad-peer")
    data = write_corpus(work / "corpus")
    made_up = f"/ip4/127.0.0.1/tcp/{_closed_port()}/p2p/QmbMExRXwcK3vMoz1geMPzPq2XxGQLbkLQYDvkn6XKcpPj"
    cases = {
        "malformed": peer_args("/ip4/127.0.0.1/tcp/31337/p2p/not-base58!", data, work / "cache"),
        "no_peer_id": peer_args("/ip4/127.0.0.1/tcp/31337", data, work / "cache"),
        "unreachable": peer_args(made_up, data, work / "cache", "--join-timeout", "2"),
    }
    return run_cli_batch(cases, work / "runs"), made_up


def test_peer_with_malformed_initial_peers(bad_peer_runs):
    results, _ = bad_peer_runs
    assert_one_line_error(results["malformed"], "--initial-peers", "not-base58!", "not a valid multiaddr")
    assert_one_line_error(results["no_peer_id"], "--initial-peers", "missing the /p2p/<peer ID> part")


def test_peer_with_unreachable_initial_peers(bad_peer_runs):
    results, made_up = bad_peer_runs
    line = assert_one_line_error(results["unreachable"], "none of the initial peers answered within 2s", made_up)
    assert re.search(r"firewall|port|peer ID", line)
