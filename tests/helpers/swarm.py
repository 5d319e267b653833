"""Launch helpers for swarm tests: a photon-bootstrap node, photon-peer/photon-status invocations, real manifests.

Everything runs on 127.0.0.1 through ``tests.helpers.procs`` (own process group and TMPDIR per process). Importing
this module is cheap; the manifest helpers import hivemind and torch only when called.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from photon_p2p.runtime import signal_group
from tests.helpers.procs import BIN, LOOPBACK, MADDR_RE, ProcessPool, console

PASTE_RE = r"photon-peer --initial-peers (/\S+(?: /\S+)*)"  # photon-bootstrap's ready-to-paste line


def write_corpus(directory: Path, n_docs: int = 3, words_per_doc: int = 3000, seed: int = 0) -> Path:
    """A small private text corpus for a test peer (a few KB of pseudo-English)."""
    rng = random.Random(seed)
    vocab = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "a",
        "lazy",
        "dog",
        "while",
        "peers",
        "in",
        "swarm",
        "train",
        "one",
        "small",
        "model",
        "together",
        "and",
        "share",
        "only",
        "averaged",
        "gradients",
    ]
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        text = " ".join(rng.choice(vocab) for _ in range(words_per_doc))
        (directory / f"doc{i}.txt").write_text(text + ".\n")
    return directory


def start_bootstrap(
    procs: ProcessPool,
    workdir: Path,
    name: str = "bootstrap",
    *extra: str,
    identity: Path | None = None,
    host: str = LOOPBACK,
):
    """A photon-bootstrap on 127.0.0.1; returns (proc, first loopback multiaddr from its paste line)."""
    identity = identity or (workdir / f"{name}.key")
    proc = procs.start(
        console("photon-bootstrap")
        + ["--host-maddrs", host, "--identity-path", str(identity), "--status-period", "5", *extra],
        name=name,
    )
    line = proc.wait_for(PASTE_RE, timeout=180).group(0)
    maddr = MADDR_RE.search(line)
    assert maddr, f"no 127.0.0.1 multiaddr in the paste line: {line}"
    return proc, maddr.group(0)


def peer_args(initial_peer: str, data: Path, cache: Path, *extra: str, run_id: str = "t") -> list[str]:
    """photon-peer as a volunteer runs it, with settings small enough for a CPU test."""
    return console("photon-peer") + [
        "--initial-peers",
        initial_peer,
        "--run-id",
        run_id,
        "--data",
        str(data),
        "--model",
        "micro",
        "--max-steps",
        "10000",
        "--local-steps",
        "5",
        "--host-maddrs",
        LOOPBACK,
        "--cache-dir",
        str(cache),
        "--no-progress",
        "--join-timeout",
        "20",
        *extra,
    ]


def _launch(args: list[str], cwd: Path) -> subprocess.Popen:
    cwd.mkdir(parents=True, exist_ok=True)
    # a private TMPDIR (hivemind leaves socket files behind), short because Unix socket paths max out at 108 bytes
    tmp = tempfile.mkdtemp(prefix="ph-cli-", dir="/tmp")
    env = dict(os.environ, TMPDIR=tmp, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
    popen = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    popen.tmpdir = tmp  # type: ignore[attr-defined]
    return popen


def session_leftovers(sid: int) -> list[psutil.Process]:
    """Processes still alive in the session a command started (its p2pd, DHT child, ...), zombies excluded."""
    out = []
    for proc in psutil.process_iter(["status", "name"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
            if os.getsid(proc.pid) == sid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(proc)
    return out


def _finish(popen: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Wait for a command; the result carries ``leftovers``: what the command left running in its session."""
    try:
        out, err = popen.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        signal_group(popen.pid, signal.SIGKILL)
        out, err = popen.communicate()
        err += f"\n[test helper: killed after {timeout:.0f}s]"
    result = subprocess.CompletedProcess(popen.args, popen.returncode, out, err)
    _, alive = psutil.wait_procs(session_leftovers(popen.pid), timeout=5)
    result.leftovers = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]  # type: ignore
    signal_group(popen.pid, signal.SIGKILL)  # never leave anything behind for the next test
    shutil.rmtree(popen.tmpdir, ignore_errors=True)  # type: ignore[attr-defined]
    return result


def run_cli(args: list[str], cwd: Path, timeout: float = 90) -> subprocess.CompletedProcess:
    """Run a short-lived console script to completion (own session, own TMPDIR) and capture its output."""
    return _finish(_launch(args, cwd), timeout)


def run_cli_batch(
    cases: dict[str, list[str]],
    workdir: Path,
    timeout: float = 120,
) -> dict[str, subprocess.CompletedProcess]:
    """Run several short-lived commands side by side, each in ``workdir/<case name>``. Their start-up cost is mostly
    importing torch and hivemind, so on two cores this takes about half the time of running them one by one."""
    running = {name: _launch(args, workdir / name) for name, args in cases.items()}
    deadline = time.monotonic() + timeout
    return {name: _finish(popen, deadline - time.monotonic()) for name, popen in running.items()}


def status_json(initial_peer: str, run_id: str, cwd: Path, *extra: str) -> dict[str, Any]:
    result = run_cli(
        console("photon-status")
        + ["--initial-peers", initial_peer, "--run-id", run_id, "--json", "--join-timeout", "20", *extra],
        cwd,
    )
    assert result.returncode == 0, f"photon-status failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return json.loads(result.stdout)


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> str:
    """A user mistake: non-zero exit, exactly one ``error:`` line on stderr naming the problem, no traceback."""
    assert result.returncode != 0, f"expected failure, got 0:\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    leftovers = getattr(result, "leftovers", [])
    assert not leftovers, f"left running: {[(p.pid, p.info.get('name')) for p in leftovers]}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, f"expected one 'error:' line, got:\n{result.stderr}"
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def python_script(path: Path) -> list[str]:
    return [str(BIN / "python"), str(path)]


# --------------------------------------------------------------------------------------------------------------
# records as real peers publish them (imports hivemind/torch: call only from tests that need them)


def micro_manifest(run_id: str, *, local_steps: int = 5, preset: str = "micro"):
    """The very manifest photon-peer proposes for ``--model micro --local-steps 5 --max-steps 10000``."""
    from photon_p2p.config import ModelConfig, RoundConfig, RunConfig, SwarmConfig, TrainConfig
    from photon_p2p.data import load_tokenizer
    from photon_p2p.model import build_model_args, pad_vocab
    from photon_p2p.swarm.manifest import build_manifest

    cfg = RunConfig(
        model=ModelConfig(preset=preset),
        train=TrainConfig(max_steps=10000),
        round=RoundConfig(local_steps=local_steps),
        swarm=SwarmConfig(run_id=run_id),
    )
    tokenizer = load_tokenizer("byte")
    return build_manifest(cfg, tokenizer, build_model_args(preset, vocab_size=pad_vocab(tokenizer.vocab_size)))


def heartbeat_fields(peer_id: str, **changes: Any) -> dict[str, Any]:
    """The fields of a valid, current Heartbeat record (swarm/records.py) of ``peer_id``, with ``changes`` applied."""
    fields: dict[str, Any] = dict(
        peer_id=peer_id,
        run_id="r",
        manifest_hash="0" * 64,
        round=0,
        step=0,
        tokens=0,
        tokens_per_s=1.0,
        stage="training",
        device="cpu",
        version="0.1.0",
        time=time.time(),
    )
    fields.update(changes)
    return fields


def signed_run(manifest, identity, created_at: float | None = None):
    """A RunManifest (the signed envelope peers publish) created by ``identity``."""
    from photon_p2p.swarm.manifest import RunManifest
    from photon_p2p.swarm.records import ManifestRecord, sign_record

    record = ManifestRecord(
        manifest=manifest,
        creator=identity.peer_id.to_base58(),
        created_at=time.time() if created_at is None else created_at,
    )
    return RunManifest(record=record, raw=sign_record(record, identity))


@contextlib.contextmanager
def dht_client(initial_peer: str):
    """A DHT client node in this test process (cheap to poll, unlike launching photon-status each time)."""
    from photon_p2p.swarm.dht import DHTCalls, start_dht, stop_dht

    dht = start_dht(
        initial_peers=[initial_peer], host_maddrs=[LOOPBACK], identity=None, client_mode=True, join_timeout=30
    )
    try:
        yield DHTCalls(dht)
    finally:
        stop_dht(dht)


def wait_for_heartbeats(calls, run_id: str, count: int, *, watch=(), timeout: float = 120) -> dict[str, Any]:
    """Poll the run's heartbeats until ``count`` peers are live; fail early if a watched process dies."""
    from photon_p2p.swarm.heartbeat import read_heartbeats
    from photon_p2p.swarm.records import RejectCounter

    deadline = time.monotonic() + timeout
    while True:
        beats = read_heartbeats(calls, run_id, RejectCounter())
        if len(beats) >= count:
            return beats
        for proc in watch:
            assert proc.alive(), f"{proc.name} exited ({proc.popen.returncode}):\n{proc.output()[-3000:]}"
        assert time.monotonic() < deadline, f"{len(beats)} of {count} peers after {timeout}s"
        time.sleep(0.5)


@contextlib.contextmanager
def default_sigint():
    """Give this test process (and so every child it starts) the default Ctrl-C handler for a while.

    hivemind's ``DecentralizedAverager.run_in_background`` sets SIGINT to SIG_IGN in the process that starts the
    averager and never restores it, and an ignored signal stays ignored across fork and exec. After any test that
    runs an averager in the pytest process, every photon-bootstrap or photon-status we launch would ignore Ctrl-C.
    """
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
