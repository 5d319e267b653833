"""What every console entry point shares: logging set-up, one-line errors, exit codes, clean Ctrl-C.

Run-time behaviour below the CLI (signals, hivemind log filtering, progress bars, stopping process groups) lives
in photon_p2p.runtime, which train/, swarm/ and the entry points all import.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from collections.abc import Callable

from photon_p2p import runtime
from photon_p2p.errors import PhotonError

# re-exported until peer.py, swarm/rounds.py and bench/_swarm.py import them from photon_p2p.runtime
from photon_p2p.runtime import DeferredStop, progress_enabled, quiet_hivemind  # noqa: F401

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


def one_line(message: str) -> str:
    """An error message as one printable line: a user's value may hold newlines, carriage returns, Unicode line
    separators or terminal escapes (a key in a TOML file, a flag); those are shown escaped, as Python writes them."""
    return "".join(ch if ch.isprintable() or ch == " " else ascii(ch)[1:-1] for ch in message)


def run_main(fn: Callable[[], int | None]) -> int:
    """Run a CLI body: PhotonError -> ``error: ...`` on one line, exit 2; Ctrl-C -> exit 130; SIGTERM -> clean
    shutdown and exit 0; never a traceback for the user's mistakes."""
    runtime.handle_sigterm()
    try:
        return int(fn() or 0)
    except PhotonError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except runtime.GracefulExit:
        print("stopped", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one ``error: ...`` line (exit 2) like every other user error, not a usage dump."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USER_ERROR, f"error: {one_line(message)} (see {self.prog} --help)\n")
