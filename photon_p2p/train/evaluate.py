"""Validation loss and perplexity on the held-out documents (never trained on)."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn

from photon_p2p.data.sampler import iter_eval_batches


@torch.no_grad()
def evaluate(
    model: nn.Module,
    val_tokens: np.ndarray,
    *,
    seq_len: int,
    batch_size: int,
    max_batches: int,
    device: torch.device,
    autocast: contextlib.AbstractContextManager | None = None,
) -> tuple[float, float]:
    """Token-weighted mean cross-entropy over the first ``max_batches`` validation batches, and its perplexity.

    The same windows are used every time, so successive evaluations (and different peers) are comparable.
    """
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    try:
        for x, y in iter_eval_batches(val_tokens, seq_len=seq_len, batch_size=batch_size, max_batches=max_batches):
            x, y = x.to(device), y.to(device)
            with autocast or contextlib.nullcontext():
                loss = model(x, y)
            total_loss += float(loss) * y.numel()
            total_tokens += y.numel()
    finally:
        model.train(was_training)
    mean = total_loss / max(1, total_tokens)
    return mean, math.exp(min(mean, 50.0))  # cap: exp() of a diverged loss should read as huge, not overflow
