"""An in-process reference of a swarm: K peers in one process, exact rounds, no network.

What for: sweeping learning rate, local steps, batch and outer optimizer for a new model in minutes (Photon's
hyper-parameter study), and the yardstick a real swarm is checked against (same flags and seeds: a healthy swarm
ends no more than ~2% above the simulator's val loss, lower when sub-second rounds overshoot --local-steps;
bench/convergence.py measures it).

What is the same as ``photon-swarm``:

- **Peers and data**: peer k is a ``LocalSession`` built from the same RunConfig a real peer gets, with its share
  of ``--data`` chosen by ``launch.split_data`` (``iid``: the whole corpus with ``--data-partition k/K``;
  ``by-file``: the files dealt out). Same tokenizer, shards, sampler seed, model init (``--seed``), planned
  micro-batch, inner AdamW and gradient clipping, so each peer draws the same batches it would draw as a process.
- **Rounds** (swarm/rounds.py, the case where every peer keeps up): theta is built as photon-peer builds it
  (``torch.manual_seed(seed)``, a fresh ``Transformer``); every round each peer loads theta, resets its AdamW
  moments only with ``--reset-inner-optimizer`` (off by default, so every peer keeps its own moments across rounds),
  trains ``min(local_steps, max_steps - step)`` steps at the learning rate of the *global* step, and offers
  ``delta = theta - local`` (``state.compute_delta``, fp32) with weight ``min(tokens, max_round_weight)``. The
  weighted average goes through the same outer optimizer (train/outer.py); the global step advances by the round's
  steps; evaluations happen at the same steps as a peer's (every ``--eval-every`` crossing and at the end).
- **Averaging** emulates ``PhotonAverager``'s Butterfly All-Reduce part by part, with hivemind's own code and
  codecs: the vector is split between the K reducers by ``load_balance_peers`` (equal bandwidths) capped by
  ``robust.bounded_fractions``, and into parts by hivemind's ``TensorPartContainer`` (``part_size_bytes`` 512 KiB
  after compression, parts never cross a tensor). For each part, every sender other than its reducer sends it
  through ``compression.compress`` / ``deserialize_torch_tensor`` (the reducer's own part stays exact, as in
  hivemind); the reducer combines the parts with ``robust.robust_combine`` (``--robust-aggregation``, the default:
  clip to ``--robust-clip`` x the median norm, drop parts pointing away from the others with 3+ senders) or, with
  ``--no-robust-aggregation``, hivemind's token-weighted mean (``sum w_k x_k / sum w_k``); the averaged part is
  encoded once with the reply codec and decoded, and those values are what *every* member applies (its reducer
  included), as in averager.py. ``none`` is so bit-exact averaging; ``fp16`` and ``blockwise8bit`` round each
  sender's part once and the average once. With one peer there is no all-reduce (a lone peer applies its own delta).

What is not emulated (the simulator is the ideal a swarm approaches): matchmaking, timing, late peers and carried
deltas, partial groups, failed reducers, ``--round-seconds`` (refused: time-based rounds are not reproducible), the
collective token budget (each peer trains exactly the round's steps, which is what equal-speed peers do), the
delta norm guard (an honest run never trips it). Evaluation is of theta on the validation documents of the whole
``--data`` (for ``by-file`` that is one held-out mix of every peer's corpus, where real peers each evaluate on
their own files' validation documents).

Memory: K sessions (models, AdamW moments, samplers) live side by side; fine for the presets that train on a CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from photon_p2p.config import RunConfig
from photon_p2p.errors import ConfigError
from photon_p2p.model import Transformer
from photon_p2p.swarm.report import RoundResult
from photon_p2p.swarm.robust import bounded_fractions, robust_combine, round_weight_bound
from photon_p2p.swarm.state import compute_delta, global_norm, load_theta, theta_from_model
from photon_p2p.train.evaluate import evaluate
from photon_p2p.train.outer import make_outer_optimizer
from photon_p2p.train.session import LocalSession, resolve_model_args

logger = logging.getLogger(__name__)

COMPRESSIONS = ("none", "fp16", "blockwise8bit")
PART_SIZE_BYTES = 2**19  # hivemind's DEFAULT_PART_SIZE_BYTES, which PhotonAverager keeps


def make_codec(name: str) -> Any:
    """The hivemind codec photon-peer averages with for ``--compression name`` (peer.make_compression)."""
    from hivemind.compression import BlockwiseQuantization, Float16Compression, NoCompression

    if name not in COMPRESSIONS:
        raise ConfigError(f"--compression {name!r}: choose one of {', '.join(COMPRESSIONS)}")
    return {"none": NoCompression, "fp16": Float16Compression, "blockwise8bit": BlockwiseQuantization}[name]()


@torch.no_grad()
def butterfly_average(
    deltas: Sequence[Sequence[torch.Tensor]],
    weights: Sequence[float],
    *,
    compression: str = "none",
    robust_clip: float | None = None,
    part_size_bytes: int = PART_SIZE_BYTES,
) -> list[torch.Tensor]:
    """What every member of a Butterfly All-Reduce group applies, computed in one process (module docstring).

    ``deltas[k]`` is member k's list of fp32 tensors (same shapes for all), ``weights[k]`` its weight."""
    from hivemind.averaging.load_balancing import load_balance_peers
    from hivemind.averaging.partition import TensorPartContainer
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor

    k_peers = len(deltas)
    if k_peers != len(weights) or k_peers == 0:
        raise ValueError(f"{k_peers} deltas for {len(weights)} weights")
    codec = make_codec(compression)
    shapes = [t.shape for t in deltas[0]]
    total = sum(t.numel() for t in deltas[0])
    fractions = bounded_fractions(load_balance_peers(total, [None] * k_peers, 0), [True] * k_peers)
    containers = [
        TensorPartContainer([t.contiguous() for t in d], fractions, compression=codec, part_size_bytes=part_size_bytes)
        for d in deltas
    ]
    reply_type = codec.compression_type
    out: list[torch.Tensor] = []
    for reducer in range(k_peers):
        inputs = [list(c._input_parts_by_peer[reducer]) for c in containers]
        for p in range(len(inputs[0])):
            received = []
            for sender in range(k_peers):
                part, info = inputs[sender][p]
                if sender != reducer:  # a groupmate's part crosses the wire, compressed by its sender
                    part = deserialize_torch_tensor(codec.compress(part, info))
                received.append(part.float())
            if robust_clip is not None:
                averaged = robust_combine(received, weights, robust_clip).average
            else:  # hivemind's TensorPartReducer: accumulate w_k x_k in order, divide by the sum of weights
                acc = torch.zeros_like(received[0])
                for part, w in zip(received, weights, strict=True):
                    acc.add_(part, alpha=w)
                averaged = acc.div_(float(sum(weights)))
            # encoded once by the reducer; every member (the reducer too) applies these decoded values
            out.append(deserialize_torch_tensor(serialize_torch_tensor(averaged, reply_type)).float())
    flat = torch.cat(out)
    assert flat.numel() == total
    return [t.reshape(s).clone() for t, s in zip(flat.split([math.prod(s) for s in shapes]), shapes, strict=True)]


def peer_configs(cfg: RunConfig, data: list[str], peers: int, split: str) -> list[RunConfig]:
    """The RunConfig of each simulated peer: ``cfg`` with its share of ``data``, as photon-swarm gives it."""
    from photon_p2p.launch import split_data

    out = []
    for flags in split_data(data, peers, split):
        partition = flags[flags.index("--data-partition") + 1] if "--data-partition" in flags else None
        end = flags.index("--data-partition") if partition else len(flags)
        paths = flags[flags.index("--data") + 1 : end]
        out.append(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, paths=paths, partition=partition)))
    return out


@dataclass
class SimResult:
    """Every round's record (as a peer writes them) and the final evaluation."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    val_loss: float | None = None
    val_ppl: float | None = None
    tokens: int = 0
    seconds: float = 0.0
    params: int = 0


class Simulator:
    """K peers of one run, in this process. ``run()`` trains to ``--max-steps`` and returns the records.

    :param cfg: the run's config (what every photon-peer of the swarm would get, minus the data share)
    :param data: the corpus to share out (photon-swarm's ``--data``); ``split``: ``iid`` or ``by-file``
    :param val_tokens: evaluate on every window of these tokens instead (a benchmark's fixed held-out mix)
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        data: list[str],
        peers: int,
        split: str = "iid",
        progress: bool = False,
        val_tokens: Any = None,
    ) -> None:
        from photon_p2p.data import load_tokenizer, prepare_dataset

        if peers < 1:
            raise ConfigError(f"--peers {peers}: must be at least 1")
        if cfg.round.round_seconds:
            raise ConfigError(
                "--round-seconds: the simulator runs --local-steps rounds only (time-based rounds "
                "depend on machine speed and are not reproducible); remove --round-seconds"
            )
        self.cfg, self.peers, self.split = cfg, peers, split
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        self.model_args = resolve_model_args(cfg, tokenizer)
        self.sessions = [
            LocalSession(c, tokenizer=tokenizer, model_args=self.model_args, progress=progress)
            for c in peer_configs(cfg, data, peers, split)
        ]
        # one held-out set for every evaluation: the validation documents of the whole corpus (a peer's own split
        # for iid; the mix of every peer's corpus for by-file)
        self.val_tokens = val_tokens
        self.val = (
            val_tokens
            if val_tokens is not None
            else prepare_dataset(
                data, tokenizer, cache_dir=cfg.data.cache_dir, val_fraction=cfg.data.val_fraction, progress=progress
            ).val
        )
        # theta exactly as photon-peer builds it (peer.run_swarm_peer)
        torch.manual_seed(cfg.train.seed)
        self.theta = theta_from_model(Transformer(self.model_args))
        rc = cfg.round
        self.outer = make_outer_optimizer(
            rc.outer_optimizer, self.theta, lr=rc.effective_outer_lr, momentum=rc.outer_momentum
        )
        self.seq_len = self.model_args.max_seq_len
        self.max_weight = round_weight_bound(cfg, self.seq_len)  # as rounds.py: round_seconds is refused above
        self.global_step = 0
        self.round = 0

    def evaluate(self) -> tuple[float, float]:
        s = self.sessions[0]
        load_theta(s.model, self.theta)
        return evaluate(
            s.runnable,
            self.val,
            seq_len=self.seq_len,
            batch_size=s.plan.micro_batch,
            max_batches=(
                self.cfg.train.eval_batches * s.trainer.accum_steps
                if self.val_tokens is None
                else math.ceil(len(self.val_tokens) / self.seq_len / s.plan.micro_batch)
            ),
            device=s.device,
            autocast=s.trainer.autocast,
        )

    def run_round(self) -> RoundResult:
        train, rc = self.cfg.train, self.cfg.round
        budget = max(1, min(rc.local_steps, train.max_steps - self.global_step))
        t0 = time.perf_counter()
        deltas, weights, losses, tokens = [], [], [], 0
        for s in self.sessions:
            load_theta(s.model, self.theta)
            if rc.reset_inner_optimizer:
                s.trainer.reset_optimizer()
            s.progress.step = self.global_step
            own = 0
            for _ in range(budget):
                result = s.train_step()
                own += result.tokens
                losses.append(result.loss)
            delta = [torch.zeros_like(t) for t in self.theta]
            compute_delta(self.theta, s.model, delta)
            deltas.append(delta)
            weights.append(float(max(min(own, self.max_weight), 1.0)))
            tokens += own
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        if self.peers == 1:
            averaged = deltas[0]  # alone: a peer's own delta is the average, nothing crosses a wire
        else:
            averaged = butterfly_average(
                deltas,
                weights,
                compression=rc.compression,
                robust_clip=rc.robust_clip if rc.robust_aggregation else None,
            )
        finite = [x for x in losses if math.isfinite(x)]
        result = RoundResult(
            round=self.round,
            step=min(self.global_step + budget, train.max_steps),
            outcome="averaged" if self.peers > 1 else "alone",
            group_size=self.peers,
            tokens=tokens,
            own_tokens=tokens // self.peers,
            tokens_in_theta=tokens,
            loss=sum(finite) / len(finite) if finite else None,
            train_s=train_s,
            params=sum(t.numel() for t in self.theta),
        )
        if math.isfinite(global_norm(averaged)):
            result.outer_norm = self.outer.step(averaged)
        else:  # as rounds.py: the same non-finite average on every member is skipped by all
            result.outcome, result.tokens_in_theta, result.wasted_tokens = "skipped", 0, tokens
        result.allreduce_s = time.perf_counter() - t1
        self.global_step = result.step
        for s in self.sessions:
            s.progress.step = self.global_step
        self.round += 1
        return result

    def run(self, on_round: Callable[[dict[str, Any]], None] | None = None) -> SimResult:
        """Rounds until --max-steps; ``on_round`` gets each round record (val loss and ppl when evaluated)."""
        train = self.cfg.train
        out = SimResult(params=sum(t.numel() for t in self.theta))
        started = time.perf_counter()
        while self.global_step < train.max_steps:
            before = self.global_step
            result = self.run_round()
            out.tokens += result.tokens
            step = self.global_step
            final = step >= train.max_steps
            if (train.eval_every and step // train.eval_every > before // train.eval_every) or final:
                result.val_loss, result.val_ppl = self.evaluate()
            rec = {"kind": "round", "simulated": True, **result.record(), "tokens_total": out.tokens}
            rec["tokens_per_s"] = round(result.tokens / max(result.train_s, 1e-9), 1)
            out.rounds.append(rec)
            if on_round is not None:
                on_round(rec)
        out.seconds = time.perf_counter() - started
        last = [r for r in out.rounds if r.get("val_loss") is not None]
        if last:
            out.val_loss, out.val_ppl = last[-1]["val_loss"], last[-1]["val_ppl"]
        return out
