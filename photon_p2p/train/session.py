"""A peer's local training session: tokenizer, token shards, model, inner trainer, sampler and checkpoints.

The same session runs alone (the centralised baseline) or inside a swarm, where the round engine asks it for
``local_steps`` steps at a time and swaps the model's weights with the global parameters between rounds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from photon_p2p import __version__
from photon_p2p.config import RunConfig
from photon_p2p.data import BatchSampler, Tokenizer, load_tokenizer, prepare_dataset
from photon_p2p.errors import CheckpointError, ConfigError, DataError
from photon_p2p.model import ModelArgs, Transformer, build_model_args, pad_vocab, param_count_summary
from photon_p2p.train.checkpoint import Checkpoint, save_checkpoint
from photon_p2p.train.evaluate import evaluate
from photon_p2p.train.fit import FitPlan, pick_device, plan_fit
from photon_p2p.train.inner import InnerTrainer, StepResult

logger = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where this peer is: optimizer steps taken (the global step in a swarm) and tokens trained on."""

    step: int = 0
    tokens: int = 0


def resolve_model_args(cfg: RunConfig, tokenizer: Tokenizer) -> ModelArgs:
    vocab = cfg.model.vocab_size or pad_vocab(tokenizer.vocab_size)
    if vocab < tokenizer.vocab_size:
        raise ConfigError(
            f"--vocab-size {vocab} is smaller than the tokenizer's vocabulary ({tokenizer.vocab_size} "
            f"tokens in {cfg.data.tokenizer}); raise --vocab-size or leave it unset"
        )
    return build_model_args(
        cfg.model.preset, vocab_size=vocab, seq_len=cfg.model.seq_len, tie_embeddings=cfg.model.tie_embeddings
    )


class LocalSession:
    """Everything one peer trains with. Build it before any swarm process forks only if no CUDA is touched;
    with CUDA, start the swarm first (docs/design.md, "Traps we design around": never fork after CUDA is initialised).

    How it trains (device, micro-batch x accumulation, optimizer, activation checkpointing) is ``plan``, or
    fit.plan_fit's choice for this machine, made before the data is packed and the model allocated (a model too big
    for the machine fails at once) and logged in one line.
    """

    def __init__(
        self,
        cfg: RunConfig,
        *,
        tokenizer: Tokenizer | None = None,
        model_args: ModelArgs | None = None,
        progress: bool = True,
        plan: FitPlan | None = None,
    ):
        self.cfg = cfg
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.device = plan.device if plan is not None else pick_device(cfg.train.device)
        self.tokenizer = tokenizer or load_tokenizer(cfg.data.tokenizer)
        if not cfg.data.paths:
            raise ConfigError(
                "--data is required: give your training text (files, directories or globs), "
                "or 'default' for the Python standard library's sources"
            )
        self.model_args = model_args or resolve_model_args(cfg, self.tokenizer)
        self.plan = plan or plan_fit(self.model_args, cfg.train, self.device, model_name=f"--model {cfg.model.preset}")
        logger.info("%s", self.plan.describe())
        self.train_cfg = self.plan.apply(cfg.train)  # cfg.train with the planned micro-batch
        self.dataset = prepare_dataset(
            cfg.data.paths,
            self.tokenizer,
            cache_dir=cfg.data.cache_dir,
            val_fraction=cfg.data.val_fraction,
            progress=progress,
        )
        if self.dataset.vocab_size_needed > self.model_args.vocab_size:
            raise DataError(
                f"the token shards use ids up to {self.dataset.vocab_size_needed - 1} but the model has "
                f"{self.model_args.vocab_size} embedding rows; raise --vocab-size"
            )
        torch.manual_seed(cfg.train.seed)
        self.model = Transformer(self.model_args).to(self.device)
        self.model.activation_checkpointing = self.plan.activation_checkpointing
        logger.info("model %s", param_count_summary(self.model_args, cfg.model.preset))
        # the compiled wrapper shares parameters with self.model; checkpoints always use the plain module
        self.runnable = torch.compile(self.model) if cfg.train.compile else self.model
        self.trainer = InnerTrainer(self.runnable, self.train_cfg, self.device, optimizer=self.plan.optimizer)
        # micro-batches of a batch are consecutive draws: the same windows, in the same order, as one batch-size draw
        self.sampler = BatchSampler(
            self.dataset.train,
            seq_len=self.model_args.max_seq_len,
            batch_size=self.plan.micro_batch,
            seed=cfg.train.seed,
            partition=cfg.data.partition_tuple,
        )
        self.progress = Progress()

    @property
    def seq_len(self) -> int:
        return self.model_args.max_seq_len

    def train_step(self) -> StepResult:
        result = self.trainer.step(self.sampler, self.progress.step)
        self.progress.step += 1
        self.progress.tokens += result.tokens
        return result

    def evaluate(self) -> tuple[float, float]:
        # --eval-batches counts whole batches, so every peer evaluates the same windows whatever its micro-batch
        accum = self.trainer.accum_steps
        return evaluate(
            self.runnable,
            self.dataset.val,
            seq_len=self.seq_len,
            batch_size=self.plan.micro_batch,
            max_batches=self.cfg.train.eval_batches * accum,
            device=self.device,
            autocast=self.trainer.autocast,
        )

    # ---------------------------------------------------------------------------------------------------------
    # checkpoints

    def checkpoint_meta(self) -> dict[str, Any]:
        return dict(
            version=__version__,
            config=self.cfg.to_dict(),
            model_args=self.model_args.to_dict(),
            tokenizer=self.tokenizer.fingerprint,
            tokens=self.progress.tokens,
        )

    def save(
        self,
        *,
        extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None,
        extra_state: dict[str, Any] | None = None,
    ) -> Path:
        ck = self.cfg.checkpoint
        assert ck.dir, "save() needs --checkpoint-dir"
        state = dict(
            optimizer=self.trainer.state_dict(),
            sampler=self.sampler.state_dict(),
            rng=torch.get_rng_state(),
            progress=dict(step=self.progress.step, tokens=self.progress.tokens),
        )
        state.update(extra_state or {})
        tensors = {"model": self.model.state_dict(), **(extra_tensors or {})}
        path = save_checkpoint(
            ck.dir,
            self.progress.step,
            tensors=tensors,
            state=state,
            meta=self.checkpoint_meta(),
            keep=ck.keep,
            text_files={"tokenizer.json": self.tokenizer.to_json()},
        )
        logger.debug("checkpoint written: %s", path)
        return path

    def check_compatible(self, ckpt: Checkpoint) -> None:
        """Refuse a checkpoint written for another model shape or tokenizer, listing what differs."""
        saved = ckpt.meta.get("model_args") or {}
        current = self.model_args.to_dict()
        diffs = [f"{k} {saved.get(k)!r} (checkpoint) != {v!r} (now)" for k, v in current.items() if saved.get(k) != v]
        if diffs:
            raise CheckpointError(
                f"checkpoint {ckpt.path} was written for a different model: {'; '.join(diffs)}. "
                f"Use the same --model/--seq-len/--vocab-size/--tokenizer or another "
                f"--checkpoint-dir"
            )
        if ckpt.meta.get("tokenizer") != self.tokenizer.fingerprint:
            raise CheckpointError(
                f"checkpoint {ckpt.path} was written with a different tokenizer than "
                f"--tokenizer {self.cfg.data.tokenizer}"
            )

    def restore(self, ckpt: Checkpoint) -> None:
        self.check_compatible(ckpt)
        try:
            self.model.load_state_dict(ckpt.tensors["model"])
            self.trainer.load_state_dict(ckpt.state["optimizer"])
        except (KeyError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"checkpoint {ckpt.path} does not fit this model ({e})") from None
        self.sampler.load_state_dict(ckpt.state["sampler"])
        torch.set_rng_state(ckpt.state["rng"])
        self.progress = Progress(step=int(ckpt.state["progress"]["step"]), tokens=int(ckpt.state["progress"]["tokens"]))
