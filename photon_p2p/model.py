"""The decoder-only transformer every peer trains, and its size presets.

A Llama-style model (pre-norm RMSNorm, rotary position embeddings, SwiGLU, no biases) in plain PyTorch. It keeps
Hugging Face Llama's conventions on purpose (rotate_half RoPE, separate q/k/v projections, fp32 RMSNorm), so
photon_p2p/train/export.py writes a ``LlamaForCausalLM`` checkpoint by renaming tensors, with no permutation.

Read top to bottom: the arguments and presets, the layers, the model, and a one-line summary for logs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from photon_p2p.errors import ConfigError

# --------------------------------------------------------------------------------------------------------------
# arguments and presets


@dataclass(frozen=True, kw_only=True)
class ModelArgs:
    """Everything that fixes the architecture. It goes into checkpoints and the run manifest, where every peer
    must hold an identical copy, so ``to_dict()`` is canonical JSON (ints stay ints, floats stay floats)."""

    vocab_size: int  # embedding rows, already padded by the caller (see pad_vocab)
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None  # None means n_heads; fewer gives grouped-query attention (smaller K/V)
    ffn_hidden: int  # SwiGLU hidden width
    max_seq_len: int  # the rotary tables end here
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)  # frozen: fill the default once, here
        for name in ("rope_theta", "norm_eps", "init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ModelArgs.{name} = {value!r}: must be a positive number")
            object.__setattr__(self, name, float(value))  # 10000 and 10000.0 must serialise the same
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelArgs.{name} = {value!r}: must be a positive integer")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"ModelArgs.tie_embeddings = {self.tie_embeddings!r}: must be true or false")
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelArgs: d_model {self.d_model} is not a multiple of n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"ModelArgs: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"ModelArgs: head_dim {self.head_dim} must be even (RoPE rotates pairs of dims)")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelArgs:
        """Inverse of ``to_dict``; strict, because a silently ignored key would mean a different model."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"ModelArgs: unknown keys {', '.join(unknown)}")
        missing = sorted(
            f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name not in data
        )
        if missing:
            raise ValueError(f"ModelArgs: missing keys {', '.join(missing)}")
        return cls(**data)


def pad_vocab(n: int, multiple: int = 64) -> int:
    """Round the embedding rows up to a multiple of 64, for efficiency (as nanoGPT does): matmuls whose sizes are
    multiples of 64 hit the fast kernels; the unused rows never appear as targets, so they just learn to lose."""
    return -(-n // multiple) * multiple


def swiglu_hidden(d_model: int, multiple: int) -> int:
    """SwiGLU has three matrices instead of two, so a width of 8/3 * d_model matches a 4x GELU MLP's parameters;
    rounded up to ``multiple`` for efficient matmuls."""
    return -(-8 * d_model // (3 * multiple)) * multiple


# Photon's sizes (arXiv 2411.02908) plus two that train on a laptop CPU in seconds: ``micro`` for tests and smoke
# runs, ``tiny`` for demos. On 2 CPU cores a batch-16 AdamW step takes ~15 ms (micro) and ~0.12 s (tiny) with a
# 320-row vocabulary, ~0.2 s for tiny with 4096 rows: at this size the vocabulary, not the depth, sets the speed.
PRESETS: dict[str, dict[str, int]] = {
    "micro": dict(d_model=64, n_layers=2, n_heads=2, ffn_hidden=swiglu_hidden(64, 64), max_seq_len=64),
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, ffn_hidden=swiglu_hidden(128, 64), max_seq_len=128),
    "125m": dict(d_model=768, n_layers=12, n_heads=12, ffn_hidden=swiglu_hidden(768, 256), max_seq_len=2048),
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, ffn_hidden=swiglu_hidden(1024, 256), max_seq_len=2048),
    "1b": dict(d_model=2048, n_layers=24, n_heads=16, ffn_hidden=swiglu_hidden(2048, 256), max_seq_len=2048),
    "3b": dict(d_model=2560, n_layers=32, n_heads=20, ffn_hidden=swiglu_hidden(2560, 256), max_seq_len=2048),
    "7b": dict(d_model=4096, n_layers=32, n_heads=32, ffn_hidden=swiglu_hidden(4096, 256), max_seq_len=2048),
}


def build_model_args(
    preset: str, *, vocab_size: int, seq_len: int | None = None, tie_embeddings: bool = True
) -> ModelArgs:
    """The ModelArgs of a preset; ``vocab_size`` is the final embedding row count (the caller pads it)."""
    if preset not in PRESETS:
        raise ConfigError(f"--model {preset!r}: unknown preset; choose one of {', '.join(PRESETS)}")
    sizes = dict(PRESETS[preset])
    if seq_len is not None:
        sizes["max_seq_len"] = seq_len
    return ModelArgs(vocab_size=vocab_size, tie_embeddings=tie_embeddings, **sizes)


# --------------------------------------------------------------------------------------------------------------
# layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalise in fp32 (a bf16 mean of squares is too coarse), exactly as HF Llama does, so exports match
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_tables(
    head_dim: int, max_seq_len: int, theta: float, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotation angles, [max_seq_len, head_dim], in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float32), inv_freq)
    # HF's layout (rotate_half): dim i is paired with dim i + head_dim/2, not with its neighbour (Meta's original
    # interleaved layout); matching it lets q_proj/k_proj export without the permutation HF's converter needs.
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.d_model, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.d_model, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.d_model, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # bf16 under autocast, as HF does with a bf16 model
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if self.n_kv_heads != self.n_heads:
            # each K/V head serves a run of consecutive query heads (HF's repeat_kv); SDPA's enable_gqa would need
            # torch >= 2.5
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(args.d_model, args.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(args.d_model, args.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(args.ffn_hidden, args.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(args.d_model, args.norm_eps)
        self.attn = Attention(args)
        self.mlp_norm = RMSNorm(args.d_model, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # pre-norm: the residual stream itself is never normalised, which keeps deep stacks trainable
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


# --------------------------------------------------------------------------------------------------------------
# the model


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.d_model)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.d_model, args.norm_eps)
        self.lm_head = nn.Linear(args.d_model, args.vocab_size, bias=False)
        # derived from args, so non-persistent: checkpoints and the swarm's averaging never carry them
        self.register_buffer("rope_cos", torch.empty(0), persistent=False)
        self.register_buffer("rope_sin", torch.empty(0), persistent=False)
        # a per-peer memory/compute trade (train/fit.py decides it), so not part of ModelArgs or the checkpoint
        self.activation_checkpointing = False
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """(Re-)initialise every weight and the rotary tables; call again after ``to_empty()`` from the meta device."""
        a = self.args
        if a.tie_embeddings:
            # re-tie every time: to_empty() gives each module its own tensor; tying halves the embedding parameters,
            # which dominate small models
            self.lm_head.weight = self.tok_embeddings.weight
        else:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=a.init_std)
        nn.init.normal_(self.tok_embeddings.weight, mean=0.0, std=a.init_std)
        # GPT-2's scaled init: o_proj and down_proj each add into the residual stream, 2 * n_layers terms in all, so
        # their std shrinks by sqrt(2 * n_layers) to keep the stream's variance at init independent of depth.
        residual_std = a.init_std / math.sqrt(2 * a.n_layers)
        for layer in self.layers:
            attn, mlp = layer.attn, layer.mlp
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
                nn.init.normal_(lin.weight, mean=0.0, std=a.init_std)
            for lin in (attn.o_proj, mlp.down_proj):
                nn.init.normal_(lin.weight, mean=0.0, std=residual_std)
            layer.attn_norm.weight.fill_(1.0)
            layer.mlp_norm.weight.fill_(1.0)
        self.norm.weight.fill_(1.0)
        self.rope_cos, self.rope_sin = rope_tables(
            a.head_dim, a.max_seq_len, a.rope_theta, device=self.tok_embeddings.weight.device
        )

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] for token ids [B, T]; with ``targets`` the mean cross-entropy instead."""
        t = idx.shape[1]
        if t > self.args.max_seq_len:
            raise ValueError(f"sequence of {t} tokens is longer than the model's max_seq_len {self.args.max_seq_len}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        h = self.tok_embeddings(idx)
        # checkpointing keeps only each block's input and recomputes the block in the backward pass; non-reentrant
        # checkpoints replay autocast and RNG state, so the gradients are those of the plain forward
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for layer in self.layers:
            if recompute:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, use_reentrant=False)
            else:
                h = layer(h, cos, sin)
        logits = self.lm_head(self.norm(h))
        if targets is None:
            return logits
        # fp32 softmax: under bf16 autocast the logits are bf16, too coarse for a log-sum-exp over the vocabulary
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Parameters, a tied embedding counted once; ``exclude_embeddings`` drops the embedding and lm_head
        matrices (Kaplan et al.'s "non-embedding" count, the one scaling laws use)."""
        skip = {id(self.tok_embeddings.weight), id(self.lm_head.weight)} if exclude_embeddings else set()
        return sum(p.numel() for p in self.parameters() if id(p) not in skip)  # parameters() yields shared ones once

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward), for MFU: the PaLM paper's (appendix B) and nanoGPT's
        6 * N + 12 * L * d * T. Each weight costs 2 FLOPs per token forward and 4 backward; attention's QK^T and
        AV add 12 * d * T per layer. The embedding is a lookup (free), but lm_head is a d x vocab matmul."""
        a = self.args
        n_matmul = self.num_params(exclude_embeddings=True) + a.d_model * a.vocab_size
        return 6.0 * n_matmul + 12.0 * a.n_layers * a.d_model * seq_len


# --------------------------------------------------------------------------------------------------------------
# for logs


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def param_count_summary(args: ModelArgs, name: str = "model") -> str:
    """E.g. ``tiny: 1.23M parameters (0.98M non-embedding)``; counted on the meta device, so free even for 7b."""
    with torch.device("meta"):
        model = Transformer(args)
    return (
        f"{name}: {_human(model.num_params())} parameters "
        f"({_human(model.num_params(exclude_embeddings=True))} non-embedding)"
    )
