"""A whole swarm on one machine: a bootstrap node and N photon-peer processes on loopback.

Each peer is a real process (its own DHT, averager and p2pd) in its own process group and working directory, with
its share of the data: ``iid`` gives every peer a disjoint 1/N of the sequence windows of the same corpus
(``--data-partition k/N``); ``by-file`` deals the files out, so peers see different documents (heterogeneous data,
as in Photon's experiments). One display follows all peers through their metrics files; Ctrl-C or SIGTERM stops
every process group and leaves nothing running.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from photon_p2p.errors import ConfigError
from photon_p2p.runtime import signal_group, stop_groups

logger = logging.getLogger(__name__)

LOOPBACK = "/ip4/127.0.0.1/tcp/0"
# a bootstrap that dies is noticed at once (_wait_for_maddr checks it is alive); this only bounds one that hangs.
# Importing torch and hivemind and starting p2pd took over 60 s on 2 loaded cores, hence the margin.
STARTUP_TIMEOUT = 180.0


@dataclass
class Member:
    """One process of the swarm and where its files are."""

    name: str
    popen: subprocess.Popen
    dir: Path
    log: Path
    metrics: Path | None = None
    offset: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        signal_group(self.popen.pid, sig)

    def read_new(self) -> list[dict[str, Any]]:
        """Records appended to the metrics file since the last call (complete lines only)."""
        if self.metrics is None or not self.metrics.exists():
            return []
        with self.metrics.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self.offset += end
        out = []
        for line in chunk[:end].splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            out.append(rec)
            if "outcome" in rec:  # a round record ('step' and 'eval' records carry a round number too)
                self.rounds.append(rec)
                if rec.get("val_loss") is not None:  # swarm peers report evaluations inside round records
                    self.evals.append(rec)
        return out


def split_data(paths: list[str], peers: int, split: str) -> list[list[str]]:
    """Per-peer extra flags for the data split."""
    if split == "iid":
        return [["--data", *paths, "--data-partition", f"{k}/{peers}"] for k in range(peers)]
    from photon_p2p.data import resolve_paths

    files = [str(f.path) for f in resolve_paths(paths)]
    if len(files) < peers:
        raise ConfigError(
            f"--split by-file needs at least one file per peer: --data has {len(files)} file(s) for "
            f"--peers {peers}; use --split iid or more files"
        )
    return [["--data", *files[k::peers]] for k in range(peers)]


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM (a clean shutdown) if the launcher dies, even by SIGKILL. Each peer
    runs in its own session so it can be stopped as a group, which also means no terminal signal reaches it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG (Linux)
    except OSError:
        pass  # not Linux: the launcher's finally still stops everything unless it is SIGKILLed


def _spawn(args: list[str], name: str, workdir: Path, env: dict[str, str]) -> Member:
    d = workdir / name
    d.mkdir(parents=True, exist_ok=True)
    log = d / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=d,
            env=env,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    return Member(name=name, popen=popen, dir=d, log=log)


def _wait_for_maddr(member: Member, timeout: float) -> str:
    import re

    deadline = time.monotonic() + timeout
    pattern = re.compile(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+")
    while time.monotonic() < deadline:
        m = pattern.search(member.log.read_text(errors="replace"))
        if m:
            return m.group(0)
        if not member.alive():
            break
        time.sleep(0.2)
    # errors are one line (cli/common.py escapes newlines): the log's last line says why, the log has the rest
    last = (member.log.read_text(errors="replace").strip().splitlines() or ["(empty log)"])[-1]
    raise ConfigError(f"the bootstrap node did not start (see {member.log}): {last}")


def _console(name: str) -> list[str]:
    exe = Path(sys.executable).parent / name
    return [str(exe)] if exe.exists() else [sys.executable, "-m", f"photon_p2p.cli.{name.split('-')[1]}"]


@dataclass
class SwarmPlan:
    peers: int
    data: list[str]
    split: str
    workdir: Path
    peer_args: list[str]  # flags passed through to every photon-peer
    fresh: bool = False
    threads: int | None = None


def run_swarm(plan: SwarmPlan, display: Any) -> dict[str, Any]:
    """Start everything, follow it until every peer exits, stop everything. Returns the summary figures."""
    if plan.fresh and plan.workdir.exists():
        shutil.rmtree(plan.workdir)
    plan.workdir.mkdir(parents=True, exist_ok=True)
    shares = split_data(plan.data, plan.peers, plan.split)
    threads = plan.threads or max(1, (os.cpu_count() or 2) // plan.peers)
    members: list[Member] = []
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        boot = _spawn(_console("photon-bootstrap") + ["--host-maddrs", LOOPBACK], "bootstrap", plan.workdir, env)
        members.append(boot)
        entry = _wait_for_maddr(boot, STARTUP_TIMEOUT)
        peers = []
        for k in range(plan.peers):
            name = f"peer-{k}"
            args = (
                _console("photon-peer")
                + shares[k]
                + [
                    "--initial-peers",
                    entry,
                    "--host-maddrs",
                    LOOPBACK,
                    "--threads",
                    str(threads),
                    "--checkpoint-dir",
                    "checkpoints",
                    "--metrics-file",
                    "metrics.jsonl",
                    "--no-progress",
                    "--wait-for-peers",
                    str(plan.peers),  # all start round 0 together, whoever loads its data first
                    *(["--resume"] if not plan.fresh else []),
                    *plan.peer_args,
                ]
            )
            member = _spawn(args, name, plan.workdir, env)
            member.metrics = member.dir / "metrics.jsonl"
            peers.append(member)
            members.append(member)
        display.started(entry, peers, plan)
        while any(p.alive() for p in peers):
            for p in peers:
                for rec in p.read_new():
                    display.record(p, rec)
            display.refresh(peers)
            time.sleep(0.5)
        for p in peers:
            for rec in p.read_new():
                display.record(p, rec)
        failed = [p for p in peers if p.popen.returncode not in (0, None)]
        summary = summarize(peers)
        summary["failed"] = {p.name: p.popen.returncode for p in failed}
        return summary
    finally:
        stop_all(members)


def stop_all(members: list[Member], grace: float = 15.0) -> None:
    """SIGTERM every process group (clean shutdown: peers save a checkpoint), then SIGKILL what is left."""
    codes = stop_groups([m.popen for m in members], grace=grace, sig=signal.SIGTERM)
    for m, code in zip(members, codes, strict=True):
        if code is None:
            logger.warning("%s (pid %d) did not exit", m.name, m.popen.pid)


def summarize(peers: list[Member]) -> dict[str, Any]:
    """Final losses, tokens, bytes exchanged, and what per-step data parallelism would have sent instead."""
    out: dict[str, Any] = {"peers": {}}
    total_sent = total_steps = 0
    n = len(peers)
    params = None
    for p in peers:
        last_eval = p.evals[-1] if p.evals else {}
        sent = sum(r.get("bytes_sent", 0) for r in p.rounds)
        total_sent += sent
        steps = max((r.get("step", 0) for r in p.rounds), default=0)
        total_steps = max(total_steps, steps)
        out["peers"][p.name] = dict(
            rounds=len(p.rounds),
            steps=steps,
            bytes_sent=sent,
            val_loss=last_eval.get("val_loss"),
            val_ppl=last_eval.get("val_ppl"),
            first_loss=p.rounds[0].get("loss") if p.rounds else None,
            last_loss=p.rounds[-1].get("loss") if p.rounds else None,
        )
        params = params or _param_count(p)
    out["bytes_sent_total"] = total_sent
    if params and total_steps and n > 1:
        # a ring/butterfly all-reduce of fp32 gradients sends 2 (n-1)/n x params x 4 bytes per peer per step
        dp = 2 * (n - 1) / n * params * 4 * total_steps * n
        out["bytes_sent_data_parallel"] = dp
        out["communication_saved"] = dp / total_sent if total_sent else None
    return out


def _param_count(member: Member) -> int | None:
    """Number of averaged values, from the size of the first full round (bytes per value known per compression)."""
    for r in member.rounds:
        if r.get("group_size", 1) > 1 and r.get("params"):
            return int(r["params"])
    return None
