"""The field testbed (photon_p2p/testbed.py) really emulates volunteers' machines, and always cleans up after itself.

Measured, not assumed: one TCP stream from a host limited to 20 Mbit/s carries 12-25 Mbit/s in each direction, and
one from a 100 Mbit/s host several times more; a busy loop in a host with a quarter-core CPU quota gets 0.15-0.35
CPU-seconds per second (and is throttled); four real hivemind DHT nodes, one per namespace on 10.x addresses, all
read each other's values. Teardown: after the context ends - normally, by an exception, by a failure half-way
through creation, or by Ctrl-C of the process that made it - no namespace or cgroup of the testbed is left and the
processes started in it (a detached orphan included, as p2pd is after SIGKILL of its parent) are dead; a testbed
whose creator was SIGKILLed is swept by the next one. Skips where namespaces/tc/cgroups cannot be made (not root).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from photon_p2p import testbed
from photon_p2p.testbed import FieldTestbed, HostSpec
from tests.helpers.procs import wait_until

NET_OK, NET_REASON = testbed.available()
CPU_OK, CPU_REASON = testbed.available(cpu=True)
pytestmark = pytest.mark.skipif(not NET_OK, reason=NET_REASON)
needs_cpu = pytest.mark.skipif(not CPU_OK, reason=CPU_REASON)


def leftovers(pid: int | None = None) -> set[str]:
    """Namespaces and cgroups of testbeds made by process ``pid`` (default: this one)."""
    prefix = f"{testbed.PREFIX}-{pid or os.getpid()}-"
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout.split()
    cgroups = os.listdir(testbed.CGROUP_CPU) if testbed.CGROUP_CPU.is_dir() else []
    return {n for n in netns + cgroups if n.startswith(prefix)}


def dead(pid: int, timeout: float = 10.0) -> bool:
    try:
        psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        pass
    except psutil.TimeoutExpired:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    return True


def test_rate_limits_both_directions_and_scale_with_the_rate():
    hosts = [HostSpec("slow", rate_mbit=20), HostSpec("mid", rate_mbit=100), HostSpec("fast", rate_mbit=1000)]
    with FieldTestbed(hosts) as tb:
        assert {tb.addr(h.name).split(".")[0] for h in hosts} == {"10"}
        up = tb.measure_tcp_mbit("slow", "fast", seconds=2.0)
        down = tb.measure_tcp_mbit("fast", "slow", seconds=2.0)
        mid = tb.measure_tcp_mbit("mid", "fast", seconds=2.0)
    print(f"20 Mbit/s host: up {up:.1f}, down {down:.1f}; 100 Mbit/s host: up {mid:.1f} Mbit/s")
    assert 12 < up < 25, up
    assert 12 < down < 25, down
    assert 60 < mid < 110, mid
    assert mid > 3 * up
    assert not leftovers()


@needs_cpu
def test_cpu_quota_limits_a_busy_loop():
    busy = (
        "import time\nt0, c0 = time.monotonic(), time.process_time()\n"
        "while time.monotonic() - t0 < 2.0:\n    pass\n"
        "print((time.process_time() - c0) / (time.monotonic() - t0))"
    )
    with FieldTestbed([HostSpec("quarter", cpu=0.25)]) as tb:
        host = tb["quarter"]
        out = subprocess.run(
            host.wrap([sys.executable, "-c", busy]), capture_output=True, text=True, check=True, timeout=60
        ).stdout
        stat = dict(line.split() for line in Path(host.cgroup, "cpu.stat").read_text().splitlines())
        quota = Path(host.cgroup, "cpu.cfs_quota_us").read_text().strip()
    share = float(out)
    print(f"busy loop at cpu=0.25: {share:.3f} CPU-s per s; cpu.stat {stat}")
    assert quota == "25000"
    assert 0.15 < share < 0.35, share
    assert int(stat["nr_throttled"]) >= 10  # ~20 periods of 100 ms, throttled in most of them
    assert not leftovers()


def test_teardown_kills_processes_and_removes_everything():
    with FieldTestbed([HostSpec("a", rate_mbit=50), HostSpec("b", cpu=0.5 if CPU_OK else None)]) as tb:
        names = {tb["a"].netns, tb["b"].netns, tb.bridge_netns}
        assert names <= leftovers()
        # a detached orphan (own session, as p2pd is after its parent's SIGKILL) next to a process-group leader
        sleeper = subprocess.Popen(
            tb.wrap("b", ["sh", "-c", "setsid -f sleep 1001; exec sleep 1000"]), start_new_session=True
        )
        in_a = subprocess.Popen(tb.wrap("a", ["sleep", "1000"]), start_new_session=True)
        in_b = wait_until(
            lambda: len(pids := testbed._netns_pids(tb["b"].netns)) == 2 and pids,
            timeout=10,
            what="both sleeps in host b",
        )
        assert sleeper.pid in in_b, in_b
    assert sleeper.wait(10) == -signal.SIGKILL and in_a.wait(10) == -signal.SIGKILL
    assert all(dead(pid) for pid in in_b)
    assert not leftovers()
    tb.close()  # idempotent


def test_teardown_on_exception():
    hosts = [HostSpec("a"), HostSpec("b", rate_mbit=20)]
    with pytest.raises(RuntimeError, match="inside the testbed"), FieldTestbed(hosts) as tb:
        proc = subprocess.Popen(tb.wrap("b", ["sleep", "1000"]), start_new_session=True)
        time.sleep(0.2)
        raise RuntimeError("inside the testbed")
    assert proc.wait(10) == -signal.SIGKILL
    assert not leftovers()


def test_failure_half_way_through_creation_cleans_up():
    with pytest.raises(testbed.TestbedError, match=r"`tc -n .* tbf .*bogus.*` failed \(exit \d+\): \S"):
        FieldTestbed([HostSpec("a", rate_mbit=100), HostSpec("b")], burst="bogus")
    with pytest.raises(testbed.TestbedError, match="rate_mbit must be positive"):
        FieldTestbed([HostSpec("a"), HostSpec("b", rate_mbit=0)])
    with pytest.raises(ValueError, match="unique"):
        FieldTestbed([HostSpec("a"), HostSpec("a")])
    assert not leftovers()


CREATOR = """
import subprocess, sys, time
from photon_p2p.testbed import FieldTestbed, HostSpec
from tests.helpers.procs import wait_until
with FieldTestbed([HostSpec("a", rate_mbit=20)]) as tb:
    p = subprocess.Popen(tb.wrap("a", ["sleep", "1000"]), start_new_session=True)
    print(p.pid, flush=True)
    time.sleep(120)
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_creator_interrupted_or_killed_leaves_nothing(sig):
    """Ctrl-C of the creating process runs the teardown; after SIGKILL the next testbed sweeps the leftovers."""
    creator = subprocess.Popen([sys.executable, "-c", CREATOR], stdout=subprocess.PIPE, text=True)
    try:
        sleeper = int(creator.stdout.readline())
        assert leftovers(creator.pid)
        creator.send_signal(sig)
        creator.wait(30)
    finally:
        creator.kill()
    if sig == signal.SIGKILL:
        assert leftovers(creator.pid) and not dead(sleeper, timeout=0.5)
        with FieldTestbed([HostSpec("x")]):
            pass
    assert dead(sleeper)
    assert not leftovers(creator.pid)


DHT_NODE = """
import os, sys, time
t0 = time.monotonic()
import hivemind
from hivemind.utils import get_dht_time
me, maddr, n, rendezvous = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
while me and not os.path.exists(rendezvous):  # everybody imports at once; node 0's address comes in a file
    time.sleep(0.05)
initial = open(rendezvous).read().split() if me else []
dht = hivemind.DHT(host_maddrs=[maddr], initial_peers=initial, start=True)
visible = [str(m) for m in dht.get_visible_maddrs()]
print("VISIBLE", *visible, f"after {time.monotonic() - t0:.1f} s", flush=True)
if not me:
    with open(rendezvous + ".tmp", "w") as f:
        f.write(" ".join(visible))
    os.replace(rendezvous + ".tmp", rendezvous)
found, deadline, stored = set(), time.monotonic() + 90, 0.0
while len(found) < n and time.monotonic() < deadline:
    if time.monotonic() - stored > 3:  # again now and then, as the nearest nodes change while others join
        dht.store(f"testbed-node{me}", f"value{me}", get_dht_time() + 600)
        stored = time.monotonic()
    for k in set(range(n)) - found:
        record = dht.get(f"testbed-node{k}", latest=True)
        if record is not None and record.value == f"value{k}":
            found.add(k)
    time.sleep(0.2)
print("FOUND", len(found), sorted(found), f"after {time.monotonic() - t0:.1f} s", flush=True)
time.sleep(600)  # until the test kills us: the others may still be reading our value
"""


@pytest.mark.slow
def test_four_dht_nodes_in_namespaces_find_each_other(procs, tmp_path):
    t0 = time.monotonic()
    n, rendezvous = 4, str(tmp_path / "node0.maddrs")
    # a core each where quotas work: their weight keeps the nodes quick on a busy box (see testbed.SHARES_PER_CORE)
    with FieldTestbed([HostSpec(f"h{i}", rate_mbit=100, cpu=1.0 if CPU_OK else None) for i in range(n)]) as tb:
        nodes = [
            procs.start(
                tb.wrap(
                    f"h{i}", [sys.executable, "-c", DHT_NODE, str(i), tb.maddr(f"h{i}", 31337), str(n), rendezvous]
                ),
                name=f"dht{i}",
            )
            for i in range(n)
        ]
        visible = nodes[0].wait_for(r"VISIBLE (\S+)", timeout=120).group(1)
        assert visible.startswith(f"/ip4/{tb.addr('h0')}/tcp/31337/p2p/"), visible
        for node in nodes:
            node.wait_for(rf"FOUND {n} ", timeout=120)
        print(
            f"{n} DHT nodes found all {n} values in {time.monotonic() - t0:.1f} s:",
            *(node.wait_for(r"FOUND .*", 1).group(0) for node in nodes),
            sep="\n  ",
        )
        for node in nodes:
            node.signal_group(signal.SIGKILL)
    assert not leftovers()
