"""Sampling text from a trained model: load it from a checkpoint or a ``photon-export`` folder, then sample.

Every document the model trained on ended with the end-of-text token, so every document it saw (but the first of
a shard) began right after one: each prompt is preceded by that token, and an empty prompt is just that token,
i.e. "the start of a new document". It is never shown in the output. Generation stops at --max-new-tokens or when
the model emits end-of-text (the end of the document).

There is no KV cache (photon_p2p.model has none): each new token costs a forward pass over the context, cropped to
the model's ``max_seq_len`` from the left once the text is longer. Fine for the small models this project trains.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from photon_p2p.errors import CheckpointError, ConfigError
from photon_p2p.model import Transformer

logger = logging.getLogger(__name__)

EXPORT_FILES = ("config.json", "model.safetensors")


@dataclass
class LoadedModel:
    """A model ready to sample from, its tokenizer, and what was loaded (for the log line)."""

    model: Transformer
    tokenizer: Any  # photon_p2p.data.tokenizer.Tokenizer
    path: Path
    step: int | None  # None for an export (it does not record one)
    weights: str  # which weights: "theta (the swarm's model)", "local", or "export"


def is_export(path: Path) -> bool:
    return all((path / name).is_file() for name in EXPORT_FILES)


def load_model(spec: str, weights: str = "auto") -> LoadedModel:
    """A photon-export folder, one checkpoint (step-XXXXXXXX), or a --checkpoint-dir (its latest checkpoint).

    ``weights`` picks the weights of a swarm checkpoint (see model_from_checkpoint): auto, theta or local."""
    from photon_p2p.train.checkpoint import find_checkpoint, latest_checkpoint

    path = Path(spec)
    if not path.exists():
        raise CheckpointError(
            f"{path}: no such directory; give a --checkpoint-dir of photon-peer, a step-XXXXXXXX "
            f"directory inside it, or a folder written by photon-export"
        )
    if path.is_dir() and is_export(path):
        if weights != "auto":
            raise ConfigError(
                f"--weights {weights}: {path} is a photon-export folder, which holds one set of "
                f"weights; --weights applies to photon checkpoints only"
            )
        return _load_export(path)
    if path.is_dir() and (path / "config.json").is_file():  # an export missing its weights, not a checkpoint dir
        raise CheckpointError(f"{path}: has config.json but no model.safetensors: an incomplete export")
    if (
        path.is_dir()
        and not (path / "meta.json").exists()
        and not re.fullmatch(r"step-\d{8,}", path.name)
        and latest_checkpoint(path) is None
    ):
        raise CheckpointError(
            f"{path}: neither a checkpoint (no step-XXXXXXXX directory, no meta.json) nor a "
            f"photon-export folder (config.json + model.safetensors)"
        )
    return _load_checkpoint(find_checkpoint(spec), weights)  # explains a file, an incomplete checkpoint, ...


def _load_checkpoint(step_dir: Path, weights: str) -> LoadedModel:
    from photon_p2p.train.checkpoint import load_checkpoint, model_from_checkpoint, tokenizer_from_checkpoint

    ckpt = load_checkpoint(step_dir)
    model = model_from_checkpoint(ckpt, source=weights)
    tokenizer = tokenizer_from_checkpoint(ckpt)
    if "theta" not in ckpt.tensors:
        which = "local (a --local-only checkpoint has no other)"
    elif weights == "local":
        which = "local (this peer's own copy, not the swarm's theta)"
    else:
        which = "theta (the swarm's model)"
    return LoadedModel(model=model, tokenizer=tokenizer, path=step_dir, step=ckpt.step, weights=which)


def _load_export(path: Path) -> LoadedModel:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from photon_p2p.data.tokenizer import tokenizer_from_json
    from photon_p2p.errors import DataError
    from photon_p2p.train.export import model_from_hf

    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: unreadable ({e})") from None
    try:
        tensors = load_file(str(path / "model.safetensors"), device="cpu")
    except (SafetensorError, OSError, RuntimeError) as e:
        detail = " ".join(str(e).split())[:200]
        raise CheckpointError(
            f"{path / 'model.safetensors'}: cannot be read, it is corrupt or truncated ({detail})"
        ) from None
    model = model_from_hf(config, tensors, origin=str(path))
    tok_path = path / "tokenizer.json"
    try:
        tokenizer = tokenizer_from_json(tok_path.read_text(encoding="utf-8"), origin=str(tok_path))
    except FileNotFoundError:
        raise CheckpointError(
            f"{path}: has no tokenizer.json, needed to turn text into tokens; export the "
            f"checkpoint again with photon-export"
        ) from None
    except (OSError, UnicodeDecodeError, DataError) as e:
        raise CheckpointError(f"{tok_path}: unusable ({e})") from None
    return LoadedModel(model=model, tokenizer=tokenizer, path=path, step=None, weights="export")


# --------------------------------------------------------------------------------------------------------------
# sampling


def resolve_device(spec: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; otherwise a torch device name (cpu, cuda, cuda:1)."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"--device {spec!r}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {spec}: this machine has no usable CUDA GPU; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {spec}: only cpu and cuda are supported")
    return device


def prompt_ids(tokenizer: Any, prompt: str, max_seq_len: int) -> list[int]:
    """The end-of-text token (start of a document, see the module docstring) and the prompt's tokens."""
    ids = tokenizer.encode(prompt)
    if len(ids) + 1 > max_seq_len:
        raise ConfigError(
            f"--prompt is {len(ids)} tokens, but the model's context is {max_seq_len} tokens (one of "
            f"them the start-of-document token): shorten the prompt"
        )
    return [tokenizer.eos_id, *ids]


@torch.no_grad()
def sample(
    model: Transformer,
    context: list[int],
    *,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    generator: torch.Generator | None = None,
    eos_id: int | None = None,
    allowed: int | None = None,
    on_token: Callable[[], None] | None = None,
) -> list[int]:
    """The new token ids following ``context`` (without it), stopping before ``eos_id``.

    ``temperature`` 0 is greedy (argmax; no randomness). ``top_k`` 0 samples from the whole vocabulary.
    ``allowed`` masks ids at or above it: the embedding is padded past the tokenizer's vocabulary (pad_vocab), and
    those rows, never a training target, must not be sampled either. ``on_token`` is called after every token."""
    device = next(model.parameters()).device
    ids = torch.tensor(context, dtype=torch.long, device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        window = ids[-model.args.max_seq_len :]  # the rotary tables end at max_seq_len: keep the latest tokens
        logits = model(window[None])[0, -1].float()
        if allowed is not None and allowed < logits.numel():
            logits[allowed:] = float("-inf")
        if temperature == 0:
            token = int(logits.argmax())
        else:
            logits = logits / temperature
            if 0 < top_k < logits.numel():
                kth = torch.topk(logits, top_k).values[-1]
                logits[logits < kth] = float("-inf")
            probs = torch.softmax(logits, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        if on_token is not None:
            on_token()
        if eos_id is not None and token == eos_id:
            break
        new.append(token)
        ids = torch.cat((ids, torch.tensor([token], dtype=torch.long, device=device)))
    return new


def generate(
    loaded: LoadedModel,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: int = 50,
    seed: int = 0,
    num_samples: int = 1,
    device: torch.device | None = None,
    on_token: Callable[[], None] | None = None,
) -> list[str]:
    """``num_samples`` texts, each the prompt followed by what the model wrote.

    Sample i draws from its own generator seeded with ``seed + i``: the same seed gives the same texts, and sample
    i does not depend on how long the samples before it were."""
    if temperature < 0:
        raise ConfigError(f"--temperature {temperature}: must be 0 (greedy) or more")
    if top_k < 0:
        raise ConfigError(f"--top-k {top_k}: must be 0 (no limit) or more")
    device = device or torch.device("cpu")
    model = loaded.model.to(device).eval()
    tok = loaded.tokenizer
    if tok.vocab_size > model.args.vocab_size:
        raise CheckpointError(
            f"{loaded.path}: the tokenizer has {tok.vocab_size} tokens but the model only "
            f"{model.args.vocab_size} embedding rows; they do not belong together"
        )
    context = prompt_ids(tok, prompt, model.args.max_seq_len)
    texts = []
    for i in range(num_samples):
        gen = torch.Generator(device=device)
        gen.manual_seed(seed + i)
        new = sample(
            model,
            context,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            generator=gen,
            eos_id=getattr(tok, "eos_id", None),
            allowed=tok.vocab_size,
            on_token=on_token,
        )
        # the prompt verbatim, then the decoded continuation: the prompt is always an exact prefix of the text
        texts.append(prompt + tok.decode(new))
    return texts
