"""Shared by bench/allreduce.py and bench/communication.py: a swarm of N real peer processes on 127.0.0.1 that run
one all-reduce at a time, on command, and report what it cost.

Each peer is its own OS process (forked from the benchmark, in its own process group) holding its own hivemind DHT
(and so its own ``p2pd``), one ``PhotonAverager`` (our class, with a benchmark-only hook that changes compression,
part size and prefetch between steps, so one set of peers runs every setting in turn) and, optionally, one
``torch.distributed`` gloo rank (TCP store on 127.0.0.1). The parent coordinates every operation with a
``multiprocessing.Barrier`` created before the fork: each peer resets its input to the same per-peer random values,
the averager does its matchmaking first (``step(wait=False, require_trigger=True)`` until ``AWAITING_TRIGGER``), and
only then are all peers released at once; each peer times ``allow_allreduce()`` -> result (gloo: ``all_reduce``) and
the time of an operation is the slowest peer's.

Around every operation the parent also reads, with no help from the peers: CPU seconds used per kind of process
(peer main process, averager, DHT, p2pd) and TCP payload bytes between our peers' p2pd daemons (``ss -tin``
``bytes_received`` of every socket on one of their listening ports: what really crossed loopback, noise/yamux/protobuf
framing and DHT chatter included). Each result is checked: every peer returns the values at a few fixed positions,
which must equal the mean of the inputs there (within the compression's error) and be identical across peers.

With ``SwarmSpec.hosts`` (``photon_p2p.testbed`` hosts, one per peer) each forked peer first moves into its host's
network namespace (and CPU cgroup) and uses the host's 10.x address instead of 127.0.0.1: hivemind maddrs, the
gloo TCP store (on rank 0's host) and gloo's interface (``GLOO_SOCKET_IFNAME``); TCP bytes are then read with
``ss`` inside every host's namespace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any

import numpy as np
import psutil

from photon_p2p.runtime import signal_group

COMPRESSIONS = ("none", "fp16", "blockwise8bit")
BITS = {"none": 32, "fp16": 16, "blockwise8bit": 8}
# max |result - true mean| at the sampled positions for unit-variance inputs (8-bit: ~0.7% of a block's absmax,
# applied twice, to the inputs and to the average)
TOLERANCE = {"none": 1e-5, "fp16": 1e-2, "blockwise8bit": 0.1}
SAMPLES = 2048
GATE_TIMEOUT = 900.0


def compression_by_name(name: str):
    from hivemind.compression import BlockwiseQuantization, Float16Compression, NoCompression

    return {"none": NoCompression, "fp16": Float16Compression, "blockwise8bit": BlockwiseQuantization}[name]()


def _averager_classes():
    from hivemind.averaging import DecentralizedAverager
    from hivemind.utils import MPFuture

    from photon_p2p.swarm.averager import PhotonAverager

    class Configurable:
        """Benchmark hook: update the all-reduce settings (``compression`` by name, ``part_size_bytes``,
        ``prefetch``) and ``torch_threads`` (torch's intra-op threads) inside the averager process before the next
        step."""

        def configure(self, **settings: Any) -> None:
            future = MPFuture()
            self._outer_pipe.send(("_configure", [], dict(settings=settings, future=future)))
            future.result(timeout=30)

        async def _configure(self, settings: dict[str, Any], future: Any) -> None:
            try:
                settings = dict(settings)
                if "torch_threads" in settings:
                    import torch

                    torch.set_num_threads(settings.pop("torch_threads"))
                if "compression" in settings:
                    settings["compression"] = compression_by_name(settings["compression"])
                self.allreduce_kwargs.update(settings)
                future.set_result(None)
            except Exception as e:
                future.set_exception(e)

    class BenchAverager(Configurable, PhotonAverager):
        pass

    class StockAverager(Configurable, DecentralizedAverager):
        """hivemind's own averager, as shipped, for comparison with our runner."""

    return BenchAverager, StockAverager


@dataclasses.dataclass
class SwarmSpec:
    n: int
    shapes: list[tuple[int, ...]]  # the averaged tensors (one flat tensor, or a model's parameter shapes)
    gloo: bool = False
    stock: bool = False  # also run hivemind's own DecentralizedAverager (method "stock")
    part_size_bytes: int = 2**19
    allreduce_timeout: float = 900.0
    chunk_timeout: float = 120.0
    match_timeout: float = 60.0
    hosts: list[Any] | None = None  # photon_p2p.testbed.Host per rank (rate-limited namespaces); None = loopback

    def address(self, rank: int) -> str:
        return self.hosts[rank].address if self.hosts else "127.0.0.1"


@dataclasses.dataclass
class OpResult:
    method: str  # "gloo", "stock" or a compression name (PhotonAverager)
    ok: bool
    error: str = ""
    seconds: list[float] = dataclasses.field(default_factory=list)  # per peer: trigger -> result
    bytes_sent: list[int] = dataclasses.field(default_factory=list)  # per peer, as PhotonAverager counts them
    bytes_received: list[int] = dataclasses.field(default_factory=list)
    wire_bytes: int | None = None  # TCP payload between our p2pds during the all-reduce (trigger -> last result)
    wire_bytes_step: int | None = None  # the same for the whole step, matchmaking included
    cpu_s: dict[str, float] = dataclasses.field(default_factory=dict)  # all peers, trigger -> last result
    max_error: float = float("nan")
    identical: bool = False
    lost_fraction: float = 0.0
    min_available_gib: float = float("nan")

    @property
    def time(self) -> float:
        return max(self.seconds)


# ---------------------------------------------------------------------------------------------------------------
# the peer process


class _Peer:
    def __init__(self, rank: int, spec: SwarmSpec, initial_peers: list[str], gloo_port: int | None):
        import hivemind
        import torch

        from photon_p2p.runtime import quiet_hivemind

        quiet_hivemind("warning")
        self.rank, self.spec, self.torch = rank, spec, torch
        self.dht = hivemind.DHT(
            start=True, host_maddrs=[f"/ip4/{spec.address(rank)}/tcp/0"], initial_peers=initial_peers
        )
        bench_cls, stock_cls = _averager_classes()
        # hivemind imports bitsandbytes lazily, in the averager process, on the first 8-bit step (seconds): import
        # and run it here, before the averager forks, so it inherits it warm (as photon-peer does). Not in the
        # benchmark's own process: OpenMP used there before a fork hangs the forked peers' first torch op.
        from photon_p2p.peer import make_compression

        make_compression("blockwise8bit")
        from photon_p2p.swarm.averager import averager_settings

        common = dict(
            start=True,
            part_size_bytes=spec.part_size_bytes,
            allow_state_sharing=False,
            **averager_settings(
                matchmaking_time=5.0,
                allreduce_timeout=spec.allreduce_timeout,
                target_group_size=spec.n,
                min_group_size=spec.n,
                chunk_timeout=spec.chunk_timeout,
            ),
        )
        self.averager = bench_cls(
            [torch.zeros(s) for s in spec.shapes],
            [],
            self.dht,
            prefix="bench",
            compression=compression_by_name("none"),
            get_state_meta=dict,
            **common,
        )
        self.stock = (
            stock_cls([torch.zeros(s) for s in spec.shapes], self.dht, prefix="benchstock", **common)
            if spec.stock
            else None
        )
        total = sum(int(np.prod(s)) for s in spec.shapes)
        self.source = torch.randn(total, generator=torch.Generator().manual_seed(1000 + rank))
        self.offsets = np.cumsum([0] + [int(np.prod(s)) for s in spec.shapes])
        self.sample_idx = torch.from_numpy(
            np.random.default_rng(0).choice(total, size=min(SAMPLES, total), replace=False)
        )
        self.buffer = None
        self.gloo_port = gloo_port
        self.step_id = 0

    def start_gloo(self) -> None:
        import datetime

        import torch.distributed as dist

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{self.spec.address(0)}:{self.gloo_port}",
            rank=self.rank,
            world_size=self.spec.n,
            timeout=datetime.timedelta(seconds=self.spec.allreduce_timeout),
        )
        self.buffer = self.source.clone()

    def info(self) -> dict[str, Any]:
        pids = {
            "averager": [self.averager.pid] + ([self.stock.pid] if self.stock else []),
            "dht": [self.dht.pid],
            "p2pd": [c.pid for c in psutil.Process(self.dht.pid).children(recursive=True)],
        }
        return dict(
            maddrs=[str(m) for m in self.dht.get_visible_maddrs()],
            pids=pids,
            source_sample=self.source[self.sample_idx].numpy(),
        )

    def _load_inputs(self, tensors: Sequence[Any]) -> None:
        for t, a, b in zip(tensors, self.offsets[:-1], self.offsets[1:], strict=True):
            t.copy_(self.source[a:b].view(t.shape))

    def _sample(self, tensors: Sequence[Any]) -> np.ndarray:
        idx = self.sample_idx.numpy()
        which = np.searchsorted(self.offsets, idx, side="right") - 1
        return np.array(
            [float(tensors[w].view(-1)[i - self.offsets[w]]) for w, i in zip(which, idx, strict=True)], dtype=np.float32
        )

    def hivemind(self, gate: Any, unmatched: Any, method: str, settings: dict[str, Any]) -> dict[str, Any]:
        from hivemind.averaging.control import AveragingStage

        from photon_p2p.swarm.records import RoundGather

        stock = method == "stock"
        averager = self.stock if stock else self.averager
        averager.configure(compression="none" if stock else method, **settings)
        self.step_id += 1
        if not stock:
            averager.set_round(self.step_id, self.spec.n)
        with averager.get_tensors() as tensors:
            self._load_inputs(tensors[: len(self.spec.shapes)])
        gather = RoundGather(round=self.step_id, theta_hash="bench", tokens=1, steps=1).model_dump()
        _gate(gate)  # parent: snapshot before matchmaking
        control = averager.step(
            gather=gather, weight=1.0, wait=False, require_trigger=True, timeout=self.spec.match_timeout
        )
        try:
            while control.stage != AveragingStage.AWAITING_TRIGGER and not control.done():
                time.sleep(0.001)
            if control.done():
                with unmatched.get_lock():
                    unmatched.value += 1
            _gate(gate)  # parent: snapshot after matchmaking; then everybody goes at once
            if unmatched.value:  # somebody found no group: nobody starts (the others would wait for it)
                if control.done():
                    control.result()  # raises what matchmaking raised
                raise RuntimeError("a groupmate failed to match")
        except BaseException:
            control.cancel()
            raise
        t0 = time.perf_counter()
        control.allow_allreduce()
        result = control.result()
        seconds = time.perf_counter() - t0
        with averager.get_tensors() as tensors:
            sample = self._sample(tensors[: len(self.spec.shapes)])
        if stock:
            return dict(seconds=seconds, sample=sample)
        return dict(
            seconds=seconds,
            sample=sample,
            bytes_sent=result["bytes_sent"],
            bytes_received=result["bytes_received"],
            lost_fraction=result["lost_fraction"],
        )

    def gloo(self, gate: Any) -> dict[str, Any]:
        import torch.distributed as dist

        self.buffer.copy_(self.source)
        _gate(gate)
        _gate(gate)
        t0 = time.perf_counter()
        dist.all_reduce(self.buffer)  # SUM: gloo has no AVG; the division below is not timed
        seconds = time.perf_counter() - t0
        self.buffer.div_(self.spec.n)
        return dict(seconds=seconds, sample=self.buffer[self.sample_idx].numpy())

    def close(self) -> None:
        if self.buffer is not None:
            import torch.distributed as dist

            dist.destroy_process_group()
        for averager in (self.stock, self.averager):
            if averager is not None and averager.is_alive():
                averager.shutdown()
        self.dht.shutdown()


def _gate(gate: Any) -> None:
    """Two barrier waits: "I am ready" and "go"; the parent takes its snapshots between the two."""
    gate.wait(GATE_TIMEOUT)
    gate.wait(GATE_TIMEOUT)


def _peer_main(
    rank: int, spec: SwarmSpec, conn: Any, gate: Any, unmatched: Any, initial_peers: list[str], gloo_port: int | None
) -> None:
    if spec.hosts:  # first thing: everything this peer starts (DHT, p2pd, averager, gloo) lives on its host
        spec.hosts[rank].enter()
        os.environ["GLOO_SOCKET_IFNAME"] = spec.hosts[rank].ifname
    os.setpgrp()  # the parent kills the whole group (DHT, averager, p2pd) if anything goes wrong
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    signal.signal(signal.SIGTERM, lambda *_: os.killpg(0, signal.SIGKILL))
    try:  # Linux: SIGTERM when the benchmark dies, however it dies (so no orphan p2pd)
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os.killpg(0, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    peer = None
    try:
        peer = _Peer(rank, spec, initial_peers, gloo_port)
        conn.send(("up", peer.info()))
        if spec.gloo:
            peer.start_gloo()
        conn.send(("ready", None))
        while True:
            command, kwargs = conn.recv()
            if command == "stop":
                break
            try:
                out = peer.gloo(gate) if command == "gloo" else peer.hivemind(gate, unmatched, **kwargs)
                conn.send(("ok", out))
            except Exception as e:
                gate.abort()  # release everybody waiting at a gate
                conn.send(("failed", f"{type(e).__name__}: {e}"))
    except BaseException:
        conn.send(("crashed", traceback.format_exc()))
    finally:
        if peer is not None:
            peer.close()
        conn.close()
        os._exit(0)


# ---------------------------------------------------------------------------------------------------------------
# the parent


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tcp_received_by_socket(ports: set[int], netns: Sequence[str] = ()) -> dict[tuple[str, str], int]:
    """bytes_received of every established TCP socket with one end on one of ``ports`` (both ends are ours), in
    this network namespace or in each of ``netns``."""
    ss = ["ss", "-tinH", "state", "established"]
    out = "".join(
        subprocess.run(
            ["ip", "netns", "exec", ns, *ss] if ns else ss, capture_output=True, text=True, check=True
        ).stdout
        for ns in (netns or [""])
    )
    counts, key = {}, None
    for line in out.splitlines():
        if not line.startswith(("\t", " ")):
            fields = line.split()
            local, peer = fields[-2], fields[-1]
            ends = {int(local.rsplit(":", 1)[1]), int(peer.rsplit(":", 1)[1])}
            key = (local, peer) if ends & ports else None
        elif key is not None:
            for field in line.split():
                if field.startswith("bytes_received:"):
                    counts[key] = int(field.split(":")[1])
            key = None
    return counts


def _wire_delta(before: dict, after: dict) -> int:
    return sum(v - before.get(k, 0) for k, v in after.items())


class Swarm:
    """N peer processes; ``run(method)`` performs one operation on all of them and returns an OpResult."""

    def __init__(self, spec: SwarmSpec):
        self.spec = spec
        ctx = mp.get_context("fork")
        self.gate = ctx.Barrier(spec.n + 1)
        self.unmatched = ctx.Value("i", 0)  # peers whose step finished (failed) before the trigger
        self.procs, self.conns, self.infos = [], [], []
        self.ports: set[int] = set()
        self.netns = [h.netns for h in spec.hosts] if spec.hosts else []
        self.cpu_procs: dict[str, list[psutil.Process]] = {}
        gloo_port = _free_port() if spec.gloo else None
        try:
            initial: list[str] = []
            for rank in range(spec.n):
                parent_conn, child_conn = ctx.Pipe()
                proc = ctx.Process(
                    target=_peer_main,
                    name=f"bench-peer-{rank}",
                    daemon=False,
                    args=(rank, spec, child_conn, self.gate, self.unmatched, initial, gloo_port),
                )
                proc.start()
                child_conn.close()
                self.procs.append(proc)
                self.conns.append(parent_conn)
                info = self._expect(rank, "up", timeout=180)
                self.infos.append(info)
                initial = initial or info["maddrs"]
            for rank in range(spec.n):
                self._expect(rank, "ready", timeout=180)
        except BaseException:
            self.close()
            raise
        for info, proc in zip(self.infos, self.procs, strict=True):
            self.ports.update(int(m.split("/tcp/")[1].split("/")[0]) for m in info["maddrs"])
            self.cpu_procs.setdefault("peer", []).append(psutil.Process(proc.pid))
            for kind, pids in info["pids"].items():
                self.cpu_procs.setdefault(kind, []).extend(psutil.Process(p) for p in pids)
        samples = np.stack([info["source_sample"] for info in self.infos]).astype(np.float64)
        self.expected = samples.mean(axis=0)

    def _expect(self, rank: int, what: str, timeout: float) -> Any:
        if not self.conns[rank].poll(timeout):
            raise RuntimeError(f"peer {rank}: no '{what}' within {timeout:.0f} s")
        kind, payload = self.conns[rank].recv()
        if kind != what:
            raise RuntimeError(f"peer {rank}: expected '{what}', got '{kind}': {payload}")
        return payload

    def _cpu(self) -> dict[str, float]:
        out = {}
        for kind, procs in self.cpu_procs.items():
            total = 0.0
            for p in procs:
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
            out[kind] = total
        return out

    def _parent_gate(self) -> None:
        self.gate.wait(GATE_TIMEOUT)

    def run(self, method: str, **settings: Any) -> OpResult:
        command = "gloo" if method == "gloo" else "hivemind"
        kwargs = {} if command == "gloo" else dict(method=method, settings=settings)
        self.unmatched.value = 0
        for conn in self.conns:
            conn.send((command, kwargs))
        available = [psutil.virtual_memory().available]
        try:
            self._parent_gate()  # all inputs loaded
            wire0 = _tcp_received_by_socket(self.ports, self.netns)
            self._parent_gate()
            self._parent_gate()  # all matched (gloo: nothing to match)
            wire1, cpu1 = _tcp_received_by_socket(self.ports, self.netns), self._cpu()
            available.append(psutil.virtual_memory().available)
            self._parent_gate()
        except threading.BrokenBarrierError:  # some peer failed before the all-reduce and aborted the gate
            replies = [
                self.conns[r].recv() if self.conns[r].poll(self.spec.allreduce_timeout) else ("failed", "?")
                for r in range(self.spec.n)
            ]
            self.gate.reset()
            return OpResult(method=method, ok=False, error="; ".join(str(p) for kind, p in replies if kind != "ok"))
        replies = []
        for rank, conn in enumerate(self.conns):
            while not conn.poll(1.0):
                available.append(psutil.virtual_memory().available)
                if not self.procs[rank].is_alive():
                    raise RuntimeError(f"peer {rank} died")
            replies.append(conn.recv())
        wire2, cpu2 = _tcp_received_by_socket(self.ports, self.netns), self._cpu()
        result = OpResult(
            method=method,
            ok=True,
            min_available_gib=min(available) / 2**30,
            cpu_s={k: round(cpu2[k] - cpu1[k], 3) for k in cpu2},
        )
        failures = [str(payload) for kind, payload in replies if kind != "ok"]
        if failures:
            self.gate.reset()  # a peer that failed after the gates aborted it
            result.ok, result.error = False, "; ".join(failures)
            return result
        outs = [payload for _, payload in replies]
        result.seconds = [o["seconds"] for o in outs]
        samples = np.stack([o["sample"] for o in outs])
        result.identical = bool((samples == samples[0]).all())
        result.max_error = float(np.abs(samples.astype(np.float64) - self.expected).max())
        if command == "hivemind":
            result.wire_bytes, result.wire_bytes_step = _wire_delta(wire1, wire2), _wire_delta(wire0, wire2)
            if method != "stock":
                result.bytes_sent = [o["bytes_sent"] for o in outs]
                result.bytes_received = [o["bytes_received"] for o in outs]
                result.lost_fraction = max(o["lost_fraction"] for o in outs)
        tolerance = TOLERANCE.get(method, TOLERANCE["none"])
        if (
            result.max_error > tolerance
            or (method not in ("stock",) and not result.identical)
            or result.lost_fraction > 0
        ):
            result.ok = False
            result.error = (
                f"wrong result: max error {result.max_error:.3g} (tolerance {tolerance}), identical "
                f"across peers: {result.identical}, lost fraction {result.lost_fraction}"
            )
        return result

    def close(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("stop", {}))
        deadline = time.time() + 30
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.time()))
        for proc in self.procs:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if not signal_group(proc.pid, sig):  # what the peer left behind (p2pd, torch_shm_manager)
                    break
                time.sleep(0.5)
            proc.join(1)

    def __enter__(self) -> Swarm:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def machine_info() -> dict[str, Any]:
    import platform

    import hivemind
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hivemind": hivemind.__version__,
        "cpu_count": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
    }


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def size_label(n: int) -> str:
    for unit, scale in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def parse_size(text: str) -> int:
    text = text.strip()
    scale = {"k": 10**3, "K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:], 1)
    return int(float(text[:-1] if scale != 1 else text) * scale)


def save_json(path: Any, data: dict[str, Any]) -> None:
    import json
    from pathlib import Path

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    print(f"saved {out}")
