"""Catching up: download theta, the outer optimizer state and the round from a live peer, and check them.

Used by a joining or restarting peer whose swarm is ahead, and by a late peer whose round closed without it. The
download is untrusted (schema, run, shapes, finiteness, theta hash: swarm/state.py) and applied all at once under
the averager's lock, so a failed or rejected download leaves this peer's state exactly as it was.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from photon_p2p.swarm.records import RecordRejected, RejectCounter, StateMeta
from photon_p2p.swarm.state import validate_downloaded_state

logger = logging.getLogger(__name__)

DOWNLOAD_ATTEMPTS = 2  # downloads whose result failed validation before giving up (the transfer retries itself)
STALL_TIMEOUT_S = 60.0  # a donor that sends nothing for this long is given up on (no limit while bytes flow)
TRANSFER_ATTEMPTS = 4  # attempts in a row without new bytes before the transfer gives up (swarm/transfer.py)


@dataclass
class Downloaded:
    meta: StateMeta
    seconds: float
    nbytes: int


def state_nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def download_state(
    averager,
    expected: list[torch.Tensor],
    *,
    num_theta: int,
    run_id: str,
    manifest_hash: str,
    min_round: int,
    rejects: RejectCounter,
    show_progress: bool,
    attempts: int = DOWNLOAD_ATTEMPTS,
) -> Downloaded | None:
    """Download the newest state at ``min_round`` or later into ``expected`` (in place, all or nothing).

    The transfer (swarm/transfer.py) resumes where a donor stopped and has no overall deadline while bytes flow.
    Returns None, after one log line saying why, when no donor could send a valid state."""
    nbytes = state_nbytes(expected)
    why = "no donor answered"
    t0 = time.perf_counter()
    for attempt in range(1, attempts + 1):
        try:
            result = averager.download_state(
                expected_bytes=nbytes,
                min_priority=float(min_round),
                stall_timeout=STALL_TIMEOUT_S,
                max_attempts=TRANSFER_ATTEMPTS,
                show_progress=show_progress,
            )
        except Exception as e:  # the averager process gone, a pipe error: this peer cannot download now
            logger.debug("state download failed: %r", e)
            result, why = None, f"the download failed ({type(e).__name__})"
        if result is None:
            why = averager.last_download_error or why
            break  # the transfer already retried every donor it could find
        else:
            metadata, tensors = result
            try:
                meta = validate_downloaded_state(
                    metadata, tensors, expected, num_theta=num_theta, run_id=run_id, manifest_hash=manifest_hash
                )
                if meta.round < min_round:
                    raise RecordRejected(f"donor is at round {meta.round}, older than {min_round}")
            except RecordRejected as e:
                rejects.add("state download", e.reason)
                why = f"a donor sent an invalid state ({e.reason})"
            else:
                with averager.get_tensors():
                    for dst, src in zip(expected, tensors, strict=True):
                        dst.copy_(src)
                return Downloaded(meta=meta, seconds=time.perf_counter() - t0, nbytes=nbytes)
        if attempt < attempts:
            time.sleep(min(2.0 * attempt, 5.0))
    logger.warning("state download gave up after %.0fs: %s", time.perf_counter() - t0, why)
    return None
