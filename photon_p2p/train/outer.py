"""Outer optimizers: turn the averaged pseudo-gradient ``delta = theta - local`` into the next global ``theta``.

- ``fedavg``: theta -= lr * delta. With lr 1 this is plain parameter averaging (Photon's recommended recipe).
- ``nesterov``: SGD with Nesterov momentum, exactly torch.optim.SGD(nesterov=True, dampening=0) semantics
  (DiLoCo: lr 0.7, momentum 0.9).
- ``fedadam``: Adam on the pseudo-gradient (Reddi et al. 2021, "Adaptive Federated Optimization"),
  beta1 = momentum, beta2 = 0.99, eps 1e-8, bias-corrected, with torch.optim.Adam's exact arithmetic.

The state buffers are allocated up front (zeros) instead of lazily, because they live in the averager's shared
memory: a joining peer downloads them with theta, and a group whose members disagree averages them. A zero
momentum buffer gives bit-for-bit the same first step as torch's lazy ``buf = grad.clone()``.
"""

from __future__ import annotations

import math

import torch

FEDADAM_BETA2 = 0.99
FEDADAM_EPS = 1e-8


class OuterOptimizer:
    """Base: updates ``theta`` in place from an averaged delta; ``state`` holds named fp32 CPU buffers."""

    name = "base"

    def __init__(self, theta: list[torch.Tensor], *, lr: float, momentum: float):
        self.theta, self.lr, self.momentum = theta, lr, momentum
        self.state: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def step(self, delta: list[torch.Tensor]) -> float:
        """Apply one outer step. Returns the L2 norm of the change to theta (logged per round)."""
        before = [t.clone() for t in self.theta]
        self._step(delta)
        return math.sqrt(sum(float((t - b).double().pow(2).sum()) for t, b in zip(self.theta, before, strict=True)))

    def _step(self, delta: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def state_tensors(self) -> list[torch.Tensor]:
        """Buffers in a fixed order (what the averager shares and what a joining peer downloads)."""
        return [self.state[k] for k in sorted(self.state)]


class FedAvg(OuterOptimizer):
    name = "fedavg"

    def _step(self, delta: list[torch.Tensor]) -> None:
        for t, d in zip(self.theta, delta, strict=True):
            t.sub_(d, alpha=self.lr)


class Nesterov(OuterOptimizer):
    name = "nesterov"

    def __init__(self, theta: list[torch.Tensor], *, lr: float, momentum: float):
        super().__init__(theta, lr=lr, momentum=momentum)
        self.state = {f"momentum.{i:05d}": torch.zeros_like(t) for i, t in enumerate(theta)}

    def _step(self, delta: list[torch.Tensor]) -> None:
        # the same operations, in the same order, as torch.optim.SGD(momentum=m, nesterov=True, dampening=0)
        for t, d, buf in zip(self.theta, delta, self.state_tensors(), strict=True):
            buf.mul_(self.momentum).add_(d)
            t.add_(d.add(buf, alpha=self.momentum), alpha=-self.lr)


class FedAdam(OuterOptimizer):
    name = "fedadam"

    def __init__(self, theta: list[torch.Tensor], *, lr: float, momentum: float):
        super().__init__(theta, lr=lr, momentum=momentum)
        self.state = {f"exp_avg.{i:05d}": torch.zeros_like(t) for i, t in enumerate(theta)}
        self.state.update({f"exp_avg_sq.{i:05d}": torch.zeros_like(t) for i, t in enumerate(theta)})
        self.state["step"] = torch.zeros(1)

    def _step(self, delta: list[torch.Tensor]) -> None:
        self.state["step"] += 1
        step = float(self.state["step"])
        b1, b2 = self.momentum, FEDADAM_BETA2
        bias1, bias2_sqrt = 1 - b1**step, math.sqrt(1 - b2**step)
        for i, (t, d) in enumerate(zip(self.theta, delta, strict=True)):
            m, v = self.state[f"exp_avg.{i:05d}"], self.state[f"exp_avg_sq.{i:05d}"]
            # the operations of torch.optim.Adam's single-tensor path, in its order
            m.lerp_(d, 1 - b1)
            v.mul_(b2).addcmul_(d, d, value=1 - b2)
            denom = (v.sqrt() / bias2_sqrt).add_(FEDADAM_EPS)
            t.addcdiv_(m, denom, value=-self.lr / bias1)


OUTER_OPTIMIZERS: dict[str, type[OuterOptimizer]] = {"fedavg": FedAvg, "nesterov": Nesterov, "fedadam": FedAdam}


def make_outer_optimizer(kind: str, theta: list[torch.Tensor], *, lr: float, momentum: float) -> OuterOptimizer:
    return OUTER_OPTIMIZERS[kind](theta, lr=lr, momentum=momentum)
