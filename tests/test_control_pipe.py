"""Large messages reach hivemind's background processes (swarm/dht.py, _BlockingReads).

hivemind's DHT and averager processes read their control pipe from a non-blocking descriptor, and a message larger
than the pipe's 64 KiB buffer arrives in parts: the read failed with BlockingIOError, the next one started inside
the rest of the message, and EOFError ended the process's loop (hivemind PR #660). Measured before the fix: every
DHT store of 100 KB or more timed out, and two real peers of a run whose manifest carried an 8k-token BPE
tokenizer (~90 KB compressed: what the README suggests for a 125m run) each lost their DHT on the manifest store
and trained alone to the end without a single averaged round. Here: 1 and 3 MB values go through a real DHT
process and back, a 1 MB message reaches a real averager process, and those two real peers average in round 0.
A peer whose DHT or averager process died anyway stops with one line.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any

import pytest
import torch

from photon_p2p.peer import make_compression
from photon_p2p.swarm.averager import PhotonAverager, averager_settings
from photon_p2p.swarm.dht import dht_class
from tests.helpers.peers import finish, rounds, start_peer
from tests.helpers.procs import console
from tests.helpers.swarm import start_bootstrap

MB = 1 << 20


def test_megabyte_values_go_through_the_dht_process_and_back():
    from hivemind.utils import get_dht_time

    dht = dht_class()(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        for size in (MB, 3 * MB, 10):  # the small one last: the process still reads messages after the large ones
            value = bytes(range(256)) * (size // 256) or b"x" * size
            assert dht.store(f"k{size}", value, get_dht_time() + 60, return_future=True).result(timeout=30)
            got = dht.get(f"k{size}", latest=True, return_future=True).result(timeout=30)
            assert got is not None and got.value == value, size
        assert dht.is_alive()
    finally:
        dht.shutdown()


class _Echo(PhotonAverager):
    async def _echo(self, payload: bytes, future: Any) -> None:
        future.set_result(len(payload))


def test_a_megabyte_message_reaches_the_averager_process():
    from hivemind.utils import MPFuture

    dht = dht_class()(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    avg = _Echo(
        [torch.zeros(4)],
        [torch.zeros(4)],
        dht,
        prefix="pipe",
        compression=make_compression("none"),
        get_state_meta=dict,
        start=True,
        **averager_settings(matchmaking_time=3.0, allreduce_timeout=10.0, target_group_size=2, chunk_timeout=4.0),
    )
    try:
        for size in (MB, 10):
            future = MPFuture()
            avg._outer_pipe.send(("_echo", [], dict(payload=b"x" * size, future=future)))
            assert future.result(timeout=30) == size
        assert avg.is_alive()
    finally:
        avg.shutdown()
        dht.shutdown()


@pytest.mark.timeout(300)
def test_peers_of_a_run_with_a_large_tokenizer_average(procs, tmp_path):
    tok = tmp_path / "tok.json"
    subprocess.run(
        console("photon-tokenizer") + ["train", "--data", "default", "--vocab-size", "8192", "--output", str(tok)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert tok.stat().st_size > 256 << 10  # ~90 KB compressed in the manifest: more than a pipe buffer
    _, entry = start_bootstrap(procs, tmp_path, "boot")
    common = dict(
        run_id="tok",
        cache=tmp_path / "cache",
        local_steps=5,
        max_steps=10,
        extra=["--tokenizer", str(tok), "--min-group-size", "2", "--wait-for-peers", "2"],
    )
    a = start_peer(procs, "a", initial_peers=[entry], **common)
    b = start_peer(procs, "b", initial_peers=[entry], **common)
    for p in (a, b):
        finish(p, 240)
    for p in (a, b):
        assert "BlockingIOError" not in p.output() and "EOFError" not in p.output(), p.output()[-3000:]
    # --min-group-size 2: nobody closes a round alone, so round 0 is one group of both (with a dead DHT it never was)
    ra, rb = rounds(a)[0], rounds(b)[0]
    assert ra["outcome"] == rb["outcome"] == "averaged", (ra, rb)
    assert ra["group_size"] == 2 and ra["theta_hash"] == rb["theta_hash"]


def test_a_peer_whose_dht_or_averager_process_died_stops_with_one_line():
    """Without its DHT a peer sees nobody and trains alone; without its averager it can never average: either way
    it must stop and say why, not carry on as if the swarm were empty (the round loop checks before each round and
    while it waits for a group)."""
    import multiprocessing as mp

    from photon_p2p.errors import SwarmError
    from photon_p2p.swarm.dht import check_processes

    gone = mp.get_context("fork").Process(target=int)
    gone.start()
    gone.join(30)
    alive = mp.get_context("fork").Process(target=time.sleep, args=(30,))
    alive.start()
    try:
        check_processes(alive, alive)
        with pytest.raises(SwarmError, match=r"this peer's DHT process has stopped \(exit code 0"):
            check_processes(gone, alive)
        with pytest.raises(SwarmError, match="this peer's averager process has stopped"):
            check_processes(alive, gone)
    finally:
        alive.kill()
        alive.join(10)
