"""What every console entry point shares: logging set-up, one-line errors, clean Ctrl-C."""

from __future__ import annotations

import logging
import os
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


def run_main(fn: Callable[[], int | None]) -> int:
    """Run a CLI body: PhotonError -> ``error: ...`` on one line, exit 2; Ctrl-C -> exit 130, no traceback."""
    try:
        return int(fn() or 0)
    except PhotonError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def progress_enabled(requested: bool) -> bool:
    """Progress bars only on a terminal: logs and CI output stay readable."""
    return requested and sys.stderr.isatty()
