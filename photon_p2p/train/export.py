"""Export a model to the Hugging Face Llama layout: config.json, model.safetensors and the tokenizer files.

photon_p2p.model keeps Llama's conventions (rotate_half RoPE, separate q/k/v, SwiGLU, fp32 RMSNorm), so export is
a renaming of tensors with no permutation. The directory loads with ``LlamaForCausalLM.from_pretrained(dir)`` and
with tools that read that layout (vLLM, llama.cpp's convert_hf_to_gguf.py, ...).
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from photon_p2p.errors import CheckpointError, DataError
from photon_p2p.model import ModelArgs, Transformer

logger = logging.getLogger(__name__)

# our name inside layers.{i} -> Hugging Face's name inside model.layers.{i}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)")


def hf_state_dict(model: Transformer, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Our weights under Hugging Face Llama names, as separate contiguous CPU tensors (safetensors refuses shared
    storage, so a tied embedding is written once and lm_head is left out)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if name == "tok_embeddings.weight":
            hf = "model.embed_tokens.weight"
        elif name == "norm.weight":
            hf = "model.norm.weight"
        elif name == "lm_head.weight":
            if model.args.tie_embeddings:
                continue
            hf = "lm_head.weight"
        elif (m := _LAYER_KEY.fullmatch(name)) and m.group(2) in _LAYER_NAMES:
            hf = f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
        else:  # a new parameter in model.py must be mapped here, never silently dropped
            raise RuntimeError(f"export: no Hugging Face name for parameter {name!r}")
        out[hf] = t.detach().to(device="cpu", dtype=dtype).clone(memory_format=torch.contiguous_format)
    return out


def hf_config(
    args: ModelArgs,
    *,
    dtype: torch.dtype = torch.float32,
    eos_token_id: int | None = None,
) -> dict[str, Any]:
    """config.json for transformers' LlamaConfig, readable by transformers 4.40+ and 5.x."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": args.vocab_size,
        "hidden_size": args.d_model,
        "intermediate_size": args.ffn_hidden,
        "num_hidden_layers": args.n_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads,
        "head_dim": args.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        # transformers 5 reads rope_parameters (rope_theta inside it); 4.x reads the top-level rope_theta
        "rope_theta": args.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
        "tie_word_embeddings": args.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": args.init_std,
        # documents are separated by one end-of-text token, which also starts the next one (GPT-2's convention).
        # Written even when unknown (null): LlamaConfig would otherwise assume Llama's own ids 1 and 2.
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),  # transformers 5 calls it dtype and still reads this
    }


def export_hf(
    model: Transformer,
    out_dir: str | Path,
    *,
    tokenizer_json: str | None = None,
    eos_token: str = "<|endoftext|>",
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Write ``model`` (and the tokenizer, given its tokenizer.json text) as a Hugging Face Llama directory.

    The files are written into a hidden sibling directory that is renamed into place at the end, so ``out_dir``
    either holds a complete export or does not exist. Refuses to replace a non-empty ``out_dir``.
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out}: already exists and is not empty; export to a new directory or remove it")
    eos_token_id = None
    if tokenizer_json is not None:
        from tokenizers import Tokenizer  # only exports with a tokenizer pay for the import

        try:
            eos_token_id = Tokenizer.from_str(tokenizer_json).token_to_id(eos_token)
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise DataError(f"export: the tokenizer is not a valid tokenizer.json ({e})") from None
        if eos_token_id is None:
            logger.warning("export: %r is not in the tokenizer's vocabulary; eos_token_id left unset", eos_token)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        config = hf_config(model.args, dtype=dtype, eos_token_id=eos_token_id)
        _write_json(tmp / "config.json", config)
        # transformers refuses safetensors files without format metadata
        save_file(hf_state_dict(model, dtype), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if tokenizer_json is not None:
            (tmp / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
            special = {"bos_token": eos_token, "eos_token": eos_token}
            _write_json(
                tmp / "tokenizer_config.json",
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    **special,
                    "model_max_length": model.args.max_seq_len,
                    "clean_up_tokenization_spaces": False,
                },
            )
            _write_json(tmp / "special_tokens_map.json", special)
            if eos_token_id is not None:  # so generate() stops at the end of a document
                ids = {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id}
                _write_json(tmp / "generation_config.json", ids)
        for f in tmp.iterdir():  # the data must be on disk before the rename that publishes it
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        try:
            os.replace(tmp, out)  # atomic; replaces nothing but a missing or empty directory
        except OSError as e:
            raise CheckpointError(f"{out}: cannot move the export into place ({e.strerror})") from None
        _fsync_dir(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    what = "model and tokenizer" if tokenizer_json is not None else "model"
    logger.info("exported %s to %s (%s)", what, out, config["torch_dtype"])
    return out


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def model_from_hf(config: dict[str, Any], weights: dict[str, torch.Tensor], *, origin: str = "export") -> Transformer:
    """The inverse of ``hf_config`` + ``hf_state_dict``: our model (fp32, CPU, eval mode) from a Llama config.json
    and its tensors. Refuses, with a CheckpointError naming ``origin``, what photon_p2p.model cannot represent
    (biases, RoPE scaling, another head_dim, another activation) rather than load a model that computes otherwise."""

    def need(key: str) -> Any:
        if key not in config:
            raise CheckpointError(f"{origin}: config.json has no {key!r}; it is not a Llama config")
        return config[key]

    unsupported = [
        f"{k}={config[k]!r}" for k, ok in (("model_type", "llama"), ("hidden_act", "silu")) if config.get(k, ok) != ok
    ]
    unsupported += [f"{k}=true" for k in ("attention_bias", "mlp_bias") if config.get(k)]
    rope = config.get("rope_parameters") or {}
    if config.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        unsupported.append("RoPE scaling")
    if unsupported:
        raise CheckpointError(f"{origin}: not a model photon can run ({', '.join(unsupported)})")
    try:
        d_model, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
        args = ModelArgs(
            vocab_size=int(need("vocab_size")),
            d_model=d_model,
            n_layers=int(need("num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=int(config.get("num_key_value_heads") or n_heads),
            ffn_hidden=int(need("intermediate_size")),
            max_seq_len=int(need("max_position_embeddings")),
            rope_theta=float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0),
            norm_eps=float(config.get("rms_norm_eps", 1e-6)),  # transformers' LlamaConfig default
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),  # ditto
            init_std=float(config.get("initializer_range", 0.02)),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{origin}: config.json describes no valid model ({e})") from None
    if config.get("head_dim") not in (None, args.head_dim):
        raise CheckpointError(
            f"{origin}: head_dim {config['head_dim']} != hidden_size / num_attention_heads "
            f"({args.head_dim}); photon's model cannot represent it"
        )

    ours_by_hf = {hf: ours for ours, hf in _LAYER_NAMES.items()}
    state: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for name, t in weights.items():
        if name == "model.embed_tokens.weight":
            ours = "tok_embeddings.weight"
        elif name == "model.norm.weight":
            ours = "norm.weight"
        elif name == "lm_head.weight":
            ours = "lm_head.weight"
        elif (m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)) and m.group(2) in ours_by_hf:
            ours = f"layers.{m.group(1)}.{ours_by_hf[m.group(2)]}"
        elif name.endswith("rotary_emb.inv_freq"):  # older transformers saved this derived buffer
            continue
        else:
            unknown.append(name)
            continue
        state[ours] = t.to(torch.float32)
    if unknown:
        shown = ", ".join(unknown[:5]) + (", ..." if len(unknown) > 5 else "")
        raise CheckpointError(f"{origin}: model.safetensors holds tensors photon's model does not have ({shown})")
    if args.tie_embeddings and "tok_embeddings.weight" in state:
        # a tied export stores the matrix once; some writers still include lm_head: it must be the same matrix
        head = state.pop("lm_head.weight", None)
        if head is not None and not torch.equal(head, state["tok_embeddings.weight"]):
            raise CheckpointError(f"{origin}: tie_word_embeddings is true but lm_head differs from embed_tokens")
        state["lm_head.weight"] = state["tok_embeddings.weight"]
    model = Transformer(args)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{origin}: the weights do not match config.json ({detail})") from None
    return model.eval()
