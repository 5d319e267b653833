"""An export from photon_p2p/train/export.py is a working Hugging Face Llama checkpoint.

Proves: transformers' LlamaForCausalLM loads the directory offline with no missing or unexpected weights and
computes the same logits as our model (fp32, max abs diff < 1e-4) for tied and untied embeddings, grouped-query
attention and a non-default rope_theta; the tokenizer files load and encode as the original tokenizer does; a
bf16 export stores bf16; the export never overwrites a non-empty directory and leaves no partial files behind.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from photon_p2p.errors import CheckpointError
from photon_p2p.model import ModelArgs, Transformer
from photon_p2p.train.export import export_hf

transformers = pytest.importorskip("transformers")

EOS = "<|endoftext|>"


def random_model(**overrides) -> Transformer:
    """A small model with O(1) random weights everywhere, norms included, so a wrong mapping shows in the logits."""
    base = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, ffn_hidden=192, max_seq_len=48)
    model = Transformer(ModelArgs(**{**base, **overrides}))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model.eval()


def tiny_tokenizer_json() -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["the", "cat", "sat", "on", "mat", "a", "dog"]
    vocab = {EOS: 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([EOS])
    return tok.to_str()


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_embeddings": False},
        {"n_kv_heads": 2, "rope_theta": 500000.0},
    ],
    ids=["tied", "untied", "gqa-rope-theta"],
)
def test_transformers_computes_the_same_logits(tmp_path, overrides):
    model = random_model(**overrides)
    out = export_hf(model, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary directory left behind

    hf, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf.dtype == torch.float32
    assert hf.config.tie_word_embeddings == model.args.tie_embeddings
    assert hf.config.num_key_value_heads == model.args.n_kv_heads
    hf.eval()

    idx = torch.randint(0, 128, (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(idx), hf(input_ids=idx).logits
    assert ours.std() > 0.5  # the comparison is not between near-zero logits
    assert (ours - theirs).abs().max().item() < 1e-4


def test_tokenizer_files_load(tmp_path):
    tok_json = tiny_tokenizer_json()
    out = export_hf(random_model(), tmp_path / "export", tokenizer_json=tok_json, eos_token=EOS)
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"} <= {
        p.name for p in out.iterdir()
    }
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == 0 and config["bos_token_id"] == 0

    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert tok.convert_tokens_to_ids(EOS) == 0
    auto = transformers.AutoTokenizer.from_pretrained(out)
    assert auto.eos_token == EOS and auto.eos_token_id == 0
    assert auto.model_max_length == 48
    # no extra tokens added around the text: ids are the raw tokenizer's
    assert auto("the cat sat on a mat")["input_ids"] == [2, 3, 4, 5, 7, 6]


def test_bf16_export(tmp_path):
    out = export_hf(random_model(), tmp_path / "export", dtype=torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16


def test_refuses_to_overwrite_a_non_empty_dir(tmp_path):
    target = tmp_path / "export"
    target.mkdir()
    export_hf(random_model(), target)  # an empty directory may be replaced
    with pytest.raises(CheckpointError, match="not empty") as e:
        export_hf(random_model(), target)
    assert str(target) in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
