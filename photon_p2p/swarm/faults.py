"""Deliberate faults for tests and chaos drills (torchft's ``fail_at(peer, step)`` habit).

Set ``PHOTON_FAULTS`` in a peer's environment, comma-separated::

    kill_in_allreduce@3        SIGKILL this peer's whole process group while it sends round 3's update
    stall_before_average@2:15  sleep 15 s between training and averaging in round 2 (a straggler)
    nan_update@1               poison round 1's local model with NaN (a diverged peer)

Unset (the default) means no fault. Tests assert both that the fault happened and that training survived.
"""

from __future__ import annotations

import logging
import os
import re
import signal

logger = logging.getLogger(__name__)

_SPEC = re.compile(r"^(kill_in_allreduce|stall_before_average|nan_update)@(\d+)(?::([0-9.]+))?$")


def _parse(text: str) -> dict[str, tuple[int, float]]:
    faults = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        m = _SPEC.match(item)
        if not m:
            raise ValueError(f"PHOTON_FAULTS: cannot parse {item!r}")
        faults[m.group(1)] = (int(m.group(2)), float(m.group(3) or 0))
    return faults


FAULTS = _parse(os.environ.get("PHOTON_FAULTS", ""))


def at(name: str, round_: int) -> float | None:
    """The fault's argument if fault ``name`` is armed for ``round_``, else None."""
    spec = FAULTS.get(name)
    if spec is None or spec[0] != round_:
        return None
    logger.warning("PHOTON_FAULTS: injecting %s in round %d", name, round_)
    return spec[1]


def kill_whole_peer() -> None:
    """What a machine failure looks like to the others: every process of this peer dies at once."""
    os.killpg(os.getpgid(0), signal.SIGKILL)
