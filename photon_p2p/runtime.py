"""How a photon-p2p process behaves at run time, below any CLI: the layer train/, swarm/ and the entry points share.

It owns four things, each in one place:

- **signals and clean stops**: SIGTERM unwinds the main thread like Ctrl-C but exits 0 (``GracefulExit``, installed
  by ``handle_sigterm``), and ``DeferredStop`` turns both into a request a training loop honours between steps;
- **hivemind log filtering**: ``quiet_hivemind`` drops the messages hivemind logs as errors for outcomes we expect;
- **progress-bar policy**: ``progress_enabled`` (bars only on a terminal);
- **process-group teardown**: ``signal_group`` and ``stop_group(s)``. A hivemind process leaves its DHT child, p2pd
  and torch_shm_manager behind when it is killed, so whoever starts one starts it in its own process group and
  stops the whole group (docs/design.md, "Traps we design around").

Nothing here runs at import: handlers and filters are installed by the functions, called from ``main()``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import typing
from collections.abc import Sequence

# --------------------------------------------------------------------------------------------------------------
# signals and clean stops


class GracefulExit(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM: unwinds through every ``finally`` like Ctrl-C, but exits 0."""


_MAIN_PID: int | None = None  # the process that called handle_sigterm (its forked children inherit the handler)


def _on_sigterm(signum: int, frame: object) -> None:
    if os.getpid() != _MAIN_PID:
        # a forked helper (hivemind's DHT or averager process) inherited this handler: die as if it had none. Its
        # parent cleans up; raising here would print a GracefulExit traceback from inside hivemind's event loop
        # (e.g. when the whole process group gets SIGTERM, or when hivemind terminate()s a slow child).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one clean shutdown; a second TERM must not interrupt it
    raise GracefulExit()


def handle_sigterm() -> None:
    """From now on SIGTERM raises ``GracefulExit`` in this process's main thread (call it from the main thread)."""
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _on_sigterm)


class DeferredStop:
    """Turn Ctrl-C and SIGTERM into a request that a training loop honours *between* steps.

    An interrupt raised in the middle of a step would leave the model half-updated, or the sampler a micro-batch
    ahead of the step counter, so the checkpoint saved on the way out would not resume exactly. Inside this context
    the signals only set ``requested``; the loop checks it after each step, saves, and calls ``raise_()``. A second
    Ctrl-C interrupts at once (an escape hatch if a step hangs); the state is then not saved. Outside the main
    thread signals cannot be caught, and the context does nothing.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, typing.Any] = {}
        self._pid = os.getpid()

    def __enter__(self) -> DeferredStop:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum: int, frame: object) -> None:
        if os.getpid() != self._pid:  # a forked child inherited the handler: behave as if it had none
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt()
            return  # a repeated SIGTERM must not interrupt the shutdown already under way
        self.signum = signum  # no printing here: a handler that writes to stderr can hit a reentrant write

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return "SIGTERM" if self.signum == signal.SIGTERM else "Ctrl-C"

    def raise_(self) -> typing.NoReturn:
        """Leave like the signal would have: SIGTERM exits 0 (GracefulExit), Ctrl-C exits 130."""
        if self.signum == signal.SIGTERM:
            raise GracefulExit()
        raise KeyboardInterrupt()


# --------------------------------------------------------------------------------------------------------------
# hivemind log filtering

# hivemind logs an ERROR with a traceback whenever a step finds no group; for us that is an expected outcome
# (the peer goes on alone or re-syncs) that we report in our own words.
_EXPECTED_HIVEMIND_NOISE = (
    "could not find a group",
    # our averager's refusal of a group that straddles a round boundary (swarm/averager.py); under churn a
    # newcomer's first group often does, and swarm/rounds.py retries and logs it as one warning line
    "group members are at different rounds",
    "recommended to set target_group_size",
    # hivemind's prefetching iterator, when a groupmate dies mid-all-reduce
    "Task was destroyed but it is pending",
    # p2pd's own log when Ctrl-C stops it together with us (its listener closes under it)
    "use of closed network connection",
)


class _DropExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in _EXPECTED_HIVEMIND_NOISE)


def quiet_hivemind(level: str = "info") -> None:
    """Call after importing hivemind (its handler exists only then): drop expected noise, keep real warnings."""
    from hivemind.utils import logging as hv_logging  # noqa: F401 - installs hivemind's handler

    hv = logging.getLogger("hivemind")
    hv.setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    for handler in hv.handlers + logging.getLogger().handlers:
        handler.addFilter(_DropExpected())


# --------------------------------------------------------------------------------------------------------------
# progress bars


def progress_enabled(requested: bool) -> bool:
    """Progress bars only on a terminal: logs and CI output stay readable."""
    return requested and sys.stderr.isatty()


# --------------------------------------------------------------------------------------------------------------
# process-group teardown


def signal_group(pid: int, sig: int) -> bool:
    """Send ``sig`` to process group ``pid`` (0: our own). False if the group is gone (or not ours): by the time
    we stop something it may well have exited, which is not an error."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def stop_groups(
    popens: Sequence[subprocess.Popen], *, grace: float, sig: int = signal.SIGTERM, reap: float = 5.0
) -> list[int | None]:
    """Stop processes started with ``start_new_session=True``, each with whatever it started.

    ``sig`` goes to the groups whose leader still runs; they get ``grace`` seconds (together, not each) to exit,
    then every group gets SIGKILL: stragglers, and what an exited leader left behind (p2pd, a DHT child,
    torch_shm_manager). Returns the exit codes, None for a leader still not gone ``reap`` seconds later.
    """
    if sig != signal.SIGKILL:
        running = [p for p in popens if p.poll() is None]
        for p in running:
            signal_group(p.pid, sig)
        deadline = time.monotonic() + grace
        for p in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
    for p in popens:
        signal_group(p.pid, signal.SIGKILL)
    deadline = time.monotonic() + reap
    for p in popens:
        with contextlib.suppress(subprocess.TimeoutExpired):
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
    return [p.returncode for p in popens]


def stop_group(popen: subprocess.Popen, *, grace: float, sig: int = signal.SIGTERM, reap: float = 5.0) -> int | None:
    """``stop_groups`` for one process: ``sig`` to its group, up to ``grace`` seconds, then SIGKILL the group."""
    return stop_groups([popen], grace=grace, sig=sig, reap=reap)[0]
