"""Benchmark: photon-p2p rounds in the field (photon_p2p/testbed.py): uneven machines, and a volunteer joining.

Each peer is a real ``photon-peer`` in its own network namespace on a rate-limited link, some on a fraction of a CPU
core (cgroup quota). Scenarios:

``uneven``   three peers at 1, 1/2 and 1/8 of a core against an *even* swarm (three peers at 1/2 core each: about the
             same total compute) with the same settings, so the same token budget: tokens wasted (trained but never
             merged into theta), idle fraction per peer (matchmaking wait / wall time of its rounds), and the final val
             loss of the uneven swarm against the even one.
``join``     a peer trains a Nesterov run with a big state (theta + momentum: ``--vocab-size`` sets the size); a
             volunteer joins over a ``--join-rate`` Mbit/s link: seconds from its start to its first averaged round,
             and that time as a multiple of state bytes / link bandwidth.

    .venv/bin/python bench/field.py                     # both scenarios (~6 minutes on 2 cores)
    .venv/bin/python bench/field.py --quick             # shorter rounds (~3 minutes)
    .venv/bin/python bench/field.py --scenario uneven

Targets (issue "Rounds that hold in the field"): wasted <= 5% with a 1/8-speed peer; fast peers idle <= 10%; join
<= 1.5x bytes/bandwidth; the uneven swarm's val loss within 2% of the even one's. Results go to
``bench/results/field.json``; run as root (namespaces, tc, cgroups).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results" / "field.json"
BIN = Path(sys.executable).parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--scenario", default="uneven,join", help="comma list of: uneven, join (default: both)")
    p.add_argument("--quick", action="store_true", help="fewer, shorter rounds")
    p.add_argument("--data", default="default", help="training text for the peers (default: Python's own sources)")
    p.add_argument("--rate", type=float, default=100.0, help="link rate of the uneven scenario's peers, Mbit/s")
    p.add_argument("--join-rate", type=float, default=50.0, help="the joining volunteer's link, Mbit/s (default 50)")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=296_000,
        help="join scenario: embedding rows of the tiny model, which set the state's size (default: "
        "296000, 38.7M parameters: 310 MB of theta + Nesterov momentum)",
    )
    p.add_argument("--output", type=Path, default=RESULTS, help=f"where to save the figures (default: {RESULTS})")
    return p.parse_args(argv)


class Fleet:
    """photon-bootstrap + photon-peer processes on one testbed; every process group is stopped at the end."""

    def __init__(self, tb, workdir: Path):
        self.tb, self.workdir = tb, workdir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, host: str, argv: list[str]) -> subprocess.Popen:
        d = self.workdir / host
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / "tmp"  # the process's temporary files go with its run directory, not loose in /tmp
        tmp.mkdir(exist_ok=True)
        env = dict(os.environ, TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
        with (d / "out.log").open("wb") as out:
            proc = subprocess.Popen(
                self.tb.wrap(host, argv), cwd=d, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.procs[host] = proc
        return proc

    def bootstrap(self, host: str = "boot") -> str:
        self.start(host, [str(BIN / "photon-bootstrap"), "--host-maddrs", self.tb.maddr(host)])
        pattern = re.compile(rf"/ip4/{re.escape(self.tb.addr(host))}/tcp/\d+/p2p/\w+")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            m = pattern.search((self.workdir / host / "out.log").read_text(errors="replace"))
            if m:
                return m.group(0)
            time.sleep(0.3)
        raise RuntimeError(f"bootstrap did not start: {(self.workdir / host / 'out.log').read_text()[-2000:]}")

    def peer(self, host: str, entry: str, flags: list[str]) -> subprocess.Popen:
        return self.start(
            host,
            [
                str(BIN / "photon-peer"),
                "--initial-peers",
                entry,
                "--host-maddrs",
                self.tb.maddr(host),
                "--metrics-file",
                "metrics.jsonl",
                "--no-progress",
                "--threads",
                "1",
                *flags,
            ],
        )

    def wait_for(self, host: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in (self.workdir / host / "out.log").read_text(errors="replace"):
            if time.monotonic() > deadline or self.procs[host].poll() is not None:
                raise RuntimeError(f"{host}: no {text!r}: {(self.workdir / host / 'out.log').read_text()[-2000:]}")
            time.sleep(0.3)

    def wait(self, hosts: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for h in hosts:
            code = self.procs[h].wait(max(1.0, deadline - time.monotonic()))
            if code != 0:
                raise RuntimeError(f"{h} exited {code}: {(self.workdir / h / 'out.log').read_text()[-3000:]}")

    def rounds(self, host: str) -> list[dict[str, Any]]:
        path = self.workdir / host / "metrics.jsonl"
        if not path.exists():
            return []
        return [r for r in map(json.loads, path.read_text().splitlines()) if "outcome" in r]  # round records

    def close(self) -> None:
        from photon_p2p.runtime import stop_groups

        stop_groups(list(self.procs.values()), grace=10.0)


def _swarm_figures(fleet: Fleet, names: list[str]) -> dict[str, Any]:
    per_peer, own, merged, wasted = {}, 0, 0, 0
    for name in names:
        recs = fleet.rounds(name)
        wall = sum(r["train_s"] + r["matchmaking_s"] + r["allreduce_s"] + r["sync_s"] for r in recs)
        p_own = sum(r["own_tokens"] for r in recs)
        p_merged = sum(r["tokens_in_theta"] for r in recs)
        per_peer[name] = dict(
            rounds=len(recs),
            own_tokens=p_own,
            tokens_in_theta=p_merged,
            idle_fraction=sum(r["matchmaking_s"] for r in recs) / max(wall, 1e-9),
            tokens_per_s=p_own / max(sum(r["train_s"] for r in recs), 1e-9),
            outcomes={o: sum(r["outcome"] == o for r in recs) for o in {r["outcome"] for r in recs}},
            val_loss=recs[-1].get("val_loss"),
            theta_hash=recs[-1]["theta_hash"],
        )
        own += p_own
        merged += p_merged
        wasted += sum(r["wasted_tokens"] for r in recs)
    return dict(
        peers=per_peer,
        wasted_fraction=1 - merged / max(own, 1),
        diverged_tokens=wasted,
        one_theta=len({p["theta_hash"] for p in per_peer.values()}) == 1,
    )


def run_uneven(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from photon_p2p.testbed import FieldTestbed, HostSpec

    local_steps, rounds_ = (60, 4) if args.quick else (120, 6)
    flags = [
        "--data",
        args.data,
        "--model",
        "micro",
        "--local-steps",
        str(local_steps),
        "--batch-size",
        "8",
        "--max-steps",
        str(local_steps * rounds_),
        "--eval-every",
        "0",
        "--eval-batches",
        "32",
        "--wait-for-peers",
        "3",
        "--run-id",
        "field",
        "--cache-dir",
        str(workdir / "cache"),
    ]
    out = {}
    for label, cpus in (("even", (0.5, 0.5, 0.5)), ("uneven", (1.0, 0.5, 0.125))):
        names = [f"p{i}" for i in range(3)]
        # every peer starts at a full core and gets its quota once its model is built: importing torch and
        # hivemind at 1/8 of a core takes most of a minute and is not what this measures
        hosts = [HostSpec("boot")] + [HostSpec(n, args.rate, cpu=1.0) for n in names]
        with FieldTestbed(hosts) as tb:
            fleet = Fleet(tb, workdir / label)
            try:
                entry = fleet.bootstrap()
                for n in names:
                    fleet.peer(n, entry, flags)
                for n, cores in zip(names, cpus, strict=True):
                    fleet.wait_for(n, "model micro", timeout=300)
                    tb.set_cpu(n, cores)
                fleet.wait(names, timeout=1800)
                out[label] = dict(cpus=cpus, **_swarm_figures(fleet, names))
            finally:
                fleet.close()
        print(
            f"{label}: wasted {out[label]['wasted_fraction']:.1%}; "
            + "; ".join(
                f"{n} ({c} core) idle {p['idle_fraction']:.1%}, {p['tokens_per_s']:,.0f} tok/s, "
                f"val loss {p['val_loss']}"
                for (n, p), c in zip(out[label]["peers"].items(), cpus, strict=True)
            ),
            flush=True,
        )
    even_loss = out["even"]["peers"]["p0"]["val_loss"]
    uneven_loss = out["uneven"]["peers"]["p0"]["val_loss"]
    out["val_loss_ratio_uneven_vs_even"] = uneven_loss / even_loss if even_loss and uneven_loss else None
    out["settings"] = dict(local_steps=local_steps, rounds=rounds_, rate_mbit=args.rate, model="micro")
    return out


def run_join(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from photon_p2p.testbed import FieldTestbed, HostSpec

    flags = [
        "--data",
        args.data,
        "--model",
        "tiny",
        "--vocab-size",
        str(args.vocab_size),
        "--seq-len",
        "32",
        "--batch-size",
        "1",
        "--local-steps",
        "160",
        "--max-steps",
        "1000000",
        "--outer-optimizer",
        "nesterov",
        "--compression",
        "blockwise8bit",
        "--eval-every",
        "0",
        "--run-id",
        "join",
        "--cache-dir",
        str(workdir / "cache"),
        "--allreduce-timeout",
        "300",
        "--matchmaking-time",
        "10",
    ]
    hosts = [HostSpec("boot"), HostSpec("host", 1000.0), HostSpec("volunteer", args.join_rate)]
    with FieldTestbed(hosts) as tb:
        fleet = Fleet(tb, workdir / "join")
        try:
            entry = fleet.bootstrap()
            fleet.peer("host", entry, flags)
            deadline = time.monotonic() + 600
            while not fleet.rounds("host"):
                if time.monotonic() > deadline or fleet.procs["host"].poll() is not None:
                    raise RuntimeError("the running peer never finished a round")
                time.sleep(1)
            t0 = time.time()
            fleet.peer("volunteer", entry, flags)
            first = None
            while first is None and time.monotonic() < deadline + 1200:
                first = next((r for r in fleet.rounds("volunteer") if r["outcome"] == "averaged"), None)
                if fleet.procs["volunteer"].poll() is not None:
                    raise RuntimeError((workdir / "join" / "volunteer" / "out.log").read_text()[-3000:])
                time.sleep(1)
            log = (workdir / "join" / "volunteer" / "out.log").read_text(errors="replace")
        finally:
            fleet.close()
    m = re.search(r"downloaded theta for round \d+ \(step \d+\): (\d+) MB in ([0-9.]+)s", log)
    state_mb = float(m.group(1)) if m else float("nan")
    ideal_s = state_mb * 8 / args.join_rate
    join_s = (first["time"] - t0) if first else float("nan")
    out = dict(
        rate_mbit=args.join_rate,
        state_mb=state_mb,
        download_s=float(m.group(2)) if m else None,
        join_to_first_averaged_s=join_s,
        bytes_over_bandwidth_s=ideal_s,
        download_multiple=(float(m.group(2)) / ideal_s) if m else None,
        join_multiple=join_s / ideal_s,
        downloads=log.count("downloaded theta"),
    )
    print(
        f"join: {state_mb:.0f} MB at {args.join_rate:.0f} Mbit/s (ideal {ideal_s:.0f}s): download "
        f"{out['download_s']}s, first averaged round after {join_s:.0f}s ({out['join_multiple']:.2f}x)",
        flush=True,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    from photon_p2p.testbed import available

    args = parse_args(argv)
    ok, why = available(cpu=True)
    if not ok:
        print(f"field benchmark needs the testbed: {why}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="photon-field-") as tmp:
        for scenario in args.scenario.split(","):
            runner = {"uneven": run_uneven, "join": run_join}[scenario.strip()]
            results[scenario.strip()] = runner(args, Path(tmp))
    from _swarm import machine_info, save_json

    save_json(args.output, dict(machine=machine_info(), results=results))
    print(f"saved {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
