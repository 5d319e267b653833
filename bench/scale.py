"""Benchmark: how a round's time and a peer's memory grow with the number of peers (issue 14, part 4).

For each peer count (2, 4, 8, 16 by default) a real swarm runs on 127.0.0.1: one ``photon-bootstrap`` and N
``photon-peer`` processes (each its own process group, DHT child, averager child and p2pd), the micro model, disjoint
iid shares of real text (``../shared/data``, --data-partition k/N), ``--threads 1`` per peer, ``--min-group-size N``
(by default: every round is one group of all N, so the all-reduce measured is an N-peer one) and a few rounds of
--local-steps.

From the peers' round records (``metrics.jsonl``), after the warm-up round 0 (start-up, first matchmaking), the
medians over peers and rounds of: compute (``train_s``), matchmaking (``matchmaking_s``: from the end of training to
the start of the all-reduce, i.e. waiting for the slowest peer plus forming the group), all-reduce (``allreduce_s``)
and the whole round (between consecutive round records of a peer: the outer step, heartbeats and logging included);
the overhead fraction (matchmaking + all-reduce) / round. A sampler walks every peer's process tree every few
seconds (psutil): RSS and PSS (RSS counts pages a forked child shares with its parent once per process, PSS splits
them, so PSS sums to the real footprint) of the peer, its averager, its DHT and its p2pd, and the CPU each used.

All peers share the machine's cores, so at equal --local-steps compute per round is the same work but takes about
N / cores times longer in wall time once N exceeds the cores: the measured overhead fraction is diluted by that
contention. The benchmark therefore also reports the fraction against the compute time of the smallest swarm
(``overhead_uncontended``: what a round would be if every peer had its own core, with the matchmaking and
all-reduce times measured under contention, so an upper bound on them). Target: overhead <= 20% with 16 peers.

    .venv/bin/python bench/scale.py               # 2, 4, 8, 16 peers, 3 rounds of 50 steps (~20 min on 2 busy cores)
    .venv/bin/python bench/scale.py --quick       # 2 and 4 peers, 3 rounds of 20 steps (~3-5 minutes)
    .venv/bin/python bench/scale.py --peers 16 --min-group-size 1   # photon-peer's default: groups as they form

On 2 cores under load an all-16 group may never form (--min-group-size 16 waits up to --timeout); see README.

Writes ``bench/results/scale.json``. Every process is stopped at exit, Ctrl-C and SIGTERM included (process groups,
then SIGKILL of whatever is left, p2pd included).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from photon_p2p.launch import _die_with_parent

sys.path.insert(0, str(Path(__file__).resolve().parent))

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "scale.json"
BIN = Path(sys.executable).parent
DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt.gz"
MADDR = re.compile(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+")
ROLES = ("peer", "averager", "dht", "p2pd", "other")
TARGET = 0.20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--peers", default="2,4,8,16", help="comma-separated peer counts (default 2,4,8,16)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per swarm, the warm-up round 0 included (default 3)")
    p.add_argument("--local-steps", type=int, default=50, help="inner steps per round (default 50)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per inner step (default 8)")
    p.add_argument("--model", default="micro", help="model preset (default micro)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per peer (default 1)")
    p.add_argument("--matchmaking-time", type=float, default=10.0, help="photon-peer --matchmaking-time (default 10)")
    p.add_argument(
        "--min-group-size",
        type=int,
        default=0,
        help="photon-peer --min-group-size (default 0: the swarm's size, so every round is one all-N group; 1 is "
        "photon-peer's own default: whoever finds a group averages, the rest go alone)",
    )
    p.add_argument("--data", type=Path, default=DATA, help=f"training text (default {DATA})")
    p.add_argument("--sample-every", type=float, default=3.0, help="seconds between memory/CPU samples (default 3)")
    p.add_argument("--timeout", type=float, default=1500.0, help="seconds per swarm, start-up included (default 1500)")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"results JSON (default {RESULTS})")
    p.add_argument("--quick", action="store_true", help="2 and 4 peers, 3 rounds of 50 steps (~3 minutes)")
    args = p.parse_args(argv)
    if args.quick:
        args.peers, args.rounds, args.local_steps, args.batch_size = "2,4", 3, 20, 8
    args.peer_counts = [int(x) for x in args.peers.split(",") if x.strip()]
    if args.rounds < 2 or any(n < 2 for n in args.peer_counts):
        p.error("--rounds must be at least 2 (round 0 is a warm-up) and every peer count at least 2")
    return args


# ------------------------------------------------------------------------------------------------------------------
# processes


class Swarm:
    """A bootstrap and N peers, each in its own session (process group); ``stop`` leaves nothing running."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[subprocess.Popen] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        d = self.workdir / name
        d.mkdir(parents=True, exist_ok=True)
        # own TMPDIR: hivemind leaves p2p client sockets behind even on a clean exit
        env = dict(os.environ, TMPDIR=tempfile.mkdtemp(prefix=f"ps-{name}-", dir="/tmp"), PYTHONUNBUFFERED="1")
        env.pop("PHOTON_FAULTS", None)
        with (d / "out.log").open("wb") as out:
            proc = subprocess.Popen(
                argv,
                cwd=d,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=_die_with_parent,  # SIGTERM if this benchmark dies, even by SIGKILL
            )
        self.procs.append(proc)
        return proc

    def bootstrap(self) -> str:
        self.start("boot", [str(BIN / "photon-bootstrap"), "--host-maddrs", "/ip4/127.0.0.1/tcp/0"])
        log, deadline = self.workdir / "boot" / "out.log", time.monotonic() + 180
        while time.monotonic() < deadline:
            m = MADDR.search(log.read_text(errors="replace"))
            if m:
                return m.group(0)
            if self.procs[0].poll() is not None:
                break
            time.sleep(0.3)
        raise RuntimeError(f"the bootstrap did not start: {log.read_text(errors='replace')[-1500:]}")

    def stop(self) -> None:
        from photon_p2p.runtime import stop_groups

        # SIGTERM, then SIGKILL of every group: also what an exited leader left behind (p2pd, DHT child)
        stop_groups(self.procs, grace=10.0)


def classify(root: psutil.Process) -> dict[int, str]:
    """pid -> role in one peer's process tree. The DHT child is the parent of p2pd (the averager talks to the DHT's
    daemon); the averager is the other Python child."""
    roles = {root.pid: "peer"}
    try:
        children = root.children(recursive=True)
    except psutil.Error:
        return roles
    p2pd = [c for c in children if _name(c) == "p2pd"]
    dht_pids = set()
    for c in p2pd:
        roles[c.pid] = "p2pd"
        with contextlib.suppress(psutil.Error):
            dht_pids.add(c.ppid())
    for c in children:
        if c.pid in roles:
            continue
        if c.pid in dht_pids and c.pid != root.pid:
            roles[c.pid] = "dht"
        elif _name(c) == _name(root) or "python" in _name(c):  # a fork keeps the peer's name
            roles[c.pid] = "averager"
        else:
            roles[c.pid] = "other"  # torch_shm_manager and the like
    return roles


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return ""


class Sampler(threading.Thread):
    """Every ``every`` seconds: per peer and role, RSS, PSS (MiB) and CPU seconds so far; and the machine's load."""

    def __init__(self, peers: list[subprocess.Popen], every: float):
        super().__init__(name="sampler", daemon=True)
        self.peers, self.every = peers, every
        self.samples: list[dict[str, Any]] = []
        self.done = threading.Event()

    def run(self) -> None:
        psutil.cpu_percent()  # starts the machine-wide counter
        while not self.done.wait(self.every):
            sample: dict[str, Any] = {"t": time.time(), "peers": [], "cpu": [], "available_gib": 0.0}
            for popen in self.peers:
                per: dict[str, dict[str, float]] = {r: {"rss": 0.0, "pss": 0.0, "n": 0} for r in ROLES}
                cpu_by_pid: dict[int, tuple[str, float]] = {}  # per process: a process that ends or starts
                try:
                    roles = classify(psutil.Process(popen.pid))
                except psutil.Error:
                    roles = {}
                for pid, role in roles.items():
                    try:
                        proc = psutil.Process(pid)
                        mem = proc.memory_full_info()
                        cpu = proc.cpu_times()
                    except psutil.Error:
                        continue
                    per[role]["rss"] += mem.rss / 2**20
                    per[role]["pss"] += getattr(mem, "pss", mem.rss) / 2**20
                    cpu_by_pid[pid] = (role, cpu.user + cpu.system)
                    per[role]["n"] += 1
                sample["peers"].append(per)
                sample["cpu"].append(cpu_by_pid)  # between samples must not count as negative CPU
            sample["available_gib"] = psutil.virtual_memory().available / 2**30
            sample["cpu_percent"] = psutil.cpu_percent()
            sample["load"] = os.getloadavg()[0]
            self.samples.append(sample)


# ------------------------------------------------------------------------------------------------------------------
# one swarm


def _records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "outcome" in rec:  # round records only
            out.append(rec)
    return out


def run_swarm(n: int, args: argparse.Namespace, workdir: Path, cache: Path) -> dict[str, Any]:
    swarm = Swarm(workdir)
    max_steps = args.rounds * args.local_steps
    t0 = time.monotonic()
    sampler = None
    try:
        entry = swarm.bootstrap()
        flags = [
            "--initial-peers", entry, "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--run-id", f"scale-{n}",
            "--model", args.model, "--max-steps", str(max_steps), "--local-steps", str(args.local_steps),
            "--batch-size", str(args.batch_size), "--eval-every", str(max_steps), "--eval-batches", "2",
            "--wait-for-peers", str(n), "--wait-for-peers-timeout", str(args.timeout),
            "--min-group-size", str(args.min_group_size or n), "--quorum-timeout", str(args.timeout),
            "--matchmaking-time", str(args.matchmaking_time), "--allreduce-timeout", "60",
            "--threads", str(args.threads), "--metrics-file", "metrics.jsonl", "--no-progress", "--seed", "0",
            "--cache-dir", str(cache),
        ]  # fmt: skip
        peers = [
            swarm.start(
                f"p{k}", [str(BIN / "photon-peer"), *flags, "--data", str(args.data), "--data-partition", f"{k}/{n}"]
            )  # fmt: skip
            for k in range(n)
        ]
        sampler = Sampler(peers, args.sample_every)
        sampler.start()
        deadline = time.monotonic() + args.timeout
        for k, p in enumerate(peers):
            code = p.wait(max(1.0, deadline - time.monotonic()))
            if code != 0:
                tail = (workdir / f"p{k}" / "out.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{n} peers: p{k} exited {code}: {tail}")
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{n} peers: not done within --timeout {args.timeout:.0f}s") from None
    finally:
        if sampler is not None:
            sampler.done.set()
        swarm.stop()
    wall = time.monotonic() - t0
    recs = [_records(workdir / f"p{k}" / "metrics.jsonl") for k in range(n)]
    return summarize(n, recs, sampler.samples if sampler else [], wall)


def _median(xs: list[float]) -> float | None:
    return round(statistics.median(xs), 3) if xs else None


def summarize(n: int, recs: list[list[dict[str, Any]]], samples: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """Medians over peers and rounds after the warm-up round; memory and CPU over the same window."""
    rows = []
    for peer in recs:
        by_round = sorted(peer, key=lambda r: r["round"])
        for prev, r in zip(by_round, by_round[1:], strict=False):
            rows.append(dict(r, round_s=r["time"] - prev["time"]))  # rounds >= 1: round 0 is the warm-up
    t = {k: _median([r[k] for r in rows]) for k in ("train_s", "matchmaking_s", "allreduce_s", "round_s")}
    overhead = (t["matchmaking_s"] + t["allreduce_s"]) / t["round_s"] if rows and t["round_s"] else None
    # the measured window: from the last peer's end of round 0 to the first peer's last round record
    start = max((min(r["time"] for r in p) for p in recs if p), default=0.0)
    end = min((max(r["time"] for r in p) for p in recs if p), default=0.0)
    window = [s for s in samples if start <= s["t"] <= end] or samples
    mem: dict[str, Any] = {}
    for key in ("rss", "pss"):
        per_role = {
            role: _median([sum(p[role][key] for p in s["peers"]) / max(1, len(s["peers"])) for s in window])
            for role in ROLES
        }
        per_role["total"] = _median(
            [sum(p[r][key] for p in s["peers"] for r in ROLES) / len(s["peers"]) for s in window]
        )
        mem[f"{key}_mib_per_peer"] = per_role
    # processes per peer and role (a check on the classification: 1 peer, 1 averager, 1 DHT, 1 p2pd)
    mem["processes_per_peer"] = {
        role: _median([sum(p[role]["n"] for p in s["peers"]) / max(1, len(s["peers"])) for s in window])
        for role in ROLES
    }
    mem["pss_gib_all_peers_peak"] = round(
        max((sum(p[r]["pss"] for p in s["peers"] for r in ROLES) for s in samples), default=0.0) / 1024, 2
    )
    mem["available_gib_min"] = round(min((s["available_gib"] for s in samples), default=0.0), 2)
    cpu = {}
    # CPU between the last sample before the window and the last inside it (after the last round the peer's children
    # shut down before the peer exits: a sample after the window can miss them)
    a = max((s for s in samples if s["t"] <= start), key=lambda s: s["t"], default=samples[0] if samples else None)
    b = max((s for s in samples if s["t"] <= end), key=lambda s: s["t"], default=None)
    if a is not None and b is not None and b["t"] > a["t"] and len(a["cpu"]) == len(b["cpu"]):
        dt = b["t"] - a["t"]
        for role in ROLES:
            used = [
                sum(c - pa.get(pid, ("", 0.0))[1] for pid, (r, c) in pb.items() if r == role)
                for pa, pb in zip(a["cpu"], b["cpu"], strict=True)
            ]
            cpu[role] = round(statistics.mean(used) / dt, 3) if dt > 0 else None
        cpu["total"] = round(sum(v for v in cpu.values() if v is not None), 3)
    return {
        "peers": n,
        "rounds_measured": len(rows),
        "group_sizes": sorted({r.get("group_size", 1) for r in rows}),
        "outcomes": sorted({r["outcome"] for r in rows}),
        "median_s": t,
        "overhead_fraction": round(overhead, 3) if overhead is not None else None,
        "memory": mem,
        "cpu_cores_per_peer": cpu,
        "machine_cpu_percent": _median([s["cpu_percent"] for s in window]),
        "load_average": _median([s["load"] for s in window]),
        "wall_s": round(wall, 1),
    }


# ------------------------------------------------------------------------------------------------------------------
# growth and report


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def growth(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Largest over smallest swarm for each figure, and the log-log slope (value ~ peers^slope) over all counts."""
    import math

    first, last = results[0], results[-1]
    figures = {
        **{k: lambda r, k=k: r["median_s"][k] for k in ("train_s", "matchmaking_s", "allreduce_s", "round_s")},
        "pss_mib_per_peer": lambda r: r["memory"]["pss_mib_per_peer"]["total"],
        "rss_mib_per_peer": lambda r: r["memory"]["rss_mib_per_peer"]["total"],
        "cpu_cores_per_peer": lambda r: r["cpu_cores_per_peer"].get("total"),
    }
    out: dict[str, Any] = {"from": first["peers"], "to": last["peers"]}
    for name, get in figures.items():
        pts = [(r["peers"], get(r)) for r in results if get(r)]
        slope = None
        if len(pts) >= 2:
            xs, ys = [math.log(p) for p, _ in pts], [math.log(v) for _, v in pts]
            mx, my = statistics.mean(xs), statistics.mean(ys)
            den = sum((x - mx) ** 2 for x in xs)
            slope = round(sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den, 2) if den else None
        out[name] = {"ratio": _ratio(get(last), get(first)), "slope": slope}
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.exists():
        print(f"skipped: no training text at {args.data} (give --data FILE)", file=sys.stderr)
        return 0
    from _swarm import machine_info, save_json

    # SIGTERM unwinds like Ctrl-C, so every swarm's finally stops its process groups
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="photon-scale-") as tmp:
        for n in args.peer_counts:
            print(f"--- {n} peers: {args.rounds} rounds of {args.local_steps} steps", flush=True)
            try:
                r = run_swarm(n, args, Path(tmp) / f"n{n}", Path(tmp) / "cache")
            except RuntimeError as e:  # keep what the other swarms measured
                print(f"error: {e}", file=sys.stderr, flush=True)
                continue
            results.append(contention(r))
            print(json.dumps(r), flush=True)
            report(results, args, save_json, machine_info, final=n == args.peer_counts[-1])
    return 0 if len(results) == len(args.peer_counts) else 1


def contention(r: dict[str, Any]) -> dict[str, Any]:
    """What the round would look like if each peer had its own core: compute = the CPU seconds the peer process used
    per round (single-threaded, so on a free core its wall time); matchmaking and all-reduce as measured (under
    contention, so an upper bound). Also the CPU share of the communication machinery (averager, DHT, p2pd)."""
    t, cpu = r["median_s"], r["cpu_cores_per_peer"]
    if not cpu or not t["round_s"]:
        r["overhead_dedicated"] = r["cpu_overhead_fraction"] = r["compute_cpu_s"] = r["cpu_s_per_round"] = None
        return r
    # CPU seconds per round and peer, by process: the DHT's grows with N (every peer reads every heartbeat)
    r["cpu_s_per_round"] = {role: round(v * t["round_s"], 3) for role, v in cpu.items() if v is not None}
    compute = cpu["peer"] * t["round_s"]
    comm = t["matchmaking_s"] + t["allreduce_s"]
    r["compute_cpu_s"] = round(compute, 3)
    r["overhead_dedicated"] = round(comm / (compute + comm), 3) if compute + comm else None
    r["cpu_overhead_fraction"] = (
        round((cpu["averager"] + cpu["dht"] + cpu["p2pd"]) / cpu["total"], 3) if cpu["total"] else None
    )
    return r


def report(results: list[dict[str, Any]], args: argparse.Namespace, save_json: Any, machine_info: Any, final: bool):
    """Print the table and save the JSON (after every swarm, so a later failure keeps the earlier figures)."""
    if not results:
        return
    print(
        f"\n{'peers':>5} {'round s':>8} {'compute':>8} {'match':>7} {'allred':>7} {'overhead':>9} {'dedic.':>8} "
        f"{'cpu ov':>7} {'PSS MiB':>8}"
        f" {'peer':>6} {'avgr':>6} {'dht':>6} {'p2pd':>6} {'RSS MiB':>8} {'cores':>6} {'group':>6} {'load':>5}"
    )
    for r in results:
        t, pss, rss = r["median_s"], r["memory"]["pss_mib_per_peer"], r["memory"]["rss_mib_per_peer"]
        print(
            f"{r['peers']:>5} {t['round_s']:>8.2f} {t['train_s']:>8.2f} {t['matchmaking_s']:>7.2f} "
            f"{t['allreduce_s']:>7.3f} {_pct(r['overhead_fraction']):>9} {_pct(r['overhead_dedicated']):>8} "
            f"{_pct(r['cpu_overhead_fraction']):>7} "
            f"{pss['total']:>8.0f} {pss['peer']:>6.0f} {pss['averager']:>6.0f} {pss['dht']:>6.0f} {pss['p2pd']:>6.0f} "
            f"{rss['total']:>8.0f} {r['cpu_cores_per_peer'].get('total', float('nan')):>6.2f} "
            f"{','.join(map(str, r['group_sizes'])):>6} {r['load_average']:>5.1f}"
        )
    largest = results[-1]
    summary = {
        "largest_swarm": largest["peers"],
        "overhead_fraction": largest["overhead_fraction"],
        "overhead_dedicated": largest["overhead_dedicated"],
        "cpu_overhead_fraction": largest["cpu_overhead_fraction"],
        "target": TARGET,
        "target_met": largest["overhead_fraction"] is not None and largest["overhead_fraction"] <= TARGET,
        "target_met_dedicated": largest["overhead_dedicated"] is not None and largest["overhead_dedicated"] <= TARGET,
        "complete": final,
        "growth": growth(results),
        "pss_gib_all_peers_peak": largest["memory"]["pss_gib_all_peers_peak"],
    }
    print(json.dumps(summary))
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    save_json(args.out, {"summary": summary, "swarms": results, "config": config, "machine": machine_info()})


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted: every swarm process was stopped", file=sys.stderr)
        sys.exit(130)
