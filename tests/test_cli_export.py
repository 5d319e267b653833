"""``photon-export``: a checkpoint trained by ``photon-peer`` becomes a working Hugging Face Llama directory.

Proves, with real subprocesses: a run with a trained BPE tokenizer and untied embeddings is exported from its
checkpoint directory (the latest checkpoint) or from one step directory (that one); transformers'
LlamaForCausalLM loads it offline and computes the logits of our model rebuilt from the checkpoint (max abs diff
< 1e-4); the exported tokenizer loads with PreTrainedTokenizerFast and encodes text exactly as ours does, even after
the original tokenizer file is gone; --dtype bf16 stores bf16. A missing directory, a directory without
checkpoints, a corrupt checkpoint, a non-empty --output and a bad --dtype are each one ``error:`` line, exit 2,
with nothing written. A swarm checkpoint exports theta (the swarm's model), or the peer's local copy with
``--weights local``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from photon_p2p.data import load_tokenizer, train_bpe
from photon_p2p.model import ModelArgs, Transformer
from photon_p2p.train.checkpoint import load_checkpoint
from tests.helpers.local import assert_one_line_error, run_cli, write_corpus

transformers = pytest.importorskip("transformers")

TEXT = "the quick brown fox jumps over the lazy dog.\nnobody knows why <|endoftext|> seven cats"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A short photon-peer run with its own BPE tokenizer, untied embeddings and checkpoints at steps 3 and 6."""
    root = tmp_path_factory.mktemp("export")
    corpus = write_corpus(root / "corpus")
    tok_path = root / "tok.json"
    train_bpe([str(corpus)], 320, str(tok_path), progress=False)
    tok = load_tokenizer(str(tok_path))
    proc = run_cli(
        "photon-peer",
        [
            "--local-only",
            "--data",
            corpus,
            "--cache-dir",
            root / "cache",
            "--tokenizer",
            tok_path,
            "--model",
            "micro",
            "--no-tie-embeddings",
            "--max-steps",
            "6",
            "--batch-size",
            "4",
            "--lr",
            "1e-2",
            "--eval-every",
            "0",
            "--eval-batches",
            "1",
            "--checkpoint-dir",
            root / "ck",
            "--checkpoint-every",
            "3",
            "--no-progress",
            "--threads",
            "1",
        ],
        cwd=root,
    )
    assert proc.returncode == 0, proc.stderr
    tok_path.unlink()  # the export must not need the original file
    return root, tok


def our_model(step_dir: Path) -> Transformer:
    """Our model rebuilt by hand from a checkpoint: its model_args and weights."""
    ckpt = load_checkpoint(step_dir)
    model = Transformer(ModelArgs.from_dict(ckpt.meta["model_args"]))
    model.load_state_dict(ckpt.tensors["model"])
    return model.eval()


def test_export_latest_checkpoint_matches_our_logits_and_tokenizer(run):
    root, tok = run
    out = root / "hf-latest"
    proc = run_cli("photon-export", [root / "ck", "--output", out], cwd=root)
    assert proc.returncode == 0, proc.stderr
    assert f"exported {root / 'ck' / 'step-00000006'} to {out}" in proc.stdout
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()
    }

    hf, info = transformers.LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert hf.config.tie_word_embeddings is False
    ours = our_model(root / "ck" / "step-00000006")
    ids = torch.tensor([tok.encode(TEXT)[:64]])
    with torch.no_grad():
        expected, got = ours(ids), hf.eval()(input_ids=ids).logits
    assert expected.std() > 0.1
    assert (expected - got).abs().max().item() < 1e-4

    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(out / "tokenizer.json"))
    assert hf_tok.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT)
    assert hf_tok.encode(TEXT) == tok.encode(TEXT)  # no extra tokens are added around a text
    assert hf_tok.decode(tok.encode("the lazy dog")) == "the lazy dog"
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == tok.eos_id and config["vocab_size"] == ours.args.vocab_size


def test_export_one_step_dir_in_bf16(run):
    root, tok = run
    out = root / "hf-step3"
    proc = run_cli("photon-export", [root / "ck" / "step-00000003", "--output", out, "--dtype", "bf16"], cwd=root)
    assert proc.returncode == 0, proc.stderr
    hf = transformers.LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    ours = our_model(root / "ck" / "step-00000003")
    later = our_model(root / "ck" / "step-00000006")
    weight = hf.model.embed_tokens.weight
    assert torch.equal(weight, ours.tok_embeddings.weight.to(torch.bfloat16).float())  # step 3, rounded to bf16
    assert not torch.equal(weight, later.tok_embeddings.weight.to(torch.bfloat16).float())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_bad_inputs(run, tmp_path):
    root, _ = run
    missing = tmp_path / "missing"
    assert_one_line_error(
        run_cli("photon-export", [missing, "-o", tmp_path / "out"], cwd=tmp_path), str(missing), "no such directory"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(
        run_cli("photon-export", [empty, "-o", tmp_path / "out"], cwd=tmp_path), str(empty), "holds no checkpoint"
    )
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert_one_line_error(
        run_cli("photon-export", [a_file, "-o", tmp_path / "out"], cwd=tmp_path), str(a_file), "not a directory"
    )
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    assert_one_line_error(
        run_cli("photon-export", [root / "ck", "-o", busy], cwd=tmp_path), f"--output {busy}", "not empty"
    )
    assert [p.name for p in busy.iterdir()] == ["keep.txt"]
    assert_one_line_error(
        run_cli("photon-export", [root / "ck", "-o", tmp_path / "out", "--dtype", "fp8"], cwd=tmp_path),
        "argument --dtype: invalid choice: 'fp8'",
    )
    assert_one_line_error(run_cli("photon-export", [root / "ck"], cwd=tmp_path), "--output")
    assert not (tmp_path / "out").exists()


def test_corrupt_checkpoint(run, tmp_path):
    import shutil

    root, _ = run
    step = tmp_path / "ck" / "step-00000006"
    shutil.copytree(root / "ck" / "step-00000006", step)
    weights = step / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    proc = run_cli("photon-export", [tmp_path / "ck", "-o", tmp_path / "out"], cwd=tmp_path)
    assert_one_line_error(proc, str(step), "model.safetensors is truncated or modified")
    (step / "meta.json").write_text("{not json")
    proc = run_cli("photon-export", [step, "-o", tmp_path / "out"], cwd=tmp_path)
    assert_one_line_error(proc, str(step), "meta.json is corrupt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no output, no partial directory


def test_a_swarm_checkpoint_exports_theta_unless_told_local(run, tmp_path):
    """A swarm checkpoint holds theta (the swarm's model) beside this peer's local copy: the export is theta."""
    from safetensors.torch import load_file

    from photon_p2p.train.checkpoint import save_checkpoint
    from photon_p2p.train.export import hf_state_dict

    root, _ = run
    local = load_checkpoint(root / "ck" / "step-00000006")
    model = our_model(local.path)
    theta = {f"{i:05d}": p.detach() + 0.5 for i, p in enumerate(model.parameters())}
    save_checkpoint(
        tmp_path / "swarm",
        6,
        tensors={"model": local.tensors["model"], "theta": theta},
        state={**local.state, "round": 2},
        meta=local.meta,
        keep=1,
        text_files={"tokenizer.json": (local.path / "tokenizer.json").read_text()},
    )
    exported = {}
    for flags in ([], ["--weights", "local"], ["--weights", "theta"]):
        out = tmp_path / ("out" + "-".join(flags))
        proc = run_cli("photon-export", [tmp_path / "swarm", "-o", out, *flags], cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        exported[tuple(flags)] = load_file(out / "model.safetensors")
    with torch.no_grad():
        want_local = hf_state_dict(model)
        for p, t in zip(model.parameters(), theta.values(), strict=True):
            p.copy_(t)
        want_theta = hf_state_dict(model)
    for flags, want in (((), want_theta), (("--weights", "theta"), want_theta), (("--weights", "local"), want_local)):
        assert all(torch.equal(exported[flags][k], want[k]) for k in want), flags
    proc = run_cli("photon-export", [root / "ck", "-o", tmp_path / "x", "--weights", "theta"], cwd=tmp_path)
    assert_one_line_error(proc, "holds no swarm model (theta)")
