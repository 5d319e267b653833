"""The global state of a run as one peer holds it, and the checks around it.

``theta`` is the list of fp32 CPU tensors of the global model, in ``model.named_parameters()`` order (tied weights
once). The local model (on any device, any autocast) is loaded from it at the start of every round, and the
pseudo-gradient ``delta = theta - local`` is computed back on the CPU in fp32: hivemind's averager must never see
bf16 (docs/design.md, "Traps we design around": bf16 + fp16 compression hangs the averager).
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from photon_p2p.swarm.records import RecordRejected, StateMeta

DELTA_NORM_MAX_RATIO = 20.0  # a delta this many times larger than recent accepted ones is treated as broken
DELTA_NORM_HISTORY = 8


@dataclass
class Carry:
    """A late round's work, held over to the next round (damped by 1 / (1 + staleness)): swarm/rounds.py."""

    delta: list[torch.Tensor]
    tokens: int
    factor: float
    from_round: int


def theta_from_model(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().to("cpu", torch.float32).clone().contiguous() for p in model.parameters()]


@torch.no_grad()
def load_theta(model: nn.Module, theta: list[torch.Tensor]) -> None:
    for p, t in zip(model.parameters(), theta, strict=True):
        p.copy_(t.to(p.device, p.dtype), non_blocking=True)


@torch.no_grad()
def compute_delta(theta: list[torch.Tensor], model: nn.Module, out: list[torch.Tensor]) -> None:
    """out = theta - local, in fp32 on the CPU."""
    for d, t, p in zip(out, theta, model.parameters(), strict=True):
        torch.sub(t, p.detach().to("cpu", torch.float32), out=d)


def theta_hash(theta: list[torch.Tensor]) -> str:
    """A short fingerprint of theta: equal on two peers iff they hold bit-identical global parameters."""
    h = hashlib.blake2b(digest_size=8)
    for t in theta:
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def global_norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


class DeltaGuard:
    """Checks a pseudo-gradient before it is offered to anyone: finite, and not absurdly large compared with the
    recent accepted ones (a diverged local run must not be averaged into everybody's model)."""

    def __init__(self, max_ratio: float = DELTA_NORM_MAX_RATIO):
        self.max_ratio = max_ratio
        self.history: deque[float] = deque(maxlen=DELTA_NORM_HISTORY)

    def check(self, delta: list[torch.Tensor]) -> tuple[bool, float, str]:
        norm = global_norm(delta)
        if not math.isfinite(norm):
            return False, norm, "the pseudo-gradient contains NaN or Inf (local training diverged)"
        if len(self.history) >= 3:
            typical = statistics.median(self.history)
            if typical > 0 and norm > self.max_ratio * typical:
                return (
                    False,
                    norm,
                    f"pseudo-gradient norm {norm:.3g} is over {self.max_ratio:.0f}x the recent median {typical:.3g}",
                )
        return True, norm, ""

    def accept(self, norm: float) -> None:
        self.history.append(norm)


def validate_downloaded_state(
    metadata: Any,
    tensors: list[torch.Tensor],
    expected: list[torch.Tensor],
    *,
    num_theta: int,
    run_id: str,
    manifest_hash: str,
) -> StateMeta:
    """A state download from another peer is untrusted: schema, run, shapes, finiteness and the theta hash."""
    try:
        meta = StateMeta.model_validate(metadata)
    except Exception:
        raise RecordRejected("state metadata does not match the schema") from None
    if meta.run_id != run_id or meta.manifest_hash != manifest_hash:
        raise RecordRejected("state belongs to another run or manifest")
    if len(tensors) != len(expected) or meta.num_tensors != len(expected):
        raise RecordRejected(f"state has {len(tensors)} tensors, expected {len(expected)}")
    for got, want in zip(tensors, expected, strict=True):
        if got.shape != want.shape or got.dtype != want.dtype:
            raise RecordRejected(f"state tensor {tuple(got.shape)}/{got.dtype} != {tuple(want.shape)}/{want.dtype}")
        if not bool(torch.isfinite(got).all()):
            raise RecordRejected("state contains NaN or Inf")
    if theta_hash(tensors[:num_theta]) != meta.theta_hash:
        raise RecordRejected("state does not match the theta hash it claims")
    return meta
