"""Catching up: download theta, the outer optimizer state and the round from a live peer, and check them.

Used by a joining or restarting peer whose swarm is ahead, and by a late peer whose round closed without it. The
download is untrusted (schema, run, shapes, finiteness, theta hash: swarm/state.py) and applied all at once under
the averager's lock, so a failed or rejected download leaves this peer's state exactly as it was.

Three more checks keep one hostile donor from planting its theta:

- **size**: ``expected`` is built from the manifest (the model's parameter count and the outer optimizer), and the
  transfer refuses a donor whose description announces more bytes before it reads a single data byte
  (swarm/transfer.py);
- **vouched theta**: the donor's own claim is not enough: its (round, theta hash) must also have shown in the signed
  heartbeats of ``min(VOUCHERS, other live peers)`` peers besides the donor (``vouchers``). With only the donor
  live, nobody can vouch and the donor is trusted (a lone peer is the swarm). Peers catching up themselves
  ("syncing") or still starting are not counted: they hold no state to vouch with, and two stuck peers that each
  waited for the other's vouch never caught up. The cost: while other honest peers are syncing, a lying donor
  needs fewer accomplices;
- **rate**: donors serve each requester a bounded number of snapshots per minute (swarm/transfer.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from photon_p2p.swarm.records import RecordRejected, RejectCounter, StateMeta
from photon_p2p.swarm.state import validate_downloaded_state

logger = logging.getLogger(__name__)

VOUCHERS = 2  # peers besides the donor that must have shown the downloaded theta hash in their heartbeats
VOUCH_WAIT_S = 5.0  # a state one round fresh may not have reached the others' heartbeats yet: wait this long for it
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


class Unvouched(RecordRejected):
    """A valid state that too few peers besides its donor vouch for (yet): not evidence that its donor lies."""


def check_vouched(vouchers: Callable[[int, str], tuple[set[str], int]], meta: StateMeta, donor: str | None) -> None:
    """Refuse a downloaded state that too few peers besides its donor vouch for (waits a little for heartbeats)."""
    deadline = time.monotonic() + VOUCH_WAIT_S
    while True:
        vouched, live = vouchers(meta.round, meta.theta_hash)
        vouched.discard(donor or "")
        need = min(VOUCHERS, max(0, live - (donor is not None)))
        if len(vouched) >= need:
            return
        if time.monotonic() >= deadline:
            raise Unvouched(
                f"theta {meta.theta_hash[:12]} of round {meta.round} is vouched for by {len(vouched)} peer(s) besides "
                f"its donor, {need} needed"
            )
        time.sleep(0.5)


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
    vouchers: Callable[[int, str], tuple[set[str], int]] | None = None,
    failure: list[BaseException] | None = None,
) -> Downloaded | None:
    """Download the newest state at ``min_round`` or later into ``expected`` (in place, all or nothing).

    The transfer (swarm/transfer.py) resumes where a donor stopped and has no overall deadline while bytes flow.
    ``vouchers(round, theta_hash)`` -> (peer IDs that vouch for it, how many others are live); None skips the
    check (tests of the transfer itself). Returns None, after one log line saying why, when no donor could send a
    valid state."""
    nbytes = state_nbytes(expected)
    why = "no donor answered"
    if failure is not None:
        failure.clear()
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
            if failure is not None:
                failure.clear()  # the last try found no donor: that is not an unvouched state
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
                if vouchers is not None:
                    check_vouched(vouchers, meta, averager.last_download_donor)
            except RecordRejected as e:
                if failure is not None:
                    failure[:] = [e]  # the caller tells an unvouched state from a lie (rounds.py catch_up)
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
