"""The transformer in photon_p2p/model.py is a correct causal language model and its presets have the sizes
they claim.

Proves: the preset names agree with config.MODEL_PRESETS; every preset (the big ones on the meta device, for
free) gives logits of the right shape and a parameter count in the published range; a token never sees the
future; micro can overfit a fixed batch (gradients flow everywhere that matters); tied embeddings are one tensor
counted once, also after building on the meta device; the scaled residual init is applied; too-long inputs fail
clearly; the loss is plain cross-entropy of the logits; ModelArgs round-trips through JSON.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from photon_p2p.config import MODEL_PRESETS
from photon_p2p.errors import ConfigError
from photon_p2p.model import (
    PRESETS,
    ModelArgs,
    Transformer,
    build_model_args,
    pad_vocab,
    param_count_summary,
)


def small_args(**overrides) -> ModelArgs:
    base = dict(vocab_size=96, d_model=64, n_layers=2, n_heads=4, ffn_hidden=192, max_seq_len=32)
    return ModelArgs(**{**base, **overrides})


def test_presets_match_config():
    assert tuple(PRESETS) == MODEL_PRESETS


def test_pad_vocab():
    assert [pad_vocab(n) for n in (1, 64, 65, 50257)] == [64, 64, 128, 50304]
    assert pad_vocab(300, 128) == 384


def test_unknown_preset_names_the_flag():
    with pytest.raises(ConfigError, match="--model"):
        build_model_args("13b", vocab_size=320)


@pytest.mark.parametrize("preset", ["micro", "tiny"])
def test_small_presets_forward(preset):
    args = build_model_args(preset, vocab_size=320)
    model = Transformer(args)
    idx = torch.randint(0, 320, (2, args.max_seq_len))
    logits = model(idx)
    assert logits.shape == (2, args.max_seq_len, 320)
    assert torch.isfinite(logits).all()
    # at init the model is close to uniform over the vocabulary (random targets: with tied embeddings the input
    # token itself gets a higher logit)
    assert abs(model(idx, torch.randint(0, 320, idx.shape)).item() - math.log(320)) < 0.1


# (low, high) parameter counts with GPT-2's padded vocabulary and tied embeddings
EXPECTED = {
    "125m": (110e6, 135e6),
    "350m": (330e6, 400e6),
    "1b": (1.0e9, 1.5e9),
    "3b": (2.4e9, 3.0e9),
    "7b": (6.0e9, 7.5e9),
}


@pytest.mark.parametrize("preset", list(EXPECTED))
def test_large_presets_on_meta(preset):
    args = build_model_args(preset, vocab_size=50304)
    assert args.max_seq_len == 2048 and args.ffn_hidden % 256 == 0
    assert args.ffn_hidden >= 8 * args.d_model / 3
    with torch.device("meta"):
        model = Transformer(args)
        logits = model(torch.zeros(2, 16, dtype=torch.long))
    assert logits.shape == (2, 16, 50304)
    low, high = EXPECTED[preset]
    assert low <= model.num_params() <= high
    assert model.num_params() - model.num_params(exclude_embeddings=True) == 50304 * args.d_model
    # 6N dominates at 2048 tokens; the attention term is what is left
    attn = model.flops_per_token(2048) - 6 * (model.num_params(exclude_embeddings=True) + 50304 * args.d_model)
    assert attn == 12 * args.n_layers * args.d_model * 2048
    assert preset in param_count_summary(args, preset)


def test_param_count_summary_format():
    assert param_count_summary(build_model_args("7b", vocab_size=50304), "7b").startswith("7b: 6.68B parameters (")
    assert param_count_summary(build_model_args("micro", vocab_size=320), "micro").endswith("M non-embedding)")


def test_causal():
    torch.manual_seed(0)
    model = Transformer(small_args())
    idx = torch.randint(0, 96, (2, 32))
    t = 11
    changed = idx.clone()
    changed[:, t + 1 :] = torch.randint(0, 96, (2, 32 - t - 1))
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-6)
    assert (a[:, t + 1 :] - b[:, t + 1 :]).abs().max() > 1e-4


def test_gqa_forward_and_sizes():
    args = small_args(n_heads=4, n_kv_heads=2)
    model = Transformer(args)
    assert model.layers[0].attn.k_proj.weight.shape == (2 * 16, 64)
    assert model(torch.randint(0, 96, (1, 8))).shape == (1, 8, 96)
    with pytest.raises(ValueError, match="n_kv_heads"):
        small_args(n_heads=4, n_kv_heads=3)


def test_micro_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = Transformer(build_model_args("micro", vocab_size=64))
    idx = torch.randint(0, 64, (4, 33))
    x, y = idx[:, :-1], idx[:, 1:]  # y is a non-contiguous view, as a trainer would pass it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(100):
        loss = model(x, y)
        first = first if first is not None else loss.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    assert first > 3.5  # ~ln(64) = 4.16 at init
    assert model(x, y).item() < 0.5


def test_tied_embeddings_are_one_tensor_counted_once():
    tied, untied = Transformer(small_args()), Transformer(small_args(tie_embeddings=False))
    assert tied.lm_head.weight is tied.tok_embeddings.weight
    assert untied.lm_head.weight is not untied.tok_embeddings.weight
    assert untied.num_params() - tied.num_params() == 96 * 64
    assert tied.num_params() == sum(p.numel() for n, p in tied.named_parameters() if n != "lm_head.weight")
    assert tied.num_params(exclude_embeddings=True) == untied.num_params(exclude_embeddings=True)


def test_meta_device_then_to_empty_then_init():
    torch.manual_seed(0)
    reference = Transformer(small_args())
    with torch.device("meta"):
        model = Transformer(small_args())
    model.to_empty(device="cpu")
    model.init_weights()
    assert model.lm_head.weight is model.tok_embeddings.weight  # re-tied
    torch.testing.assert_close(model.rope_cos, reference.rope_cos, rtol=0, atol=0)
    model.load_state_dict(reference.state_dict())
    idx = torch.randint(0, 96, (2, 16))
    torch.testing.assert_close(model(idx), reference(idx), rtol=0, atol=0)


def test_scaled_residual_init():
    torch.manual_seed(0)
    args = small_args(d_model=128, n_heads=4, n_layers=8, ffn_hidden=384, init_std=0.02)
    layer = Transformer(args).layers[3]
    residual_std = 0.02 / math.sqrt(2 * 8)
    for w in (layer.attn.q_proj.weight, layer.attn.k_proj.weight, layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight):
        assert w.std().item() == pytest.approx(0.02, rel=0.05)
    for w in (layer.attn.o_proj.weight, layer.mlp.down_proj.weight):
        assert w.std().item() == pytest.approx(residual_std, rel=0.05)
    assert (layer.attn_norm.weight == 1).all()


def test_too_long_input_raises():
    model = Transformer(small_args(max_seq_len=16))
    model(torch.zeros(1, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_loss_is_cross_entropy_of_logits():
    torch.manual_seed(0)
    model = Transformer(small_args())
    idx, targets = torch.randint(0, 96, (3, 20)), torch.randint(0, 96, (3, 20))
    logits = model(idx)
    expected = F.cross_entropy(logits.reshape(-1, 96), targets.reshape(-1))
    loss = model(idx, targets)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)


def test_args_round_trip_and_validation():
    args = build_model_args("tiny", vocab_size=320, seq_len=64, tie_embeddings=False)
    data = json.loads(json.dumps(args.to_dict()))
    assert ModelArgs.from_dict(data) == args
    assert data["n_kv_heads"] == data["n_heads"] and data["max_seq_len"] == 64
    assert isinstance(ModelArgs.from_dict({**data, "rope_theta": 10000}).to_dict()["rope_theta"], float)
    with pytest.raises(ValueError, match="unknown keys bias"):
        ModelArgs.from_dict({**data, "bias": True})
    with pytest.raises(ValueError, match="missing keys d_model"):
        ModelArgs.from_dict({k: v for k, v in data.items() if k != "d_model"})
    with pytest.raises(ValueError, match="d_model"):
        small_args(d_model=66, n_heads=4)
