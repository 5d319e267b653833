"""Batches from a flat token stream: a shuffled, resumable training sampler and deterministic evaluation batches.

The stream is cut into windows of ``seq_len + 1`` tokens starting at multiples of ``seq_len`` (neighbours share one
token: the last target of one window is the first input of the next), so every token is trained on as a target
exactly once per epoch. Documents are packed back to back with an end-of-text token between them, as in GPT-2, so
windows freely cross document boundaries.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from photon_p2p.errors import DataError

logger = logging.getLogger(__name__)


def _num_windows(num_tokens: int, seq_len: int) -> int:
    return max(0, (num_tokens - 1) // seq_len)


def _gather(tokens: np.ndarray, starts: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    # one fancy-indexing read per batch: memmapped data is only touched where the windows are
    rows = np.asarray(tokens[starts[:, None] + np.arange(length + 1)], dtype=np.int64)
    data = torch.from_numpy(rows)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


class BatchSampler:
    """Random batches of whole windows; each epoch visits every window of this peer's partition once.

    ``partition=(k, n)`` keeps windows ``i`` with ``i % n == k``: ``n`` peers sharing one copy of the data get
    disjoint, interleaved (so identically distributed) shares. The order within an epoch is a permutation drawn
    from ``PCG64`` seeded with ``(seed, epoch)``, so it is the same on every machine and numpy version and can be
    resumed from ``(epoch, position)`` alone. A batch may span the end of one epoch and the start of the next.
    """

    def __init__(
        self, tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int, partition: tuple[int, int] = (0, 1)
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        k, n = partition
        if not 0 <= k < n:
            raise ValueError(f"partition must be (k, n) with 0 <= k < n, got {partition}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.partition = (k, n)
        self.num_tokens = len(tokens)
        self.num_windows = _num_windows(self.num_tokens, seq_len)
        if self.num_windows == 0:
            raise DataError(
                f"the training data holds only {self.num_tokens:,} tokens, fewer than --seq-len + 1 = "
                f"{seq_len + 1}; use a shorter --seq-len or add more --data"
            )
        self._windows = np.arange(k, self.num_windows, n, dtype=np.int64)
        if len(self._windows) == 0:
            raise DataError(
                f"the training data holds {self.num_windows} windows of --seq-len {seq_len}, too few to "
                f"give partition {k} of {n} any; add more --data or use fewer peers per data copy"
            )
        self.epoch = 0
        self.position = 0
        self._order: np.ndarray | None = None
        self._order_epoch = -1

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def windows_per_epoch(self) -> int:
        return len(self._windows)

    def _epoch_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch]))
            self._order = self._windows[rng.permutation(len(self._windows))]
            self._order_epoch = self.epoch
        assert self._order is not None
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, int64 tensors of shape ``[batch_size, seq_len]`` with ``y`` the next token of each ``x``."""
        picked: list[np.ndarray] = []
        need = self.batch_size
        while need:
            order = self._epoch_order()
            take = order[self.position : self.position + need]
            picked.append(take)
            need -= len(take)
            self.position += len(take)
            if self.position == len(order):
                self.epoch += 1
                self.position = 0
        starts = np.concatenate(picked) * self.seq_len
        return _gather(self.tokens, starts, self.seq_len)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "partition": [int(p) for p in self.partition],
            "num_windows": self.num_windows,
            "num_tokens": self.num_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` left off. Refuses a state saved for other data, ``seq_len`` or partition;
        a different batch size is fine (the position counts windows, not batches)."""
        try:
            saved_partition = tuple(int(p) for p in state["partition"])
            saved = {name: int(state[name]) for name in ("epoch", "position", "seed", "seq_len", "num_windows")}
            saved_tokens = int(state.get("num_tokens", self.num_tokens))
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(
                f"the sampler state in this checkpoint is malformed ({e!r}); start over with --fresh"
            ) from None
        problems = []
        if saved["seq_len"] != self.seq_len:
            problems.append(f"--seq-len was {saved['seq_len']}, now {self.seq_len}")
        if saved_partition != self.partition:
            problems.append(
                f"partition was {saved_partition[0]} of {saved_partition[1]}, "
                f"now {self.partition[0]} of {self.partition[1]}"
            )
        if saved["num_windows"] != self.num_windows or saved_tokens != self.num_tokens:
            problems.append(f"it had {saved_tokens:,} training tokens, now {self.num_tokens:,}")
        if problems:
            raise DataError(
                f"the data changed since this checkpoint: {'; '.join(problems)}; use the same --data, "
                f"--tokenizer and --seq-len, or start over with --fresh"
            )
        if not (saved["epoch"] >= 0 and 0 <= saved["position"] < len(self._windows)):
            raise DataError(
                f"the sampler state in this checkpoint is malformed (epoch {saved['epoch']}, position "
                f"{saved['position']} of {len(self._windows)}); start over with --fresh"
            )
        if saved["seed"] != self.seed:
            logger.info("continuing the data order of seed %d from the checkpoint (not %d)", saved["seed"], self.seed)
        self.seed, self.epoch, self.position = saved["seed"], saved["epoch"], saved["position"]
        self._order_epoch = -1


def iter_eval_batches(
    tokens: np.ndarray, *, seq_len: int, batch_size: int, max_batches: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Contiguous windows from the start of ``tokens``, in order: the same batches on every call and every peer.

    At most ``max_batches`` batches; the last may be smaller. A validation split shorter than ``seq_len + 1``
    tokens gives one shorter window, so small corpora can still be evaluated.
    """
    if seq_len < 1 or batch_size < 1 or max_batches < 1:
        raise ValueError("seq_len, batch_size and max_batches must be positive")
    n = len(tokens)
    if n < 2:
        raise DataError(
            f"the validation data holds {n} token(s), too few to evaluate on; add more --data or raise --val-fraction"
        )
    length = min(seq_len, n - 1)
    count = min(_num_windows(n, length), max_batches * batch_size)
    for first in range(0, count, batch_size):
        starts = np.arange(first, min(first + batch_size, count), dtype=np.int64) * length
        yield _gather(tokens, starts, length)
