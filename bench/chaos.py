"""Benchmark: chaos, the long form of tests/test_chaos.py. Seeded churn against a churn-free run.

Real ``photon-bootstrap`` and ``photon-peer`` processes on 127.0.0.1 (micro model, the same data and settings in both
runs). The churn run has ``--slots`` peer slots: slot 0 (the anchor) stays for the whole run; at every round
boundary the anchor reports, a seeded schedule makes at least ``--churn`` of the slots change: a live peer leaves
(SIGTERM, or SIGKILL mid-round: a machine dying, its round's work lost) or a free slot's peer (re)joins as a
fresh process (new identity: it downloads the run's state first). The churn-free run has ``--baseline-peers`` peers
(about the churn run's mean number of live peers) that stay from start to end, with the same --max-steps, so about
the same token budget (both token counts are reported). Figures: final val loss of both runs (the anchor's
evaluation of theta at the last step) and their ratio, tokens trained and merged into theta, joins, leaves, joins
that downloaded state, rounds.

    .venv/bin/python bench/chaos.py                  # 32 rounds, 4 slots, >= 25% churn per round (~25 min, 2 cores)
    .venv/bin/python bench/chaos.py --rounds 40 --seed 1

Target (issue 16, point 6): over 30+ rounds with >= 25% of peers leaving or joining each round, the final val loss
within 3% of the churn-free run's. Results go to ``bench/results/chaos.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results" / "chaos.json"
BIN = Path(sys.executable).parent
MADDR = re.compile(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rounds", type=int, default=32, help="rounds of the run (default 32)")
    p.add_argument(
        "--local-steps",
        type=int,
        default=100,
        help="inner steps per round (default 100: a round must outlast a joiner's start-up, ~15 s on 2 busy cores, "
        "or joiners are gone again before they train)",
    )
    p.add_argument("--slots", type=int, default=4, help="peer slots of the churn run, the anchor included (default 4)")
    p.add_argument(
        "--baseline-peers",
        type=int,
        default=2,
        help="peers of the churn-free run (default 2: about the mean number of live peers of the churn run, so both "
        "runs train about the same number of tokens)",
    )
    p.add_argument("--churn", type=float, default=0.25, help="fraction of slots that change each round (default 0.25)")
    p.add_argument("--seed", type=int, default=0, help="seed of the churn schedule (default 0)")
    p.add_argument("--data", default="default", help="training text (default: Python's own sources)")
    p.add_argument("--output", type=Path, default=RESULTS, help=f"where to save the figures (default: {RESULTS})")
    return p.parse_args(argv)


class Fleet:
    """Processes on loopback, each in its own process group and TMPDIR; all stopped at the end."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs: dict[str, Path] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        d = self.workdir / name
        d.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, TMPDIR=tempfile.mkdtemp(prefix=f"pc-{name[:6]}-", dir="/tmp"), PYTHONUNBUFFERED="1")
        log = d / "out.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, cwd=d, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.procs[name], self.logs[name] = proc, log
        return proc

    def log(self, name: str) -> str:
        return self.logs[name].read_text(errors="replace")

    def bootstrap(self) -> str:
        self.start("boot", [str(BIN / "photon-bootstrap"), "--host-maddrs", "/ip4/127.0.0.1/tcp/0"])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            m = MADDR.search(self.log("boot"))
            if m:
                return m.group(0)
            time.sleep(0.3)
        raise RuntimeError(f"bootstrap did not start: {self.log('boot')[-2000:]}")

    def rounds(self, name: str) -> list[dict[str, Any]]:
        path = self.workdir / name / "metrics.jsonl"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # being written
                continue
            if "outcome" in rec:
                out.append(rec)
        return out

    def close(self) -> None:
        from photon_p2p.runtime import stop_groups

        stop_groups(list(self.procs.values()), grace=10.0)


def peer_flags(args: argparse.Namespace, workdir: Path, run_id: str) -> list[str]:
    return [
        "--data",
        args.data,
        "--model",
        "micro",
        "--run-id",
        run_id,
        "--local-steps",
        str(args.local_steps),
        "--max-steps",
        str(args.local_steps * args.rounds),
        "--batch-size",
        "8",
        "--eval-every",
        "0",  # only at the end: the figure
        "--eval-batches",
        "32",
        "--matchmaking-time",
        "3",
        "--allreduce-timeout",
        "30",
        "--host-maddrs",
        "/ip4/127.0.0.1/tcp/0",
        "--metrics-file",
        "metrics.jsonl",
        "--no-progress",
        "--threads",
        "1",
        "--cache-dir",
        str(workdir / "cache"),
    ]


def _figures(fleet: Fleet, names: list[str]) -> dict[str, Any]:
    own = merged = wasted = 0
    for name in names:
        recs = fleet.rounds(name)
        own += sum(r["own_tokens"] for r in recs)
        merged += sum(r["tokens_in_theta"] for r in recs)
        wasted += sum(r["wasted_tokens"] for r in recs)
    return dict(own_tokens=own, tokens_in_theta=merged, diverged_tokens=wasted)


def run_baseline(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    fleet = Fleet(workdir / "baseline")
    names = [f"b{i}" for i in range(args.baseline_peers)]
    flags = peer_flags(args, workdir, "calm") + ["--wait-for-peers", str(len(names))]
    try:
        entry = fleet.bootstrap()
        for n in names:
            fleet.start(n, [str(BIN / "photon-peer"), "--initial-peers", entry, *flags])
        for n in names:
            code = fleet.procs[n].wait(3600)
            if code != 0:
                raise RuntimeError(f"{n} exited {code}: {fleet.log(n)[-3000:]}")
        last = fleet.rounds(names[0])[-1]
        hashes = {fleet.rounds(n)[-1]["theta_hash"] for n in names}
        return dict(
            peers=len(names),
            rounds=len(fleet.rounds(names[0])),
            val_loss=last["val_loss"],
            one_theta=len(hashes) == 1,
            **_figures(fleet, names),
        )
    finally:
        fleet.close()


def run_churn(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The anchor runs to the end; around it, the schedule makes peers leave and join at every round boundary."""
    rng = random.Random(args.seed)
    fleet = Fleet(workdir / "churn")
    # the first peers start round 0 together; a later joiner sees the run under way and goes straight to its download
    flags = peer_flags(args, workdir, "chaos") + ["--wait-for-peers", str(args.slots)]
    per_round = max(1, round(args.churn * args.slots))
    live: dict[int, str] = {}  # slot -> process name
    started: list[str] = []
    events: list[dict[str, Any]] = []
    serial = 0

    def join(slot: int, entry: str) -> None:
        nonlocal serial
        name = f"s{slot}-{serial}"
        serial += 1
        fleet.start(name, [str(BIN / "photon-peer"), "--initial-peers", entry, *flags])
        live[slot] = name
        started.append(name)

    try:
        entry = fleet.bootstrap()
        for slot in range(args.slots):
            join(slot, entry)
        anchor = live[0]
        seen = 0
        while fleet.procs[anchor].poll() is None:
            recs = fleet.rounds(anchor)
            if len(recs) > seen:
                seen = len(recs)
                r = recs[-1]["round"]
                for _ in range(per_round):
                    # leave: a peer that has trained (one still starting up has not joined yet); join: a free slot
                    leavable = [s for s, n in live.items() if s != 0 and fleet.rounds(n)]
                    free = [s for s in range(1, args.slots) if s not in live]
                    if free and (not leavable or rng.random() < 0.5):
                        slot = rng.choice(free)
                        join(slot, MADDR.search(fleet.log(anchor)).group(0) if rng.random() < 0.5 else entry)
                        events.append(dict(round=r, event="join", peer=live[slot]))
                    elif leavable:
                        name = live.pop(rng.choice(leavable))
                        how = rng.choice(["SIGTERM", "SIGKILL"])
                        if how == "SIGTERM":  # a clean leave: the peer stops between rounds
                            fleet.procs[name].send_signal(signal.SIGTERM)
                        else:  # a machine dying: every process of the peer at once, mid-round
                            os.killpg(fleet.procs[name].pid, signal.SIGKILL)
                        events.append(dict(round=r, event="leave", how=how, peer=name))
            time.sleep(0.5)
        if fleet.procs[anchor].returncode != 0:
            raise RuntimeError(f"the anchor exited {fleet.procs[anchor].returncode}: {fleet.log(anchor)[-3000:]}")
        last = fleet.rounds(anchor)[-1]
        joiners = [e["peer"] for e in events if e["event"] == "join"]
        downloaded = [n for n in joiners if re.search(r"joining: .*downloaded theta", fleet.log(n))]
        trained = [n for n in joiners if fleet.rounds(n)]
        rounds_with_churn = len({e["round"] for e in events})
        return dict(
            slots=args.slots,
            rounds=len(fleet.rounds(anchor)),
            rounds_with_churn=rounds_with_churn,
            val_loss=last["val_loss"],
            joins=len(joiners),
            joins_that_trained=len(trained),
            joins_that_downloaded_state_first=len(downloaded),
            leaves=sum(e["event"] == "leave" for e in events),
            leaves_by_sigkill=sum(e.get("how") == "SIGKILL" for e in events),
            mean_group_size=sum(r["group_size"] for r in fleet.rounds(anchor)) / max(1, len(fleet.rounds(anchor))),
            events=events,
            **_figures(fleet, started),
        )
    finally:
        fleet.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="photon-chaos-") as tmp:
        t0 = time.monotonic()
        churn = run_churn(args, Path(tmp))
        print(
            f"churn: {churn['rounds']} rounds, {churn['joins']} joins ({churn['joins_that_downloaded_state_first']} "
            f"downloaded state first), {churn['leaves']} leaves ({churn['leaves_by_sigkill']} by SIGKILL), "
            f"{churn['tokens_in_theta']:,} tokens in theta, val loss {churn['val_loss']:.4f} "
            f"({time.monotonic() - t0:.0f}s)",
            flush=True,
        )
        t0 = time.monotonic()
        calm = run_baseline(args, Path(tmp))
        print(
            f"churn-free: {calm['peers']} peers, {calm['rounds']} rounds, {calm['tokens_in_theta']:,} tokens in theta, "
            f"val loss {calm['val_loss']:.4f} ({time.monotonic() - t0:.0f}s)",
            flush=True,
        )
    ratio = churn["val_loss"] / calm["val_loss"]
    tokens = churn["tokens_in_theta"] / calm["tokens_in_theta"]
    print(f"val loss churn / churn-free: {ratio:.4f} (target <= 1.03) at {tokens:.2f}x the tokens")
    from _swarm import machine_info, save_json

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    save_json(
        args.output,
        dict(
            machine=machine_info(),
            settings=settings,
            churn=churn,
            churn_free=calm,
            val_loss_ratio=ratio,
            tokens_ratio=tokens,
        ),
    )
    print(f"saved {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
