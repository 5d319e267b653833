"""Training alone (``photon-peer --local-only``): the centralised baseline Photon compares against.

Also home of what every training loop shares: deciding what to do with an existing checkpoint directory, the
progress bar, and the evaluation line.
"""

from __future__ import annotations

import logging
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from photon_p2p.config import RunConfig, TrainConfig
from photon_p2p.errors import ConfigError
from photon_p2p.runtime import DeferredStop, GracefulExit, progress_enabled
from photon_p2p.train.checkpoint import Checkpoint, clear_checkpoints, latest_checkpoint, load_checkpoint
from photon_p2p.train.metrics import StepStats, open_metrics
from photon_p2p.train.session import LocalSession

logger = logging.getLogger(__name__)


def checkpoint_to_resume(cfg: RunConfig) -> Checkpoint | None:
    """Apply --resume / --fresh to --checkpoint-dir. Never silently overwrite a previous run's checkpoints."""
    ck = cfg.checkpoint
    if not ck.dir:
        return None
    latest = latest_checkpoint(ck.dir)
    if latest is None:
        if ck.resume:
            logger.info("no checkpoint in %s yet: starting from scratch", ck.dir)
        return None
    if ck.fresh:
        n = clear_checkpoints(ck.dir)
        logger.info("--fresh: deleted %d checkpoint(s) in %s", n, ck.dir)
        return None
    if not ck.resume:
        raise ConfigError(
            f"--checkpoint-dir {ck.dir} already holds checkpoints (latest: {latest.name}): pass "
            f"--resume to continue that run or --fresh to discard it"
        )
    logger.info("resuming from %s", latest)
    return load_checkpoint(latest)


def _warn_if_schedule_changed(ckpt: Checkpoint, cfg: RunConfig) -> None:
    """The learning rate is a function of the step *and* of --max-steps/--warmup-steps/--lr/--alpha-f: resuming with
    other values continues on a different schedule (fine for extending a run, but not a reproduction of it)."""
    saved = (ckpt.meta.get("config") or {}).get("train") or {}
    now = cfg.train.to_dict()
    changed = [
        f"{TrainConfig.flag_of(k)} {saved[k]!r} -> {now[k]!r}"
        for k in ("max_steps", "warmup_steps", "lr", "alpha_f")
        if k in saved and saved[k] != now[k]
    ]
    if changed:
        logger.warning(
            "resuming with a different learning-rate schedule than the checkpoint's run (%s)", ", ".join(changed)
        )


def format_eval_line(
    step: int, max_steps: int, loss: float | None, val_loss: float, val_ppl: float, tokens_per_s: float
) -> str:
    train = f"loss {loss:.4f} | " if loss is not None else ""
    return (
        f"step {step}/{max_steps} | {train}val loss {val_loss:.4f} | val ppl {val_ppl:.2f} | {tokens_per_s:,.0f} tok/s"
    )


def run_solo(cfg: RunConfig) -> dict[str, Any]:
    """Train alone to --max-steps. Returns the last evaluation and step figures.

    Ctrl-C or SIGTERM stops after the current step (never inside one, so the checkpoint it saves resumes exactly);
    a second Ctrl-C stops at once without saving.
    """
    show = progress_enabled(cfg.log.progress)
    session = LocalSession(cfg, progress=show)
    resume = checkpoint_to_resume(cfg)
    if resume is not None:
        _warn_if_schedule_changed(resume, cfg)
        session.restore(resume)
    train = cfg.train
    metrics = open_metrics(cfg.log, group="local", name="local-only", config=cfg.to_dict())
    if session.progress.step >= train.max_steps:
        logger.info(
            "the checkpoint is at step %d, already --max-steps %d: nothing to train (raise --max-steps to continue)",
            session.progress.step,
            train.max_steps,
        )
    speed = StepStats(session.model, session.seq_len, session.device)
    last: dict[str, Any] = {}
    saved_step = session.progress.step if resume is not None else -1
    stopping = False
    bar = tqdm(
        total=train.max_steps,
        initial=session.progress.step,
        desc="training",
        unit="step",
        disable=not show,
        dynamic_ncols=True,
    )
    try:
        with logging_redirect_tqdm(), DeferredStop() as stop:
            while session.progress.step < train.max_steps:
                result = session.train_step()
                step = session.progress.step
                speed.add(result.tokens)
                bar.update(1)
                final = step == train.max_steps
                if step % train.log_every == 0 or final:
                    last = speed.record(step=step, result=result, tokens=session.progress.tokens)
                    metrics.write(last)
                    bar.set_postfix(loss=f"{result.loss:.3f}", lr=f"{result.lr:.2e}", refresh=False)
                if (train.eval_every and step % train.eval_every == 0) or final:
                    val_loss, val_ppl = session.evaluate()
                    logger.info(
                        format_eval_line(
                            step, train.max_steps, result.loss, val_loss, val_ppl, last.get("tokens_per_s", 0.0)
                        )
                    )
                    metrics.write(
                        dict(kind="eval", step=step, val_loss=val_loss, val_ppl=val_ppl, tokens=session.progress.tokens)
                    )
                    last.update(val_loss=val_loss, val_ppl=val_ppl)
                if cfg.checkpoint.dir and (step % cfg.checkpoint.every == 0 or final):
                    session.save()
                    saved_step = step
                if stop.requested:
                    if cfg.checkpoint.dir and saved_step != step:
                        path = session.save()
                        logger.warning("%s at step %d: saved %s (continue with --resume)", stop.name, step, path)
                    else:
                        logger.warning("%s at step %d: stopping", stop.name, step)
                    stopping = True
                    stop.raise_()
    except KeyboardInterrupt as e:
        if not isinstance(e, GracefulExit) and not stopping:
            logger.warning(
                "interrupted inside step %d: not saved (--resume continues from the last checkpoint)",
                session.progress.step + 1,
            )
        raise
    finally:
        bar.close()
        metrics.close()
    return last
