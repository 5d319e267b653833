"""``photon-generate``: text sampled from a real trained checkpoint, its photon-export folder and a swarm checkpoint.

Proves, on a micro model trained for a few steps by a real ``photon-peer --local-only`` run: greedy decoding
(--temperature 0) from the checkpoint directory and from its photon-export folder print the very same text, equal
to an independent greedy loop over the checkpoint's weights (end-of-text token first, padded vocabulary rows never
chosen, the context cropped to max_seq_len), with the prompt as an exact prefix, the text alone on stdout and what
was loaded on stderr; --seed makes sampling reproducible, sample i of --num-samples uses seed + i, and different
seeds give different texts; on a swarm checkpoint (model and theta differ) --weights theta and local give different
greedy text, auto gives theta's, and theta's equals the trained model's. Missing, empty and corrupt paths, an
incomplete export, a prompt longer than the context and bad flags are each one ``error:`` line, exit 2, no traceback.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch

from photon_p2p.cli.generate import main
from photon_p2p.data.tokenizer import ByteTokenizer
from photon_p2p.model import ModelArgs, Transformer
from photon_p2p.train.checkpoint import load_checkpoint, save_checkpoint
from tests.helpers.local import assert_one_line_error, run_cli, write_corpus

PROMPT = "the quick"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """A micro model trained for 30 steps (checkpoints at 15 and 30) and a photon-export of its latest checkpoint."""
    root = tmp_path_factory.mktemp("generate")
    corpus = write_corpus(root / "corpus", files=3, lines=100)
    proc = run_cli(
        "photon-peer",
        ["--local-only", "--data", corpus, "--cache-dir", root / "cache", "--model", "micro", "--max-steps", "30",
         "--batch-size", "8", "--lr", "1e-2", "--eval-every", "0", "--eval-batches", "1", "--checkpoint-dir",
         root / "ck", "--checkpoint-every", "15", "--no-progress", "--threads", "1"],
        cwd=root,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("photon-export", [root / "ck", "--output", root / "hf"], cwd=root)
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "ck": root / "ck", "step": root / "ck" / "step-00000030", "hf": root / "hf"}


@pytest.fixture
def cli(capsys, monkeypatch):
    """photon-generate's main() in this process (no second torch import): (exit code, stdout, stderr)."""
    before = signal.getsignal(signal.SIGTERM)  # run_main installs its own SIGTERM handler
    # setup_logging() changes process-wide logging (levels, a root handler): put it back for the tests after us
    root, ours = logging.getLogger(), logging.getLogger("photon_p2p")
    saved = (root.level, list(root.handlers), ours.level)
    # ... and it sets HIVEMIND_LOGLEVEL in os.environ, which every process a later test starts would inherit
    # (hivemind-dht would then never print its address): monkeypatch restores the environment after the test
    monkeypatch.setenv("HIVEMIND_LOGLEVEL", os.environ.get("HIVEMIND_LOGLEVEL", "INFO"))

    def call(*argv: object) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's errors exit from inside parse_args
            code = int(e.code or 0)
        finally:
            signal.signal(signal.SIGTERM, before)
            root.setLevel(saved[0])
            root.handlers[:] = saved[1]
            ours.setLevel(saved[2])
        out, err = capsys.readouterr()
        return code, out, err

    return call


def trained_model(step_dir: Path) -> Transformer:
    ckpt = load_checkpoint(step_dir)
    model = Transformer(ModelArgs.from_dict(ckpt.meta["model_args"]))
    model.load_state_dict(ckpt.tensors["model"])
    return model.eval()


def greedy_reference(model: Transformer, prompt: str, n: int) -> str:
    """Greedy decoding written out plainly: what --temperature 0 must print."""
    tok = ByteTokenizer()
    ids = [tok.eos_id, *tok.encode(prompt)]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids[-model.args.max_seq_len :]]))[0, -1]
            token = int(logits[: tok.vocab_size].argmax())  # rows past the tokenizer's vocabulary are padding
            if token == tok.eos_id:
                break
            new.append(token)
            ids.append(token)
    return prompt + tok.decode(new)


def samples(stdout: str, n: int) -> list[str]:
    """The texts of a --num-samples n output, without their ``=== sample i of n ===`` lines."""
    parts = []
    rest = stdout
    for i in range(1, n + 1):
        header = f"=== sample {i} of {n} ===\n"
        assert header in rest, stdout
        before, rest = rest.split(header, 1)
        if i > 1:
            parts.append(before.removesuffix("\n\n"))
    parts.append(rest.removesuffix("\n"))
    return parts


# --------------------------------------------------------------------------------------------------------------
# the console script on a checkpoint and on its export


def test_greedy_text_is_the_same_from_checkpoint_and_export(run):
    args = ["--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "80"]
    from_ck = run_cli("photon-generate", [run["ck"], *args], cwd=run["root"])
    assert from_ck.returncode == 0, from_ck.stderr
    from_hf = run_cli("photon-generate", [run["hf"], *args], cwd=run["root"])
    assert from_hf.returncode == 0, from_hf.stderr

    # 80 new tokens after 10 of context: past max_seq_len 64, so the context is cropped along the way
    expected = greedy_reference(trained_model(run["step"]), PROMPT, 80)
    assert len(expected) > len(PROMPT)
    assert from_ck.stdout == expected + "\n"  # the text alone: logging goes to stderr
    assert from_hf.stdout == from_ck.stdout
    assert f"loaded {run['step']} (step 30, " in from_ck.stderr
    assert "weights: local (a --local-only checkpoint has no other)" in from_ck.stderr
    assert "greedy" in from_ck.stderr and "context 64 tokens" in from_ck.stderr
    assert f"loaded {run['hf']} (" in from_hf.stderr and "weights: export" in from_hf.stderr
    assert "Traceback" not in from_ck.stderr + from_hf.stderr


def test_sampling_is_reproducible_per_seed(run, cli):
    args = [run["step"], "--prompt", PROMPT, "--max-new-tokens", "40"]
    code, out, _ = cli(*args, "--seed", "5", "--num-samples", "2")
    assert code == 0
    first, second = samples(out, 2)
    assert first.startswith(PROMPT) and second.startswith(PROMPT)
    assert first != second
    assert cli(*args, "--seed", "5", "--num-samples", "2")[1] == out  # the same seed: the same texts
    code, out6, _ = cli(*args, "--seed", "6")
    assert code == 0 and "===" not in out6
    assert out6 == second + "\n"  # sample 2 of seed 5 is sample 1 of seed 6
    assert cli(*args, "--seed", "6", "--top-k", "0", "--temperature", "1.5")[1] != out6


# --------------------------------------------------------------------------------------------------------------
# a swarm checkpoint: the local model and theta differ


@pytest.fixture(scope="module")
def swarm_ck(run) -> Path:
    """A checkpoint laid out as RoundEngine.save writes it: theta = the trained weights, model = a fresh random
    init (as if this peer had wandered off), plus outer-optimizer state."""
    src = load_checkpoint(run["step"])
    trained = trained_model(run["step"])
    torch.manual_seed(1234)
    local = Transformer(trained.args)
    theta = {f"{i:05d}": p.detach().clone() for i, p in enumerate(trained.parameters())}
    outer = {f"{i:05d}": torch.zeros_like(p) for i, p in enumerate(trained.parameters())}
    meta = {k: v for k, v in src.meta.items() if k not in ("format", "step", "files", "aliases")}
    root = run["root"] / "swarm-ck"
    save_checkpoint(root, src.step, tensors={"model": local.state_dict(), "theta": theta, "outer": outer},
                    state={"round": 3}, meta=meta, keep=1,
                    text_files={"tokenizer.json": (src.path / "tokenizer.json").read_text()})  # fmt: skip
    return root


def test_weights_theta_local_and_auto(run, swarm_ck, cli, caplog):
    caplog.set_level("INFO", logger="photon_p2p")
    greedy = ["--prompt", PROMPT, "--temperature", "0", "--max-new-tokens", "40"]
    texts = {}
    for weights in ("theta", "local", "auto"):
        caplog.clear()
        code, out, err = cli(swarm_ck, *greedy, "--weights", weights)
        assert code == 0, err
        texts[weights] = out
        said = "weights: local (this peer's own copy" if weights == "local" else "weights: theta (the swarm's model)"
        assert said in caplog.text, caplog.text
    assert texts["theta"] != texts["local"]
    assert texts["auto"] == texts["theta"]
    assert texts["theta"] == greedy_reference(trained_model(run["step"]), PROMPT, 40) + "\n"  # theta = trained

    code, out, err = cli(run["ck"], *greedy, "--weights", "theta")  # a --local-only run has no theta
    assert code == 2 and out == "" and "holds no swarm model (theta)" in err


# --------------------------------------------------------------------------------------------------------------
# errors


def one_error(result: tuple[int, str, str], *needles: str) -> None:
    code, out, err = result
    assert code == 2, (code, out, err)
    assert out == "" and err.count("\n") == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err


def test_bad_paths(run, cli, tmp_path):
    one_error(cli(tmp_path / "missing"), "missing: no such directory", "photon-export")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_error(cli(empty), "neither a checkpoint", "nor a photon-export folder")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    one_error(cli(a_file), "not a directory")

    step = tmp_path / "ck" / "step-00000030"
    shutil.copytree(run["step"], step)
    weights = step / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    one_error(cli(tmp_path / "ck"), "model.safetensors is truncated or modified")

    hf = tmp_path / "hf"
    shutil.copytree(run["hf"], hf)
    (hf / "tokenizer.json").unlink()
    one_error(cli(hf), "has no tokenizer.json")
    one_error(cli(run["hf"], "--weights", "local"), "--weights local", "photon-export folder")
    (hf / "model.safetensors").write_bytes((run["hf"] / "model.safetensors").read_bytes()[:-100])
    one_error(cli(hf), "model.safetensors: cannot be read")
    (hf / "model.safetensors").unlink()
    one_error(cli(hf), "config.json but no model.safetensors")


def test_bad_flags_and_prompt(run, cli):
    ck = run["ck"]
    one_error(cli(ck, "--prompt", "x" * 64), "--prompt is 64 tokens", "context is 64 tokens")
    one_error(cli(ck, "--temperature", "-1"), "--temperature", "at least 0")
    one_error(cli(ck, "--max-new-tokens", "0"), "--max-new-tokens", "at least 1")
    one_error(cli(ck, "--top-k", "many"), "--top-k", "not a whole number")
    one_error(cli(ck, "--weights", "both"), "--weights", "invalid choice")
    one_error(cli(ck, "--device", "toaster"), "--device 'toaster'", "not a device")
    if not torch.cuda.is_available():
        one_error(cli(ck, "--device", "cuda"), "no usable CUDA GPU")
    code, out, _ = cli(ck, "--prompt", "x" * 63, "--max-new-tokens", "3", "--temperature", "0")  # just fits
    assert code == 0 and out.startswith("x" * 63)


def test_a_corrupt_export_is_one_line_from_the_console_script(run, tmp_path):
    hf = tmp_path / "hf"
    shutil.copytree(run["hf"], hf)
    (hf / "model.safetensors").write_bytes(b"\x00" * 64)
    proc = run_cli("photon-generate", [hf], cwd=tmp_path)
    assert_one_line_error(proc, str(hf / "model.safetensors"), "cannot be read")
    assert proc.stdout == ""
