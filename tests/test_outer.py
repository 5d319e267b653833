"""Outer optimizers applied to an averaged pseudo-gradient.

Proves: fedavg with lr 1 equals plain parameter averaging of the local models; nesterov is bit-for-bit
torch.optim.SGD(nesterov=True) and fedadam bit-for-bit torch.optim.Adam on the same deltas; the returned step
norm is the norm of the change to theta.
"""

from __future__ import annotations

import pytest
import torch

from photon_p2p.train.outer import make_outer_optimizer


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 4, generator=g), torch.randn(9, generator=g)]


def test_fedavg_lr1_is_parameter_averaging():
    theta = _params()
    locals_ = [[t + 0.1 * (k + 1) * torch.randn_like(t) for t in theta] for k in range(3)]
    weights = [1.0, 2.0, 1.0]
    delta = [
        sum(w * (t - loc[i]) for w, loc in zip(weights, locals_, strict=True)) / sum(weights)
        for i, t in enumerate(theta)
    ]
    opt = make_outer_optimizer("fedavg", [t.clone() for t in theta], lr=1.0, momentum=0.0)
    opt.step(delta)
    for i in range(2):
        averaged = sum(w * loc[i] for w, loc in zip(weights, locals_, strict=True)) / sum(weights)
        torch.testing.assert_close(opt.theta[i], averaged, rtol=0, atol=1e-6)
    assert opt.state_tensors() == []


@pytest.mark.parametrize("kind", ["nesterov", "fedadam"])
def test_matches_torch_optimizer_bit_for_bit(kind):
    theta = _params(1)
    reference = [t.clone().requires_grad_() for t in theta]
    if kind == "nesterov":
        ours = make_outer_optimizer(kind, [t.clone() for t in theta], lr=0.7, momentum=0.9)
        torch_opt = torch.optim.SGD(reference, lr=0.7, momentum=0.9, nesterov=True, foreach=False)
    else:
        ours = make_outer_optimizer(kind, [t.clone() for t in theta], lr=0.01, momentum=0.9)
        torch_opt = torch.optim.Adam(reference, lr=0.01, betas=(0.9, 0.99), eps=1e-8, foreach=False)
    g = torch.Generator().manual_seed(2)
    for _ in range(6):
        delta = [torch.randn(t.shape, generator=g) for t in theta]
        ours.step(delta)
        for p, d in zip(reference, delta, strict=True):
            p.grad = d.clone()
        torch_opt.step()
    for a, b in zip(ours.theta, reference, strict=True):
        assert torch.equal(a, b.detach())


def test_step_norm_is_the_change_of_theta():
    theta = _params(3)
    opt = make_outer_optimizer("nesterov", [t.clone() for t in theta], lr=0.5, momentum=0.9)
    before = [t.clone() for t in opt.theta]
    norm = opt.step([torch.ones_like(t) for t in theta])
    change = torch.cat([(a - b).flatten() for a, b in zip(opt.theta, before, strict=True)]).norm().item()
    assert norm == pytest.approx(change, rel=1e-6)
