"""The inner loop: one peer's optimizer steps on its own data.

Photon's local recipe: AdamW (betas 0.9/0.95) with a high peak learning rate on small batches, cosine schedule on
the global step, gradient clipping at 1.0. Gradient accumulation turns micro-batches that fit in memory into the
configured batch, so the optimisation does not depend on the peer's hardware.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import torch
from torch import nn

from photon_p2p.config import TrainConfig
from photon_p2p.errors import CheckpointError, ConfigError
from photon_p2p.train.fit import pick_device, uses_bf16
from photon_p2p.train.schedule import lr_at

logger = logging.getLogger(__name__)

ADAM_BETAS = (0.9, 0.95)


def resolve_device(spec: str) -> torch.device:
    """'auto' picks CUDA, then MPS, then the CPU; a device this machine lacks is a clear error (fit.pick_device)."""
    return pick_device(spec)


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (weights and optimizer stay fp32), plain fp32 elsewhere."""
    if not uses_bf16(device, precision):
        return contextlib.nullcontext()
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--precision bf16: this GPU does not support bfloat16 (use --precision fp32)")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (linear and embedding weights), not norms or biases, as GPT-2/nanoGPT do."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_inner_optimizer(
    model: nn.Module,
    cfg: TrainConfig,
    device: torch.device,
    kind: str | None = None,
) -> torch.optim.Optimizer:
    """``kind`` ("adamw" or "adamw8bit", e.g. fit.py's choice) overrides ``cfg.inner_optimizer``; its "auto"
    means plain AdamW."""
    groups = param_groups(model, cfg.weight_decay)
    if (kind or cfg.inner_optimizer) == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:  # pragma: no cover - it is a hard dependency
            raise ConfigError(f"--inner-optimizer adamw8bit needs bitsandbytes>=0.50 ({e})") from None
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=ADAM_BETAS)
    # fused kernels exist for CUDA (and CPU in recent torch); foreach is the portable fallback
    try:
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=ADAM_BETAS, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=ADAM_BETAS, foreach=True)


class StepResult:
    """What one optimizer step reports. ``loss`` (mean over the batch) and ``grad_norm`` (before clipping; NaN when
    clipping is off) stay on the device until first read: reading them waits for the GPU, so a loop that looks at
    them only every ``--log-every`` steps lets the GPU run ahead of Python in between."""

    __slots__ = ("_loss_sum", "_accum", "_grad_norm", "lr", "tokens")

    def __init__(
        self, *, loss_sum: torch.Tensor | float, accum: int, lr: float, tokens: int, grad_norm: torch.Tensor | float
    ):
        self._loss_sum, self._accum, self._grad_norm = loss_sum, accum, grad_norm
        self.lr, self.tokens = lr, tokens

    @property
    def loss(self) -> float:
        if not isinstance(self._loss_sum, float):
            self._loss_sum = float(self._loss_sum)
        return self._loss_sum / self._accum

    @property
    def grad_norm(self) -> float:
        if not isinstance(self._grad_norm, float):
            self._grad_norm = float(self._grad_norm)
        return self._grad_norm

    def __repr__(self) -> str:
        return (
            f"StepResult(loss={self.loss:.4f}, lr={self.lr:.3g}, tokens={self.tokens}, grad_norm={self.grad_norm:.3g})"
        )


class InnerTrainer:
    """Owns the local model's optimizer; ``step()`` runs one optimizer step (with accumulation) on the next batch.

    :param model: the local model, already on ``device`` (possibly wrapped by torch.compile)
    :param micro_batch: sequences per forward/backward pass, a divisor of ``cfg.batch_size`` (default:
        ``cfg.micro_batch``); the sampler given to ``step()`` must yield batches of this size
    :param optimizer: "adamw" or "adamw8bit", what fit.plan_fit chose when ``cfg.inner_optimizer`` is "auto"
    """

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        device: torch.device,
        *,
        micro_batch: int | None = None,
        optimizer: str | None = None,
    ):
        self.model, self.cfg, self.device = model, cfg, device
        self.micro_batch = micro_batch or cfg.micro_batch
        if cfg.batch_size % self.micro_batch:
            raise ValueError(f"micro-batch {self.micro_batch} does not divide batch {cfg.batch_size}")
        pinned = cfg.inner_optimizer != "auto"
        self.optimizer_kind = cfg.inner_optimizer if pinned else optimizer or "adamw"
        self._optimizer_pinned = pinned
        self.optimizer = build_inner_optimizer(model, cfg, device, self.optimizer_kind)
        # equal micro-batches, each loss scaled by 1/accum_steps: the gradient of the batch's mean loss
        self.accum_steps = cfg.batch_size // self.micro_batch
        self.autocast = autocast_context(device, cfg.precision)
        self._pin = device.type == "cuda"

    def lr_for(self, step: int) -> float:
        return lr_at(
            step,
            peak_lr=self.cfg.lr,
            warmup_steps=self.cfg.warmup,
            max_steps=self.cfg.max_steps,
            alpha_f=self.cfg.alpha_f,
        )

    def step(self, sampler: Any, global_step: int) -> StepResult:
        """One optimizer step at learning rate lr(global_step). Returns the mean loss over the batch."""
        lr = self.lr_for(global_step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        for _ in range(self.accum_steps):
            x, y = sampler.next_batch()
            if self._pin:  # a copy from pinned memory is truly asynchronous; from pageable memory it waits
                x, y = x.pin_memory(), y.pin_memory()
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with self.autocast:
                loss = self.model(x, y)
            (loss / self.accum_steps).backward()
            loss_sum += loss.detach()
            tokens += y.numel()
        # no .item() or float() anywhere in a step: each would make the host wait for the device (see StepResult)
        grad_norm: torch.Tensor | float = math.nan
        if self.cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss_sum=loss_sum, accum=self.accum_steps, lr=lr, tokens=tokens, grad_norm=grad_norm)

    def reset_optimizer(self) -> None:
        """Drop the optimizer's moments (Photon's ``reset_optimizer`` between rounds, or after a bad round)."""
        self.optimizer.state.clear()

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load saved moments; refuses those of the other --inner-optimizer, which would load silently and then fail
        (or worse) in the first step. With --inner-optimizer auto the checkpoint's kind is adopted instead."""
        saved = _optimizer_kind(state)
        if saved is not None and saved != self.optimizer_kind and not self._optimizer_pinned:
            # --inner-optimizer auto: keep the checkpoint's kind rather than lose its moments
            log = logger.warning if saved == "adamw" else logger.info  # fp32 moments take 4x the planned memory
            log("resuming with the checkpoint's %s moments (memory was planned for %s)", saved, self.optimizer_kind)
            self.optimizer_kind = saved
            self.optimizer = build_inner_optimizer(self.model, self.cfg, self.device, saved)
        if saved is not None and saved != self.optimizer_kind:
            raise CheckpointError(
                f"the checkpoint holds --inner-optimizer {saved} moments, but this run uses "
                f"--inner-optimizer {self.cfg.inner_optimizer}: resume with --inner-optimizer "
                f"{saved}, or start over with --fresh"
            )
        self.optimizer.load_state_dict(state)


def _optimizer_kind(state: dict[str, Any]) -> str | None:
    """Which --inner-optimizer wrote an optimizer state dict (None: no moments yet, either fits)."""
    for param_state in (state.get("state") or {}).values():
        if "exp_avg" in param_state:
            return "adamw"
        if "state1" in param_state or any(str(k).startswith("__bnb") for k in param_state):
            return "adamw8bit"  # bitsandbytes nests its states under __bnb_optimizer_quant_state__ in state_dict()
    return None
