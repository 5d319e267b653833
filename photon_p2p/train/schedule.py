"""Learning-rate schedule: linear warm-up, then cosine decay to ``alpha_f`` x peak (Photon uses alpha_f = 0.1).

It is a pure function of the *global* step, so a peer that joins a swarm at round r, or resumes from a checkpoint,
lands on exactly the learning rate everybody else is using; there is no scheduler state to save.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, peak_lr: float, warmup_steps: int, max_steps: int, alpha_f: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return peak_lr * (alpha_f + (1.0 - alpha_f) * cosine)
