"""``BatchSampler`` yields (x, y) next-token pairs from whole windows, visits every window of its partition exactly
once per epoch, is reproducible from its seed, resumes from ``state_dict`` exactly as if never stopped (across an
epoch boundary too), gives peers disjoint partitions that cover the data, and refuses a state saved for other data;
``iter_eval_batches`` is deterministic and copes with tiny validation splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from photon_p2p.data.sampler import BatchSampler, iter_eval_batches
from photon_p2p.data.shards import prepare_dataset
from photon_p2p.data.tokenizer import ByteTokenizer
from photon_p2p.errors import DataError

# position i holds i: a window's first token tells which window it is
TOKENS = np.arange(10_000, dtype=np.uint32)
SEQ = 16
NUM_WINDOWS = (len(TOKENS) - 1) // SEQ  # 624


def window_ids(x: torch.Tensor) -> list[int]:
    starts = x[:, 0].tolist()
    assert all(s % SEQ == 0 for s in starts)
    return [s // SEQ for s in starts]


def test_batches_are_shifted_windows() -> None:
    s = BatchSampler(TOKENS, seq_len=SEQ, batch_size=8, seed=0)
    x, y = s.next_batch()
    assert x.shape == y.shape == (8, SEQ) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    assert torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x - x[:, :1], torch.arange(SEQ).expand(8, SEQ))  # contiguous windows
    assert s.tokens_per_batch == 8 * SEQ


def test_each_epoch_visits_every_window_once_in_a_new_order() -> None:
    s = BatchSampler(TOKENS, seq_len=SEQ, batch_size=48, seed=3)  # 624 = 13 x 48: epochs end on a batch
    epochs = [[i for _ in range(13) for i in window_ids(s.next_batch()[0])] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(NUM_WINDOWS))
    assert epochs[0] != epochs[1]
    assert s.epoch == 2 and s.position == 0


def test_batches_span_epoch_boundaries() -> None:
    s = BatchSampler(TOKENS, seq_len=SEQ, batch_size=50, seed=1)  # 624 = 12 x 50 + 24
    seen = [i for _ in range(25) for i in window_ids(s.next_batch()[0])]
    assert sorted(seen[:NUM_WINDOWS]) == list(range(NUM_WINDOWS))
    assert sorted(seen[NUM_WINDOWS : 2 * NUM_WINDOWS]) == list(range(NUM_WINDOWS))
    assert (s.epoch, s.position) == (2, 2)


def test_same_seed_same_batches_different_seed_different() -> None:
    a, b, c = (BatchSampler(TOKENS, seq_len=SEQ, batch_size=4, seed=seed) for seed in (7, 7, 8))
    for _ in range(200):  # more than one epoch (156 batches)
        xa, ya = a.next_batch()
        xb, yb = b.next_batch()
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(a.next_batch()[0], c.next_batch()[0])


def test_resume_mid_epoch_continues_exactly_across_the_epoch_boundary() -> None:
    original = BatchSampler(TOKENS, seq_len=SEQ, batch_size=10, seed=5)
    for _ in range(55):  # 550 of 624 windows: mid-epoch
        original.next_batch()
    state = original.state_dict()
    assert all(isinstance(v, int) for k, v in state.items() if k != "partition")
    assert state["partition"] == [0, 1] and all(isinstance(v, int) for v in state["partition"])
    restored = BatchSampler(TOKENS, seq_len=SEQ, batch_size=10, seed=999)  # the checkpoint's seed wins
    restored.load_state_dict(state)
    for _ in range(20):  # crosses into epoch 1 at batch 8 (mid-batch)
        xo, yo = original.next_batch()
        xr, yr = restored.next_batch()
        assert torch.equal(xo, xr) and torch.equal(yo, yr)
    assert original.epoch == restored.epoch == 1
    assert original.state_dict() == restored.state_dict()


def test_partitions_are_disjoint_and_cover_all_windows() -> None:
    n = 3
    shares = []
    for k in range(n):
        s = BatchSampler(TOKENS, seq_len=SEQ, batch_size=8, seed=0, partition=(k, n))
        assert s.windows_per_epoch == 208
        shares.append({i for _ in range(26) for i in window_ids(s.next_batch()[0])})
        assert all(i % n == k for i in shares[-1])
    assert sum(len(sh) for sh in shares) == NUM_WINDOWS
    assert set().union(*shares) == set(range(NUM_WINDOWS))


def test_state_from_different_data_or_settings_is_refused() -> None:
    state = BatchSampler(TOKENS, seq_len=SEQ, batch_size=4, seed=0).state_dict()
    cases = [
        (BatchSampler(TOKENS[:5000], seq_len=SEQ, batch_size=4, seed=0), "10,000 training tokens, now 5,000"),
        (BatchSampler(TOKENS, seq_len=32, batch_size=4, seed=0), "--seq-len was 16, now 32"),
        (BatchSampler(TOKENS, seq_len=SEQ, batch_size=4, seed=0, partition=(1, 2)), "partition was 0 of 1"),
    ]
    for sampler, why in cases:
        with pytest.raises(DataError, match=f"^the data changed since this checkpoint: .*{why}"):
            sampler.load_state_dict(state)
    # another batch size is fine: the position counts windows
    BatchSampler(TOKENS, seq_len=SEQ, batch_size=7, seed=0).load_state_dict(state)
    with pytest.raises(DataError, match="malformed"):
        BatchSampler(TOKENS, seq_len=SEQ, batch_size=4, seed=0).load_state_dict({"epoch": 1})
    with pytest.raises(DataError, match="malformed"):
        BatchSampler(TOKENS, seq_len=SEQ, batch_size=4, seed=0).load_state_dict({**state, "position": 10_000})


def test_too_little_data_is_an_error_with_the_numbers() -> None:
    with pytest.raises(DataError, match=r"only 64 tokens, fewer than --seq-len \+ 1 = 65; use a shorter --seq-len"):
        BatchSampler(np.arange(64, dtype=np.uint16), seq_len=64, batch_size=2, seed=0)
    BatchSampler(np.arange(65, dtype=np.uint16), seq_len=64, batch_size=2, seed=0).next_batch()  # one window is ok
    with pytest.raises(DataError, match="partition 2 of 3"):
        BatchSampler(np.arange(33, dtype=np.uint16), seq_len=16, batch_size=2, seed=0, partition=(2, 3))


def test_eval_batches_are_deterministic_contiguous_and_bounded() -> None:
    batches = list(iter_eval_batches(TOKENS, seq_len=SEQ, batch_size=4, max_batches=3))
    again = list(iter_eval_batches(TOKENS, seq_len=SEQ, batch_size=4, max_batches=3))
    assert len(batches) == 3
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again, strict=True))
    assert [i for x, _ in batches for i in window_ids(x)] == list(range(12))
    x, y = batches[0]
    assert torch.equal(y[:, :-1], x[:, 1:])
    # fewer windows than max_batches x batch_size: the last batch is smaller
    sizes = [x.shape[0] for x, _ in iter_eval_batches(np.arange(100), seq_len=SEQ, batch_size=4, max_batches=10)]
    assert sizes == [4, 2]  # (100 - 1) // 16 = 6 windows


def test_eval_on_a_tiny_validation_split_uses_one_shorter_window() -> None:
    ((x, y),) = iter_eval_batches(np.arange(10, dtype=np.uint16), seq_len=64, batch_size=8, max_batches=4)
    assert x.tolist() == [list(range(9))] and y.tolist() == [list(range(1, 10))]
    with pytest.raises(DataError, match="too few to evaluate"):
        list(iter_eval_batches(np.arange(1), seq_len=64, batch_size=8, max_batches=4))


def test_sampler_on_real_memmapped_shards(shared_data: Path, tmp_path: Path) -> None:
    ds = prepare_dataset(
        [str(shared_data / "tinyshakespeare.txt.gz")],
        ByteTokenizer(),
        cache_dir=str(tmp_path),
        val_fraction=0.02,
        progress=False,
    )
    s = BatchSampler(ds.train, seq_len=128, batch_size=16, seed=0, partition=(1, 2))
    x, y = s.next_batch()
    assert x.shape == (16, 128) and int(x.max()) < ds.vocab_size_needed
    text = ByteTokenizer().decode(x[0].tolist())
    assert all(c.isprintable() or c.isspace() for c in text)  # real text, not garbage
    evals = list(iter_eval_batches(ds.val, seq_len=128, batch_size=16, max_batches=2))
    assert len(evals) == 2 and evals[0][0].shape == (16, 128)
