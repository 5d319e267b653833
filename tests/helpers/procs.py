"""Real processes for swarm tests: each in its own process group and its own TMPDIR, always killed at the end.

docs/design.md ("Traps"): after SIGKILL a hivemind process leaves its DHT child, p2pd and socket files behind, and
even a clean shutdown leaves /tmp/hivemind-p2pclient-*.sock. So every process gets a private TMPDIR, and teardown
kills whole process groups. ``descendants()`` snapshots a process tree so a test can check nothing outlived it.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from photon_p2p.runtime import signal_group, stop_group

BIN = Path(sys.executable).parent
LOOPBACK = "/ip4/127.0.0.1/tcp/0"
MADDR_RE = re.compile(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/[1-9A-HJ-NP-Za-km-z]+")


def console(name: str) -> list[str]:
    """A console script of this project, from the same virtual environment as the test run."""
    return [str(BIN / name)]


class Proc:
    """A launched process with its output in files (never a pipe that could fill up and block it)."""

    def __init__(self, args: list[str], workdir: Path, name: str, env: dict[str, str] | None = None):
        self.name, self.args = name, args
        self.dir = workdir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        # short on purpose: torch_shm_manager and p2pd put Unix sockets here, and those paths max out at 108 bytes
        self.tmp = Path(tempfile.mkdtemp(prefix=f"ph-{name[:8]}-", dir="/tmp"))
        self.out_path, self.err_path = self.dir / "stdout.log", self.dir / "stderr.log"
        full_env = dict(os.environ, TMPDIR=str(self.tmp), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        full_env.update(env or {})
        with self.out_path.open("wb") as out, self.err_path.open("wb") as err:
            self.popen = subprocess.Popen(
                args, stdout=out, stderr=err, env=full_env, cwd=self.dir, start_new_session=True
            )
        self.pid = self.popen.pid

    @property
    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def output(self) -> str:
        return self.stdout + self.stderr

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: float) -> int:
        return self.popen.wait(timeout=timeout)

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """Wait until stdout+stderr matches ``pattern``; fail with the logs if the process dies or time runs out."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = regex.search(self.output())
            if m:
                return m
            if not self.alive():
                m = regex.search(self.output())
                if m:
                    return m
                raise AssertionError(
                    f"{self.name} exited ({self.popen.returncode}) before printing {pattern!r}:\n"
                    f"{self.output()[-4000:]}"
                )
            time.sleep(0.2)
        raise AssertionError(f"{self.name}: no {pattern!r} within {timeout}s:\n{self.output()[-4000:]}")

    def maddr(self, timeout: float = 60) -> str:
        return self.wait_for(MADDR_RE.pattern, timeout).group(0)

    def descendants(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def signal_group(self, sig: int) -> None:
        signal_group(self.pid, sig)

    def kill(self) -> None:
        stop_group(self.popen, grace=0.0, sig=signal.SIGKILL, reap=10.0)
        shutil.rmtree(self.tmp, ignore_errors=True)


class ProcessPool:
    """Starts processes under one work directory and kills every process group at teardown."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[Proc] = []

    def start(self, args: list[str], name: str, env: dict[str, str] | None = None) -> Proc:
        proc = Proc(args, self.workdir, name, env)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    interval: float = 0.3,
    what: str = "condition",
    explain: Callable[[], str] | None = None,
):
    """Poll ``predicate`` until it returns something truthy; on timeout fail with ``explain()`` (say, the logs of
    the processes involved: a CI failure must be diagnosable from its output alone)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout}s" + (f"\n{explain()}" if explain else ""))


def all_gone(processes: list[psutil.Process], timeout: float = 10.0) -> list[psutil.Process]:
    """Processes from the list still alive after ``timeout`` (zombies count as gone)."""
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    return [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
