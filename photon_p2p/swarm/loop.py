"""The peer's loop around the round engine: start together, catch up, rounds, evaluations, metrics, leaderboard
entries, checkpoints, clean stops (Ctrl-C, SIGTERM, a quorum that never forms)."""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from functools import partial
from typing import Any

from photon_p2p.errors import SwarmError
from photon_p2p.runtime import DeferredStop
from photon_p2p.swarm.dht import check_processes
from photon_p2p.swarm.records import LastRound
from photon_p2p.swarm.report import RoundResult, format_round_line
from photon_p2p.swarm.rounds import RoundEngine, _Leave
from photon_p2p.swarm.state import load_theta
from photon_p2p.swarm.view import ACTIVE_STAGES
from photon_p2p.train.metrics import MetricsWriter

logger = logging.getLogger(__name__)

REPING_PERIOD = 30.0  # seconds between checks that this peer's --initial-peers still know it


async def _reping_initial_peers(_dht: Any, node: Any, maddrs: tuple[str, ...] = ()) -> int:
    """Runs in the DHT process: dial and ping each initial peer. A ping makes the pinged node add us to its routing
    table, so a bootstrap that was down (its routing table empty, and nobody pings a node that stopped answering)
    knows the run's peers again and introduces newcomers to them. Returns how many answered that were missing
    from our routing table (were down)."""
    from hivemind.p2p import PeerID
    from hivemind.utils.multiaddr import Multiaddr

    back = 0
    for text in maddrs:
        maddr = Multiaddr(text)
        peer_id = PeerID.from_base58(maddr["p2p"])
        known = node.protocol.routing_table.get(peer_id=peer_id) is not None
        try:  # dialling a node that is down can take p2pd a long time: bounded, the next try is 30 s away
            await asyncio.wait_for(node.p2p._client.connect(peer_id, [maddr.decapsulate("/p2p/" + maddr["p2p"])]), 10)
        except Exception as e:  # still down: try again next time
            logger.debug("initial peer %s unreachable: %r", text, e)
            continue
        back += await node.protocol.call_ping(peer_id) is not None and not known
    return back


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _seconds(x: float) -> float:
    return min(max(0.0, x), 1e7)


class PeerLoop(RoundEngine):
    """A RoundEngine that runs until --max-steps (what photon-peer runs)."""

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        # this peer's totals for the leaderboard (restored from a checkpoint by the caller)
        self.contribution: dict[str, Any] = dict(tokens=0, rounds=0, rounds_averaged=0, first_seen=time.time())

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
            peers = self.view.peers().values()
            if any(v.hb.round > self.round for v in peers):
                return  # the run is under way already: catch_up downloads its state
            ready = 1 + sum(1 for v in peers if v.hb.round == self.round and v.hb.stage in ACTIVE_STAGES)
            if ready >= sw.wait_for_peers:
                logger.info("%d peers ready: starting round %d", ready, self.round)
                return
            if self.stop_requested():
                raise _Leave()
            now = time.monotonic()
            if now >= deadline:
                logger.warning(
                    "only %d of %d peers ready after %.0fs (--wait-for-peers-timeout): starting anyway",
                    ready,
                    sw.wait_for_peers,
                    sw.wait_for_peers_timeout,
                )
                return
            if now >= next_log:
                logger.info("waiting for peers: %d of %d ready (--wait-for-peers)", ready, sw.wait_for_peers)
                next_log = now + 10.0
            time.sleep(0.5)

    def _say_if_no_group_can_form(self) -> None:
        peers = self.view.peers()
        if self.averager.client_mode and peers and not self.view.reachable_peers():
            logger.warning(
                "every live peer of run '%s' is in --client-mode: none accepts connections, so no group "
                "can form and this peer trains alone until a peer without --client-mode joins",
                self.run.manifest.run_id,
            )

    def _keep_initial_peers(self, stop: threading.Event) -> None:
        """A background thread (a dial to a node that is down blocks; the rounds must not wait for it): every
        REPING_PERIOD, reconnect to --initial-peers that came back (a bootstrap node restarted with its identity is
        found again by the run's peers, see _reping_initial_peers)."""
        maddrs = tuple(self.cfg.swarm.initial_peers)
        while not stop.wait(REPING_PERIOD):
            try:
                back = self.view.calls.run_coroutine(partial(_reping_initial_peers, maddrs=maddrs), timeout=60.0)
            except Exception as e:  # the DHT busy or stopping: this is housekeeping, the rounds go on
                logger.debug("re-pinging initial peers failed: %r", e)
                continue
            if back:
                logger.info("reconnected to %d of --initial-peers (back after being unreachable)", back)

    def save(self) -> None:
        from photon_p2p.swarm.manifest import manifest_settings

        self.session.save(
            extra_tensors={"theta": {f"{i:05d}": t for i, t in enumerate(self.theta)}, "outer": self.outer.state},
            extra_state={
                "round": self.round,
                "manifest_hash": self.run.hash,
                "contribution": dict(self.contribution),
                "manifest_settings": manifest_settings(self.run.manifest),
                "run_owner": self.run.record.creator,  # pinned: --resume refuses a run of another owner
            },
        )

    def _evaluate(self, result: RoundResult) -> None:
        from photon_p2p.train.solo import format_eval_line

        load_theta(self.session.model, self.theta)  # evaluate the global model, not this peer's local copy
        result.val_loss, result.val_ppl = self.session.evaluate()
        logger.info(
            format_eval_line(
                self.global_step,
                self.cfg.train.max_steps,
                result.loss,
                result.val_loss,
                result.val_ppl,
                self.tokens_per_s,
            )
        )
        self.heartbeat.update(val_ppl=result.val_ppl)
        self.metrics.write(
            dict(
                kind="eval",
                step=self.global_step,
                round=result.round,
                val_loss=result.val_loss,
                val_ppl=result.val_ppl,
                tokens=self.session.progress.tokens,
            )
        )

    def _report(self, result: RoundResult) -> None:
        """Running totals for the leaderboard, and how this round went for dashboards (both signed, in the DHT)."""
        c = self.contribution
        c["tokens"] += result.tokens_in_theta
        c["rounds"] += 1
        c["rounds_averaged"] += result.outcome == "averaged"
        self.heartbeat.contribute(**c)
        self.heartbeat.update(
            last_round=LastRound(
                round=result.round,
                outcome=result.outcome,
                tokens=result.tokens_in_theta,
                train_s=_seconds(result.train_s),
                matchmaking_s=_seconds(result.matchmaking_s),
                allreduce_s=_seconds(result.allreduce_s),
                loss=_finite(result.loss),
                val_ppl=_finite(result.val_ppl),
            )
        )

    def loop(self, metrics: MetricsWriter) -> dict[str, Any]:
        """Every round until --max-steps. Ctrl-C/SIGTERM stop between rounds (or leave a round unfinished, its
        update dropped) with a checkpoint of the last round boundary; a second Ctrl-C stops at once, unsaved."""
        train, ck = self.cfg.train, self.cfg.checkpoint
        last: dict[str, Any] = {}
        stop = DeferredStop()
        self.stop_requested = lambda: stop.requested
        self.metrics = metrics
        reping_stop = threading.Event()
        # a client-mode node is in nobody's routing table: its pings would not make it known
        if self.cfg.swarm.initial_peers and not self.averager.client_mode:
            threading.Thread(
                target=self._keep_initial_peers, args=(reping_stop,), name="initial-peers", daemon=True
            ).start()
        try:
            with stop:
                self.wait_for_peers()
                self.catch_up("joining")
                self._say_if_no_group_can_form()
                while self.global_step < train.max_steps and not stop.requested:
                    check_processes(self.view.calls.dht, self.averager)
                    before = self.global_step
                    result = self.run_round()
                    step = self.global_step
                    final = step >= train.max_steps
                    if (train.eval_every and step // train.eval_every > before // train.eval_every) or final:
                        self._evaluate(result)
                    logger.info(format_round_line(result, self.tokens_per_s))
                    last = {"kind": "round", **result.record()}
                    last["tokens_per_s"] = round(self.tokens_per_s, 1)
                    metrics.write(last)
                    self._report(result)
                    if ck.dir and (step // ck.every > before // ck.every or final):
                        self.save()
        except _Leave:
            pass
        except SwarmError:
            if ck.dir and self.round > 0:
                self.save()  # the state of the last round boundary: --resume continues from it
            raise
        except KeyboardInterrupt:
            logger.warning(
                "interrupted twice inside round %d: not saved (--resume continues from the last checkpoint)", self.round
            )
            raise
        finally:
            reping_stop.set()
        if stop.requested:
            if ck.dir and self.round > 0:
                self.save()
                logger.warning("%s at round %d: checkpoint saved (continue with --resume)", stop.name, self.round)
            else:
                logger.warning("%s at round %d: stopping", stop.name, self.round)
            stop.raise_()
        return last
