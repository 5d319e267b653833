"""The round engine: Photon's federated rounds, peer to peer, on uneven machines.

Round r, on every peer::

    local model <- theta (- c * a late delta carried over, see below)
    train until the round's *collective* token budget is met     (peers report round tokens in heartbeats)
    delta = theta - local                                         (checked: finite, norm not absurd)
    matchmaking keyed by (run, manifest, r) -> Butterfly All-Reduce of delta, weighted by tokens
    theta <- outer_step(theta, mean delta)                        (identical on every member)

**Collective budget** (hivemind.Optimizer's target batch size, applied to Photon's rounds): a round closes when
the peers training it have *together* trained ``local_steps x batch x seq_len`` tokens per peer, so a fast peer
trains more steps and a slow one fewer, they stop within about one step of each other, and nobody idles waiting
for a slower peer to finish a fixed number of steps (``--round-seconds`` closes rounds on time instead). Deltas
are weighted by tokens, so each token counts the same whoever trained it.

**Nobody advances alone while others train the same round**: a peer keeps looking for its group while heartbeats
show peers at its round (their heartbeats expire within seconds if they die or freeze).

**Late peers carry their work over** instead of dropping it: a peer whose round closed without it (it froze, or
one step took longer than the others' patience) keeps its delta, downloads the newer theta, and starts its next
round from ``theta_new - c * delta_late`` with ``c = 1 / (1 + staleness)`` (staleness in rounds). Its late work so
enters the round it arrives in, damped by its age, inside its own next pseudo-gradient; theta is never replaced by
an older one, so a late peer cannot pull the swarm backwards. docs/design.md explains the choice.

**Bounded weight**: the weight a peer declares (its tokens, plus c x carried tokens) is clamped to the manifest's
bound (swarm/robust.py ``max_round_weight``, which derives it from the rules above); reducers refuse heavier ones.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import torch
from tqdm import tqdm

from photon_p2p.config import RunConfig
from photon_p2p.errors import SwarmError
from photon_p2p.swarm import faults
from photon_p2p.swarm.averager import PhotonAverager
from photon_p2p.swarm.dht import check_processes, remote_result
from photon_p2p.swarm.heartbeat import HeartbeatPublisher
from photon_p2p.swarm.manifest import RunManifest
from photon_p2p.swarm.records import RejectCounter, RoundGather, StateMeta
from photon_p2p.swarm.report import RoundResult
from photon_p2p.swarm.robust import round_weight_bound
from photon_p2p.swarm.state import Carry, DeltaGuard, compute_delta, global_norm, load_theta, theta_hash
from photon_p2p.swarm.sync import VOUCHERS, Unvouched, download_state
from photon_p2p.swarm.view import ACTIVE_STAGES, SwarmView
from photon_p2p.train.metrics import MetricsWriter, StepStats
from photon_p2p.train.outer import OuterOptimizer
from photon_p2p.train.session import LocalSession

logger = logging.getLogger(__name__)

MATCHMAKING_SLACK_S = 3.0  # on top of --matchmaking-time for one matchmaking attempt
PATIENCE_ROUNDS = 3  # while peers of our round are live, keep looking for up to this many --matchmaking-time
ALONE_GRACE_S = 2.0  # others take part in rounds but none seen at ours: look again this long before going alone
POLL_S = 0.1  # how often a waiting peer checks its averaging step (also the resolution of the idle figures)
SYNC_AGAIN = 1  # after a download the swarm may have moved on: download once more before training
AGREE_WAIT_S = 600.0  # a joiner waits this long for the swarm to agree on one state (catch_up): a few 125m rounds


class RoundEngine:
    """Runs this peer's rounds until --max-steps. The caller owns the processes (DHT, averager, heartbeat)."""

    def __init__(
        self,
        *,
        cfg: RunConfig,
        run: RunManifest,
        session: LocalSession,
        theta: list[torch.Tensor],
        outer: OuterOptimizer,
        delta: list[torch.Tensor],
        averager: PhotonAverager,
        view: SwarmView,
        heartbeat: HeartbeatPublisher,
        rejects: RejectCounter,
        show_progress: bool,
        round_: int = 0,
    ):
        self.cfg, self.run, self.session = cfg, run, session
        self.theta, self.outer, self.delta = theta, outer, delta
        self.averager, self.view, self.heartbeat, self.rejects = averager, view, heartbeat, rejects
        self.show_progress = show_progress
        self.round = round_
        self.global_step = session.progress.step
        self.guard = DeltaGuard()
        self.theta_hash = theta_hash(theta)
        self.last_sync_unvouched = False  # the last download was refused as unvouched (catch_up waits, not gives up)
        self.carry: Carry | None = None
        self.tokens_per_step = cfg.train.batch_size * session.seq_len
        self.max_weight = round_weight_bound(cfg, session.seq_len)
        self._speed = 0.0
        self.stop_requested = lambda: False  # set by the loop (swarm/loop.py) to its DeferredStop
        self.metrics = MetricsWriter(None)  # the loop's writer: 'step' records every --log-every inner steps
        self.step_stats = StepStats(session.model, session.seq_len, session.device)

    @property
    def tokens_per_s(self) -> float:
        return self._speed

    # ------------------------------------------------------------------------------------------------------
    # state shared with donors (runs in the averager's state-sharing thread, under the averager's lock)

    def state_meta(self) -> dict[str, Any]:
        return StateMeta(
            run_id=self.run.manifest.run_id,
            manifest_hash=self.run.hash,
            round=self.round,
            step=self.global_step,
            theta_hash=self.theta_hash,
            num_tensors=len(self.theta) + len(self.outer.state_tensors()),
        ).model_dump()

    def set_global(self, *, round_: int, step: int) -> None:
        self.round = round_
        self.global_step = step  # agreed at round boundaries; the session's counter runs ahead during a round
        self.session.progress.step = step
        self.theta_hash = theta_hash(self.theta)
        if not self.averager.client_mode:
            self.averager.state_sharing_priority = float(round_)  # freshest donors are asked first
        # stage "ready": between rounds. A heartbeat still saying "averaging" at the new round would tell the others
        # that the new round is already closing
        self.heartbeat.update(
            round=round_, step=step, theta_hash=self.theta_hash, round_tokens=0, stage="ready", publish_now=True
        )

    # ------------------------------------------------------------------------------------------------------
    # catching up

    def sync(self, *, reason: str, min_round: int) -> float | None:
        """Download the newest state (round >= min_round). Returns the seconds it took, None if nobody could
        serve it (then every peer claiming that round is one step closer to being ignored)."""
        self.heartbeat.update(stage="syncing", publish_now=True)
        t0 = time.perf_counter()
        failure: list[BaseException] = []
        got = download_state(
            self.averager,
            self.theta + self.outer.state_tensors(),
            num_theta=len(self.theta),
            run_id=self.run.manifest.run_id,
            manifest_hash=self.run.hash,
            min_round=min_round,
            rejects=self.rejects,
            show_progress=self.show_progress,
            vouchers=self._vouchers,
            failure=failure,
        )
        self.last_sync_unvouched = bool(failure) and isinstance(failure[0], Unvouched)
        if got is None:
            if not self.last_sync_unvouched:  # a donor served a valid state others have not vouched for (yet)
                self.view.claim_failed(min_round)
            return None
        with self.averager.get_tensors():
            self.set_global(round_=got.meta.round, step=got.meta.step)
        logger.info(
            "%s: downloaded theta for round %d (step %d): %.0f MB in %.1fs (%.1f MB/s)",
            reason,
            got.meta.round,
            got.meta.step,
            got.nbytes / 1e6,
            got.seconds,
            got.nbytes / 1e6 / got.seconds,
        )
        return time.perf_counter() - t0

    def _vouchers(self, round_: int, theta_hash: str) -> tuple[set[str], int]:
        """Who vouches for a downloaded (round, theta hash), and how many other peers are live (swarm/sync.py)."""
        return self.view.vouchers(round_, theta_hash), self.view.possible_vouchers()

    def catch_up(self, reason: str) -> float:
        """Download while a peer that can serve state is ahead of us (a joiner must not train on stale state only
        to throw the work away). Returns seconds spent.

        A state is only taken when others vouch for it (swarm/sync.py). Right after a failed all-reduce the live
        peers can hold different theta for a round, and a download is refused as unvouched; that is no evidence of
        a lie, so instead of giving up (and training from our initial weights) we wait, up to AGREE_WAIT_S, until
        enough peers show one state (they agree again when they next average together), then download again."""
        spent = 0.0
        tries, waiting_since = 0, None
        while tries <= SYNC_AGAIN and not self.stop_requested():
            newest = self.view.newest_servable_round()
            if newest <= self.round:
                break
            took = self.sync(
                reason=f"{reason}: the swarm is at round {newest}, we are at {self.round}", min_round=newest
            )
            if took is not None:
                spent += took
                tries += 1
                self.view.wait_fresh()
                continue
            if not self.last_sync_unvouched:
                tries += 1  # nobody could serve it: the claim counts as failed; ask again (bounded by SYNC_AGAIN)
                continue
            waiting_since = waiting_since or time.monotonic()
            need = 1 + min(VOUCHERS, max(0, self.view.possible_vouchers() - 1))  # the donor and its vouchers
            logger.info("%s: the swarm's peers hold different states; waiting for %d to agree", reason, need)
            while (
                not self.view.state_agreed(newest, need)
                and time.monotonic() - waiting_since < AGREE_WAIT_S
                and not self.stop_requested()
            ):
                self.view.wait_fresh()
            if time.monotonic() - waiting_since >= AGREE_WAIT_S:
                tries += 1
        self.heartbeat.update(stage="ready", publish_now=True)
        return spent

    # ------------------------------------------------------------------------------------------------------
    # one round: train

    def _round_budget(self) -> int:
        """Steps per peer this round (the last round of a run is shorter)."""
        return max(1, min(self.cfg.round.local_steps, self.cfg.train.max_steps - self.global_step))

    def _start_local(self) -> int:
        """Load theta into the local model; subtract a carried late delta. Returns the carried tokens."""
        s = self.session
        load_theta(s.model, self.theta)
        if self.cfg.round.reset_inner_optimizer:
            s.trainer.reset_optimizer()
        if self.carry is None:
            return 0
        with torch.no_grad():
            for p, d in zip(s.model.parameters(), self.carry.delta, strict=True):
                p.sub_((self.carry.factor * d).to(p.device, p.dtype))
        logger.info(
            "round %d: carrying over round %d's late work (%d tokens, weight x%.2f)",
            self.round,
            self.carry.from_round,
            self.carry.tokens,
            self.carry.factor,
        )
        return self.carry.tokens

    def _budget_met(self, own_tokens: int, budget_steps: int) -> bool:
        """The round closes when the first peer sees the collective budget met; the others follow at their next
        step boundary (so estimates that differ between peers cannot keep one of them training alone)."""
        closing = self.view.at_round(self.round, ("averaging",))
        if closing:
            logger.debug("round %d closes: %s is averaging it", self.round, next(iter(closing))[:16])
            return True
        others, _ = self.view.tokens_in_round(self.round)
        # the participants include peers still finishing the previous round's all-reduce: their heartbeat lags the
        # round boundary, and without them a short round would close on this peer's share alone
        n = self._expected_mates()
        met = own_tokens + others >= budget_steps * self.tokens_per_step * (1 + n)
        if met:
            logger.debug(
                "round %d closes: budget met (own %d + others %d tokens, %d others)", self.round, own_tokens, others, n
            )
        return met

    def train_local(self) -> tuple[int, int, float | None, float]:
        """Inner steps of this round. Returns (steps, tokens, mean loss, seconds)."""
        s, rc = self.session, self.cfg.round
        budget = self._round_budget()
        deadline = time.monotonic() + rc.round_seconds if rc.round_seconds else None
        steps = tokens = 0
        losses = []
        t0 = time.perf_counter()
        self.heartbeat.update(stage="training", round=self.round, round_tokens=0, publish_now=True)
        bar = tqdm(
            total=None if deadline else budget,
            desc=f"round {self.round}",
            unit="step",
            leave=False,
            disable=not self.show_progress,
            dynamic_ncols=True,
        )
        start_step = s.progress.step
        try:
            while not self.stop_requested():
                if deadline is not None:
                    if steps >= self.cfg.train.max_steps - self.global_step or (
                        steps > 0 and (time.monotonic() >= deadline or self.view.at_round(self.round, ("averaging",)))
                    ):
                        break  # on time, or the round is closing (a joiner must not train on while others wait)
                elif steps > 0 and self._budget_met(tokens, budget):
                    break
                result = s.train_step()
                steps += 1
                tokens += result.tokens
                self.step_stats.add(result.tokens)
                if s.progress.step % self.cfg.train.log_every == 0:
                    # step = the round's first global step + this peer's inner steps so far (peers that train more
                    # steps than the group agrees on revisit a few step numbers in the next round)
                    self.metrics.write(
                        self.step_stats.record(
                            step=s.progress.step, result=result, tokens=s.progress.tokens, round=self.round
                        )
                    )
                losses.append(result.loss)
                bar.update(1)
                bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{result.lr:.2e}", refresh=False)
                speed = tokens / max(time.perf_counter() - t0, 1e-9)
                self.heartbeat.update(
                    step=s.progress.step,
                    tokens=s.progress.tokens,
                    round_tokens=tokens,
                    tokens_per_s=speed,
                    loss=result.loss if math.isfinite(result.loss) else None,
                )
        finally:
            bar.close()
        seconds = time.perf_counter() - t0
        self._speed = tokens / max(seconds, 1e-9)
        s.progress.step = start_step  # the global step advances when the round ends (agreed with the group)
        finite = [x for x in losses if math.isfinite(x)]
        return steps, tokens, (sum(finite) / len(finite) if finite else None), seconds

    # ------------------------------------------------------------------------------------------------------
    # one round: average

    def _expected_mates(self) -> int:
        """Peers we keep waiting for: those about to train ("ready"), training or averaging our round, and those
        still finishing the previous one's all-reduce (heartbeats lag a round boundary by a second or two)."""
        return len(self.view.at_round(self.round, ACTIVE_STAGES)) + len(
            self.view.at_round(self.round - 1, ("averaging",))
        )

    def _group_target(self) -> int:
        """How big a group to ask hivemind for. Also counts peers whose heartbeat still shows the previous round in
        training: with short rounds that is usually a heartbeat a second old, and a full group starts the moment
        its last member arrives, whereas a target too small starts without it (the target only costs up to
        --matchmaking-time when such a peer really is a round behind)."""
        stages = ("training", "averaging")
        return 1 + len(self.view.at_round(self.round, ACTIVE_STAGES)) + len(self.view.at_round(self.round - 1, stages))

    def _attempt(self, gather: dict[str, Any], weight: float) -> dict[str, Any] | str:
        """One matchmaking + all-reduce attempt. Returns the outcome, or why it did not happen: 'nogroup', 'late',
        'stop'. Never raises: a hivemind error is a failed attempt, not a crashed peer."""
        rc = self.cfg.round
        expected = self._group_target() - 1
        target = expected + 1 if expected else None
        if rc.target_group_size is not None:
            target = min(target or rc.target_group_size, rc.target_group_size)
        if target is not None or rc.min_group_size > 1:
            # hivemind starts a group at its target, whatever the minimum; with a quorum and nobody seen yet, the
            # quorum itself is the target, so the group starts the moment it is complete, not at --matchmaking-time
            target = max(target or 0, rc.min_group_size)
        try:
            # every attempt sets the round again: hivemind rewrites the group bits once a group is assembled, so
            # after a failed all-reduce a retry would look for its group under another key
            self.averager.set_round(self.round, target if target and target >= 2 else rc.target_group_size)
            with self.averager.get_tensors():  # a failed attempt may have overwritten part of the buffers
                compute_delta(self.theta, self.session.model, self.delta)  # includes a carried-over delta
                faults.poison_update(self.delta, self.round)  # a hostile peer's update (tests and benchmarks)
            control = self.averager.step(
                gather=gather,
                weight=weight,
                wait=False,
                allow_retries=False,
                timeout=rc.matchmaking_time + MATCHMAKING_SLACK_S,
            )
        except Exception as e:
            logger.debug("round %d: could not start averaging (%r)", self.round, e)
            return "nogroup"
        try:
            while not control.done():
                if self.stop_requested():
                    control.cancel()
                    return "stop"
                if not control.began_allreduce and self.view.closed_round() > self.round and not self._expected_mates():
                    control.cancel()  # our round closed without us
                    return "late"
                try:
                    return remote_result(control, POLL_S)
                except FutureTimeout:
                    continue
            return remote_result(control)
        except Exception as e:  # no group, a groupmate vanished, ...: the caller decides, the peer never crashes
            if "could not find a group" in str(e):
                logger.debug("round %d: no group yet", self.round)
            else:
                logger.warning(
                    "round %d: averaging attempt failed (%s); retrying while peers of this round are live",
                    self.round,
                    str(e)[:200] or type(e).__name__,
                )
            return "nogroup"

    def average(self, steps: int, tokens: int, weight: float, loss: float | None) -> dict[str, Any] | str:
        """Look for this round's group while it can still form. Returns the all-reduce outcome, or 'alone',
        'late' (the round closed without us) or 'stop'."""
        rc = self.cfg.round
        gather = RoundGather(
            round=self.round,
            theta_hash=self.theta_hash,
            tokens=tokens,
            steps=steps,
            loss=loss if loss is not None and math.isfinite(loss) else None,
        ).model_dump()
        start = time.monotonic()
        patience = rc.matchmaking_time * PATIENCE_ROUNDS
        warned = False
        while True:
            if self.stop_requested():
                return "stop"
            check_processes(self.view.calls.dht, self.averager)  # a quorum wait must not outlive them
            mates = self._expected_mates()
            waited = time.monotonic() - start
            if not mates:
                if self.view.closed_round() > self.round:
                    return "late"  # also when the peers that closed it have left since (the run's end)
                active = any(v.hb.stage in ACTIVE_STAGES for v in self.view.peers().values())
                if rc.min_group_size <= 1 and (waited >= ALONE_GRACE_S or not active):
                    return "alone"  # nobody else trains this round: partial participation
                if rc.min_group_size <= 1:
                    time.sleep(0.2)  # others are live but not seen at our round yet: heartbeats lag a little
                    continue
            elif waited >= patience and rc.min_group_size <= 1:
                logger.warning(
                    "round %d: %d peer(s) report this round but no group formed in %.0fs; going on "
                    "alone (they merge with us when we next meet)",
                    self.round,
                    mates,
                    waited,
                )
                return "alone"
            if self.averager.client_mode and not self.view.reachable_peers() and rc.min_group_size <= 1:
                return "alone"  # nobody accepts connections: no group can form (said once at start)
            if rc.min_group_size > 1:
                if waited >= rc.quorum_timeout:
                    raise SwarmError(
                        f"no group of at least {rc.min_group_size} peers formed in "
                        f"{rc.quorum_timeout:.0f}s (--min-group-size, --quorum-timeout); "
                        f"{len(self.view.peers())} other peer(s) are live in run "
                        f"'{self.run.manifest.run_id}'"
                    )
                if not warned and waited >= rc.matchmaking_time:
                    logger.info(
                        "round %d: waiting for a group of at least %d peers (--min-group-size; gives up "
                        "after --quorum-timeout %.0fs)",
                        self.round,
                        rc.min_group_size,
                        rc.quorum_timeout,
                    )
                    warned = True
            outcome = self._attempt(gather, weight)
            if not isinstance(outcome, str) or outcome in ("late", "stop"):
                return outcome
            time.sleep(0.2)

    # ------------------------------------------------------------------------------------------------------
    # one round, start to end

    def run_round(self) -> RoundResult:
        """Train, then average (or go alone, or carry the work over if the round closed without us)."""
        s, rc = self.session, self.cfg.round
        r = self.round
        carried = self._start_local()
        steps, tokens, loss, train_s = self.train_local()
        if self.stop_requested():
            raise _Leave()
        if faults.at("nan_update", r) is not None:
            with torch.no_grad():
                next(s.model.parameters()).fill_(float("nan"))
        stall = faults.at("stall_before_average", r)
        if stall:
            time.sleep(stall)
        advance = steps if rc.round_seconds else self._round_budget()  # global steps this round, if alone
        base = RoundResult(
            round=r, step=self.global_step + advance, outcome="alone", own_tokens=tokens, loss=loss, train_s=train_s
        )
        with self.averager.get_tensors():
            compute_delta(self.theta, s.model, self.delta)
        ok, norm, why = self.guard.check(self.delta)
        if not ok:
            logger.warning("round %d: not sharing this round's update: %s; resetting the inner optimizer", r, why)
            s.trainer.reset_optimizer()
            self.carry = None
            base.wasted_tokens = tokens + carried
            return self._sit_out(base)
        self.guard.accept(norm)
        self.heartbeat.update(stage="averaging", round_tokens=tokens, publish_now=True)
        weight = min(tokens + (self.carry.factor * self.carry.tokens if self.carry else 0.0), self.max_weight)
        t0 = time.perf_counter()
        outcome = self.average(advance, tokens, float(max(weight, 1.0)), loss)
        waited = time.perf_counter() - t0
        base.allreduce_s = outcome["allreduce_s"] if isinstance(outcome, dict) else 0.0
        base.matchmaking_s = waited - base.allreduce_s  # looking for the group: idle time
        if outcome == "stop":
            raise _Leave()  # this round's update is dropped; the others carry on without us
        if outcome == "late":
            return self._late(base, carried)
        base.tokens_in_theta = tokens + carried
        self.carry = None
        if outcome == "alone":
            base.tokens = tokens
            with self.averager.get_tensors():  # alone: our own delta is the average
                compute_delta(self.theta, s.model, self.delta)
            return self._apply(base)
        gathered = outcome["gathered"]
        base.outcome, base.group_size, base.group = "averaged", len(gathered), outcome["group"]
        base.step = self.global_step + min(g["steps"] for g in gathered.values())  # the same on every member
        base.tokens = sum(g["tokens"] for g in gathered.values())
        base.bytes_sent, base.bytes_received = outcome["bytes_sent"], outcome["bytes_received"]
        base.reconciled, base.lost_fraction = outcome["reconciled"], outcome["lost_fraction"]
        offenders = outcome.get("offenders") or {}
        base.offenders = sorted(offenders)
        base.clipped_parts = sum(c for c, _ in offenders.values())
        base.dropped_parts = sum(d for _, d in offenders.values())
        if outcome["reconciled"]:
            logger.info("round %d: group members held different theta; merged them", r)
        if outcome.get("reconcile_failed"):
            base.reconcile_failed = True
            logger.warning(
                "round %d: merging the group's different theta failed part-way; each member kept its "
                "own (they merge when they next meet)",
                r,
            )
        if not math.isfinite(global_norm(self.delta)):
            # every member received the same values, so every member takes the same decision here
            logger.warning("round %d: the averaged update is not finite; skipping it", r)
            base.outcome, base.tokens_in_theta, base.wasted_tokens = "skipped", 0, tokens + carried
            return self._advance(base)
        return self._apply(base)

    def _apply(self, result: RoundResult) -> RoundResult:
        with self.averager.get_tensors():
            result.outer_norm = self.outer.step(self.delta)
        return self._advance(result)

    def _advance(self, result: RoundResult) -> RoundResult:
        with self.averager.get_tensors():
            self.set_global(round_=self.round + 1, step=min(result.step, self.cfg.train.max_steps))
        result.theta_hash = self.theta_hash
        result.params = sum(t.numel() for t in self.theta)
        return result

    def _late(self, result: RoundResult, carried: int) -> RoundResult:
        """Our round closed without us: keep the work (our delta, already including any earlier carry), download
        the newer theta, and merge the work into the next round, damped by its staleness."""
        r = self.round
        newest, took = self.view.newest_servable_round(), None
        if newest > r:
            kept = [d.clone() for d in self.delta]  # a copy only when the work is carried over
            logger.info(
                "round %d: the swarm closed this round without us (it is at round %d); keeping our update for "
                "the next round and re-syncing",
                r,
                newest,
            )
            t0 = time.perf_counter()
            took = self.sync(reason="late", min_round=newest)
            result.sync_s = time.perf_counter() - t0
            if took is None:
                logger.warning("round %d: could not download the newer state; applying our own update", r)
        else:
            # the peers that closed it have all left (the run's end): nobody to re-sync from, nor to wait for
            logger.warning("round %d: the peers that closed this round have left the run; applying our own update", r)
        if took is None:
            # nobody could serve the newer round (the claim is doubtful, or its peers left): finish our own round
            # alone instead of skipping it (a skipped round does not advance the step, and the run would never end)
            result.tokens = result.own_tokens
            result.tokens_in_theta = result.own_tokens + carried
            self.carry = None
            return self._apply(result)
        staleness = max(1, self.round - r)
        tokens = result.own_tokens + (self.carry.tokens if self.carry else 0)
        self.carry = Carry(delta=kept, tokens=tokens, factor=1.0 / (1.0 + staleness), from_round=r)
        result.outcome, result.staleness, result.carried_tokens = "late", staleness, tokens
        result.step = self.global_step
        result.theta_hash, result.params = self.theta_hash, sum(t.numel() for t in self.theta)
        return result

    def _sit_out(self, result: RoundResult) -> RoundResult:
        """This round's update is unusable (NaN, absurd norm): let the others finish the round without us, then
        take their theta; if nobody else trains this round, skip it (the step still advances)."""
        r = self.round
        result.outcome = "skipped"
        self.heartbeat.update(stage="sitting-out", publish_now=True)  # so nobody waits for us in matchmaking
        deadline = time.monotonic() + self.cfg.round.matchmaking_time + self.cfg.round.allreduce_timeout
        while self._expected_mates() and time.monotonic() < deadline and not self.stop_requested():
            time.sleep(0.5)
        if (
            self.view.newest_servable_round() > r
            and self.sync(reason="re-sync after a skipped update", min_round=r + 1) is not None
        ):
            result.step = self.global_step
            result.theta_hash, result.params = self.theta_hash, sum(t.numel() for t in self.theta)
            return result
        return self._advance(result)


class _Leave(Exception):
    """Ctrl-C/SIGTERM inside a round: leave with theta, outer state and round as at the start of this round."""
