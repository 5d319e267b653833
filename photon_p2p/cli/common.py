"""What every console entry point shares: logging set-up, one-line errors, clean Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import sys
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


def _on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one clean shutdown; a second TERM must not interrupt it
    raise GracefulExit()


# hivemind logs an ERROR with a traceback whenever a step finds no group; for us that is an expected outcome
# (the peer goes on alone or re-syncs) that we report in our own words.
_EXPECTED_HIVEMIND_NOISE = ("could not find a group", "recommended to set target_group_size")


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


def progress_enabled(requested: bool) -> bool:
    """Progress bars only on a terminal: logs and CI output stay readable."""
    return requested and sys.stderr.isatty()
