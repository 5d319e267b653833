"""What every console entry point shares: logging set-up, one-line errors, clean Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import typing
from collections.abc import Callable

from photon_p2p.errors import PhotonError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def setup_logging(level: str = "info") -> None:
    """Configure our loggers (called from main(), never at import). hivemind's own chatter goes one level up."""
    fmt = "%(asctime)s %(levelname).1s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper()), format=fmt, datefmt="%H:%M:%S", stream=sys.stderr)
    logging.getLogger("photon_p2p").setLevel(getattr(logging, level.upper()))
    # hivemind installs its own handler on import; keep it quieter than ours unless debugging
    hv_level = logging.DEBUG if level == "debug" else logging.WARNING
    os.environ.setdefault("HIVEMIND_LOGLEVEL", logging.getLevelName(hv_level))
    logging.getLogger("hivemind").setLevel(hv_level)


class GracefulExit(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM: unwinds through every ``finally`` like Ctrl-C, but exits 0."""


_MAIN_PID: int | None = None  # the process whose run_main installed _on_sigterm


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


# hivemind logs an ERROR with a traceback whenever a step finds no group; for us that is an expected outcome
# (the peer goes on alone or re-syncs) that we report in our own words.
_EXPECTED_HIVEMIND_NOISE = ("could not find a group", "recommended to set target_group_size",
                            # hivemind's prefetching iterator, when a groupmate dies mid-all-reduce
                            "Task was destroyed but it is pending",
                            # p2pd's own log when Ctrl-C stops it together with us (its listener closes under it)
                            "use of closed network connection")


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


def run_main(fn: Callable[[], int | None]) -> int:
    """Run a CLI body: PhotonError -> ``error: ...`` on one line, exit 2; Ctrl-C -> exit 130; SIGTERM -> clean
    shutdown and exit 0; never a traceback for the user's mistakes."""
    global _MAIN_PID
    _MAIN_PID = os.getpid()
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return int(fn() or 0)
    except PhotonError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except GracefulExit:
        print("stopped", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one ``error: ...`` line (exit 2) like every other user error, not a usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USER_ERROR, f"error: {message} (see {self.prog} --help)\n")


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


def progress_enabled(requested: bool) -> bool:
    """Progress bars only on a terminal: logs and CI output stay readable."""
    return requested and sys.stderr.isatty()
