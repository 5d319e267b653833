"""Per-step data parallelism for bench/wan.py: one ``torch.distributed`` gloo rank of a DDP run, photon-peer's recipe.

The baseline photon-p2p is measured against must be the same training, only communicating every step: this module
takes photon-peer's own flags (parsed by ``photon_p2p.cli.peer.parse_config``) and builds photon-peer's
``LocalSession`` from them: the same model class and preset, tokenizer, data share (``--data-partition r/N``),
sampler, seed, AdamW settings, gradient clipping and learning-rate schedule (``InnerTrainer``). The model is wrapped in
``DistributedDataParallel``, so every step's gradients are all-reduced (averaged) over gloo before AdamW steps, and
every rank holds the same weights: a global batch of N x --batch-size.

Timing, per step (one JSON line per step in ``--out``): ``step_s`` is the whole optimizer step (forward, backward with
DDP's bucketed all-reduce, clipping, AdamW); ``allreduce_s`` is the wall time during which at least one gradient
bucket's all-reduce was in flight (a DDP comm hook stamps each bucket's start and completion; it overlaps the rest of
the backward pass), ``compute_s`` the rest. Before training, each rank also times a few steps of a
communication-free copy of the model (``compute_ref_s`` in the start record): step time minus that is the
all-reduce time the overlap could not hide. Rank 0 evaluates on the held-out windows every ``--dp-eval-every`` steps;
every rank then waits at a barrier, and neither the evaluation nor that barrier is on the step clock.

    python bench/_ddp.py --rank R --world N --master ADDR:PORT --out FILE --dp-steps S [--dp-eval-every K] \
        -- <photon-peer flags>

Run by bench/wan.py inside each emulated host's namespace with ``GLOO_SOCKET_IFNAME`` set to the host's veth.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    peer_flags: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, peer_flags = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, required=True, help="this process's rank (0-based)")
    p.add_argument("--world", type=int, required=True, help="number of ranks")
    p.add_argument("--master", required=True, help="ADDR:PORT of rank 0's TCP store (rank 0's host address)")
    p.add_argument("--out", type=Path, required=True, help="JSONL file: one record per step and per evaluation")
    p.add_argument("--dp-steps", type=int, required=True, help="optimizer steps to run (<= --max-steps)")
    p.add_argument("--dp-eval-every", type=int, default=16, help="rank 0 evaluates every K steps (and at the end)")
    p.add_argument(
        "--calibrate-steps", type=int, default=6, help="steps of a communication-free copy, timed first (0: none)"
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="gloo collective timeout, seconds")
    return p.parse_args(argv), peer_flags


class BucketClock:
    """A DDP comm hook that all-reduces (averages) each gradient bucket, as DDP's default hook does, and stamps the
    wall time from the bucket's hand-off to its completion; ``busy()`` is the union of those intervals."""

    def __init__(self, world: int):
        self.world = world
        self.intervals: list[tuple[float, float]] = []

    def hook(self, _state, bucket):
        import torch.distributed as dist

        start = time.perf_counter()
        tensor = bucket.buffer().div_(self.world)
        fut = dist.all_reduce(tensor, async_op=True).get_future()

        def done(f):
            self.intervals.append((start, time.perf_counter()))
            return f.value()[0]

        return fut.then(done)

    def busy(self) -> float:
        total, end = 0.0, float("-inf")
        for a, b in sorted(self.intervals):
            if b > end:
                total += b - max(a, end)
                end = b
        self.intervals.clear()
        return total


def calibrate(session, trainer, steps: int) -> float | None:
    """Seconds of one optimizer step without communication, on this rank's CPU share: a copy of the model and its
    own AdamW train ``steps`` steps (the first, warming up, not counted) on a fixed batch of held-out windows. The
    copy leaves the run's model, optimizer and sampler untouched. DDP overlaps the all-reduce with the backward
    pass, so the step time minus this is the all-reduce time the step could not hide."""
    if steps < 2:
        return None
    import copy

    import torch

    from photon_p2p.data.sampler import iter_eval_batches
    from photon_p2p.train.inner import build_inner_optimizer

    model = copy.deepcopy(session.model)
    opt = build_inner_optimizer(model, trainer.cfg, session.device, trainer.optimizer_kind)
    x, y = next(
        iter_eval_batches(session.dataset.val, seq_len=session.seq_len, batch_size=trainer.micro_batch, max_batches=1)
    )
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model(x, y).backward()
        if trainer.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), trainer.cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    del model, opt
    return sorted(times[1:])[len(times[1:]) // 2]


def main(argv: list[str] | None = None) -> int:
    args, peer_flags = parse_args(argv)
    from photon_p2p.cli.peer import parse_config
    from photon_p2p.runtime import quiet_hivemind

    cfg, _ = parse_config(peer_flags)
    quiet_hivemind("warning")
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from photon_p2p.train.session import LocalSession

    addr, port = args.master.rsplit(":", 1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://{addr}:{port}",
        rank=args.rank,
        world_size=args.world,
        timeout=datetime.timedelta(seconds=args.timeout),
    )
    session = LocalSession(cfg, progress=False)
    trainer = session.trainer
    if trainer.accum_steps != 1:  # DDP would all-reduce every micro-batch: not per-step data parallelism
        raise SystemExit(f"_ddp.py: needs micro-batch = batch (got {trainer.accum_steps} accumulation steps)")
    compute_ref = calibrate(session, trainer, args.calibrate_steps)
    clock = BucketClock(args.world)
    # broadcasts rank 0's initial weights (all ranks share the seed, so they are equal already)
    ddp = DistributedDataParallel(session.runnable, broadcast_buffers=False)
    ddp.register_comm_hook(None, clock.hook)
    trainer.model = ddp  # InnerTrainer's forward/backward, clipping and AdamW now run through DDP
    out = args.out.open("w")

    def write(rec: dict) -> None:
        out.write(json.dumps(rec) + "\n")
        out.flush()

    params = sum(p.numel() for p in session.model.parameters())
    write(
        dict(kind="start", rank=args.rank, world=args.world, params=params, compute_ref_s=compute_ref, time=time.time())
    )
    dist.barrier()
    tokens = 0
    for step in range(1, args.dp_steps + 1):
        t0 = time.perf_counter()
        result = trainer.step(session.sampler, step - 1)
        loss = result.loss  # waits for the step (CPU: already done)
        step_s = time.perf_counter() - t0
        comm = clock.busy()
        tokens += result.tokens * args.world
        write(
            dict(
                kind="step",
                step=step,
                loss=loss,
                lr=result.lr,
                step_s=step_s,
                allreduce_s=comm,
                compute_s=step_s - comm,
                tokens=tokens,
                time=time.time(),
            )
        )
        if step % args.dp_eval_every == 0 or step == args.dp_steps:
            if args.rank == 0:
                t1 = time.perf_counter()
                val_loss, val_ppl = session.evaluate()
                write(
                    dict(
                        kind="eval",
                        step=step,
                        val_loss=val_loss,
                        val_ppl=val_ppl,
                        tokens=tokens,
                        eval_s=time.perf_counter() - t1,
                    )
                )
            dist.barrier()  # off the clock: the others wait here, not in the next step's all-reduce
    write(dict(kind="end", time=time.time(), threads=torch.get_num_threads()))
    out.close()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
