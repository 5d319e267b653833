"""Field testbed: volunteers' machines emulated on one Linux box, for tests and benchmarks of the swarm.

Loopback hides what the field feels: a volunteer's uplink of 20-100 Mbit/s, machines with a fraction of a core.
``FieldTestbed`` gives every emulated host its own network namespace, joined to the others through a Linux bridge
that lives in a namespace of its own (so nothing touches the real host network), by veth pairs created directly in
their namespaces. Each host has an address from a private 10.x.y.0/24 range (never 198.18.0.0/15 or a
documentation range: libp2p treats those as unroutable, and 4 peers then fail with "routing: not found"), a ``tbf``
rate limit on both ends of its veth pair (upload and download), and optionally a cgroup v1 CPU quota. ``netem``
is not available on these kernels: there is no delay emulation, only bandwidth and CPU.

Processes join a host either as a subprocess (``wrap(host, argv)``: joins the cgroup, then ``exec ip netns exec``,
same PID, so process-group kills keep working) or from inside a forked child (``enter(host)``: cgroup + setns(2);
hivemind's DHT, averager and p2pd started afterwards inherit both). ``close()`` (also on exception, Ctrl-C and at
exit) SIGKILLs every process left in each namespace or cgroup (orphaned p2pd daemons included), removes the
cgroups and deletes the namespaces, which deletes the veths. Needs root, ``ip`` and ``tc``; ``available()`` says
whether that is so here and why not. Leftovers of a test run that was itself SIGKILLed are swept by the next one.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import dataclasses
import functools
import itertools
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

CGROUP_CPU = Path("/sys/fs/cgroup/cpu")
NETNS_DIR = Path("/var/run/netns")
PREFIX = "phtb"  # namespaces are PREFIX-<pid>-<n>-<host>, cgroups CGROUP_CPU/PREFIX-<pid>-<n>/<host>
CFS_PERIOD_US = 100_000
SHARES_PER_CORE, SHARES_MAX = 64 * 1024, 262_144  # cgroup v1 cpu.shares per core of quota, and its maximum
CLONE_NEWNET = 0x40000000
BRIDGE = "br0"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_STALE_RE = re.compile(rf"^{PREFIX}-(\d+)-\d+")
_counter = itertools.count(1)
_live: set[FieldTestbed] = set()
_lock = threading.Lock()


logger = logging.getLogger(__name__)


class TestbedError(RuntimeError):
    """A testbed command failed (the message has the command and its stderr) or the testbed cannot exist here."""

    __test__ = False  # not a pytest test class, despite its name


@dataclasses.dataclass(frozen=True)
class HostSpec:
    name: str
    rate_mbit: float | None = None  # both directions; None = unlimited
    cpu: float | None = None  # cores (0.125 = 1/8 of a core, 2.0 = two cores); None = unlimited


@dataclasses.dataclass(frozen=True)
class Host:
    """One emulated machine: plain data (picklable, survives fork), usable without the FieldTestbed object."""

    name: str
    netns: str
    address: str
    ifname: str  # its end of the veth pair, inside its namespace (e.g. for GLOO_SOCKET_IFNAME)
    rate_mbit: float | None
    cpu: float | None
    cgroup: str | None  # cgroup v1 cpu directory, only where cpu is set

    def maddr(self, port: int = 0) -> str:
        return f"/ip4/{self.address}/tcp/{port}"

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """An argv that joins this host's cgroup and execs ``ip netns exec NS argv...``, keeping its PID."""
        if self.cgroup is None:
            return ["ip", "netns", "exec", self.netns, *argv]
        script = 'echo $$ > "$1" && shift && exec ip netns exec "$@"'
        return ["sh", "-c", script, "photon-testbed", f"{self.cgroup}/cgroup.procs", self.netns, *argv]

    def enter(self) -> None:
        """Move the calling process into this host: cgroup, then network namespace (setns(2) of this thread, so
        call it first thing in a freshly forked child, before any thread starts; its children inherit both)."""
        if self.cgroup is not None:
            Path(self.cgroup, "cgroup.procs").write_text(str(os.getpid()))
        fd = os.open(NETNS_DIR / self.netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                errno = ctypes.get_errno()
                raise TestbedError(f"setns({self.netns}): {os.strerror(errno)}")
        finally:
            os.close(fd)


def _run(args: Sequence[str], timeout: float = 30.0) -> str:
    """Run a command; TestbedError with its stderr if it fails."""
    try:
        return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, check=True).stdout
    except subprocess.CalledProcessError as e:
        raise TestbedError(f"`{' '.join(args)}` failed (exit {e.returncode}): {e.stderr.strip()}") from None
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TestbedError(f"`{' '.join(args)}` failed: {e}") from None


@functools.cache
def available(cpu: bool = False) -> tuple[bool, str]:
    """Whether testbeds can be made here (root, ``ip``, ``tc``, namespaces, veth, tbf), and with ``cpu=True`` CPU
    quotas too; the reason says what is missing (for a test's skip message) or what works."""
    if os.geteuid() != 0:
        return False, f"the field testbed needs root (network namespaces, tc, cgroups); running as uid {os.geteuid()}"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return False, f"the field testbed needs {' and '.join(missing)} (iproute2) on PATH"
    probe = f"{PREFIX}-probe-{os.getpid()}"
    try:
        _run(["ip", "netns", "add", probe])
        try:
            _run(["ip", "-n", probe, "link", "add", "pa", "type", "veth", "peer", "name", "pb"])
            _run(
                [
                    "tc",
                    "-n",
                    probe,
                    "qdisc",
                    "add",
                    "dev",
                    "pa",
                    "root",
                    "tbf",
                    "rate",
                    "100mbit",
                    "burst",
                    "256kb",
                    "latency",
                    "200ms",
                ]
            )
        finally:
            subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    except TestbedError as e:
        return False, f"network namespaces / veth / tbf unavailable here: {e}"
    net = "network namespaces, veth pairs and tbf rate limits work"
    cpu_ok, cpu_reason = _cpu_available()
    if cpu and not cpu_ok:
        return False, f"{net}, but CPU quotas do not: {cpu_reason}"
    return True, f"{net}; CPU quotas: {cpu_reason}"


def _cpu_available() -> tuple[bool, str]:
    if not (CGROUP_CPU / "cpu.cfs_quota_us").is_file():
        return False, f"no cgroup v1 cpu controller at {CGROUP_CPU} (cgroup v2 is not supported)"
    probe = CGROUP_CPU / f"{PREFIX}-probe-{os.getpid()}"
    try:
        probe.mkdir(exist_ok=True)
        (probe / "cpu.cfs_quota_us").write_text(str(CFS_PERIOD_US // 2))
        probe.rmdir()
    except OSError as e:
        return False, f"cannot create a cgroup with a CPU quota under {CGROUP_CPU}: {e}"
    return True, f"cgroup v1 cpu controller at {CGROUP_CPU}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _netns_pids(netns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _cgroup_pids(cgroup: Path) -> list[int]:
    try:
        return [int(p) for p in (cgroup / "cgroup.procs").read_text().split()]
    except OSError:
        return []


def _kill_all(netns: Sequence[str], cgroups: Sequence[Path], timeout: float = 15.0) -> list[int]:
    """SIGKILL every process in the namespaces and cgroups until none is left; the survivors (should be none)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = {p for ns in netns for p in _netns_pids(ns)} | {p for cg in cgroups for p in _cgroup_pids(cg)}
        pids.discard(os.getpid())
        if not pids or time.monotonic() > deadline:
            return sorted(pids)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _subdirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir()]
    except OSError:  # gone meanwhile (another run's sweep)
        return []


def _remove_cgroup(path: Path, timeout: float = 10.0) -> str | None:
    """rmdir a cgroup (children first); retried while its killed processes finish exiting. An error, or None."""
    for child in _subdirs(path):
        error = _remove_cgroup(child, timeout)
        if error:
            return error
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return None
        except FileNotFoundError:
            return None
        except OSError as e:
            if time.monotonic() > deadline:
                return f"rmdir {path}: {e} (processes: {_cgroup_pids(path)})"
            time.sleep(0.05)


def _delete_netns(netns: str) -> str | None:
    p = subprocess.run(["ip", "netns", "del", netns], capture_output=True, text=True)
    if p.returncode and (NETNS_DIR / netns).exists():
        return f"ip netns del {netns}: {p.stderr.strip()}"
    return None


def cleanup_stale() -> list[str]:
    """Remove namespaces and cgroups of testbeds whose creating process is gone (a run that was SIGKILLed).
    Returns what was removed."""
    removed = []
    netns = [
        line.split()[0]
        for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
        if line.strip()
    ]
    stale_ns = [ns for ns in netns if (m := _STALE_RE.match(ns)) and not _alive(int(m.group(1)))]
    stale_cg = [cg for cg in _subdirs(CGROUP_CPU) if (m := _STALE_RE.match(cg.name)) and not _alive(int(m.group(1)))]
    _kill_all(stale_ns, [c for cg in stale_cg for c in _subdirs(cg)])
    for cg in stale_cg:
        if _remove_cgroup(cg) is None:
            removed.append(str(cg))
    for ns in stale_ns:
        if _delete_netns(ns) is None:
            removed.append(ns)
    return removed


@contextlib.contextmanager
def _signals_deferred():
    """SIGINT/SIGTERM wait until the block is done (teardown must not stop half-way); then they are delivered."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    sigs = [sig for sig in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(sig) is not None]  # None: not Python's
    old = {sig: signal.signal(sig, lambda s, _f: received.append(s)) for sig in sigs}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(received):
            signal.raise_signal(sig)


class FieldTestbed:
    """Hosts in their own network namespaces on one bridge, rate-limited and CPU-limited as their specs say.

    ``with FieldTestbed([HostSpec("boot"), HostSpec("a", rate_mbit=20, cpu=0.5)]) as tb: tb.wrap("a", argv)``.
    Hosts get ``<subnet>.1``, ``.2``, ... in list order (``subnet``: three octets, default ``10.<100-249>.<n>``);
    ``burst`` and ``latency`` are tbf's (256kb/200ms: ~96 Mbit/s of TCP at 100 Mbit/s).
    """

    def __init__(
        self, hosts: Sequence[HostSpec], subnet: str | None = None, burst: str = "256kb", latency: str = "200ms"
    ):
        names = [h.name for h in hosts]
        bad = [n for n in names if not _NAME_RE.match(n)]
        if bad or len(set(names)) != len(names) or not 1 <= len(names) <= 250:
            raise ValueError(f"host names must be unique, 1-32 of [A-Za-z0-9_.-], 1-250 hosts: {names}")
        ok, reason = available(cpu=any(h.cpu is not None for h in hosts))
        if not ok:
            raise TestbedError(reason)
        number = next(_counter)
        self.id = f"{os.getpid()}-{number}"
        short = f"{os.getpid():x}{number:x}"  # veth names: at most 15 characters
        base = subnet or f"10.{100 + os.getpid() % 150}.{number % 256}"
        self.bridge_netns = f"{PREFIX}-{self.id}-bridge"
        self.cgroup_root = CGROUP_CPU / f"{PREFIX}-{self.id}"
        self.hosts: dict[str, Host] = {}
        self._netns: list[str] = []
        self._cgroups: list[Path] = []
        self._closed = False
        with _lock:
            _live.add(self)
        try:
            cleanup_stale()
            self._add_netns(self.bridge_netns)
            _run(["ip", "-n", self.bridge_netns, "link", "add", BRIDGE, "type", "bridge"])
            _run(["ip", "-n", self.bridge_netns, "link", "set", BRIDGE, "up"])
            for i, spec in enumerate(hosts):
                self.hosts[spec.name] = self._add_host(spec, i, short, f"{base}.{i + 1}", burst, latency)
        except BaseException:
            with contextlib.suppress(TestbedError):
                self.close()
            raise

    def _add_netns(self, netns: str) -> None:
        self._netns.append(netns)  # before creating it: a half-made one is deleted too
        _run(["ip", "netns", "add", netns])
        _run(["ip", "-n", netns, "link", "set", "lo", "up"])

    def _add_host(self, spec: HostSpec, i: int, short: str, address: str, burst: str, latency: str) -> Host:
        netns, inner, outer = f"{PREFIX}-{self.id}-{spec.name}", f"v{short}{i}a", f"v{short}{i}b"
        assert len(outer) <= 15, outer
        self._add_netns(netns)
        _run(
            [
                "ip",
                "link",
                "add",
                inner,
                "netns",
                netns,
                "type",
                "veth",
                "peer",
                "name",
                outer,
                "netns",
                self.bridge_netns,
            ]
        )
        _run(["ip", "-n", self.bridge_netns, "link", "set", outer, "master", BRIDGE])
        _run(["ip", "-n", self.bridge_netns, "link", "set", outer, "up"])
        _run(["ip", "-n", netns, "addr", "add", f"{address}/24", "dev", inner])
        _run(["ip", "-n", netns, "link", "set", inner, "up"])
        if spec.rate_mbit is not None:
            if not spec.rate_mbit > 0:
                raise TestbedError(f"host {spec.name}: rate_mbit must be positive, not {spec.rate_mbit}")
            rate = f"{round(spec.rate_mbit * 1000)}kbit"
            for ns, dev in ((netns, inner), (self.bridge_netns, outer)):  # its upload, its download
                _run(
                    [
                        "tc",
                        "-n",
                        ns,
                        "qdisc",
                        "add",
                        "dev",
                        dev,
                        "root",
                        "tbf",
                        "rate",
                        rate,
                        "burst",
                        burst,
                        "latency",
                        latency,
                    ]
                )
        cgroup = None
        if spec.cpu is not None:
            if not spec.cpu > 0:
                raise TestbedError(f"host {spec.name}: cpu must be positive, not {spec.cpu}")
            if not self._cgroups:
                self.cgroup_root.mkdir()
                self._cgroups.append(self.cgroup_root)
            path = self.cgroup_root / spec.name
            path.mkdir()
            self._cgroups.append(path)
            (path / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (path / "cpu.cfs_quota_us").write_text(str(max(1000, round(spec.cpu * CFS_PERIOD_US))))
            # the quota caps a host; its weight makes the quota what binds on a busy box too (a nice-0 task weighs
            # 1024, so a host of `cpu` cores gets them while fewer than ~100 other tasks compete for 2 cores)
            shares = min(SHARES_MAX, round(SHARES_PER_CORE * spec.cpu))
            (path / "cpu.shares").write_text(str(shares))
            total = int((self.cgroup_root / "cpu.shares").read_text()) if len(self._cgroups) > 2 else 0
            (self.cgroup_root / "cpu.shares").write_text(str(min(SHARES_MAX, total + shares)))
            cgroup = str(path)
        return Host(spec.name, netns, address, inner, spec.rate_mbit, spec.cpu, cgroup)

    # -- using hosts (by name or Host)

    def __getitem__(self, host: str | Host) -> Host:
        return host if isinstance(host, Host) else self.hosts[host]

    def set_cpu(self, host: str | Host, cpu: float) -> None:
        """Change a host's CPU quota while it runs (it must have been created with one): e.g. let a slow machine
        start up at full speed, so a test does not spend minutes importing at 1/8 of a core."""
        h = self[host]
        if h.cgroup is None or not cpu > 0:
            raise TestbedError(f"host {h.name}: set_cpu needs a host created with a cpu quota and cpu > 0")
        Path(h.cgroup, "cpu.cfs_quota_us").write_text(str(max(1000, round(cpu * CFS_PERIOD_US))))
        Path(h.cgroup, "cpu.shares").write_text(str(min(SHARES_MAX, round(SHARES_PER_CORE * cpu))))
        self.hosts[h.name] = dataclasses.replace(h, cpu=cpu)

    def addr(self, host: str | Host) -> str:
        return self[host].address

    def maddr(self, host: str | Host, port: int = 0) -> str:
        return self[host].maddr(port)

    def wrap(self, host: str | Host, argv: Sequence[str]) -> list[str]:
        return self[host].wrap(argv)

    def enter(self, host: str | Host) -> None:
        self[host].enter()

    def measure_tcp_mbit(self, src: str | Host, dst: str | Host, seconds: float = 2.0) -> float:
        """Mbit/s of one TCP stream from ``src`` to ``dst`` as the receiver sees it (bytes / first-to-last byte)."""
        src, dst = self[src], self[dst]
        server = subprocess.Popen(
            dst.wrap([sys.executable, "-c", _TCP_SERVER, dst.address]),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            port = server.stdout.readline().strip()
            if not port.isdigit():
                raise TestbedError(f"tcp server in {dst.name} did not start: {port} {server.stderr.read()}")
            _run(src.wrap([sys.executable, "-c", _TCP_CLIENT, dst.address, port, str(seconds)]), timeout=seconds + 120)
            out, err = server.communicate(timeout=120)
            if server.returncode:
                raise TestbedError(f"tcp server in {dst.name} failed: {err.strip()}")
            nbytes, elapsed = out.split()
            return int(nbytes) * 8 / float(elapsed) / 1e6
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait()

    # -- teardown

    def close(self) -> None:
        """Kill every process in the testbed, remove its cgroups and namespaces. Idempotent; raises TestbedError
        (after doing all it can) if something could not be removed."""
        with _signals_deferred():
            if self._closed:
                return
            errors = []
            hosts_cgroups = [c for c in self._cgroups if c != self.cgroup_root]
            survivors = _kill_all(self._netns, hosts_cgroups)
            if survivors:
                errors.append(f"processes survived SIGKILL: {survivors}")
            for cgroup in reversed(self._cgroups):
                errors.append(_remove_cgroup(cgroup))
            for netns in reversed(self._netns):
                errors.append(_delete_netns(netns))
            self._closed = True
            with _lock:
                _live.discard(self)
        errors = [e for e in errors if e]
        if errors:
            raise TestbedError(f"testbed {self.id} teardown: " + "; ".join(errors))

    def __enter__(self) -> FieldTestbed:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except TestbedError as e:  # never hide the exception that is already on its way
            logger.warning("testbed teardown: %s", e)

    def __repr__(self) -> str:
        return f"FieldTestbed({self.id}, {list(self.hosts.values())})"


@atexit.register
def _close_all() -> None:
    for testbed in list(_live):
        try:
            testbed.close()
        except TestbedError as e:
            logger.warning("testbed teardown: %s", e)


_TCP_SERVER = """
import socket, sys, time
s = socket.create_server((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
c, _ = s.accept()
n, t0 = 0, None
while b := c.recv(1 << 20):
    t1 = time.perf_counter()
    if t0 is None:  # the clock starts at the first byte: what came before it is not counted
        t0 = t1
    else:
        n += len(b)
print(n, max(t1 - t0, 1e-9))
"""

_TCP_CLIENT = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], int(sys.argv[2])))
block, end = b"\\0" * (1 << 16), time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    c.sendall(block)
c.close()
"""
