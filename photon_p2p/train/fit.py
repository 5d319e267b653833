"""Fitting the workstation: which device a peer trains on, what a training step needs in memory, and how the peer
reaches the run's batch on the memory it has.

The run fixes *what* is trained (``--batch-size`` sequences per optimizer step, in the manifest); each peer decides
*how*: ``pick_device`` (CUDA, then MPS, then the CPU), ``available_memory`` (or ``--memory-limit``),
``estimate_memory`` (the formula below), and ``plan_fit``, which walks the fallbacks in this order and takes the
first that fits:

1. the largest micro-batch that **divides** the batch, with ``accumulation = batch / micro-batch`` passes per step.
   Divisors only: equal micro-batches make the mean of the micro-batch losses exactly the loss of the whole batch
   (each is scaled by 1/accumulation), and the sampler then draws the batch's windows in the same order, so the
   optimisation does not depend on the machine (batch 12 tries 12, 6, 4, 3, 2, 1);
2. if even micro-batch 1 does not fit: 8-bit AdamW (bitsandbytes; CUDA and CPU), then activation checkpointing,
   then both, each again with the largest micro-batch that fits;
3. if nothing fits: a one-line ConfigError with the parameter count, the smallest configuration's estimate, the
   memory there is and what would be needed.

A setting the user pinned (``--micro-batch-size N``, ``--inner-optimizer adamw|adamw8bit``,
``--activation-checkpointing on|off``) is never changed; only the ``auto`` ones are chosen. ``FitPlan.describe()``
is the one line the peer logs. Nothing here allocates the model, and nothing creates a CUDA context except
``available_memory`` of a CUDA device (so a swarm peer, which must fork before CUDA starts, plans a GPU only after
its forks; see ``plan_before_fork``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from dataclasses import dataclass

import psutil
import torch

from photon_p2p.config import TrainConfig
from photon_p2p.errors import ConfigError
from photon_p2p.model import ModelArgs

MiB, GiB = 1 << 20, 1 << 30
FP32 = 4
MARGIN_FRACTION = 0.10  # allocator slack and fragmentation, kernels' workspaces, what the formula leaves out
MARGIN_FIXED = 64 * MiB
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps fp32 moments for smaller tensors (AdamW8bit's min_8bit_size)
BNB_BLOCK = 256  # ... and one fp32 absmax per 256 values of each 8-bit moment (blockwise quantisation)
OUTER_STATE_COPIES = {"fedavg": 0, "nesterov": 1, "fedadam": 2}  # fp32 buffers per parameter, photon_p2p/train/outer


# --------------------------------------------------------------------------------------------------------------
# device and memory


def pick_device(requested: str) -> torch.device:
    """``auto``: CUDA if available, then MPS (Apple GPUs), else the CPU. An explicit device that this machine does not
    have is a one-line ConfigError naming ``--device``."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if _mps_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "" if torch.backends.cuda.is_built() else f" (this torch {torch.__version__} is built without it)"
            raise ConfigError(
                f"--device {requested}: CUDA is not available on this machine{why}; use --device cpu or auto"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"--device {requested}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )
    elif device.type == "mps" and not _mps_available():
        raise ConfigError(
            f"--device {requested}: MPS (Apple GPU) is not available on this machine; use --device cpu or auto"
        )
    return device


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def device_reason(requested: str, device: torch.device) -> str:
    """Why this device, for the plan's line: 'auto: no CUDA/MPS', '--device cuda:1', ..."""
    if requested != "auto":
        return f"--device {requested}"
    return {"cuda": "auto: CUDA available", "mps": "auto: MPS, no CUDA"}.get(device.type, "auto: no CUDA/MPS")


def available_memory(device: torch.device) -> int:
    """Bytes free for training on ``device``: CUDA's free memory (this creates the CUDA context), MPS's recommended
    working set less what the driver already holds, the CPU's available RAM (what can be allocated without swapping)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "mps" and hasattr(torch, "mps") and hasattr(torch.mps, "recommended_max_memory"):
        return max(0, int(torch.mps.recommended_max_memory()) - int(torch.mps.driver_allocated_memory()))
    return int(psutil.virtual_memory().available)  # the CPU, and MPS on an old torch (unified memory)


def uses_bf16(device: torch.device, precision: str) -> bool:
    """bf16 autocast on CUDA by default (weights and optimizer stay fp32), fp32 elsewhere (CPU bf16 is slow)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def adamw8bit_usable(device: torch.device) -> bool:
    """bitsandbytes is installed and has 8-bit AdamW for this device. Looked up, not imported: importing it is slow,
    chatty, and touches CUDA (which must wait for a swarm peer's forks)."""
    return device.type in ("cuda", "cpu") and importlib.util.find_spec("bitsandbytes") is not None


def _fused_adamw(device: torch.device) -> bool:
    """Whether build_inner_optimizer gets fused AdamW here (no temporaries in the step): CUDA, and CPU on torch 2.4+."""
    major, minor = (int(p) for p in torch.__version__.split(".")[:2])
    return device.type == "cuda" or (device.type == "cpu" and (major, minor) >= (2, 4))


# --------------------------------------------------------------------------------------------------------------
# the estimate


def param_numels(args: ModelArgs) -> list[int]:
    """Elements of each parameter tensor of ``Transformer(args)`` (a tied embedding once), without building it."""
    d, f, hd = args.d_model, args.ffn_hidden, args.head_dim
    q, kv = args.n_heads * hd, args.n_kv_heads * hd
    layer = [d, d * q, d * kv, d * kv, q * d, d, d * f, d * f, f * d]  # norm, q k v o, norm, gate up down
    head = [] if args.tie_embeddings else [args.vocab_size * d]
    return [args.vocab_size * d] + layer * args.n_layers + [d] + head


def activation_bytes_per_token_layer(args: ModelArgs, compute_bytes: int, device_type: str = "cpu") -> int:
    """What one block keeps for its backward pass, per token. Counted from model.py (d = d_model, f = ffn_hidden,
    h = n_heads, c = bytes of the compute dtype: 4 in fp32, 2 under bf16 autocast):

    - fp32 (the residual stream, and RMSNorm's fp32 maths): for each of the two norms, its input (the block input,
      the mid-block residual) and x * rsqrt(mean x^2) (kept by the weight multiply): 4 x 4d = 16d;
    - each norm's output as the projections keep it: in fp32 the output itself, shared by the projections that
      read it, 2 x 4d; under autocast one bf16 copy per projection (autocast casts activations per call: q, k, v
      and gate, up), 5cd;
    - compute dtype: the rotated q and k, v, and the attention output (o_proj's input is a view of it): 4cd;
      SwiGLU's gate, silu(gate), up and their product (down_proj's input): 4cf;
    - SDPA's log-sum-exp, fp32: 4h. Flash/memory-efficient attention (CUDA, and the CPU since torch 2.2) keeps no
      T x T scores; MPS's attention is assumed to keep scores and probabilities, 2chT more.

    RoPE's multiplies by cos/sin keep only the (shared) tables, so q and k before rotation are not kept.
    """
    d, f, h = args.d_model, args.ffn_hidden, args.n_heads
    c = compute_bytes
    norm_outputs = 5 * c * d if c < FP32 else 2 * FP32 * d
    per = 16 * d + norm_outputs + c * (4 * d + 4 * f) + 4 * h
    if device_type == "mps":
        per += 2 * c * h * args.max_seq_len
    return per


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training step needs at its peak, by part. ``swarm`` is what a swarm peer keeps in fp32 on the CPU
    (theta, delta and the outer optimizer's state, plus one more theta-and-state copy while a state is served or
    downloaded, or late work is carried); it shares the training memory only when the device is the CPU."""

    params: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    step_temporaries: int
    swarm: int = 0
    swarm_on_device: bool = False

    @property
    def training(self) -> int:
        """Weights, gradients and moments live throughout; the optimizer's temporaries appear only in its step,
        after the backward pass has freed the activations, so the peak is the larger of the two."""
        return (
            self.weights + self.gradients + self.optimizer + max(self.activations + self.logits, self.step_temporaries)
        )

    @property
    def subtotal(self) -> int:
        return self.training + (self.swarm if self.swarm_on_device else 0)

    @property
    def margin(self) -> int:
        return int(MARGIN_FRACTION * self.subtotal) + MARGIN_FIXED

    @property
    def device_total(self) -> int:
        """What must fit on the training device (the number the plan compares with the memory there is)."""
        return self.subtotal + self.margin

    def breakdown(self) -> str:
        parts = [
            ("weights", self.weights),
            ("gradients", self.gradients),
            ("optimizer", self.optimizer),
            ("activations", self.activations),
            ("logits", self.logits),
        ]
        if self.swarm_on_device:
            parts.append(("swarm buffers", self.swarm))
        parts.append(("margin", self.margin))
        return ", ".join(f"{name} {human_bytes(n)}" for name, n in parts)


def estimate_memory(
    args: ModelArgs,
    *,
    micro_batch: int,
    seq_len: int | None = None,
    compute_dtype: torch.dtype = torch.float32,
    optimizer: str = "adamw",
    activation_checkpointing: bool = False,
    device_type: str = "cpu",
    swarm_outer: str | None = None,
) -> MemoryEstimate:
    """Peak memory of one training step of ``Transformer(args)`` on ``micro_batch`` sequences of ``seq_len`` tokens.

    With N parameters (a tied embedding once), t = micro_batch x seq_len tokens, L layers, V = vocab_size, c = bytes
    of the compute dtype and A = ``activation_bytes_per_token_layer`` (its docstring derives it)::

        weights     4N [+ cN]           fp32 master weights [+ under autocast the bf16 copy of each, which autocast
                                        keeps for the whole forward and backward]
        gradients   4N                  fp32, kept across the micro-batches of an accumulated step
        optimizer   8N                  AdamW's two fp32 moments; 8-bit AdamW: 2 bytes + an fp32 absmax per 256
                                        values for tensors of >= 4096 elements, 8 bytes for the smaller ones
        activations t ((L+2) A + (8+c)d + 16)  every block's saved tensors, the final norm's, the token ids, and
                                        two layers' worth for the gradients of the block the backward pass is in.
                    with checkpointing: t (4dL + 3A + (8+c)d + 16): each block keeps only its fp32 input; one block
                                        at a time is recomputed, plus its gradients
        logits      t V (12 [+ c])      log-softmax output, its gradient and the logits' gradient in fp32 (+ the
                                        bf16 logits under autocast): cross-entropy is computed in fp32
        temporaries 4N                  non-fused AdamW's step (torch < 2.4 on the CPU; none when fused)
        swarm       4N (4 + 2k)         theta, delta, k outer-state buffers (fedavg 0, nesterov 1, fedadam 2), and
                                        one transient theta-and-state copy plus a carried delta

    peak = weights + gradients + optimizer + max(activations + logits, temporaries) [+ swarm on a CPU peer], and
    ``device_total`` adds a margin of 10% + 64 MiB. Left out on purpose: the CUDA context (already excluded from
    CUDA's free memory), torch.compile's caches, and the Python process itself. tests/test_fit.py compares the
    formula with the peak RSS growth of real CPU training steps.
    """
    seq_len = seq_len or args.max_seq_len
    numels = param_numels(args)
    n = sum(numels)
    c = torch.finfo(compute_dtype).bits // 8
    if optimizer == "adamw8bit":
        moments = sum(
            2 * k + 2 * FP32 * math.ceil(k / BNB_BLOCK) if k >= BNB_MIN_8BIT_SIZE else 2 * FP32 * k for k in numels
        )
    else:
        moments = 2 * FP32 * n
    t = micro_batch * seq_len
    per_layer = activation_bytes_per_token_layer(dataclasses.replace(args, max_seq_len=seq_len), c, device_type)
    outside = (8 + c) * args.d_model + 16  # the final norm's (as a block's norm) and the token ids
    if activation_checkpointing:
        activations = t * (FP32 * args.d_model * args.n_layers + 3 * per_layer + outside)
    else:
        activations = t * ((args.n_layers + 2) * per_layer + outside)
    logits = t * args.vocab_size * (3 * FP32 + (c if c < FP32 else 0))
    temporaries = 0 if optimizer == "adamw8bit" or _fused_adamw(torch.device(device_type)) else FP32 * n
    swarm = FP32 * n * (4 + 2 * OUTER_STATE_COPIES[swarm_outer]) if swarm_outer else 0
    weights = FP32 * n + (c * n if c < FP32 else 0)
    return MemoryEstimate(
        params=n,
        weights=weights,
        gradients=FP32 * n,
        optimizer=moments,
        activations=activations,
        logits=logits,
        step_temporaries=temporaries,
        swarm=swarm,
        swarm_on_device=bool(swarm_outer) and device_type == "cpu",
    )


# --------------------------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class FitPlan:
    """How this peer trains: device, micro-batch x accumulation = batch, optimizer, checkpointing, and why."""

    device: torch.device
    device_reason: str
    batch_size: int
    micro_batch: int
    optimizer: str  # "adamw" | "adamw8bit"
    activation_checkpointing: bool
    bf16: bool
    estimate: MemoryEstimate
    budget: int  # bytes the plan had to fit in
    budget_source: str  # "free" or "allowed by --memory-limit"
    notes: tuple[str, ...] = ()  # why each fallback was taken, or that the user pinned it

    @property
    def accumulation(self) -> int:
        return math.ceil(self.batch_size / self.micro_batch)

    def describe(self) -> str:
        """The one line the peer logs, e.g. ``device cpu (auto: no CUDA/MPS); memory ~1.2 GiB of 20.5 GiB free;
        micro-batch 8 x 2 accumulation = batch 16; AdamW, fp32, no activation checkpointing``."""
        batch = (
            f"micro-batch {self.micro_batch} x {self.accumulation} accumulation = batch {self.batch_size}"
            if self.accumulation > 1
            else f"micro-batch {self.micro_batch} = batch {self.batch_size}, no accumulation"
        )
        how = ", ".join(
            [
                "8-bit AdamW" if self.optimizer == "adamw8bit" else "AdamW",
                "bf16 autocast" if self.bf16 else "fp32",
                "activation checkpointing" if self.activation_checkpointing else "no activation checkpointing",
            ]
        )
        why = f" ({'; '.join(self.notes)})" if self.notes else ""
        return (
            f"device {self.device} ({self.device_reason}); memory ~{human_bytes(self.estimate.device_total)} of "
            f"{human_bytes(self.budget)} {self.budget_source}; {batch}; {how}{why}"
        )

    def apply(self, train: TrainConfig) -> TrainConfig:
        """``train`` with this plan's micro-batch: what InnerTrainer and the sampler are built from."""
        return dataclasses.replace(train, micro_batch_size=self.micro_batch)


def _divisors_descending(n: int) -> list[int]:
    return [k for k in range(n, 0, -1) if n % k == 0]


def plan_fit(
    args: ModelArgs,
    train: TrainConfig,
    device: torch.device,
    *,
    model_name: str = "the model",
    swarm_outer: str | None = None,
    available: int | None = None,
) -> FitPlan:
    """Choose micro-batch, optimizer and activation checkpointing for ``args`` on ``device`` (see the module
    docstring for the order). ``available`` (bytes) defaults to ``available_memory(device)``; ``--memory-limit``
    replaces both. ``swarm_outer`` (the outer optimizer) counts a swarm peer's CPU buffers, which matter when the
    device is the CPU. Raises a one-line ConfigError when nothing fits."""
    if train.memory_limit is not None:
        budget, source = int(train.memory_limit * GiB), "allowed by --memory-limit"
    else:
        budget, source = available if available is not None else available_memory(device), "free"
    bf16 = uses_bf16(device, train.precision)
    micro_options = [train.micro_batch_size] if train.micro_batch_size else _divisors_descending(train.batch_size)
    if train.inner_optimizer == "auto":
        optimizers = ["adamw", "adamw8bit"] if adamw8bit_usable(device) else ["adamw"]
    else:
        optimizers = [train.inner_optimizer]
    checkpointing = {"auto": [False, True], "on": [True], "off": [False]}[train.activation_checkpointing]
    pinned = [
        f"{flag} {value}"
        for flag, value, is_pinned in (
            ("--micro-batch-size", train.micro_batch_size, train.micro_batch_size is not None),
            ("--inner-optimizer", train.inner_optimizer, train.inner_optimizer != "auto"),
            ("--activation-checkpointing", train.activation_checkpointing, train.activation_checkpointing != "auto"),
        )
        if is_pinned
    ]

    def estimate(micro: int, optimizer: str, ckpt: bool) -> MemoryEstimate:
        return estimate_memory(
            args,
            micro_batch=micro,
            compute_dtype=torch.bfloat16 if bf16 else torch.float32,
            optimizer=optimizer,
            activation_checkpointing=ckpt,
            device_type=device.type,
            swarm_outer=swarm_outer,
        )

    modes = [(optimizer, ckpt) for ckpt in checkpointing for optimizer in optimizers]
    for i, (optimizer, ckpt) in enumerate(modes):
        for micro in micro_options:
            est = estimate(micro, optimizer, ckpt)
            if est.device_total > budget:
                continue
            notes = []
            if micro < train.batch_size and train.micro_batch_size is None:
                whole = estimate(train.batch_size, optimizer, ckpt).device_total
                notes.append(f"batch {train.batch_size} in one pass needs ~{human_bytes(whole)}")
            if i > 0:
                first = estimate(micro_options[-1], *modes[0]).device_total
                notes.append(
                    f"even micro-batch {micro_options[-1]} with {_mode_label(*modes[0])} needs ~{human_bytes(first)}"
                )
            if pinned:
                notes.append("as set: " + ", ".join(pinned))
            return FitPlan(
                device=device,
                device_reason=device_reason(train.device, device),
                batch_size=train.batch_size,
                micro_batch=micro,
                optimizer=optimizer,
                activation_checkpointing=ckpt,
                bf16=bf16,
                estimate=est,
                budget=budget,
                budget_source=source,
                notes=tuple(notes),
            )
    smallest = estimate(micro_options[-1], *modes[-1])
    where = (
        f"--memory-limit allows {human_bytes(budget)}"
        if train.memory_limit is not None
        else f"this machine has {human_bytes(budget)} free on {device}"
    )
    as_set = f" ({', '.join(pinned)} as set)" if pinned else ""
    raise ConfigError(
        f"{model_name} ({human_count(smallest.params)} parameters) does not fit: even micro-batch {micro_options[-1]} "
        f"with {_mode_label(*modes[-1])}{as_set} needs ~{human_bytes(smallest.device_total)} "
        f"({smallest.breakdown()}), but {where}; try a machine or GPU with >= {human_bytes(smallest.device_total)} "
        f"free, or a smaller --model or --seq-len"
    )


def _mode_label(optimizer: str, ckpt: bool) -> str:
    return ("8-bit AdamW" if optimizer == "adamw8bit" else "AdamW") + (" and activation checkpointing" if ckpt else "")


def plan_before_fork(
    args: ModelArgs,
    train: TrainConfig,
    *,
    model_name: str,
    outer_optimizer: str,
) -> FitPlan | None:
    """A swarm peer's plan, made before its global state is allocated and before it forks (so without initialising
    CUDA: ``torch.cuda.device_count`` asks NVML where it can). A CPU peer gets its whole plan, the swarm's fp32
    buffers included. A GPU peer only has its host memory checked against those buffers here (None is returned);
    its device is planned by LocalSession after the forks, where querying CUDA is safe."""
    on_cpu = train.device == "cpu" or (
        train.device == "auto" and torch.cuda.device_count() == 0 and not _mps_available()
    )
    if on_cpu:
        return plan_fit(args, train, torch.device("cpu"), model_name=model_name, swarm_outer=outer_optimizer)
    swarm = estimate_memory(args, micro_batch=1, swarm_outer=outer_optimizer).swarm
    free = available_memory(torch.device("cpu"))
    if swarm + MARGIN_FIXED > free:
        raise ConfigError(
            f"{model_name} ({human_count(sum(param_numels(args)))} parameters) does not fit in this "
            f"machine's RAM: a swarm peer keeps theta, delta and the --outer-optimizer "
            f"{outer_optimizer} state in fp32 on the CPU, ~{human_bytes(swarm)}, but "
            f"{human_bytes(free)} is free; use a machine with more RAM or a smaller --model"
        )
    return None


# --------------------------------------------------------------------------------------------------------------
# for messages


def human_bytes(n: int) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.0f} MiB" if n >= 10 * MiB else f"{n / MiB:.1f} MiB"


def human_count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"
