"""Benchmark: tokens/s of photon's local trainer vs a bare, minimal PyTorch training loop, in one process.

The photon side is exactly what ``photon-peer`` runs: a ``LocalSession`` (token shards, ``BatchSampler``, the
model, ``InnerTrainer.step`` with its learning-rate schedule, gradient clipping and fused AdamW) stepped through
``session.train_step()``, reading the loss every ``--log-every`` steps as the training loop does. The bare side is the
same model class and size, the same torch AdamW settings and parameter groups, and the same gradient clipping, fed
with batches pre-sampled from the same token array (already on the device), so it pays nothing for data.

Within each repetition the two sides take turns every ``--block`` steps (photon first on even reps, bare first on odd
ones), so that load from other processes hits both alike; the figure of merit is the median over reps of the ratio
photon/bare of tokens/s. On a busy machine also look at ``ratio_best_blocks`` (the fastest block of each side):
other processes only ever add time, so the minimum is the steadiest estimate of each side's own cost. Results go to
``bench/results/local_step.json``.

    .venv/bin/python bench/local_step.py                       # tiny model, CPU or CUDA (auto)
    .venv/bin/python bench/local_step.py --model micro --reps 7 --steps 50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from photon_p2p.config import MODEL_PRESETS, RunConfig
from photon_p2p.train.inner import ADAM_BETAS, autocast_context, param_groups
from photon_p2p.train.session import LocalSession

RESULTS = Path(__file__).resolve().parent / "results" / "local_step.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="tiny", choices=MODEL_PRESETS, help="model preset (default: tiny)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step (default: 16)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per repetition and side (default: 30)")
    p.add_argument("--reps", type=int, default=5, help="repetitions of each side, alternating (default: 5)")
    p.add_argument(
        "--block",
        type=int,
        default=None,
        help="within a rep, the sides take turns every N steps (default: 1 on CPU, where steps are "
        "synchronous; 10 on CUDA, so the GPU can run ahead within a block)",
    )
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per side before the first rep (default: 5)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice, as photon-peer); 1 is steadier on a busy machine",
    )
    p.add_argument(
        "--data", nargs="+", default=["default"], help="training text (default: the Python standard library's sources)"
    )
    p.add_argument("--cache-dir", default=None, help="token shard cache (default: a temporary directory)")
    p.add_argument(
        "--log-every",
        type=int,
        default=10,
        help="the photon side reads its loss every N steps, as photon-peer does by default (default: 10)",
    )
    p.add_argument("--output", default=str(RESULTS), help=f"where to save the JSON (default: {RESULTS})")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_photon(session: LocalSession, steps: int, log_every: int) -> float:
    sync(session.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        result = session.train_step()
        if session.progress.step % log_every == 0:
            _ = result.loss  # what the training loop reads on a logging step
    sync(session.device)
    return time.perf_counter() - t0


class BareLoop:
    """The smallest loop that does the same math: forward, backward, clip, AdamW step, zero grads."""

    def __init__(self, session: LocalSession, batches: list[tuple[torch.Tensor, torch.Tensor]]):
        from photon_p2p.model import Transformer

        cfg = session.cfg.train
        torch.manual_seed(cfg.seed)
        self.device = session.device
        self.model = Transformer(session.model_args).to(self.device)
        ref = session.trainer.optimizer.defaults  # same AdamW flavour (fused/foreach) as the photon side
        kind = {k: ref[k] for k in ("fused", "foreach") if ref.get(k)}
        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=ADAM_BETAS, **kind
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.autocast = autocast_context(self.device, cfg.precision)
        self.grad_clip = cfg.grad_clip
        self.batches = batches
        self.i = 0

    def run(self, steps: int) -> float:
        sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            x, y = self.batches[self.i % len(self.batches)]
            self.i += 1
            with self.autocast:
                loss = self.model(x, y)
            loss.backward()
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - t0


def machine_info(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):  # other processes' load makes CPU figures noisy: keep it with the figures
        info["load_average_1min"] = round(os.getloadavg()[0], 2)
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="photon-bench-") as scratch:
        cfg = RunConfig.from_dict(
            {
                "model": {"preset": args.model, "seq_len": args.seq_len},
                "data": {"paths": args.data, "cache_dir": args.cache_dir or scratch},
                # a long schedule: the photon side computes a real cosine learning rate every step
                "train": {"max_steps": 100_000, "batch_size": args.batch_size, "device": args.device},
                "swarm": {"local_only": True},
            },
            origin="bench",
        )
        session = LocalSession(cfg, progress=False)
        device = session.device
        block = args.block or (10 if device.type == "cuda" else 1)
        seq_len, tokens_per_step = session.seq_len, args.batch_size * session.seq_len
        # the bare loop's batches: drawn in advance from the same token array by an identical sampler
        from photon_p2p.data import BatchSampler

        presampler = BatchSampler(
            session.dataset.train, seq_len=seq_len, batch_size=args.batch_size, seed=cfg.train.seed + 1
        )
        batches = [tuple(t.to(device) for t in presampler.next_batch()) for _ in range(min(args.steps, 64))]
        bare = BareLoop(session, batches)
        print(
            f"{args.model}: batch {args.batch_size} x {seq_len} tokens, vocab {session.model_args.vocab_size}, "
            f"device {device}, optimizer {type(session.trainer.optimizer).__name__} "
            f"{ {k: v for k, v in session.trainer.optimizer.defaults.items() if k in ('fused', 'foreach')} }",
            flush=True,
        )

        time_photon(session, args.warmup, args.log_every)
        bare.run(args.warmup)
        reps = []
        blocks: dict[str, list[float]] = {"photon": [], "bare": []}  # seconds per step of every block
        for rep in range(args.reps):
            # alternate in short blocks within the rep, so load from other processes hits both sides alike
            first, second = ("photon", "bare") if rep % 2 == 0 else ("bare", "photon")
            seconds = {"photon": 0.0, "bare": 0.0}
            done = 0
            while done < args.steps:
                n = min(block, args.steps - done)
                for side in (first, second):
                    t = time_photon(session, n, args.log_every) if side == "photon" else bare.run(n)
                    seconds[side] += t
                    blocks[side].append(t / n)
                done += n
            photon_tps = tokens_per_step * args.steps / seconds["photon"]
            bare_tps = tokens_per_step * args.steps / seconds["bare"]
            reps.append(
                {
                    "photon_tokens_per_s": round(photon_tps, 1),
                    "bare_tokens_per_s": round(bare_tps, 1),
                    "ratio": round(photon_tps / bare_tps, 4),
                    "first": first,
                }
            )
            print(
                f"rep {rep + 1}/{args.reps}: photon {photon_tps:10,.0f} tok/s | bare {bare_tps:10,.0f} tok/s | "
                f"ratio {photon_tps / bare_tps:.3f}",
                flush=True,
            )

    # other processes only ever add time: the fastest blocks (steps, on CPU) best estimate each side's own cost
    best = {side: tokens_per_step / min(times) for side, times in blocks.items()}
    result = {
        "ratio": statistics.median(r["ratio"] for r in reps),
        "ratio_best_blocks": round(best["photon"] / best["bare"], 4),
        "photon_tokens_per_s": statistics.median(r["photon_tokens_per_s"] for r in reps),
        "bare_tokens_per_s": statistics.median(r["bare_tokens_per_s"] for r in reps),
        "reps": reps,
        "config": {
            "model": args.model,
            "batch_size": args.batch_size,
            "seq_len": seq_len,
            "vocab_size": session.model_args.vocab_size,
            "steps": args.steps,
            "reps": args.reps,
            "warmup": args.warmup,
            "block": block,
            "threads": torch.get_num_threads(),
            "log_every": args.log_every,
            "data": args.data,
            "params": session.model.num_params(),
        },
        "machine": {**machine_info(device), "load_average_1min_at_start": load_at_start},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(
        f"median: photon {result['photon_tokens_per_s']:,.0f} tok/s, bare {result['bare_tokens_per_s']:,.0f} tok/s, "
        f"ratio photon/bare {result['ratio']:.3f} (target >= 0.97); fastest blocks: photon {best['photon']:,.0f}, "
        f"bare {best['bare']:,.0f} tok/s, ratio {result['ratio_best_blocks']:.3f}"
    )
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
