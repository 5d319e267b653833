"""Checkpoints: complete round trips, keep-last-K, and no checkpoint that loads wrong whatever happens mid-write.

Proves: a LocalSession restored from its checkpoint has the same weights, optimizer moments, sampler position, RNG
and progress, and its next step is bit-identical to the original's (AdamW and 8-bit AdamW alike); moments of the
other --inner-optimizer are refused; the tokenizer travels inside the checkpoint; only the newest K checkpoints are
kept and re-saving a step replaces it; a process SIGKILLed in the middle of save_checkpoint, and a write that fails
on a real "file too large" error (RLIMIT_FSIZE), leave the previous checkpoints loadable and no step-* directory for
the failed one (the next save sweeps the dead writer's temporary directory); a truncated model.safetensors, a
corrupted meta.json or state.pt, or a missing file is a one-line CheckpointError naming the file; a checkpoint of
another model shape or tokenizer is refused with the differences.
"""

from __future__ import annotations

import json
import resource
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from photon_p2p.config import RunConfig
from photon_p2p.data import ByteTokenizer, train_bpe
from photon_p2p.errors import CheckpointError
from photon_p2p.runtime import signal_group, stop_group
from photon_p2p.train.checkpoint import (
    clear_checkpoints,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
    tokenizer_from_checkpoint,
)
from photon_p2p.train.session import LocalSession
from tests.helpers.local import write_corpus

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from more threads, and on a busy machine OpenMP threads that wait for each other at
    every small op make these tests several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "text")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shards")


def make_cfg(corpus: Path, cache: Path, ckdir: Path, **train) -> RunConfig:
    return RunConfig.from_dict(
        {
            "model": {"preset": "micro"},
            "data": {"paths": [str(corpus)], "cache_dir": str(cache)},
            "train": {"max_steps": 50, "batch_size": 4, "device": "cpu", "eval_batches": 1, **train},
            "checkpoint": {"dir": str(ckdir), "keep": 3},
            "swarm": {"local_only": True},
        }
    )


def step_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith("step-"))


def tmp_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".tmp-"))


# --------------------------------------------------------------------------------------------------------------
# round trip


def test_session_round_trip_continues_bit_identically(corpus, cache, tmp_path):
    cfg = make_cfg(corpus, cache, tmp_path / "ck")
    a = LocalSession(cfg, progress=False)
    for _ in range(3):
        a.train_step()
    torch.manual_seed(1234)  # RNG state worth restoring
    path = a.save()
    assert path.name == "step-00000003"
    assert sorted(p.name for p in path.iterdir()) == ["meta.json", "model.safetensors", "state.pt", "tokenizer.json"]

    ckpt = load_checkpoint(path)
    assert ckpt.step == 3 and ckpt.meta["model_args"] == a.model_args.to_dict()
    assert ckpt.meta["config"] == cfg.to_dict()
    torch.manual_seed(0)  # scramble what restore must bring back
    b = LocalSession(cfg, progress=False)
    b.restore(ckpt)

    assert b.progress == a.progress
    for (name, pa), pb in zip(a.model.state_dict().items(), b.model.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name
    assert b.model.lm_head.weight is b.model.tok_embeddings.weight  # still tied after loading
    sa, sb = a.trainer.state_dict(), b.trainer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for k, st in sa["state"].items():
        for key, t in st.items():
            assert torch.equal(t, sb["state"][k][key]), (k, key)
    assert b.sampler.state_dict() == a.sampler.state_dict()
    assert torch.equal(torch.get_rng_state(), ckpt.state["rng"])

    ra, rb = a.train_step(), b.train_step()
    assert ra.loss == rb.loss and ra.lr == rb.lr
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))


def test_adamw8bit_state_round_trips(corpus, cache, tmp_path):
    pytest.importorskip("bitsandbytes")
    cfg = make_cfg(corpus, cache, tmp_path / "ck", inner_optimizer="adamw8bit")
    a = LocalSession(cfg, progress=False)
    a.train_step()
    b = LocalSession(cfg, progress=False)
    b.restore(load_checkpoint(a.save()))
    ra, rb = a.train_step(), b.train_step()
    assert ra.loss == rb.loss
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters(), strict=True))


def test_resuming_with_the_other_inner_optimizer_is_refused(corpus, cache, tmp_path):
    pytest.importorskip("bitsandbytes")
    for saved, now in (("adamw", "adamw8bit"), ("adamw8bit", "adamw")):
        a = LocalSession(make_cfg(corpus, cache, tmp_path / saved, inner_optimizer=saved), progress=False)
        a.train_step()
        b = LocalSession(make_cfg(corpus, cache, tmp_path / saved, inner_optimizer=now), progress=False)
        with pytest.raises(CheckpointError) as e:
            b.restore(load_checkpoint(a.save()))
        assert f"--inner-optimizer {saved} moments, but this run uses --inner-optimizer {now}" in str(e.value)


def test_model_and_tokenizer_come_back_from_a_checkpoint(corpus, cache, tmp_path):
    tok_path = tmp_path / "tok.json"
    train_bpe([str(corpus)], 300, str(tok_path), progress=False)
    cfg = make_cfg(corpus, cache, tmp_path / "ck")
    cfg.data.tokenizer = str(tok_path)
    session = LocalSession(cfg, progress=False)
    session.train_step()
    ckpt = load_checkpoint(session.save())
    tok_path.unlink()  # the checkpoint carries its own copy
    tok = tokenizer_from_checkpoint(ckpt)
    assert tok.fingerprint == session.tokenizer.fingerprint
    assert tok.encode("the lazy dog") == session.tokenizer.encode("the lazy dog")
    model = model_from_checkpoint(ckpt)
    assert not model.training
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), session.model.parameters(), strict=True))


def test_byte_tokenizer_of_a_checkpoint_without_tokenizer_json(tmp_path):
    # checkpoints written before tokenizer.json existed name the tokenizer in their config
    path = save_checkpoint(
        tmp_path,
        1,
        tensors={"model": {}},
        state={},
        meta={"tokenizer": ByteTokenizer().fingerprint, "config": {"data": {"tokenizer": "byte"}}},
        keep=1,
    )
    assert isinstance(tokenizer_from_checkpoint(load_checkpoint(path)), ByteTokenizer)


# --------------------------------------------------------------------------------------------------------------
# keep-last-K, replacing a step, --fresh


def small_save(root: Path, step: int, keep: int = 3, value: float = 0.0) -> Path:
    return save_checkpoint(
        root,
        step,
        tensors={"model": {"w": torch.full((4,), value)}},
        state={"step": step},
        meta={"note": "test"},
        keep=keep,
    )


def test_keeps_the_last_k(tmp_path):
    for step in (1, 2, 3, 10, 11):
        small_save(tmp_path, step, keep=2)
    assert step_dirs(tmp_path) == ["step-00000010", "step-00000011"]
    assert tmp_dirs(tmp_path) == []
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000011"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000010", "step-00000011"]


def test_resaving_a_step_replaces_it(tmp_path):
    small_save(tmp_path, 5, value=1.0)
    small_save(tmp_path, 5, value=2.0)
    assert step_dirs(tmp_path) == ["step-00000005"] and tmp_dirs(tmp_path) == []
    assert load_checkpoint(tmp_path / "step-00000005").tensors["model"]["w"][0].item() == 2.0


def test_clear_checkpoints(tmp_path):
    for step in (1, 2):
        small_save(tmp_path, step)
    (tmp_path / "other.txt").write_text("not ours")
    assert clear_checkpoints(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.txt"]
    assert clear_checkpoints(tmp_path / "missing") == 0


# --------------------------------------------------------------------------------------------------------------
# crash safety: real failures in real processes


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    from photon_p2p.train.checkpoint import save_checkpoint

    root, marker = Path(sys.argv[1]), Path(sys.argv[2])

    class Stall:
        # pickled by torch.save after the weights are on disk: a writer caught in the middle of a checkpoint
        def __reduce__(self):
            marker.write_text("inside save_checkpoint")
            time.sleep(600)

    save_checkpoint(root, 3, tensors={"model": {"w": torch.randn(300_000)}}, state={"stall": Stall()},
                    meta={}, keep=5)
""")


def test_writer_killed_mid_checkpoint_leaves_the_previous_ones_intact(tmp_path):
    root = tmp_path / "ck"
    for step in (1, 2):
        small_save(root, step, value=float(step))
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root), str(marker)], cwd=REPO, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert proc.poll() is None, "the writer exited early"
            assert time.monotonic() < deadline, "the writer never got inside save_checkpoint"
            time.sleep(0.05)
        (tmp_written,) = tmp_dirs(root)  # it did write part of step 3 ...
        assert (root / tmp_written / "model.safetensors").stat().st_size > 1_000_000
        signal_group(proc.pid, signal.SIGKILL)
    finally:
        stop_group(proc, grace=0.0, sig=signal.SIGKILL, reap=30.0)

    assert step_dirs(root) == ["step-00000001", "step-00000002"]  # ... but no step-00000003
    assert latest_checkpoint(root) == root / "step-00000002"
    assert load_checkpoint(latest_checkpoint(root)).tensors["model"]["w"][0].item() == 2.0
    small_save(root, 4)  # the next save sweeps the dead writer's leftovers
    assert tmp_dirs(root) == []
    assert step_dirs(root) == ["step-00000001", "step-00000002", "step-00000004"]


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    import torch
    from photon_p2p.errors import CheckpointError
    from photon_p2p.train.checkpoint import save_checkpoint

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so an oversized write fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), resource.RLIM_INFINITY))
    try:
        save_checkpoint(sys.argv[1], 3, tensors={"model": {"w": torch.randn(50_000)}},
                        state={"big": torch.randn(int(sys.argv[3]))}, meta={}, keep=5)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
""")


@pytest.mark.parametrize("where", ["safetensors", "state.pt"])
def test_failed_write_leaves_nothing_behind(tmp_path, where):
    root = tmp_path / "ck"
    for step in (1, 2):
        small_save(root, step, value=float(step))
    # the weights (200 kB) exceed a 100 kB file size limit; or they fit under 300 kB and the state (800 kB) does not
    limit, state_numel = (100_000, 10) if where == "safetensors" else (300_000, 200_000)
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(root), str(limit), str(state_numel)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: cannot write checkpoint {root / 'step-00000003'}: ")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert step_dirs(root) == ["step-00000001", "step-00000002"]
    assert tmp_dirs(root) == []
    assert load_checkpoint(root / "step-00000002").state == {"step": 2}
    assert resource.getrlimit(resource.RLIMIT_FSIZE)[0] == resource.RLIM_INFINITY  # the limit stayed in the child


# --------------------------------------------------------------------------------------------------------------
# damaged checkpoints


@pytest.fixture
def saved(corpus, cache, tmp_path) -> Path:
    session = LocalSession(make_cfg(corpus, cache, tmp_path / "ck"), progress=False)
    session.train_step()
    return session.save()


def test_truncated_weights_name_the_file(saved):
    weights = saved / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(saved)
    assert "model.safetensors is truncated or modified" in str(e.value) and str(saved) in str(e.value)
    assert "\n" not in str(e.value)


def test_edited_weights_of_the_same_size_are_caught_by_the_hash(saved):
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or modified"):
        load_checkpoint(saved)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"format": 1, "files": {', "meta.json is corrupt"),
        ("", "meta.json is corrupt"),
        ('{"format": 99, "files": {}}', "unknown format 99"),
        ("[1, 2]", "unknown format ?"),
    ],
)
def test_corrupted_meta_names_the_file(saved, text, expected):
    (saved / "meta.json").write_text(text)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(saved)
    assert expected in str(e.value) and str(saved) in str(e.value)


def test_missing_files_and_damaged_state(saved):
    (saved / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="state.pt is truncated or modified"):
        load_checkpoint(saved)
    (saved / "state.pt").unlink()
    with pytest.raises(CheckpointError, match="is missing state.pt"):
        load_checkpoint(saved)
    (saved / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="has no meta.json"):
        load_checkpoint(saved)


def test_a_checkpoint_of_another_model_shape_lists_the_differences(corpus, cache, saved, tmp_path):
    other = make_cfg(corpus, cache, tmp_path / "other")
    other.model.preset = "tiny"
    session = LocalSession(other, progress=False)
    with pytest.raises(CheckpointError) as e:
        session.restore(load_checkpoint(saved))
    msg = str(e.value)
    for diff in (
        "d_model 64 (checkpoint) != 128 (now)",
        "n_layers 2 (checkpoint) != 4 (now)",
        "max_seq_len 64 (checkpoint) != 128 (now)",
    ):
        assert diff in msg
    assert "vocab_size" not in msg  # only what differs
    assert "\n" not in msg


def test_a_checkpoint_with_a_different_tokenizer_is_refused(corpus, cache, saved, tmp_path):
    tok_path = tmp_path / "tok.json"
    train_bpe([str(corpus)], 300, str(tok_path), progress=False)
    other = make_cfg(corpus, cache, tmp_path / "other")
    other.data.tokenizer = str(tok_path)
    other.model.vocab_size = 320  # same shape as the byte tokenizer's padded vocabulary
    session = LocalSession(other, progress=False)
    with pytest.raises(CheckpointError, match="different tokenizer"):
        session.restore(load_checkpoint(saved))


def test_meta_is_plain_json(saved):
    meta = json.loads((saved / "meta.json").read_text())
    assert meta["step"] == 1 and meta["format"] == 1
    assert set(meta["files"]) == {"model.safetensors", "state.pt", "tokenizer.json"}
    assert meta["aliases"] == {"model": {"lm_head.weight": "tok_embeddings.weight"}}
