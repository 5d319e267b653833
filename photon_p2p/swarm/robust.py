"""Bounded influence and robust aggregation: what one hostile group member can do to a round, and the limits on it.

**Weights.** A member's averaging weight is its tokens this round, which nobody else can check. The manifest bounds
it (``max_round_weight``): the round engine clamps its own weight to the bound, and a reducer refuses a sender whose
weight is heavier (the sender is banned from that all-reduce; the others finish without it).

**Load balance.** hivemind splits the vector between reducers by the bandwidth each member *claims* in the
all-gather, through a min-max LP: one member claiming a huge bandwidth (or even twice the others') gets most of the
vector to reduce. ``bounded_fractions`` caps every reducer's share at ``SHARE_FACTOR`` x its fair share (1 / the
number of reducers). It reads only the gathered data, so every member computes the same split.

**Robust aggregation** (``RobustPartReducer``, on with ``--robust-aggregation``): hivemind's reducer adds parts up as
they stream in; this one holds every sender's part ``p`` (parts x senders x 512 KiB of memory) and then

1. clips each part to ``k`` x the median norm of that part across senders: a 1e6x-scaled update weighs at most
   ``k`` honest ones;
2. with at least 3 senders, drops a part that points away from the others (negative cosine with the
   coordinate-wise median of the clipped parts): a sign-flipped update has an honest norm, so clipping alone would
   let it cancel a share of the honest ones; a random one has a cosine near 0 and, clipped, adds bounded noise;
3. averages what is left, weighted by tokens.

The median needs an honest majority of the senders of that part; with 2 senders only clipping applies. Each part is
combined by one reducer and sent as the same bytes to every member, so every member still applies identical values.

**What a member cannot check.** A reducer may return any finite slice of the right shape: a member sees only its own
part, so it cannot tell a hostile average from an honest one, and a check that depends on what only this member knows
would make members apply different values (breaking the identical-bytes property). What bounds a hostile reducer is
its share of the vector (``bounded_fractions``: at most SHARE_FACTOR / n of it per round) and the next rounds, where
honest reducers clip any member whose delta drifted; detecting it would need redundancy (two reducers per slice,
members compare the bytes) at twice the traffic. See docs/design.md.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from hivemind.averaging.partition import AllreduceException, BannedException, TensorPartReducer

if TYPE_CHECKING:
    from photon_p2p.config import RunConfig

logger = logging.getLogger(__name__)

SHARE_FACTOR = 2.0  # no reducer averages more than this many times its fair share of the vector
MAX_SHARE_STEPS = 4  # a peer's weight counts at most this many rounds' worth of --local-steps (see max_round_weight)
CARRY_ALLOWANCE = 0.5  # late work carried over enters with c = 1 / (1 + staleness) <= 1/2 of one round's tokens


def max_round_weight(
    *, batch_size: int, seq_len: int, local_steps: int, round_seconds: float | None, max_steps: int
) -> float:
    """The heaviest weight (tokens) a member may declare in one round, from the manifest alone.

    What the round engine (swarm/rounds.py) really lets a peer train in a round:

    - with --local-steps, a round closes when the peers training it have *together* trained local_steps x batch x
      seq_len tokens per peer. A fast peer among slow ones may so train up to (1 + n) x local_steps steps, n being
      the peers it sees at its round (not bounded by the manifest). We count at most ``MAX_SHARE_STEPS`` rounds'
      worth: a peer that trained more is weighted as if it trained that much (rounds.py clamps its own weight), so
      no single peer outweighs MAX_SHARE_STEPS honest average ones;
    - with --round-seconds the steps are bounded only by time and the run's --max-steps (the round stops there), so
      the bound is max_steps steps: weak, documented;
    - a late peer adds its carried-over work, c x carried tokens with c = 1 / (1 + staleness) <= 1/2; carried tokens
      are one round's worth (the engine's clamp covers chains of late rounds): a factor ``1 + CARRY_ALLOWANCE``.
    """
    steps = max_steps if round_seconds else MAX_SHARE_STEPS * local_steps
    return float(batch_size * seq_len * steps) * (1.0 + CARRY_ALLOWANCE)


def round_weight_bound(cfg: RunConfig, seq_len: int) -> float:
    """The manifest's bound on one member's weight in a round (max_round_weight from the run's settings)."""
    return max_round_weight(
        batch_size=cfg.train.batch_size,
        seq_len=seq_len,
        local_steps=cfg.round.local_steps,
        round_seconds=cfg.round.round_seconds,
        max_steps=cfg.train.max_steps,
    )


def sane_bandwidth(value: object) -> float | None:
    """A groupmate's claimed bandwidth as load_balance_peers expects it: a finite float >= 0, or None ("the group's
    mean"). Garbage (wrong type, NaN, negative) reads as None rather than failing the whole group's all-reduce."""
    if type(value) in (int, float) and math.isfinite(value) and value >= 0:
        return float(value)
    return None


def bounded_fractions(
    sizes: Sequence[int], can_reduce: Sequence[bool], factor: float = SHARE_FACTOR
) -> tuple[int, ...]:
    """Cap each reducer's share of the vector at ``factor`` x fair share; the excess goes to the others evenly.

    ``sizes``: elements per member as load_balance_peers returned them (it may give an honest member 0);
    ``can_reduce``: members that offered to reduce (not clients, no bandwidth 0). Deterministic: every member
    computes the same split from the same gather."""
    total = sum(sizes)
    reducers = [i for i, ok in enumerate(can_reduce) if ok]
    if total == 0 or len(reducers) <= 1:
        return tuple(sizes)
    cap = max(1, math.ceil(factor * total / len(reducers)))
    out = [min(s, cap) if can_reduce[i] else s for i, s in enumerate(sizes)]
    excess = total - sum(out)
    while excess > 0:
        room = [i for i in reducers if out[i] < cap]
        if not room:  # cannot happen while factor >= 1, but never loop forever on a bad factor
            out[reducers[0]] += excess
            break
        share, extra = divmod(excess, len(room))
        for j, i in enumerate(room):
            add = min(cap - out[i], share + (1 if j < extra else 0))
            out[i] += add
            excess -= add
    return tuple(out)


@dataclass
class Combined:
    average: torch.Tensor
    clipped: list[int]  # indices (in the given order) whose part was scaled down
    dropped: list[int]  # indices whose part pointed away from the others and was left out


def robust_combine(parts: Sequence[torch.Tensor], weights: Sequence[float], clip: float) -> Combined:
    """Clip to ``clip`` x the median norm, drop parts pointing away from the coordinate-wise median (>= 3 parts),
    then the weighted mean of the rest (see the module docstring)."""
    stacked = torch.stack([p.reshape(-1).float() for p in parts])
    w = torch.tensor(list(weights), dtype=torch.float64)
    norms = stacked.double().norm(dim=1)
    ordered_norms = norms.sort().values
    if len(parts) == 2:  # the median of two is their mean, which a 1e6x sender controls: trust the smaller one
        median_norm = float(ordered_norms[0])
    elif len(parts) % 2:
        median_norm = float(ordered_norms[len(parts) // 2])
    else:
        median_norm = float(ordered_norms[len(parts) // 2 - 1 : len(parts) // 2 + 1].mean())
    bound = clip * median_norm
    scale = torch.where(norms > bound, bound / norms.clamp_min(1e-30), torch.ones_like(norms))
    clipped = [i for i in range(len(parts)) if norms[i] > bound]
    stacked = stacked * scale.float().unsqueeze(1)
    keep = torch.ones(len(parts), dtype=torch.bool)
    if len(parts) >= 3:
        ordered = stacked.sort(dim=0).values
        mid = len(parts) // 2
        median = ordered[mid] if len(parts) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
        dots = (stacked.double() @ median.double()).flatten()
        keep = dots >= 0  # cos < 0 <=> dot < 0; a zero median (or zero part) keeps everyone
    if not keep.any():  # pathological geometry: nobody agrees with the median; clipping still bounds everyone
        keep[:] = True
    dropped = [i for i in range(len(parts)) if not keep[i]]
    kw = (w * keep.double()).float()
    average = (stacked * kw.unsqueeze(1)).sum(dim=0) / kw.sum()
    return Combined(average.reshape(parts[0].shape), clipped, dropped)


class RobustPartReducer(TensorPartReducer):
    """TensorPartReducer that holds every sender's part before combining it with ``robust_combine``.

    ``offences[sender_index]`` counts [clipped, dropped] parts for the runner to log and report."""

    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, *, clip: float):
        self.clip = clip
        self.offences = [[0, 0] for _ in range(num_senders)]
        self._held: list[tuple[int, torch.Tensor, float]] = []
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self):
        self._held = []
        super().reset_accumulators()

    async def accumulate_part(
        self, sender_index: int, part_index: int, tensor_part: torch.Tensor, weight: float = 1.0
    ) -> torch.Tensor:
        """hivemind's accumulate_part, keeping the part aside instead of adding it into a running sum."""
        if not (0 <= sender_index < self.num_senders and 0 <= part_index < self.num_parts):
            raise AllreduceException(f"invalid sender {sender_index} or part {part_index}")
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:  # wait for the previous parts to be combined
            finished = asyncio.ensure_future(self.finished.wait())
            try:
                await asyncio.wait({self.current_part_future, finished}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                finished.cancel()
            if self.finished.is_set():
                raise AllreduceException(f"attempted to aggregate part in a finalized {type(self).__name__}")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self._held.append((sender_index, tensor_part, weight))
            self.current_part_accumulated_from += 1
            self.denominator += weight
            self.check_current_part_finished()
        return await future

    def check_current_part_finished(self):
        assert self.current_part_accumulated_from <= self.num_current_senders
        if self.current_part_accumulated_from == self.num_current_senders:
            if self._held:
                result = robust_combine([p for _, p, _ in self._held], [w for _, _, w in self._held], self.clip)
                for i in result.clipped:
                    self.offences[self._held[i][0]][0] += 1
                for i in result.dropped:
                    self.offences[self._held[i][0]][1] += 1
                average = result.average
            else:  # every sender of this part was banned: hivemind's accumulator of zeros over zero weight
                average = self.accumulator
            self.current_part_future.set_result(average)
            self.reset_accumulators()
