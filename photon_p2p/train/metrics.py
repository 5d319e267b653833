"""Metrics: the JSONL file (one JSON object per line, flushed as written so a crash loses at most one record), and
optional TensorBoard event files and Weights & Biases runs fed the same records.

Every record has a ``kind``: ``step`` (every --log-every inner steps: loss, lr, grad norm, tokens/s, MFU, peak
memory), ``eval`` (validation loss and perplexity of the model that counts: theta in a swarm) and ``round`` (one per
swarm round, see photon_p2p/swarm/report.py). TensorBoard and W&B get the numeric fields as ``KIND/FIELD`` scalars
against the global step, grouped by run id and named by peer, so the peers of one run overlay in one view.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

from photon_p2p.errors import ConfigError

logger = logging.getLogger(__name__)

# dense bf16/fp16 tensor-core peak FLOP/s by device name (vendor data sheets); MFU is left out where unknown (CPUs)
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10G": 125e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "V100": 125e12,
    "T4": 65e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's peak dense half-precision FLOP/s if we know it (for MFU), else None."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS.items():
        if key in name:
            return flops
    return None


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory so far: the CUDA allocator's peak on a GPU, the process's peak resident set elsewhere."""
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


class StepStats:
    """Turns a step's result into a ``step`` record: loss, lr, grad norm, tokens/s over the logging window, MFU from
    the model's FLOPs per token and the device's peak, peak memory."""

    def __init__(self, model: Any, seq_len: int, device: torch.device):
        self.flops_per_token = model.flops_per_token(seq_len)
        self.peak = peak_flops(device)
        self.device = device
        self._t, self._tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def record(self, *, step: int, result: Any, tokens: int, **extra: Any) -> dict[str, Any]:
        now = time.perf_counter()
        rate = self._tokens / max(now - self._t, 1e-9)
        self._t, self._tokens = now, 0
        grad_norm = result.grad_norm
        rec: dict[str, Any] = dict(
            kind="step",
            step=step,
            **extra,
            loss=result.loss,
            lr=result.lr,
            tokens=tokens,
            tokens_per_s=round(rate, 1),
            grad_norm=grad_norm if math.isfinite(grad_norm) else None,
            mfu=round(rate * self.flops_per_token / self.peak, 4) if self.peak else None,
            peak_mem_mb=round(peak_memory_mb(self.device), 1),
        )
        return rec


class MetricsWriter:
    """Appends records to ``path`` (or does nothing when ``path`` is None) and forwards them to the optional sinks.
    Non-finite floats become null."""

    def __init__(
        self,
        path: str | None,
        *,
        tensorboard_dir: str | None = None,
        wandb_project: str | None = None,
        wandb_mode: str = "offline",
        group: str = "photon",
        name: str = "peer",
        config: dict[str, Any] | None = None,
    ):
        self._file = None
        self._tb = self._wandb = None
        if path:
            p = Path(path)
            try:
                p.parent.mkdir(parents=True, exist_ok=True)
                self._file = p.open("a", encoding="utf-8")
            except OSError as e:
                raise ConfigError(f"--metrics-file {path}: cannot open for writing ({e.strerror})") from None
        if tensorboard_dir:
            self._tb = _open_tensorboard(Path(tensorboard_dir) / group / name)
        if wandb_project:
            self._wandb = _open_wandb(wandb_project, wandb_mode, group=group, name=name, config=config or {})

    def write(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        clean.setdefault("time", round(time.time(), 3))
        if self._file is not None:
            self._file.write(json.dumps(clean) + "\n")
            self._file.flush()
        if self._tb is None and self._wandb is None:
            return
        kind = clean.get("kind") or ("round" if "round" in clean else "step")
        step = clean.get("step")
        scalars = {
            f"{kind}/{k}": float(v)
            for k, v in clean.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and v is not None and k not in ("step", "time")
        }
        try:
            if self._tb is not None:
                for tag, value in scalars.items():
                    self._tb.add_scalar(tag, value, global_step=step, walltime=clean["time"])
            if self._wandb is not None and step is not None:
                self._wandb.log({"step": step, **scalars})
        except Exception as e:  # a logging backend must never stop training
            logger.warning("metrics backend failed (%r); disabling TensorBoard/W&B for this run", e)
            self._tb = self._wandb = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def open_metrics(log: Any, *, group: str, name: str, config: dict[str, Any] | None = None) -> MetricsWriter:
    """The writer for a run's [log] settings (--metrics-file, --tensorboard-dir, --wandb-project, --wandb-mode)."""
    return MetricsWriter(
        log.metrics_file,
        tensorboard_dir=log.tensorboard_dir,
        wandb_project=log.wandb_project,
        wandb_mode=log.wandb_mode,
        group=group,
        name=name,
        config=config,
    )


def _open_tensorboard(logdir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError(
            "--tensorboard-dir needs the tensorboard package: pip install 'photon-p2p[tensorboard]' "
            "(or pip install tensorboard)"
        ) from None
    try:
        return SummaryWriter(log_dir=str(logdir))
    except OSError as e:
        raise ConfigError(f"--tensorboard-dir {logdir}: cannot write there ({e.strerror})") from None


def _open_wandb(project: str, mode: str, *, group: str, name: str, config: dict[str, Any]) -> Any:
    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "--wandb-project needs the wandb package: pip install 'photon-p2p[wandb]' (or pip install wandb)"
        ) from None
    try:
        run = wandb.init(
            project=project,
            group=group,
            name=name,
            tags=[name],
            mode=mode,
            config=config,
            reinit="create_new",
            settings=wandb.Settings(silent=True, console="off"),
        )
    except Exception as e:  # wandb raises its own errors for a missing login in online mode, bad names, ...
        raise ConfigError(
            f"--wandb-project {project}: W&B could not start a run ({str(e).splitlines()[0][:200]}); "
            f"--wandb-mode offline works without an account or network"
        ) from None
    run.define_metric("*", step_metric="step")
    return run
