"""Butterfly All-Reduce of pseudo-gradients, on hivemind's DecentralizedAverager, with three changes we rely on.

1. **Identical results for every member, even compressed.** Stock hivemind sends each sender
   ``compress(average - its own part)``, so with fp16/8-bit every member ends with a *different* approximation of
   the average. Here each reducer encodes its averaged part **once** and sends the same bytes to every member
   (and applies the decoded bytes to its own copy), so the whole group applies bit-identical values.
2. **Failures are the same for everybody.** Output tensors hold the average itself (not a delta added to local
   values), and a slice of the *delta* whose reducer failed becomes zeros, i.e. "no update there" for everyone who
   saw the failure, instead of each member silently keeping its own values. Merging *theta* (below) is all or
   nothing: a member that lost any slice of it keeps its own theta and outer state whole (a zero slice would be a
   zeroed layer, not a missing update).
3. **Untrusted inputs.** A reducer refuses parts that are non-finite, have the wrong shape, or come with a weight
   that is not a positive finite number at most the manifest's bound (``max_weight``): the sender is banned from
   this all-reduce, the rest finish without it. Claimed bandwidths are sanitised and no reducer gets more than
   SHARE_FACTOR x its fair share of the vector; with ``robust_clip`` the reducers clip and filter parts
   (swarm/robust.py), and report who they clipped.

On top, each round's all-gather carries a ``RoundGather`` (round, theta hash, tokens). If the members' theta
hashes differ (the swarm split into groups earlier, or matchmaking failed under load), the same group then also
averages theta and the outer optimizer state, so it leaves the round holding one theta again. Bytes sent and
received are counted after compression and returned with the step's result.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import typing
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.allreduce import AllreduceException, AllReduceRunner, AveragingMode
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.load_balancing import load_balance_peers
from hivemind.averaging.matchmaking import MatchmakingException
from hivemind.averaging.partition import BannedException
from hivemind.compression import CompressionBase, NoCompression, deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import aiter_with_timeout, amap_in_executor, attach_event_on_finished, enter_asynchronously

from photon_p2p.swarm import faults
from photon_p2p.swarm.access import AccessControlMixin
from photon_p2p.swarm.dht import read_control_pipe_blocking
from photon_p2p.swarm.records import RoundGather
from photon_p2p.swarm.robust import RobustPartReducer, bounded_fractions, sane_bandwidth
from photon_p2p.swarm.transfer import LINGER_S, StateTransferMixin

logger = logging.getLogger(__name__)

MAX_WEIGHT = 1e15  # tokens per round when the caller gives no bound (peers pass the manifest's: swarm/robust.py)
PHASE_DELTA, PHASE_STATE = b".delta", b".state"


class TrafficCounter:
    """Bytes on the wire (after compression) and values whose reducer failed, for one averaging step."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.lost_values = 0
        self.total_values = 0
        self.offenders: dict[str, list[int]] = {}  # sender -> [parts clipped, parts dropped] by this member


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN/Inf. A finite sum proves it in one cheap pass (NaN and Inf propagate into the sum); only a sum that
    overflowed or is not finite pays for the element-wise check."""
    return math.isfinite(float(tensor.sum(dtype=torch.float64))) or bool(torch.isfinite(tensor).all())


class PhotonAllReduceRunner(AllReduceRunner):
    """AllReduceRunner whose outputs are the (identically encoded) averages; see the module docstring."""

    def __init__(
        self,
        *,
        traffic: TrafficCounter,
        fault_round: int | None = None,
        max_weight: float = MAX_WEIGHT,
        robust_clip: float | None = None,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.traffic, self.fault_round, self.max_weight = traffic, fault_round, max_weight
        if robust_clip is not None:
            self.tensor_part_reducer.finished.set()  # unused: its finalize would warn that it received nothing
            self.tensor_part_reducer = RobustPartReducer(
                tuple(p.shape for p in self.parts_for_local_averaging), len(self.sender_peer_ids), clip=robust_clip
            )
        self._reply_type = self.tensor_part_container.compression.compression_type
        self._encoded: dict[int, asyncio.Future] = {}
        self._own_part_shapes = tuple(p.shape for p in self.parts_for_local_averaging)
        # shapes of what each reducer must send back (read now: the container frees its parts when finished)
        self._shapes_by_peer = [
            [part.shape for part, _info in parts] for parts in self.tensor_part_container._input_parts_by_peer
        ]

    async def _encode_average(self, part_index: int, averaged_part: torch.Tensor):
        """Encode each averaged part once; every member gets the same bytes. Older parts are evicted: by the time
        part p+2 is averaged, every sender has already fetched part p (the reducer moves in lockstep)."""
        future = self._encoded.get(part_index)
        if future is None:
            loop = asyncio.get_event_loop()
            future = self._encoded[part_index] = asyncio.ensure_future(
                loop.run_in_executor(None, lambda: serialize_torch_tensor(averaged_part, self._reply_type))
            )
            self._encoded.pop(part_index - 2, None)
        return await future

    async def _ban_sender(self, peer_id: PeerID):
        index = self.sender_peer_ids.index(peer_id)
        if self.tensor_part_reducer.num_parts_received[index] >= self.tensor_part_reducer.num_parts:
            # every part arrived: the sender closed its stream after our last averaged part, as it should, and the
            # close reached us as a reset (hivemind bans on any end of the stream that is not its end marker)
            return
        if peer_id not in self.banned_senders:
            logger.warning(
                "all-reduce: excluding %s's update from this round (it stopped sending or sent invalid data)", peer_id
            )
        await super()._ban_sender(peer_id)

    def _check_input(self, part_index: int, tensor: torch.Tensor, weight: float) -> None:
        if part_index >= len(self._own_part_shapes) or tensor.shape != self._own_part_shapes[part_index]:
            raise AllreduceException(f"part {part_index} has shape {tuple(tensor.shape)}, expected another")
        if not (math.isfinite(weight) and 0 < weight <= self.max_weight):
            raise AllreduceException(f"invalid averaging weight {weight!r} (bound {self.max_weight:g})")
        if not all_finite(tensor):
            raise AllreduceException(f"part {part_index} contains NaN or Inf")

    async def _accumulate_parts_streaming(self, stream: AsyncIterator[averaging_pb2.AveragingData], sender_index: int):
        part_index = 0
        try:
            async for tensor_part, weight, nbytes in amap_in_executor(
                lambda msg: (deserialize_torch_tensor(msg.tensor_part), msg.weight, msg.tensor_part.ByteSize()),
                stream,
                max_prefetch=self.tensor_part_container.prefetch,
            ):
                self.traffic.received += nbytes
                self._check_input(part_index, tensor_part, weight)
                try:
                    averaged_part = await self.tensor_part_reducer.accumulate_part(
                        sender_index, part_index, tensor_part, weight=weight
                    )
                except BannedException:
                    logger.debug("sender %d is already banned", sender_index)
                    break
                encoded = await self._encode_average(part_index, averaged_part)
                part_index += 1
                self.traffic.sent += encoded.ByteSize()
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=encoded)
        finally:
            if part_index != self.tensor_part_reducer.num_parts:
                await self._ban_sender(self.sender_peer_ids[sender_index])

    async def _generate_input_for_peer(self, peer_index: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        async for message in super()._generate_input_for_peer(peer_index):
            self.traffic.sent += message.tensor_part.ByteSize()
            yield message
            if self.fault_round is not None:
                faults.in_allreduce(self.fault_round)

    async def _communicate_with_peer(self, peer_id: PeerID):
        peer_index = self.ordered_peer_ids.index(peer_id)
        if peer_id == self.peer_id:
            sender_index = self.sender_peer_ids.index(peer_id)
            for part_index, tensor_part in enumerate(self.parts_for_local_averaging):
                averaged_part = await self.tensor_part_reducer.accumulate_part(
                    sender_index, part_index, tensor_part, weight=self.weight
                )
                encoded = await self._encode_average(part_index, averaged_part)
                self.tensor_part_container.register_processed_part(
                    peer_index, part_index, deserialize_torch_tensor(encoded)
                )
            return
        expected = self._shapes_by_peer[peer_index]
        try:
            done_sending = asyncio.Event()
            inputs_aiter = attach_event_on_finished(self._generate_input_for_peer(peer_index), done_sending)
            stream = await self._get_peer_stub(peer_id).rpc_aggregate_part(inputs_aiter)
            if self.should_delay_results(self.peer_id):
                await done_sending.wait()
            part_index = 0

            def _decode(msg: averaging_pb2.AveragingData) -> tuple[torch.Tensor, int]:
                if msg.code != averaging_pb2.AVERAGED_PART:
                    raise AllreduceException(f"{peer_id} sent {averaging_pb2.MessageCode.Name(msg.code)}")
                return deserialize_torch_tensor(msg.tensor_part), msg.tensor_part.ByteSize()

            num_parts = self.tensor_part_container.num_parts_by_peer[peer_index]
            parts = amap_in_executor(
                _decode,
                aiter_with_timeout(stream, self.reducer_timeout),
                max_prefetch=self.tensor_part_container.prefetch,
            )
            async with contextlib.aclosing(parts):
                async for averaged, nbytes in parts:
                    self.traffic.received += nbytes
                    if (
                        part_index >= len(expected)
                        or averaged.shape != expected[part_index]
                        or not all_finite(averaged)
                    ):
                        raise AllreduceException(f"{peer_id} returned a malformed average for part {part_index}")
                    self.tensor_part_container.register_processed_part(peer_index, part_index, averaged)
                    part_index += 1
                    if part_index == num_parts:
                        # we close the stream, not the reducer: a close resets it, and a reset discards what the
                        # other end's daemon has not passed on yet (PhotonAverager.rpc_aggregate_part waits for us)
                        break
            await stream.aclose()
            if part_index != num_parts:
                raise AllreduceException(f"peer {peer_id} sent {part_index} parts, expected {num_parts}")
        except BaseException as e:
            if isinstance(e, Exception):
                logger.warning(
                    "all-reduce: lost the part of the update reduced by %s (%r); it counts as no update for this round",
                    peer_id,
                    e,
                )
            self.tensor_part_container.register_failed_reducer(peer_index)
            raise


def averager_settings(
    *,
    matchmaking_time: float,
    allreduce_timeout: float,
    target_group_size: int | None = None,
    min_group_size: int = 2,
    client_mode: bool = False,
    chunk_timeout: float | None = None,
) -> dict[str, Any]:
    """The one place where our round settings become hivemind averager arguments (peer, benchmarks, tests).

    Chunk timeouts follow the all-reduce timeout unless given: a part of 512 KiB that takes longer than a quarter
    of it (at least 2 s, at most 30 s) comes from a peer that has stalled, and the others ban it and finish without
    it."""
    if chunk_timeout is None:
        chunk_timeout = max(2.0, min(30.0, allreduce_timeout / 4))
    return dict(
        min_matchmaking_time=matchmaking_time,
        request_timeout=min(3.0, matchmaking_time / 3),
        target_group_size=target_group_size,
        min_group_size=max(2, min_group_size),
        allreduce_timeout=allreduce_timeout,
        next_chunk_timeout=chunk_timeout,
        sender_timeout=chunk_timeout,
        reducer_timeout=2 * chunk_timeout,
        client_mode=client_mode,
    )


class PhotonAverager(AccessControlMixin, StateTransferMixin, DecentralizedAverager):
    """Averages ``delta`` tensors each round; holds ``state`` tensors (theta + outer state) for reconciliation and
    for joining peers to download.

    :param delta: fp32 CPU buffers the round engine fills with theta - local before each step
    :param state: fp32 CPU tensors: theta followed by the outer optimizer's buffers (shared memory after init)
    :param get_state_meta: called in the host process when a peer downloads our state; returns the metadata dict
    :param max_weight: the heaviest weight a sender may declare (``robust.max_round_weight`` of the manifest)
    :param robust_clip: clip each part to this x the median norm across senders and drop parts pointing away from
        the others (swarm/robust.py); None averages as hivemind does
    """

    def __init__(
        self,
        delta: Sequence[torch.Tensor],
        state: Sequence[torch.Tensor],
        dht: Any,
        *,
        prefix: str,
        compression: CompressionBase,
        get_state_meta: Callable[[], dict[str, Any]],
        max_weight: float = MAX_WEIGHT,
        robust_clip: float | None = None,
        **kwargs: Any,
    ):
        # read in the averager process (set before hivemind forks it): the reducers' bounds come from the manifest
        self.max_weight, self.robust_clip = float(max_weight), robust_clip
        self.num_delta = len(delta)
        self._get_state_meta = get_state_meta
        self._compression_for_delta = compression
        super().__init__(
            averaged_tensors=list(delta) + list(state), dht=dht, prefix=prefix, compression=compression, **kwargs
        )

    def run_in_background(self, await_ready: bool = True, timeout: float | None = None) -> None:
        """Start the averager process without leaving Ctrl-C ignored here.

        hivemind sets SIGINT to SIG_IGN in the *calling* process so the child ignores it, and never restores it: a
        peer would then ignore Ctrl-C for the rest of its life. The child keeps ignoring it (the parent shuts it
        down); the caller gets its handler back."""
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return super().run_in_background(await_ready=await_ready, timeout=timeout)
        previous = signal.getsignal(signal.SIGINT)
        try:
            super().run_in_background(await_ready=False)
        finally:
            signal.signal(signal.SIGINT, previous)
        if await_ready:
            self.wait_until_ready(timeout)

    async def _shutdown(self, timeout: float | None) -> None:
        """hivemind's shutdown, tolerant of a p2p daemon that is already gone.

        Ctrl-C in a terminal signals the whole foreground process group, and ``p2pd`` handles SIGINT by exiting (it
        does not keep the SIG_IGN it inherits). Removing our handlers from a dead daemon then fails, and hivemind
        would print that failure as a thread traceback and skip cancelling the running groups."""
        if not self.client_mode:
            try:
                await self.remove_p2p_handlers(self._p2p, namespace=self.prefix)
            except Exception as e:
                logger.debug("averager shutdown: p2p daemon already gone (%r)", e)
        # the values are futures of runners, and AllReduceRunner.finalize returns None: hivemind's own loop here
        # (group.finalize on the future, gathered) would raise whenever a group is still running
        for future in list(self._running_groups.values()):
            if future.done() and not future.cancelled() and future.exception() is None:
                future.result().finalize(cancel=True)
            else:
                future.cancel()

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> typing.AsyncIterator[averaging_pb2.MessageFromLeader]:  # typing's: hivemind reads its rpc_* hints by name
        """hivemind's join handler, but the leader leaves the stream open after its last message (BEGIN_ALLREDUCE,
        or a refusal) until the follower has read it and closed its end.

        Why: when a handler returns, p2pd closes the libp2p stream, and closing it for reading makes it reset the
        stream. A yamux reset discards whatever the follower's daemon has received but not yet passed on, so a
        follower on a busy machine can lose BEGIN_ALLREDUCE sent a moment before: its step finds no group, while
        the leader has counted it in and the others lose its slice of the all-reduce (seen in CI and reproduced
        under load, always in a run's last round, when peers that finish first load the machine with their final
        evaluation). A follower reads one message after ACCEPTED and then closes its end, so this never waits on
        a live follower; the wait ends when the handler is cancelled on that close, or after LINGER_S."""
        async for message in super().rpc_join_group(request, context):
            yield message
        await asyncio.sleep(LINGER_S)

    async def rpc_aggregate_part(
        self, stream: typing.AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> typing.AsyncIterator[averaging_pb2.AveragingData]:
        """hivemind's reducer handler, but the stream stays open after the last averaged part until the sender has
        read it and closed its end (PhotonAllReduceRunner._communicate_with_peer does, after its last part). The
        reset that followed the handler's return could discard the last part at a busy sender: it then lost that
        reducer's whole slice ("sent 10 parts, expected 11": a few times per suite run under load)."""
        async for message in super().rpc_aggregate_part(stream, context):
            yield message
        await asyncio.sleep(LINGER_S)

    # ---- group registration: two all-reduce phases share one matchmaking
    def _register_allreduce_group(self, group_info: GroupInfo):
        @contextlib.contextmanager
        def registered():
            ids = [group_info.group_id + PHASE_DELTA, group_info.group_id + PHASE_STATE]
            try:
                for gid in ids:
                    self._running_groups[gid] = asyncio.Future()
                self._pending_groups_registered.set()
                yield
            finally:
                for gid in ids:
                    self._running_groups.pop(gid, None)
                self._pending_groups_registered.set()

        return registered()

    async def _aggregate_with_group(self, group_info: GroupInfo, min_vector_size: int, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            bandwidths, mode_ids, user_bytes = zip(*map(self.serializer.loads, group_info.gathered), strict=True)
            gathered = {}
            for peer_id, raw in zip(group_info.peer_ids, user_bytes, strict=True):
                # untrusted: a groupmate's gather must match the schema, else nobody can trust this group
                gathered[peer_id.to_base58()] = RoundGather.model_validate(self.serializer.loads(raw)).model_dump()
            rounds = {g["round"] for g in gathered.values()}
            if len(rounds) != 1:
                raise AllreduceException(f"group members are at different rounds {sorted(rounds)}")
            modes = tuple(map(AveragingMode, mode_ids))
            # untrusted claims: garbage reads as "the group's mean", and nobody reduces more than a bounded share
            download_bandwidths = [
                sane_bandwidth(b) if m != AveragingMode.CLIENT else 0.0 for b, m in zip(bandwidths, modes, strict=True)
            ]
            fractions = bounded_fractions(
                await asyncio.get_event_loop().run_in_executor(
                    None, load_balance_peers, self.total_size, download_bandwidths, min_vector_size
                ),
                [b != 0.0 for b in download_bandwidths],
            )
            reconcile = len({g["theta_hash"] for g in gathered.values()}) > 1
            traffic = TrafficCounter()
            reconcile_failed = False
            async with enter_asynchronously(self.get_tensors()) as tensors:
                await self._run_photon_allreduce(
                    tensors[: self.num_delta], group_info, PHASE_DELTA, fractions, traffic, kwargs
                )
                if reconcile:
                    # exact (uncompressed) and unweighted: every member's theta is an equally valid candidate
                    state_kwargs = dict(kwargs, compression=NoCompression(), weight=1.0)
                    reconcile_failed = not await self._run_photon_allreduce(
                        tensors[self.num_delta :],
                        group_info,
                        PHASE_STATE,
                        fractions,
                        traffic,
                        state_kwargs,
                        all_or_nothing=True,
                    )
            return dict(
                gathered=gathered,
                reconciled=reconcile and not reconcile_failed,
                reconcile_failed=reconcile_failed,
                allreduce_s=time.perf_counter() - started,
                bytes_sent=traffic.sent,
                bytes_received=traffic.received,
                group=[p.to_base58() for p in group_info.peer_ids],
                lost_fraction=traffic.lost_values / max(1, traffic.total_values),
                offenders=traffic.offenders,
                shares=[f / max(1, self.total_size) for f in fractions],  # of the vector each member reduced
            )
        except BaseException as e:
            if isinstance(e, Exception):
                logger.debug("all-reduce failed: %r", e, exc_info=True)
            raise MatchmakingException(f"Unable to run All-Reduce: {e!r}") from None

    runner_class = PhotonAllReduceRunner  # tests substitute a faulty runner here

    async def _run_photon_allreduce(
        self,
        tensors: Sequence[torch.Tensor],
        group_info: GroupInfo,
        phase: bytes,
        fractions: Any,
        traffic: TrafficCounter,
        kwargs: dict[str, Any],
        *,
        all_or_nothing: bool = False,
    ) -> bool:
        """Run one phase; write the averages into ``tensors``. With ``all_or_nothing`` the results are written only
        if every slice arrived (returns False and leaves ``tensors`` untouched otherwise)."""
        group_id = group_info.group_id + phase
        runner = self.runner_class(
            traffic=traffic,
            fault_round=getattr(self, "_round", None) if phase == PHASE_DELTA else None,
            max_weight=self.max_weight if phase == PHASE_DELTA else 1.0,
            robust_clip=self.robust_clip,
            p2p=self._p2p,
            servicer_type=type(self),
            prefix=self.prefix,
            tensors=tensors,
            group_id=group_id,
            ordered_peer_ids=group_info.peer_ids,
            peer_fractions=fractions,
            **kwargs,
        )
        self._running_groups[group_id].set_result(runner)
        if runner.modes[group_info.peer_ids.index(self.peer_id)] == AveragingMode.AUX:
            async for _ in runner:
                raise ValueError("auxiliary peers should not receive averaged tensors")
            return True
        results: list[torch.Tensor] = []
        index = 0
        try:
            async for averaged in runner:
                if all_or_nothing:
                    results.append(averaged.clone())
                else:
                    tensors[index].copy_(averaged)  # the average itself (zeros where a reducer failed)
                index += 1
        except Exception as e:
            if not all_or_nothing:
                raise
            logger.debug("all-or-nothing phase failed: %r", e)
            return False
        self._note_offenders(runner, phase, traffic)
        failed = runner.tensor_part_container.failed_size
        traffic.lost_values += failed
        traffic.total_values += runner.tensor_part_container.total_size
        if all_or_nothing:
            # a banned sender means some slices averaged without its part: a merge of fewer members than the
            # others may have used, so not the same theta as theirs
            if failed or runner.banned_senders or len(results) != len(tensors):
                return False
            for dst, src in zip(tensors, results, strict=True):
                dst.copy_(src)
        return True

    @staticmethod
    def _note_offenders(runner: PhotonAllReduceRunner, phase: bytes, traffic: TrafficCounter) -> None:
        """Log, once per sender and phase, whose parts our reducer clipped or dropped, and count them."""
        reducer = runner.tensor_part_reducer
        for index, (clipped, dropped) in enumerate(getattr(reducer, "offences", ())):
            if clipped or dropped:
                peer = runner.sender_peer_ids[index].to_base58()
                logger.warning(
                    "robust aggregation: %s's %s parts: %d clipped (norm over %g x the median), %d dropped (pointing "
                    "away from the others), of %d",
                    peer,
                    phase.decode().lstrip("."),
                    clipped,
                    reducer.clip,
                    dropped,
                    reducer.num_parts,
                )
                counts = traffic.offenders.setdefault(peer, [0, 0])
                counts[0] += clipped
                counts[1] += dropped

    # ---- state sharing for joining peers
    def get_current_state(self):
        """Runs in our (host) process when another peer downloads state: a consistent snapshot under the lock."""
        with self.get_tensors() as tensors:
            meta = self._get_state_meta()
            return meta, [t.detach().clone() for t in tensors[self.num_delta :]], None

    # ---- per-round matchmaking settings, applied inside the averager process
    def run(self) -> None:
        # the averager process reads its control pipe like the DHT's: blocking, or a large message kills it
        # (swarm/dht.py, _BlockingReads)
        read_control_pipe_blocking(self)
        super().run()

    def set_round(self, round_: int, target_group_size: int | None) -> None:
        """Key matchmaking by round (peers at different rounds never group) and size the group to the peers we
        expect, so a full group starts at once instead of waiting out the matchmaking time."""
        from hivemind.utils import MPFuture

        future = MPFuture()
        self._outer_pipe.send(
            ("_set_round", [], dict(bits=format(round_, "b"), target=target_group_size, future=future))
        )
        future.result(timeout=30)

    async def _set_round(self, bits: str, target: int | None, future: Any) -> None:
        try:
            # hivemind rewrites the bits once a group is assembled, so remember the round separately
            self._round = int(bits, 2)
            self._matchmaking.group_key_manager.group_bits = bits
            self._matchmaking.target_group_size = target
            future.set_result(None)
        except Exception as e:
            future.set_exception(e)
