"""Joining the DHT: validate addresses first, start a node, fail loudly (not in a buried log line) if nobody answers.

hivemind's ``DHT`` runs in a background process with its own p2pd daemon. Everything here makes sure that a
failed start leaves neither behind, and that errors say which addresses were tried and what to check.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import threading
from collections.abc import Sequence
from typing import Any

import psutil

from photon_p2p.errors import SwarmError
from photon_p2p.swarm.identity import Identity

logger = logging.getLogger(__name__)

EXAMPLE_MADDR = "/ip4/203.0.113.5/tcp/31337/p2p/QmXYZ..."


class _BlockingReads:
    """A background process's end of hivemind's control pipe, read in blocking mode.

    hivemind's DHT and averager processes watch that pipe with ``loop.add_reader``, which makes its descriptor
    non-blocking, and then read each message with ``Connection.recv()``. A message larger than the pipe's buffer
    (64 KiB on Linux) cannot be written in one go, so the read runs out of bytes mid-message: ``BlockingIOError``,
    which hivemind logs and skips, after which the next read starts inside the rest of that message and ``EOFError``
    ends the process's loop (hivemind PR #660, open). Measured: every DHT store of 100 KB or more failed, and a run
    whose manifest carried an 8k-token BPE tokenizer (89 KB compressed) left each peer with a dead DHT, training
    alone forever. The reader is only woken when the pipe is readable and the writer is mid-message, so a blocking
    read waits microseconds for the rest. Everything else passes through to the connection."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Any):
        self._conn = conn

    def recv(self) -> Any:
        os.set_blocking(self._conn.fileno(), True)  # add_reader may have made it non-blocking since the last read
        return self._conn.recv()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def read_control_pipe_blocking(process: Any) -> None:
    """Call first in the ``run()`` of a hivemind DHT or averager process (see _BlockingReads)."""
    if not isinstance(process._inner_pipe, _BlockingReads):
        process._inner_pipe = _BlockingReads(process._inner_pipe)


_DHT_CLASS: Any = None


def dht_class() -> Any:
    """hivemind's DHT with its control pipe read in blocking mode (imported lazily: hivemind is slow to import)."""
    global _DHT_CLASS
    if _DHT_CLASS is None:
        import hivemind

        class PhotonDHT(hivemind.DHT):
            def run(self) -> None:
                read_control_pipe_blocking(self)
                super().run()

        _DHT_CLASS = PhotonDHT
    return _DHT_CLASS


def validate_maddrs(addrs: Sequence[str], *, flag: str, need_peer_id: bool) -> list[str]:
    """Parse every multiaddr up front: one bad address is a one-line error naming it."""
    from hivemind.utils.multiaddr import Multiaddr

    out = []
    for addr in addrs:
        try:
            maddr = Multiaddr(addr)
        except Exception as e:  # the multiaddr package raises several parse error types
            raise SwarmError(f"{flag} {addr!r}: not a valid multiaddr ({e}); expected e.g. {EXAMPLE_MADDR}") from None
        if need_peer_id and "p2p" not in maddr:
            raise SwarmError(
                f"{flag} {addr!r}: missing the /p2p/<peer ID> part; copy the whole address printed by "
                f"photon-bootstrap or another peer, e.g. {EXAMPLE_MADDR}"
            )
        out.append(str(maddr))
    return out


def check_ports_free(host_maddrs: Sequence[str]) -> None:
    """libp2p listens with SO_REUSEPORT, so a second node on a taken port starts silently and splits the traffic.
    A plain bind (without SO_REUSEPORT) fails on a port that anyone holds: check that first."""
    import socket

    from hivemind.utils.multiaddr import Multiaddr

    for addr in host_maddrs:
        maddr = Multiaddr(addr)
        for proto, family, kind in (
            ("tcp", socket.AF_INET, socket.SOCK_STREAM),
            ("udp", socket.AF_INET, socket.SOCK_DGRAM),
        ):
            if proto not in maddr or "ip4" not in maddr:
                continue
            port = int(maddr.value_for_protocol(proto))
            if port == 0:
                continue
            with socket.socket(family, kind) as sock:
                try:
                    sock.bind((maddr.value_for_protocol("ip4"), port))
                except OSError as e:
                    hint = (
                        "is another node already running there? Choose another port"
                        if e.errno == errno.EADDRINUSE
                        else "is this an address of this machine? Use 0.0.0.0 for all interfaces"
                    )
                    raise SwarmError(
                        f"--host-maddrs {addr}: cannot listen on {proto} port {port} ({e.strerror}); {hint}"
                    ) from None


def _explain_start_failure(
    error: BaseException, initial_peers: Sequence[str], host_maddrs: Sequence[str], timeout: float
) -> str:
    text = str(error)
    if "address already in use" in text.lower():
        return f"--host-maddrs {' '.join(host_maddrs)}: the port is already in use; choose another port (or tcp/0)"
    if initial_peers:
        return (
            f"none of the initial peers answered within {timeout:.0f}s (tried: {', '.join(initial_peers)}). "
            f"Check that the node is running, that its port is reachable through firewalls/NAT, and that the "
            f"/p2p/ peer ID matches what it printed"
        )
    return f"could not start the DHT node: {text or type(error).__name__}"


def start_dht(
    *,
    initial_peers: Sequence[str],
    host_maddrs: Sequence[str],
    announce_maddrs: Sequence[str] = (),
    identity: Identity | None,
    client_mode: bool = False,
    use_relay: bool = True,
    use_auto_relay: bool = False,
    join_timeout: float = 30.0,
    authorizer: Any = None,
    **kwargs: Any,
):
    """Start a hivemind DHT node in a background process and wait until it has joined (or fail cleanly).

    ``authorizer``: a private run's ``PrivateRunAuthorizer`` (swarm/access.py): every request and response of this
    node then carries and checks run tokens.

    Every node refuses records that photon and hivemind's averager never write (validators.py), at store time."""

    from photon_p2p.swarm.validators import PhotonRecordValidator

    initial_peers = validate_maddrs(initial_peers, flag="--initial-peers", need_peer_id=True)
    host_maddrs = validate_maddrs(host_maddrs, flag="--host-maddrs", need_peer_id=False)
    announce_maddrs = validate_maddrs(announce_maddrs, flag="--announce-maddrs", need_peer_id=False)
    check_ports_free(host_maddrs)
    with signals_deferred():  # the constructor creates hivemind's first shared-memory future; it does not fork
        dht = dht_class()(
            initial_peers=initial_peers or None,
            start=False,
            await_ready=False,
            host_maddrs=host_maddrs,
            announce_maddrs=announce_maddrs or None,
            identity_path=str(identity.path) if identity is not None else None,
            client_mode=client_mode,
            use_relay=use_relay,
            use_auto_relay=use_auto_relay,
            startup_timeout=join_timeout,
            wait_timeout=min(5.0, join_timeout),
            bootstrap_timeout=min(5.0, join_timeout),
            # a peer that is already running keeps its identity check quick; the DHT only needs it for fresh joins
            check_if_identity_free=bool(initial_peers),
            authorizer=authorizer,
            record_validators=[PhotonRecordValidator(), *kwargs.pop("record_validators", ())],
            **kwargs,
        )
    try:
        dht.run_in_background(await_ready=False)  # forks: outside signals_deferred, so the child gets no mask
        dht.wait_until_ready(timeout=join_timeout)
    except BaseException as e:
        _stop_quietly(dht)
        if isinstance(e, KeyboardInterrupt):
            raise
        if "already taken" in str(e):
            raise SwarmError(
                f"--identity-path {identity.path if identity else ''}: this identity is already used by "
                f"a live peer in the swarm (is this peer already running?)"
            ) from None
        raise SwarmError(_explain_start_failure(e, initial_peers, host_maddrs, join_timeout)) from None
    return dht


def _p2pd_gone(dht: Any) -> bool:
    """Whether the DHT process's p2p daemon has already exited (Ctrl-C in a terminal reaches the whole process
    group, and p2pd exits on SIGINT even though hivemind starts it with SIGINT ignored)."""

    try:
        daemons = [c for c in psutil.Process(dht.pid).children() if c.name() == "p2pd"]
        return not any(d.status() != psutil.STATUS_ZOMBIE for d in daemons)
    except psutil.Error:
        return False  # cannot tell: take the normal path


def _stop_quietly(dht: Any) -> None:
    try:
        if dht.is_alive() and _p2pd_gone(dht):
            # hivemind's shutdown would hang for its whole grace period closing an event loop that still watches the
            # dead daemon, then warn; there is nothing left to close cleanly, so stop the process directly
            logger.debug("p2p daemon already stopped: terminating the DHT process")
            dht.terminate()
            dht.join(5)
        if dht.is_alive():
            dht.shutdown()
            dht.join(5)
        if dht.is_alive():
            dht.kill()
    except Exception as e:  # shutting down after a failure must not hide the real error
        logger.debug("DHT shutdown after a failed start: %r", e)


def stop_dht(dht: Any) -> None:
    """Shut a DHT down (and its p2pd) without raising; safe to call twice."""
    if dht is not None:
        _stop_quietly(dht)


async def _visible_maddrs(_dht: Any, node: Any) -> list[str]:
    return [str(a) for a in await node.get_visible_maddrs()]


def visible_maddrs(dht: Any, timeout: float = 30.0) -> list[str]:
    """Addresses others can paste into --initial-peers (loopback last: it only helps on this machine)."""
    with signals_deferred():
        future = dht.run_coroutine(_visible_maddrs, return_future=True)
    addrs = remote_result(future, timeout)
    return sorted(set(addrs), key=lambda a: ("/ip4/127." in a or "/ip6/::1/" in a, "/quic" in a, a))


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT/SIGTERM back while hivemind creates a future (they are delivered right after).

    hivemind's MPFutures live in shared memory (a new block every 16 futures), and allocating it starts torch's
    ``torch_shm_manager`` when none is running. If a signal interrupts the main thread while torch waits for that
    manager to start, torch retries the failed ``read()`` without calling it again and spins at 100% CPU forever
    (seen as photon-status --watch and photon-bootstrap hanging after Ctrl-C). Never wrap anything that forks:
    the child would inherit the blocked signals."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class RemoteCancelled(SwarmError):
    """A hivemind call whose future came back with ``asyncio.CancelledError`` although we never cancelled it."""


def remote_result(future: Any, timeout: float | None = None) -> Any:
    """``future.result(timeout)`` for an MPFuture answered by hivemind's DHT or averager process.

    Those processes pickle whatever their coroutine raised into the future, including ``asyncio.CancelledError``:
    a matchmaking coroutine of ours that hivemind cancels internally (its group future is cancelled while a new step
    starts right after a cancelled one) reaches this thread as a CancelledError. That is a BaseException, which
    every ``except Exception`` of ours lets through, and it killed a peer mid-run (fresh-clone CI, test_chaos and
    test_dashboard). It is a failed call like any other, so it becomes one here."""
    try:
        return future.result(timeout=timeout)
    except asyncio.CancelledError as e:
        raise RemoteCancelled("hivemind cancelled the call internally") from e


def check_processes(dht: Any, averager: Any) -> None:
    """Stop the peer with one clear line when its DHT or averager process has died: without them it can neither
    see the swarm nor average, and it would otherwise train alone (or wait for a quorum) as if nobody were there."""
    for name, process in (("DHT", dht), ("averager", averager)):
        if process is not None and not process.is_alive():
            raise SwarmError(
                f"this peer's {name} process has stopped (exit code {process.exitcode}; its error is in the log "
                "above): stopping, since it can no longer take part in the swarm"
            )


class DHTCalls:
    """Serialises calls into the DHT process from several threads of ours (its control pipe is not thread-safe)."""

    def __init__(self, dht: Any):
        self.dht = dht
        self._lock = threading.Lock()

    def _check_alive(self) -> None:
        # a DHT process that died (SIGTERM to the whole process group, OOM) never answers: fail now, not after timeout
        if not self.dht.is_alive():
            raise SwarmError("the DHT process has stopped")

    def get(self, key: str, *, latest: bool = True, timeout: float = 10.0) -> Any:
        self._check_alive()
        with self._lock, signals_deferred():
            future = self.dht.get(key, latest=latest, return_future=True)
        return remote_result(future, timeout)

    def run_coroutine(self, coro: Any, *, timeout: float = 20.0) -> Any:
        """``dht.run_coroutine`` under the same lock (the bootstrap's status line, polled beside the dashboard)."""
        self._check_alive()
        with self._lock, signals_deferred():
            future = self.dht.run_coroutine(coro, return_future=True)
        return remote_result(future, timeout)

    def store(self, key: str, value: Any, expiration_time: float, *, subkey: Any = None, timeout: float = 10.0) -> bool:
        self._check_alive()
        with self._lock, signals_deferred():
            future = self.dht.store(key, value, expiration_time, subkey=subkey, return_future=True)
        return bool(remote_result(future, timeout))
