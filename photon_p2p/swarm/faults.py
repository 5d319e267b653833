"""Deliberate faults for tests and chaos drills (torchft's ``fail_at(peer, step)`` habit).

Set ``PHOTON_FAULTS`` in a peer's environment, comma-separated::

    kill_in_allreduce@3        SIGKILL this peer's whole process group while it sends round 3's update
    freeze_in_allreduce@3      SIGSTOP this peer's whole process group there instead (the test sends SIGCONT)
    stall_before_average@2:15  sleep 15 s between training and averaging in round 2 (a straggler)
    nan_update@1               poison round 1's local model with NaN (a diverged peer)

Hostile updates (robust aggregation, bounded influence): the peer trains honestly, then *sends* something else in
the all-reduce (its own checks are bypassed; it applies the group's average like everyone). ``@N+`` arms a fault
from round N on::

    scale_update@1+:1e6        send 1e6 x the honest update
    flip_update@1+             send minus the honest update
    random_update@1+:1         send Gaussian noise with the honest update's norm x 1
    nan_send@1+                send NaN

Unset (the default) means no fault. Tests assert both that the fault happened and that training survived.
"""

from __future__ import annotations

import logging
import os
import re
import signal

logger = logging.getLogger(__name__)

_NAMES = "|".join(
    ("kill_in_allreduce", "freeze_in_allreduce", "stall_before_average", "nan_update")
    + ("scale_update", "flip_update", "random_update", "nan_send")
)
_SPEC = re.compile(rf"^({_NAMES})@(\d+)(\+?)(?::([0-9.eE+-]+))?$")


def _parse(text: str) -> dict[str, tuple[int, bool, float]]:
    faults = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        m = _SPEC.match(item)
        if not m:
            raise ValueError(f"PHOTON_FAULTS: cannot parse {item!r}")
        faults[m.group(1)] = (int(m.group(2)), bool(m.group(3)), float(m.group(4) or 0))
    return faults


FAULTS = _parse(os.environ.get("PHOTON_FAULTS", ""))


def at(name: str, round_: int) -> float | None:
    """The fault's argument if fault ``name`` is armed for ``round_``, else None."""
    spec = FAULTS.get(name)
    if spec is None or not (spec[0] == round_ or (spec[1] and round_ >= spec[0])):
        return None
    logger.warning("PHOTON_FAULTS: injecting %s in round %d", name, round_)
    return spec[2]


def poison_update(delta: list, round_: int) -> None:
    """Replace the update about to be sent (in place) by the armed hostile one, if any."""
    import torch

    if not any(name in FAULTS for name in ("scale_update", "flip_update", "random_update", "nan_send")):
        return
    with torch.no_grad():
        if (factor := at("scale_update", round_)) is not None:
            for d in delta:
                d.mul_(factor)
        if at("flip_update", round_) is not None:
            for d in delta:
                d.neg_()
        if (factor := at("random_update", round_)) is not None:
            norm = torch.sqrt(sum((d.double() ** 2).sum() for d in delta))
            noise = [torch.randn_like(d) for d in delta]
            scale = factor * norm / torch.sqrt(sum((n.double() ** 2).sum() for n in noise)).clamp_min(1e-30)
            for d, n in zip(delta, noise, strict=True):
                d.copy_(n * scale.float())
        if at("nan_send", round_) is not None:
            for d in delta:
                d.fill_(float("nan"))


def kill_whole_peer() -> None:
    """What a machine failure looks like to the others: every process of this peer dies at once."""
    os.killpg(os.getpgid(0), signal.SIGKILL)


def in_allreduce(round_: int) -> None:
    """Called while this peer sends a part of round ``round_``'s update: the faults armed for that moment."""
    if at("kill_in_allreduce", round_) is not None:
        kill_whole_peer()
    if FAULTS.get("freeze_in_allreduce", (None,))[0] == round_:
        FAULTS.pop("freeze_in_allreduce")  # once: after SIGCONT the peer must go on, not freeze at its next part
        logger.warning("PHOTON_FAULTS: injecting freeze_in_allreduce in round %d", round_)
        # a laptop lid closed mid-round: every process of the peer (DHT, averager, p2pd) stops at once, sockets open
        os.killpg(os.getpgid(0), signal.SIGSTOP)
