"""The all-reduce every round relies on, with real hivemind DHTs and averagers on 127.0.0.1.

Proves: the result is the token-weighted mean of the members' deltas (checked against a hand computation); every
member ends with bit-identical values with and without compression (fp16, blockwise 8-bit within their error);
the bytes counted per round shrink with compression as expected; a member that offers NaN is excluded by the
reducers and the others finish with the remaining deltas; members holding different theta merge it; a step that
hivemind cancels internally reaches the caller as an ordinary Exception (RemoteCancelled), not a BaseException;
a leader (join) and a reducer (parts) keep a stream open after their last message until the other end has closed
it.
"""

from __future__ import annotations

import asyncio
import threading

import msgpack
import pytest
import torch

from photon_p2p.peer import make_compression
from photon_p2p.swarm.averager import PHASE_STATE, PhotonAllReduceRunner, PhotonAverager, averager_settings
from photon_p2p.swarm.dht import RemoteCancelled, remote_result
from photon_p2p.swarm.records import RoundGather
from photon_p2p.swarm.snapshot import _pack

N_VALUES = 200_000  # several parts per peer at the default 512 KiB part size


def _swarm(n: int):
    import hivemind

    first = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    dhts = [first] + [
        hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=first.get_visible_maddrs())
        for _ in range(n - 1)
    ]
    return dhts


def _run(deltas, thetas, weights, compression="none", hashes=None, timeout=40.0, classes=None):
    """One all-reduce among len(deltas) averagers; returns (step results, tensors after) per member."""
    n = len(deltas)
    dhts = _swarm(n)
    comp = make_compression(compression)
    classes = classes or [PhotonAverager] * n
    avgs = [
        classes[i](
            [d.clone() for d in deltas[i]],
            [t.clone() for t in thetas[i]],
            dhts[i],
            prefix="t",
            compression=comp,
            get_state_meta=dict,
            start=True,
            **averager_settings(
                matchmaking_time=3.0, allreduce_timeout=timeout, target_group_size=n, chunk_timeout=4.0
            ),
        )
        for i in range(n)
    ]
    results: list = [None] * n

    def step(i: int) -> None:
        gather = RoundGather(
            round=0, theta_hash=(hashes or ["same"] * n)[i], tokens=int(weights[i]), steps=1
        ).model_dump()
        try:
            # as rounds.py reads it: through remote_result, which makes every failure an Exception
            results[i] = remote_result(
                avgs[i].step(gather=gather, weight=weights[i], timeout=timeout, wait=False, allow_retries=False)
            )
        except Exception as e:  # recorded for the assertions
            results[i] = e

    try:
        threads = [threading.Thread(target=step, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout + 30)
        after = []
        for avg in avgs:
            with avg.get_tensors() as tensors:
                after.append([t.clone() for t in tensors])
        return results, after
    finally:
        for avg in avgs:
            avg.shutdown()
        for dht in dhts:
            dht.shutdown()


def _data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    deltas = [[torch.randn(N_VALUES, generator=g), torch.randn(31, 7, generator=g)] for _ in range(n)]
    thetas = [[torch.zeros(N_VALUES), torch.zeros(31, 7)] for _ in range(n)]
    return deltas, thetas


def test_weighted_mean_is_exact_and_identical_without_compression():
    deltas, thetas = _data(3)
    weights = [1.0, 1.0, 2.0]
    results, after = _run(deltas, thetas, weights)
    assert all(isinstance(r, dict) for r in results), results
    for j in range(2):
        by_hand = (deltas[0][j] + deltas[1][j] + 2 * deltas[2][j]) / 4
        torch.testing.assert_close(after[0][j], by_hand, rtol=0, atol=1e-6)
        assert all(torch.equal(after[0][j], a[j]) for a in after), "members disagree bit-wise"
    assert results[0]["group"] == results[1]["group"] == results[2]["group"]
    assert not results[0]["reconciled"]


@pytest.mark.parametrize("compression, atol, bytes_per_value", [("fp16", 5e-3, 2.0), ("blockwise8bit", 8e-2, 1.0)])
def test_compressed_results_are_identical_across_members(compression, atol, bytes_per_value):
    deltas, thetas = _data(3, seed=1)
    weights = [3.0, 1.0, 1.0]
    results, after = _run(deltas, thetas, weights, compression=compression)
    assert all(isinstance(r, dict) for r in results), results
    for j in range(2):
        true_mean = (3 * deltas[0][j] + deltas[1][j] + deltas[2][j]) / 5
        assert (after[0][j] - true_mean).abs().max() < atol
        assert all(torch.equal(after[0][j], a[j]) for a in after), "members applied different values"
    # however parts are spread over reducers, every value travels to its reducer from the n-1 other members and
    # its average travels back to them: 2 (n-1) values per value in the group, compressed, plus framing
    values = N_VALUES + 31 * 7
    expected = 2 * (3 - 1) * values * bytes_per_value
    total_sent = sum(r["bytes_sent"] for r in results)
    assert expected <= total_sent < 1.02 * expected + 4096, (total_sent, expected)
    assert total_sent == sum(r["bytes_received"] for r in results)


def test_nan_delta_is_excluded_and_the_rest_still_average():
    """A diverged member (all-NaN update): the reducers ban it, so nothing of it reaches the honest members; the
    slice it was reducing itself comes back non-finite, is rejected, and means "no update" (zeros) for both."""
    deltas, thetas = _data(3, seed=2)
    for t in deltas[1]:
        t.fill_(float("nan"))
    results, after = _run(deltas, thetas, [1.0, 1.0, 1.0], timeout=30.0)
    honest = [0, 2]
    for i in honest:
        assert isinstance(results[i], dict), results[i]
    for j in range(2):
        fair = (deltas[0][j] + deltas[2][j]) / 2
        out = after[0][j]
        assert torch.equal(out, after[2][j]), "honest members disagree"
        assert torch.isfinite(out).all()
        averaged = torch.isclose(out, fair, atol=1e-6)
        assert bool((averaged | (out == 0)).all()), "something other than the honest average got through"
    assert torch.isclose(after[0][0], (deltas[0][0] + deltas[2][0]) / 2, atol=1e-6).float().mean() > 0.3


def test_members_with_different_theta_merge_it():
    deltas, _ = _data(2, seed=3)
    thetas = [[torch.full((N_VALUES,), 1.0), torch.zeros(31, 7)], [torch.full((N_VALUES,), 3.0), torch.ones(31, 7)]]
    results, after = _run(deltas, thetas, [5.0, 1.0], hashes=["aaaa", "bbbb"])
    assert all(isinstance(r, dict) and r["reconciled"] for r in results), results
    for a in after:
        assert torch.equal(a[2], torch.full((N_VALUES,), 2.0))  # theta merged with equal weights
        assert torch.equal(a[3], torch.full((31, 7), 0.5))


class _ReducerDiesInStatePhase(PhotonAllReduceRunner):
    """A reducer that fails in the theta merge before replying to anyone (the delta phase runs normally). Failing on
    the first part makes the fault certain whatever the load balancer gives it (one part or several)."""

    async def _accumulate_parts_streaming(self, stream, sender_index):
        async for message in super()._accumulate_parts_streaming(stream, sender_index):
            if self.group_id.endswith(PHASE_STATE):
                raise ConnectionError("reducer died")
            yield message


# hivemind names RPC handlers after the class: the faulty averager must be called PhotonAverager to talk to the others
_FaultyAverager = type("PhotonAverager", (PhotonAverager,), {"runner_class": _ReducerDiesInStatePhase})


def test_theta_merge_is_all_or_nothing_when_a_reducer_fails():
    """Before: the slice of a failed reducer came back as zeros and was copied into theta (a zeroed layer). Now a
    member that lost any slice of the merge, or merged without someone's part, keeps its whole theta and outer
    state, and says so (reconcile_failed); never zeros, never half a merge."""
    deltas, _ = _data(2, seed=4)
    thetas = [[torch.full((N_VALUES,), 1.0), torch.zeros(31, 7)], [torch.full((N_VALUES,), 3.0), torch.ones(31, 7)]]
    results, after = _run(
        deltas,
        [[t.clone() for t in th] for th in thetas],
        [1.0, 1.0],
        hashes=["aaaa", "bbbb"],
        classes=[PhotonAverager, _FaultyAverager],
    )
    assert all(isinstance(r, dict) for r in results), results
    assert any(r["reconcile_failed"] for r in results), "the fault did not hit the merge"
    merged = [torch.full((N_VALUES,), 2.0), torch.full((31, 7), 0.5)]
    for i, (r, a) in enumerate(zip(results, after, strict=True)):
        state = a[2:]
        kept = all(torch.equal(x, y) for x, y in zip(state, thetas[i], strict=True))
        whole = all(torch.equal(x, y) for x, y in zip(state, merged, strict=True))
        assert kept or whole, f"member {i} holds a partial merge"
        assert kept == r["reconcile_failed"], (i, r["reconcile_failed"])
        assert not r["reconciled"] or whole


class _CancelledInside(PhotonAverager):
    """hivemind cancelling a coroutine of its own mid-step, as its matchmaking did under load in CI (the group future
    it awaited was cancelled): its ``_step`` puts the ``asyncio.CancelledError`` into the step's future."""

    async def _aggregate_with_group(self, *args, **kwargs):
        raise asyncio.CancelledError()


def test_a_step_hivemind_cancels_internally_is_an_ordinary_failed_call():
    """That error reaches the peer as a BaseException, which ``except Exception`` lets through: it killed a peer
    mid-run. Read through remote_result it is a RemoteCancelled, an Exception like any other failed attempt."""
    deltas, thetas = _data(2, seed=5)
    results, after = _run(deltas, thetas, [1.0, 1.0], classes=[_CancelledInside] * 2)
    assert all(isinstance(r, RemoteCancelled) for r in results), results
    assert issubclass(RemoteCancelled, Exception)
    for a, d in zip(after, deltas, strict=True):  # nothing was averaged: each member keeps its own delta
        assert all(torch.equal(x, y) for x, y in zip(a[:2], d, strict=True))


@pytest.mark.parametrize(
    "handler", ["rpc_join_group", "rpc_aggregate_part", "rpc_photon_state_describe", "rpc_photon_state_read"]
)
def test_the_last_message_on_a_stream_is_not_followed_by_a_reset(handler):
    """When a handler returned, p2pd closed its stream, which resets it, and a reset discards what the other end's
    daemon had not yet passed on: a busy follower lost BEGIN_ALLREDUCE (its leader counted it into a group it never
    joined: CI, last rounds), and a busy sender lost a reducer's last averaged parts ("sent 10 parts, expected 11",
    a few times per suite run), which cost it that reducer's whole slice. Here a real averager answers with a
    last message (a join refused: not looking for a group; a part for a group it does not run; a snapshot's
    description; a chunk read refused) and the stream stays open after it until the caller closes it, so nothing
    sent can be reset away before the caller has read it. The senders close their end after the last part they
    expect (PhotonAllReduceRunner), and a downloader after the description or the last chunk: that ends the wait."""
    from hivemind.p2p import P2P
    from hivemind.proto import averaging_pb2

    dht = _swarm(1)[0]
    avg = PhotonAverager(
        [torch.zeros(4)],
        [torch.zeros(4)],
        dht,
        prefix="linger",
        compression=make_compression("none"),
        get_state_meta=dict,
        start=True,
        **averager_settings(matchmaking_time=3.0, allreduce_timeout=10.0, target_group_size=2, chunk_timeout=4.0),
    )

    async def ask() -> tuple[int, str]:
        p2p = await P2P.create(initial_peers=[str(a) for a in dht.get_visible_maddrs()])
        try:
            stub = PhotonAverager.get_stub(p2p, dht.peer_id, namespace="linger")
            if handler == "rpc_join_group":
                stream = await stub.rpc_join_group(averaging_pb2.JoinRequest(schema_hash=b"x", expiration=0.0))
            elif handler == "rpc_aggregate_part":
                part = averaging_pb2.AveragingData(code=averaging_pb2.PART_FOR_AVERAGING, group_id=b"no such group")
                stream = await stub.rpc_aggregate_part(_aiter(part))
            else:
                ask = {"want": b"x"} if handler == "rpc_photon_state_describe" else {"id": b"no such", "offset": 0}
                stream = await getattr(stub, handler)(averaging_pb2.DownloadData(metadata=_pack(ask)))
            first = await asyncio.wait_for(stream.__anext__(), timeout=10)
            try:
                await asyncio.wait_for(stream.__anext__(), timeout=2.0)
                after = "another message"
            except StopAsyncIteration:
                after = "closed"
            except TimeoutError:
                after = "open"
            await stream.aclose()
            if isinstance(first, averaging_pb2.DownloadData):  # a snapshot's description, or {"error": why}
                reply = msgpack.unpackb(first.metadata)
                return reply.get("error", "described" if "size" in reply else repr(reply)), after
            return averaging_pb2.MessageCode.Name(first.code), after
        finally:
            await p2p.shutdown()

    try:
        code, after = asyncio.run(ask())
    finally:
        avg.shutdown()
        dht.shutdown()
    expected = {
        "rpc_join_group": "NOT_LOOKING_FOR_GROUP",
        "rpc_aggregate_part": "BAD_GROUP_ID",
        "rpc_photon_state_describe": "described",
        "rpc_photon_state_read": "snapshot expired from the donor's cache",
    }[handler]
    assert code == expected, code
    assert after == "open", after  # 2 s after its last message the averager had not closed the stream


async def _aiter(*items):
    for item in items:
        yield item
