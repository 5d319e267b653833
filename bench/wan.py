"""Benchmark: wall time to a target val loss, photon-p2p against per-step data parallelism, on shaped links.

Photon's claim: communicating once per round (64-512x fewer bytes than per-step data parallelism) wins on wall time
when links are slow. Both contenders run here on the field testbed (photon_p2p/testbed.py): N emulated hosts, each
its own network namespace on a ``tbf`` link of R Mbit/s both ways and an equal CPU cgroup quota (2 cores / N).

``photon``  N real ``photon-peer`` processes and a ``photon-bootstrap`` (its own, unshaped host): fedavg, outer lr 1,
            --local-steps L, each peer on its data share (``--data-partition k/N``), eval of the global model
            after every round (``--eval-every L``).
``dp``      N gloo ranks of torch DDP (bench/_ddp.py: photon-peer's LocalSession, the same flags, so the same model,
            AdamW, clipping, schedule, data shares, sampler and seed), gradients all-reduced every step over the
            same shaped veths (``GLOO_SOCKET_IFNAME``). Per-rank batch = the peer's batch: the same global batch.

The target val loss is the one DP reaches at step ``--target-step`` (default half of --max-steps), measured in the
first rate's DP run; every later run stops when it reaches it. Both evaluate the same held-out windows (the
dataset's validation split, ``--eval-batches`` batches): DP's rank 0 every ``--dp-eval-every`` steps, photon's
peers at every round boundary. Clocks exclude start-up and evaluation for both: DP's is the sum of its step times
(rank 0), photon's the sum of a peer's round times (train + matchmaking + all-reduce + sync, from its metrics JSONL).

    .venv/bin/python bench/wan.py                       # tiny model, 100 and 20 Mbit/s (~25 minutes on 2 cores)
    .venv/bin/python bench/wan.py --quick               # micro model, 20 Mbit/s (~3 minutes)
    .venv/bin/python bench/wan.py --compressions none,blockwise8bit

Target (issue 14): photon's wall time to target <= 0.5x DP's at 100 Mbit/s, and a smaller ratio at 20 Mbit/s.
Results go to ``bench/results/wan.json``; run as root (namespaces, tc, cgroups). Needs /work/shared/data (or --data).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from field import Fleet

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "wan.json"
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt.gz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rates", default="100,20", help="link rates in Mbit/s, comma list (default: 100,20)")
    p.add_argument("--peers", type=int, default=4, help="peers = DP ranks (default 4)")
    p.add_argument("--cores", type=float, default=2.0, help="cores shared equally by the peers' cgroups (default 2)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help=f"training text (default: {DEFAULT_DATA})")
    p.add_argument("--model", default="tiny", help="model preset (default tiny)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step per peer / per rank (default 16)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak AdamW learning rate, both contenders (default 3e-3)")
    p.add_argument("--max-steps", type=int, default=192, help="schedule length in steps, both (default 192)")
    p.add_argument("--local-steps", type=int, default=32, help="photon's inner steps per round (default 32)")
    p.add_argument(
        "--target-step", type=int, default=None, help="DP step whose val loss is the target (default max-steps/2)"
    )
    p.add_argument("--dp-eval-every", type=int, default=16, help="DP evaluates every K steps (default 16)")
    p.add_argument("--eval-batches", type=int, default=16, help="held-out batches per evaluation (default 16)")
    p.add_argument("--compressions", default="none", help="photon's compressions, comma list (none, blockwise8bit)")
    p.add_argument("--quick", action="store_true", help="micro model, 20 Mbit/s, short schedule (~3 minutes)")
    p.add_argument("--output", type=Path, default=RESULTS, help=f"where to save the figures (default: {RESULTS})")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.rates, args.max_steps, args.local_steps, args.dp_eval_every = "micro", "20", 128, 16, 16
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    args.compressions = [c.strip() for c in args.compressions.split(",") if c.strip()]
    args.target_step = args.target_step or args.max_steps // 2
    if args.target_step % args.dp_eval_every or not 0 < args.target_step <= args.max_steps:
        p.error("--target-step must be a multiple of --dp-eval-every, at most --max-steps")
    return args


def common_flags(args: argparse.Namespace, k: int, cache: Path) -> list[str]:
    """photon-peer flags both contenders train with (DP parses them with photon-peer's own parser)."""
    return [
        "--data",
        args.data,
        "--data-partition",
        f"{k}/{args.peers}",
        "--model",
        args.model,
        "--batch-size",
        str(args.batch_size),
        "--micro-batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--max-steps",
        str(args.max_steps),
        "--eval-batches",
        str(args.eval_batches),
        "--device",
        "cpu",
        "--seed",
        "0",
        "--threads",
        "1",
        "--cache-dir",
        str(cache),
    ]


class Hosts(Fleet):
    """field.Fleet with per-process environment variables (GLOO_SOCKET_IFNAME) and each process's TMPDIR (p2pd's
    sockets) inside the benchmark's temporary directory, so nothing is left in /tmp."""

    def start(self, host: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        d = self.workdir / host
        d.mkdir(parents=True, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=f"t-{host[:6]}-", dir=self.workdir.parent)  # short: unix socket paths
        env = dict(os.environ, TMPDIR=tmp, PYTHONUNBUFFERED="1", **(env or {}))
        with (d / "out.log").open("wb") as out:
            proc = subprocess.Popen(
                self.tb.wrap(host, argv), cwd=d, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        self.procs[host] = proc
        return proc

    def records(self, host: str, name: str) -> list[dict[str, Any]]:
        path = self.workdir / host / name
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.endswith("}")]  # the last line may be half-written


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_dp(args, tb, workdir: Path, cache: Path, names: list[str], steps: int, target: float | None) -> dict[str, Any]:
    hosts = Hosts(tb, workdir)
    port = _free_port()
    try:
        for k, name in enumerate(names):
            argv = [
                sys.executable,
                str(HERE / "_ddp.py"),
                "--rank",
                str(k),
                "--world",
                str(len(names)),
                "--master",
                f"{tb.addr(names[0])}:{port}",
                "--out",
                str(workdir / name / "dp.jsonl"),
                "--dp-steps",
                str(steps),
                "--dp-eval-every",
                str(args.dp_eval_every),
                "--",
                *common_flags(args, k, cache),
            ]
            (workdir / name).mkdir(parents=True, exist_ok=True)
            hosts.start(name, argv, env={"GLOO_SOCKET_IFNAME": tb[name].ifname})
        deadline = time.monotonic() + 3600
        while True:  # stop as soon as rank 0 has evaluated at or under the target
            recs = hosts.records(names[0], "dp.jsonl")
            reached = target is not None and any(r["kind"] == "eval" and r["val_loss"] <= target for r in recs)
            if reached or all(p.poll() is not None for p in hosts.procs.values()):
                break
            if any(p.poll() not in (None, 0) for p in hosts.procs.values()) or time.monotonic() > deadline:
                bad = next(n for n, p in hosts.procs.items() if p.poll() not in (None, 0))
                raise RuntimeError(f"dp rank on {bad} failed: {(workdir / bad / 'out.log').read_text()[-3000:]}")
            time.sleep(0.5)
    finally:
        hosts.close()
    recs = hosts.records(names[0], "dp.jsonl")
    steps_ = [r for r in recs if r["kind"] == "step"]
    evals = [r for r in recs if r["kind"] == "eval"]
    clock = {}
    total = 0.0
    for r in steps_:
        total += r["step_s"]
        clock[r["step"]] = total
    curve = [dict(step=e["step"], tokens=e["tokens"], wall_s=clock[e["step"]], val_loss=e["val_loss"]) for e in evals]
    return dict(
        curve=curve,
        steps=len(steps_),
        params=recs[0]["params"],
        step_s=sum(r["step_s"] for r in steps_) / max(1, len(steps_)),
        compute_s=sum(r["compute_s"] for r in steps_),
        allreduce_s=sum(r["allreduce_s"] for r in steps_),  # in flight, overlapping the backward pass
        compute_ref_s=recs[0].get("compute_ref_s"),  # one step without communication (a copy, timed first)
        eval_s=sum(e["eval_s"] for e in evals),
    )


def run_photon(
    args, tb, workdir: Path, cache: Path, names: list[str], compression: str, target: float
) -> dict[str, Any]:
    fleet = Hosts(tb, workdir)
    swarm = [
        "--local-steps",
        str(args.local_steps),
        "--eval-every",
        str(args.local_steps),
        "--outer-optimizer",
        "fedavg",
        "--outer-lr",
        "1.0",
        "--compression",
        compression,
        "--wait-for-peers",
        str(len(names)),
        "--run-id",
        "wan",
    ]
    try:
        entry = fleet.bootstrap("boot")
        for k, name in enumerate(names):
            fleet.peer(name, entry, [*common_flags(args, k, cache), *swarm])
        fleet.wait_for(names[0], f"model {args.model}", timeout=600)  # CPU counted from here: not the imports
        cpu0 = cpu_split(fleet.procs[names[0]].pid)
        deadline = time.monotonic() + 3600
        while True:  # every peer evaluates the same theta; p0's evaluation decides
            recs = fleet.rounds(names[0])
            if any((r.get("val_loss") or 1e9) <= target for r in recs):
                break
            if all(fleet.procs[n].poll() is not None for n in names):
                break
            failed = [n for n in names if fleet.procs[n].poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                log = (workdir / (failed or names)[0] / "out.log").read_text()[-3000:]
                raise RuntimeError(f"photon peer {(failed or names)[0]} failed or timed out: {log}")
            time.sleep(0.5)
        cpu1 = cpu_split(fleet.procs[names[0]].pid)
    finally:
        fleet.close()
    recs = fleet.rounds(names[0])
    curve, wall, tokens = [], 0.0, 0
    parts = dict(train_s=0.0, matchmaking_s=0.0, allreduce_s=0.0, sync_s=0.0)
    for r in recs:
        for k in parts:
            parts[k] += r[k]
        wall = sum(parts.values())
        tokens += r["tokens"]  # the group's tokens merged this round
        if r.get("val_loss") is not None:
            curve.append(dict(round=r["round"], step=r["step"], tokens=tokens, wall_s=wall, val_loss=r["val_loss"]))
    return dict(
        curve=curve,
        rounds=len(recs),
        outcomes={o: sum(r["outcome"] == o for r in recs) for o in {r["outcome"] for r in recs}},
        group_sizes=[r["group_size"] for r in recs],
        bytes_sent_per_round=sum(r["bytes_sent"] for r in recs) / max(1, len(recs)),
        steps_per_peer=sum(r["own_tokens"] for r in recs) / (args.batch_size * seq_len(args.model)),
        cpu_s_p0={k: round(cpu1.get(k, 0.0) - cpu0.get(k, 0.0), 1) for k in cpu1},
        **parts,
    )


def seq_len(model: str) -> int:
    from photon_p2p.model import PRESETS

    return PRESETS[model]["max_seq_len"]


def cpu_split(pid: int) -> dict[str, float]:
    """CPU seconds so far of a photon-peer's process tree, by kind: its main (training) thread, its other threads
    (heartbeats, the DHT view poller, logging), its Python children (hivemind's DHT and averager processes) and
    p2pd. Differences of two readings say what a peer's cgroup share went to besides training."""
    import psutil

    out = dict(train_thread=0.0, other_threads=0.0, dht_and_averager=0.0, p2pd=0.0)
    try:
        proc = psutil.Process(pid)
        for t in proc.threads():
            out["train_thread" if t.id == pid else "other_threads"] += t.user_time + t.system_time
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                times = child.cpu_times()
                out["p2pd" if "p2pd" in child.name() else "dht_and_averager"] += times.user + times.system
    except psutil.Error:
        pass
    return out


def to_target(curve: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    """The first evaluation at or under the target, plus ``wall_s_interp``/``tokens_interp``: where the curve crosses
    it, linear between that evaluation and the one before (photon evaluates once a round, DP every few steps, so
    the first evaluation under the target overstates the coarser-sampled one's time by up to an interval)."""
    for i, c in enumerate(curve):
        if c["val_loss"] <= target:
            hit = dict(c)
            prev = curve[i - 1] if i else dict(wall_s=0.0, tokens=0, val_loss=None)
            frac = 1.0
            if prev["val_loss"] is not None and prev["val_loss"] > c["val_loss"]:
                frac = (prev["val_loss"] - target) / (prev["val_loss"] - c["val_loss"])
            hit["wall_s_interp"] = prev["wall_s"] + frac * (c["wall_s"] - prev["wall_s"])
            hit["tokens_interp"] = prev["tokens"] + frac * (c["tokens"] - prev["tokens"])
            return hit
    return None


def prepare_cache(args: argparse.Namespace, cache: Path) -> None:
    """Tokenize the data once, before N processes would all do it at once on a fraction of a core each."""
    from photon_p2p.data import load_tokenizer, prepare_dataset

    prepare_dataset([args.data], load_tokenizer("byte"), cache_dir=str(cache), val_fraction=0.02, progress=False)


def main(argv: list[str] | None = None) -> int:
    from photon_p2p.testbed import FieldTestbed, HostSpec, available

    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C: every `finally` stops its processes and the testbeds delete their namespaces
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    ok, why = available(cpu=True)
    if not ok:
        print(f"wan benchmark needs the testbed: {why}", file=sys.stderr)
        return 2
    if not Path(args.data).exists():
        print(f"wan benchmark: no training text at {args.data} (give --data)", file=sys.stderr)
        return 2
    from _swarm import load_average, machine_info, save_json

    names = [f"p{k}" for k in range(args.peers)]
    cpu = args.cores / args.peers
    results: dict[str, Any] = {}
    target = None
    with tempfile.TemporaryDirectory(prefix="photon-wan-") as tmp:
        cache = Path(tmp, "cache")
        prepare_cache(args, cache)
        for rate in args.rates:
            label = f"{rate:g}mbit"
            hosts = [HostSpec("boot")] + [HostSpec(n, rate, cpu=cpu) for n in names]
            out: dict[str, Any] = dict(rate_mbit=rate, load_start=load_average())
            with FieldTestbed(hosts) as tb:
                # the first DP run sets the target: its val loss at --target-step (the math does not depend on the
                # link, so later DP runs reach it at the same step and stop there)
                dp = run_dp(args, tb, Path(tmp, label, "dp"), cache, names, args.target_step, target)
                if target is None:
                    target = next(c["val_loss"] for c in dp["curve"] if c["step"] == args.target_step)
                    print(f"target val loss {target:.4f} (DP at step {args.target_step})", flush=True)
                dp["at_target"] = to_target(dp["curve"], target)
                out["dp"] = dp
                print(_line(f"{label} dp", dp, "dp"), flush=True)
                for comp in args.compressions:
                    ph = run_photon(args, tb, Path(tmp, label, f"photon-{comp}"), cache, names, comp, target)
                    ph["at_target"] = to_target(ph["curve"], target)
                    dp_t, ph_t = dp["at_target"], ph["at_target"]
                    ph["ratio_vs_dp"] = ph_t["wall_s"] / dp_t["wall_s"] if ph_t and dp_t else None
                    ph["ratio_vs_dp_interp"] = ph_t["wall_s_interp"] / dp_t["wall_s_interp"] if ph_t and dp_t else None
                    out[f"photon_{comp}"] = ph
                    print(_line(f"{label} photon {comp}", ph, "photon"), flush=True)
            out["load_end"] = load_average()
            results[label] = out
    settings = {k: v for k, v in vars(args).items() if k != "output"}
    settings.update(target_val_loss=target, cpu_per_peer=cpu, tokenizer="byte")
    save_json(args.output, dict(machine=machine_info(), settings=settings, results=results))
    return 0


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}x"


def _line(label: str, r: dict[str, Any], kind: str) -> str:
    hit = r["at_target"]
    reach = (
        f"target at {hit['wall_s']:.0f}s (interpolated {hit['wall_s_interp']:.0f}s), {hit['tokens'] / 1e6:.2f}M tokens"
        if hit
        else f"target missed (best {min(c['val_loss'] for c in r['curve']):.4f})"
    )
    if kind == "dp":
        split = (
            f"{r['step_s']:.2f}s/step: all-reduce in flight {r['allreduce_s'] / r['steps']:.2f}s, "
            f"the rest {r['compute_s'] / r['steps']:.2f}s; a step without communication {r['compute_ref_s'] or 0:.2f}s"
        )
    else:
        split = (
            f"{r['train_s'] / r['steps_per_peer']:.2f}s/step; compute {r['train_s']:.0f}s, "
            f"matchmaking {r['matchmaking_s']:.0f}s, transfer {r['allreduce_s']:.0f}s, "
            f"sync {r['sync_s']:.0f}s; photon/dp {_fmt(r['ratio_vs_dp'])} "
            f"(interpolated {_fmt(r['ratio_vs_dp_interp'])})"
        )
    return f"{label}: {reach}; {split}"


if __name__ == "__main__":
    sys.exit(main())
