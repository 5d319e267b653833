"""The round engine: Photon's federated rounds, peer to peer.

Round r, on every peer::

    local model <- theta                     (theta: fp32 CPU, identical across the group that produced it)
    train --local-steps inner steps          (or as many as fit in --round-seconds)
    delta = theta - local                    (checked: finite, norm not absurd)
    matchmaking keyed by (run, manifest, r)  -> Butterfly All-Reduce of delta, weighted by tokens
    theta <- outer_step(theta, mean delta)   (identical on every member: they applied identical bytes)

Partial participation: a peer that finds no partner within --matchmaking-time goes on alone (or, with
--min-group-size > 1, keeps looking for a quorum). Straggler policy: **drop and re-sync**. A peer that missed
its round while others completed it (their heartbeats show a later round) discards its delta and downloads the
newer theta instead of merging a delta computed against an older theta: merging stale deltas can pull the swarm
backwards, and with Photon's long rounds one dropped contribution costs little. Peers that drifted apart at the
*same* round (split groups, failed matchmaking) are merged when they next meet: see swarm/averager.py.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

from photon_p2p.config import RunConfig
from photon_p2p.swarm import faults
from photon_p2p.swarm.averager import PhotonAverager
from photon_p2p.swarm.dht import DHTCalls
from photon_p2p.swarm.heartbeat import HeartbeatPublisher, read_heartbeats
from photon_p2p.swarm.manifest import RunManifest
from photon_p2p.swarm.records import RecordRejected, RejectCounter, RoundGather, StateMeta
from photon_p2p.swarm.state import (
    DeltaGuard,
    compute_delta,
    global_norm,
    load_theta,
    theta_hash,
    validate_downloaded_state,
)
from photon_p2p.train.metrics import MetricsWriter
from photon_p2p.train.outer import OuterOptimizer
from photon_p2p.train.session import LocalSession

if TYPE_CHECKING:
    from photon_p2p.cli.common import DeferredStop

logger = logging.getLogger(__name__)

MATCHMAKING_SLACK_S = 3.0  # on top of --matchmaking-time: lets a lone leader time out and report cleanly
HEARTBEAT_POLL_S = 1.0  # how often a peer waiting for a group checks whether the swarm moved on
DOWNLOAD_ATTEMPTS = 4
_READY_STAGES = ("ready", "training", "averaging")  # heartbeat stages of a peer that has finished starting up


@dataclass
class RoundResult:
    """What one round did; becomes a metrics record and a log line."""

    round: int
    step: int
    outcome: str  # averaged | alone | resynced | skipped
    group_size: int = 1
    tokens: int = 0
    loss: float | None = None
    val_loss: float | None = None
    val_ppl: float | None = None
    allreduce_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    outer_norm: float = 0.0
    reconciled: bool = False
    lost_fraction: float = 0.0
    theta_hash: str = ""
    params: int = 0  # values averaged per round (for comparing with per-step data parallelism)
    group: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out.pop("group")
        out["group_peers"] = self.group
        return out


class RoundEngine:
    """Runs rounds until --max-steps. The caller owns the processes (DHT, averager, heartbeat thread)."""

    def __init__(self, *, cfg: RunConfig, run: RunManifest, session: LocalSession, theta: list[torch.Tensor],
                 outer: OuterOptimizer, delta: list[torch.Tensor], averager: PhotonAverager, calls: DHTCalls,
                 heartbeat: HeartbeatPublisher, metrics: MetricsWriter, peer_id: str, show_progress: bool):
        self.cfg, self.run, self.session = cfg, run, session
        self.theta, self.outer, self.delta = theta, outer, delta
        self.averager, self.calls, self.heartbeat, self.metrics = averager, calls, heartbeat, metrics
        self.peer_id, self.show_progress = peer_id, show_progress
        self.round = 0
        self.global_step = session.progress.step
        self.guard = DeltaGuard()
        self.rejects = RejectCounter()
        self.theta_hash = theta_hash(theta)
        self.last: RoundResult | None = None
        self._speed = 0.0
        self.stop: DeferredStop | None = None  # set by the round loop: Ctrl-C/SIGTERM end the round early
        self.left_cleanly = False  # True once we raised for a stop request at a point where state is consistent

    @property
    def stop_requested(self) -> bool:
        return self.stop is not None and self.stop.requested

    def _leave(self) -> None:
        """Honour Ctrl-C/SIGTERM: theta, outer state and round are those of the start of this round."""
        self.left_cleanly = True
        self.stop.raise_()

    # ------------------------------------------------------------------------------------------------------
    # state shared with donors (runs in the averager's state-sharing thread, under the averager's lock)

    def state_meta(self) -> dict[str, Any]:
        return StateMeta(run_id=self.run.manifest.run_id, manifest_hash=self.run.hash, round=self.round,
                         step=self.global_step, theta_hash=self.theta_hash,
                         num_tensors=len(self.theta) + len(self.outer.state_tensors())).model_dump()

    def _set_global(self, *, round_: int, step: int) -> None:
        self.round = round_
        self.global_step = step  # agreed at round boundaries; the session's counter runs ahead during a round
        self.session.progress.step = step
        self.theta_hash = theta_hash(self.theta)
        if not self.averager.client_mode:
            self.averager.state_sharing_priority = float(round_)  # freshest donors are asked first
        self.heartbeat.update(round=round_, step=step, theta_hash=self.theta_hash, publish_now=True)

    # ------------------------------------------------------------------------------------------------------
    # what the others are doing

    def live_peers(self) -> dict[str, Any]:
        try:
            beats = read_heartbeats(self.calls, self.run.manifest.run_id, self.rejects)
        except Exception as e:  # the DHT being slow must not stop training
            logger.debug("could not read heartbeats: %r", e)
            return {}
        return {pid: hb for pid, hb in beats.items() if hb.manifest_hash == self.run.hash and pid != self.peer_id}

    def newest_round_elsewhere(self) -> int:
        return max((hb.round for hb in self.live_peers().values()), default=-1)

    # ------------------------------------------------------------------------------------------------------
    # joining: download theta, outer state and round from live peers

    def sync_from_swarm(self, *, reason: str, min_round: int) -> bool:
        """Download the newest state (several donors in priority order, with retries). True on success."""
        expected = self.theta + self.outer.state_tensors()
        self.heartbeat.update(stage="syncing", publish_now=True)
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            t0 = time.perf_counter()
            try:
                result = self.averager.load_state_from_peers(timeout=max(30.0, self.cfg.round.allreduce_timeout))
            except Exception as e:
                logger.debug("state download failed: %r", e)
                result = None
            if result is not None:
                metadata, tensors = result
                try:
                    meta = validate_downloaded_state(metadata, tensors, expected, num_theta=len(self.theta),
                                                     run_id=self.run.manifest.run_id, manifest_hash=self.run.hash)
                    if meta.round < min_round:
                        raise RecordRejected(f"donor is at round {meta.round}, older than {min_round}")
                except RecordRejected as e:
                    self.rejects.add("state download", e.reason)
                    logger.warning("rejected a state download (%s); retrying", e.reason)
                else:
                    with self.averager.get_tensors():
                        for dst, src in zip(expected, tensors, strict=True):
                            dst.copy_(src)
                        self._set_global(round_=meta.round, step=meta.step)
                    logger.info("%s: downloaded theta for round %d (step %d) in %.1fs", reason, meta.round, meta.step,
                                time.perf_counter() - t0)
                    return True
            time.sleep(min(2.0 * attempt, 5.0))
        logger.warning("%s: no peer could send its state after %d attempts", reason, DOWNLOAD_ATTEMPTS)
        return False

    def initial_sync(self) -> None:
        """A joining or restarting peer catches up if the swarm is ahead; a current checkpoint needs nothing."""
        newest = self.newest_round_elsewhere()
        if newest > self.round:
            self.sync_from_swarm(reason=f"swarm is at round {newest}, we are at {self.round}", min_round=newest)
        else:
            self._set_global(round_=self.round, step=self.session.progress.step)

    def wait_for_peers(self) -> None:
        """--wait-for-peers N: the peers of a new run start round 0 together, instead of the first one up training
        alone (and the others downloading its solo theta) while the rest are still loading their data."""
        sw = self.cfg.swarm
        self.heartbeat.update(stage="ready", publish_now=True)
        if sw.wait_for_peers <= 1 or self.round > 0:
            return
        deadline = time.monotonic() + sw.wait_for_peers_timeout
        next_log = time.monotonic() + 10.0
        while True:
            peers = self.live_peers().values()
            if any(hb.round > self.round for hb in peers):
                return  # the run is under way already: the first round re-syncs
            ready = 1 + sum(1 for hb in peers if hb.round == self.round and hb.stage in _READY_STAGES)
            if ready >= sw.wait_for_peers:
                logger.info("%d peers ready: starting round %d", ready, self.round)
                return
            if self.stop_requested:
                self._leave()
            now = time.monotonic()
            if now >= deadline:
                logger.warning("only %d of %d peers ready after %.0fs (--wait-for-peers-timeout): starting anyway",
                               ready, sw.wait_for_peers, sw.wait_for_peers_timeout)
                return
            if now >= next_log:
                logger.info("waiting for peers: %d of %d ready (--wait-for-peers)", ready, sw.wait_for_peers)
                next_log = now + 10.0
            time.sleep(0.5)

    # ------------------------------------------------------------------------------------------------------
    # one round

    def train_local(self) -> tuple[int, int, float | None]:
        """Inner steps of this round. Returns (steps, tokens, mean loss)."""
        s, rc, train = self.session, self.cfg.round, self.cfg.train
        load_theta(s.model, self.theta)
        if rc.reset_inner_optimizer:
            s.trainer.reset_optimizer()
        budget = min(rc.local_steps, train.max_steps - s.progress.step)
        deadline = time.monotonic() + rc.round_seconds if rc.round_seconds else None
        steps = tokens = 0
        losses = []
        t0 = time.perf_counter()
        bar = tqdm(total=None if deadline else budget, desc=f"round {self.round}", unit="step", leave=False,
                   disable=not self.show_progress, dynamic_ncols=True)
        start_step = s.progress.step
        try:
            while s.progress.step < train.max_steps:
                if deadline is None and steps >= budget:
                    break
                if deadline is not None and steps > 0 and time.monotonic() >= deadline:
                    break
                if self.stop_requested:
                    break  # the round loop leaves without averaging; theta stays at the start of this round
                result = s.train_step()
                steps += 1
                tokens += result.tokens
                losses.append(result.loss)
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{result.lr:.2e}", refresh=False)
                if steps % max(1, train.log_every) == 0:
                    loss_now = result.loss if math.isfinite(result.loss) else None
                    self.heartbeat.update(step=s.progress.step, tokens=s.progress.tokens, loss=loss_now,
                                          tokens_per_s=tokens / max(time.perf_counter() - t0, 1e-9))
        finally:
            bar.close()
        self._speed = tokens / max(time.perf_counter() - t0, 1e-9)
        if losses:  # photon-status shows these: update them even when --log-every exceeds --local-steps
            self.heartbeat.update(step=s.progress.step, tokens=s.progress.tokens,
                                  loss=losses[-1] if math.isfinite(losses[-1]) else None,
                                  tokens_per_s=self._speed)
        s.progress.step = start_step  # the global step advances when the round ends (agreed with the group)
        finite = [x for x in losses if math.isfinite(x)]
        return steps, tokens, (sum(finite) / len(finite) if finite else None)

    def _average(self, steps: int, tokens: int, loss: float | None) -> dict[str, Any] | None:
        """Matchmaking + all-reduce for this round, retried until --matchmaking-time runs out. None: no group."""
        rc = self.cfg.round
        gather = RoundGather(round=self.round, theta_hash=self.theta_hash, tokens=tokens, steps=steps,
                             loss=loss if loss is not None and math.isfinite(loss) else None).model_dump()
        peers = list(self.live_peers().values())
        if not peers and self.cfg.round.min_group_size <= 1:
            return None  # nobody else in the run: do not wait out the matchmaking time for no one
        # peers one round behind are usually just finishing their all-reduce (heartbeats lag): expect them too
        expected = sum(1 for hb in peers if self.round - 1 <= hb.round <= self.round)
        target = expected + 1 if expected else None
        if rc.target_group_size is not None:
            target = min(target or rc.target_group_size, rc.target_group_size)
        if target is not None:
            target = max(target, rc.min_group_size)  # hivemind starts a group at its target, whatever the minimum
        self.averager.set_round(self.round, target if target and target >= 2 else rc.target_group_size)
        deadline = time.monotonic() + rc.matchmaking_time + MATCHMAKING_SLACK_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0.5:
                return None
            with self.averager.get_tensors():  # a failed attempt may have overwritten part of the buffers
                compute_delta(self.theta, self.session.model, self.delta)
            control = self.averager.step(gather=gather, weight=float(max(tokens, 1)), timeout=remaining,
                                         allow_retries=False, wait=False)
            try:
                while not control.done():
                    if self.stop_requested:
                        control.cancel()
                        return None
                    # a straggler stops waiting as soon as the others have finished this round without it
                    if not control.began_allreduce and self.newest_round_elsewhere() > self.round:
                        control.cancel()
                        return None
                    try:
                        return control.result(timeout=HEARTBEAT_POLL_S)
                    except FutureTimeout:
                        continue
                return control.result()
            except Exception as e:  # no group, a groupmate vanished, ... : decide below, never crash the peer
                if "could not find a group" in str(e):
                    logger.debug("round %d: no group yet", self.round)
                else:
                    logger.warning("round %d: averaging attempt failed (%r); retrying while time remains",
                                   self.round, e)
                time.sleep(0.2)

    def run_round(self) -> RoundResult:
        s, rc = self.session, self.cfg.round
        self.heartbeat.update(stage="training", round=self.round)
        steps, tokens, loss = self.train_local()
        step_before = s.progress.step
        if self.stop_requested:
            self._leave()
        if faults.at("nan_update", self.round) is not None:
            with torch.no_grad():
                next(s.model.parameters()).fill_(float("nan"))
        stall = faults.at("stall_before_average", self.round)
        if stall:
            time.sleep(stall)
        with self.averager.get_tensors():
            compute_delta(self.theta, s.model, self.delta)
        ok, norm, why = self.guard.check(self.delta)
        if not ok:
            logger.warning("round %d: not sharing this round's update: %s; resetting the inner optimizer",
                           self.round, why)
            s.trainer.reset_optimizer()
            return self._skip_round(step_before + steps, tokens, loss)
        self.guard.accept(norm)
        self.heartbeat.update(stage="averaging", tokens=s.progress.tokens, publish_now=True)
        t0 = time.perf_counter()
        newest = self.newest_round_elsewhere()
        if newest > self.round:  # finished this round without us already: no point looking for a group
            return self._resync(newest, tokens, loss)
        outcome = self._average(steps, tokens, loss)
        while (outcome is None and rc.min_group_size > 1 and not self.stop_requested
               and self.newest_round_elsewhere() <= self.round):
            logger.info("round %d: waiting for a group of at least %d peers (--min-group-size)", self.round,
                        rc.min_group_size)
            outcome = self._average(steps, tokens, loss)
        allreduce_s = time.perf_counter() - t0
        if self.stop_requested:
            self._leave()  # this round's update is dropped; the others carry on without us
        if outcome is None:
            newest = self.newest_round_elsewhere()
            if newest > self.round:
                return self._resync(newest, tokens, loss)
            with self.averager.get_tensors():  # alone: our own delta is the average
                compute_delta(self.theta, s.model, self.delta)
            return self._apply(RoundResult(round=self.round, step=step_before + steps, outcome="alone",
                                           tokens=tokens, loss=loss, allreduce_s=allreduce_s))
        gathered = outcome["gathered"]
        group_steps = max(g["steps"] for g in gathered.values())
        result = RoundResult(round=self.round, step=step_before + group_steps, outcome="averaged",
                             group_size=len(gathered), tokens=sum(g["tokens"] for g in gathered.values()), loss=loss,
                             allreduce_s=allreduce_s, bytes_sent=outcome["bytes_sent"],
                             bytes_received=outcome["bytes_received"], reconciled=outcome["reconciled"],
                             lost_fraction=outcome["lost_fraction"], group=outcome["group"])
        if outcome["reconciled"]:
            logger.info("round %d: group members held different theta; merged them", self.round)
        if not math.isfinite(global_norm(self.delta)):
            # every member received the same values, so every member takes the same decision here
            logger.warning("round %d: the averaged update is not finite; skipping it", self.round)
            result.outcome = "skipped"
            return self._advance(result)
        return self._apply(result)

    def _apply(self, result: RoundResult) -> RoundResult:
        with self.averager.get_tensors():
            result.outer_norm = self.outer.step(self.delta)
        return self._advance(result)

    def _advance(self, result: RoundResult) -> RoundResult:
        with self.averager.get_tensors():
            self._set_global(round_=self.round + 1, step=min(result.step, self.cfg.train.max_steps))
        result.theta_hash = self.theta_hash
        result.params = sum(t.numel() for t in self.theta)
        return result

    def _skip_round(self, step: int, tokens: int, loss: float | None) -> RoundResult:
        newest = self.newest_round_elsewhere()
        if newest >= self.round:
            deadline = time.monotonic() + self.cfg.round.matchmaking_time + self.cfg.round.allreduce_timeout
            while self.newest_round_elsewhere() <= self.round and time.monotonic() < deadline:
                time.sleep(1.0)
            newest = self.newest_round_elsewhere()
            if newest > self.round:
                return self._resync(newest, tokens, loss)
        return self._advance(RoundResult(round=self.round, step=step, outcome="skipped", tokens=tokens, loss=loss))

    def _resync(self, newest: int, tokens: int, loss: float | None) -> RoundResult:
        logger.info("round %d: the swarm moved on to round %d without us; dropping our update and re-syncing",
                    self.round, newest)
        r = self.round
        if not self.sync_from_swarm(reason="straggler", min_round=newest):
            return self._advance(RoundResult(round=r, step=self.session.progress.step, outcome="skipped",
                                             tokens=tokens, loss=loss))
        return RoundResult(round=r, step=self.session.progress.step, outcome="resynced", tokens=tokens, loss=loss,
                           theta_hash=self.theta_hash, params=sum(t.numel() for t in self.theta))

    @property
    def tokens_per_s(self) -> float:
        return self._speed
