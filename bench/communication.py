"""Benchmark: bytes on the wire per trained token, photon (one averaging of the pseudo-gradient every
``local_steps`` steps, each compression) against per-step data-parallel all-reduce of the same model's fp32 gradients.

Measured, not computed: it starts ``--peers`` real peer processes on 127.0.0.1 (bench/_swarm.py: each with its own
hivemind DHT, p2pd and ``PhotonAverager``) holding tensors with the shapes of the model's parameters
(``photon_p2p.model.Transformer``, preset ``--model``, built on the meta device, so even big presets cost no memory
here), and runs real all-reduces: one per compression (``none``, ``fp16``, ``blockwise8bit``) for photon's round,
and the same all-reduce uncompressed for data parallelism's step (fp32 gradients, the same size, one all-reduce per
step: it *is* the ``none`` measurement). It reads ``bytes_sent``/``bytes_received`` from each step's result (what the
averager counts: serialised tensor parts, after compression) and, independently, the TCP payload that crossed
loopback between the peers' p2pd daemons (``ss``; noise encryption, yamux and protobuf framing included, and for
photon the matchmaking and all-gather of the round too). Each all-reduce is repeated ``--reps`` times, interleaved,
and the byte counts must be stable. Bytes per round do not depend on ``local_steps``, so the local-steps sweep is
arithmetic on those measurements:

    photon bytes/token = bytes per round / (local_steps * tokens per step)      (per peer; swarm total / peers)
    DP bytes/token     = bytes per step / tokens per step                       (tokens per step = batch x seq len)
    reduction          = DP bytes/token / photon bytes/token
    target             = 0.9 x local_steps x 32 / bits per value                (none 32, fp16 16, blockwise8bit 8)
    overhead_fraction  = 1 - reduction / (local_steps x 32 / bits): the share of the ideal reduction lost to
                         protocol overhead (8-bit: absmax per 4096 values + a 1 KiB code table per part; framing);
                         the target allows 0.10

    .venv/bin/python bench/communication.py                          # tiny model, 3 peers, 3 reps (~1 minute)
    .venv/bin/python bench/communication.py --model micro --peers 4 --local-steps 16,64,512 --reps 5

How to read the output: first the measured bytes per all-reduce (per peer, averager-counted and TCP), then one row per
(local_steps, compression) with bytes per token both ways, the reduction factor, the target and whether it is met
(averager-counted; the ``wire`` columns repeat the comparison with TCP bytes). Results go to
``bench/results/communication.json`` (per config: bytes_per_token_photon, bytes_per_token_dp, reduction, target,
meets_target, overhead_fraction, and the same with the ``_wire`` suffix).
"""

from __future__ import annotations

import argparse
import math
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _swarm import BITS, COMPRESSIONS, Swarm, SwarmSpec, load_average, machine_info, save_json

RESULTS = Path(__file__).resolve().parent / "results" / "communication.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from photon_p2p.config import MODEL_PRESETS

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="tiny", choices=MODEL_PRESETS, help="model preset (default: tiny)")
    p.add_argument(
        "--vocab-size",
        type=int,
        default=320,
        help="embedding rows (default: 320, the built-in byte tokenizer's 257 padded to a multiple of 64)",
    )
    p.add_argument("--peers", type=int, default=3, help="peers in the all-reduce group (default: 3)")
    p.add_argument("--local-steps", default="16,64,512", help="photon's local steps per round (default: 16,64,512)")
    p.add_argument(
        "--compressions", default="none,fp16,blockwise8bit", help=f"from {', '.join(COMPRESSIONS)} (default: all three)"
    )
    p.add_argument("--batch-size", type=int, default=16, help="sequences per step and peer (default: 16)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the preset's)")
    p.add_argument("--reps", type=int, default=3, help="all-reduces per compression, interleaved (default: 3)")
    p.add_argument("--part-size-kib", type=int, default=512, help="averager part_size_bytes in KiB (default: 512)")
    p.add_argument("--output", default=str(RESULTS), help=f"where to save the JSON (default: {RESULTS})")
    args = p.parse_args(argv)
    args.local_steps = [int(x) for x in args.local_steps.split(",")]
    args.compressions = [c.strip() for c in args.compressions.split(",")]
    bad = [c for c in args.compressions if c not in COMPRESSIONS]
    if bad:
        p.error(f"--compressions: unknown {', '.join(bad)}; choose from {', '.join(COMPRESSIONS)}")
    if args.peers < 2 or args.reps < 1 or min(args.local_steps) < 1:
        p.error("--peers must be at least 2, --reps and --local-steps at least 1")
    return args


def model_shapes(preset: str, vocab_size: int, seq_len: int | None) -> tuple[list[tuple[int, ...]], int]:
    """The parameters' shapes (tied weights once, as photon's theta holds them) and the sequence length."""
    import torch

    from photon_p2p.model import Transformer, build_model_args

    model_args = build_model_args(preset, vocab_size=vocab_size, seq_len=seq_len)
    with torch.device("meta"):
        model = Transformer(model_args)
    return [tuple(p.shape) for p in model.parameters()], model_args.max_seq_len


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the peers are stopped on the way out
    t0 = time.perf_counter()
    shapes, seq_len = model_shapes(args.model, args.vocab_size, args.seq_len)
    numel = sum(math.prod(s) for s in shapes)
    tokens_per_step = args.batch_size * seq_len
    methods = list(dict.fromkeys(["none"] + args.compressions))  # "none" is also data parallelism's all-reduce
    print(
        f"communication benchmark: {args.model} ({numel:,} parameters in {len(shapes)} tensors), {args.peers} peers, "
        f"{tokens_per_step:,} tokens per step and peer ({args.batch_size} x {seq_len}); load average "
        f"{load_average()}",
        flush=True,
    )
    runs: dict[str, list] = {m: [] for m in methods}
    spec = SwarmSpec(n=args.peers, shapes=shapes, part_size_bytes=args.part_size_kib * 1024)
    with Swarm(spec) as swarm:
        for rep in range(args.reps + 1):  # rep 0 is a warm-up (bitsandbytes, first connections)
            for method in methods[rep % len(methods) :] + methods[: rep % len(methods)]:
                r = swarm.run(method)
                if not r.ok:  # one retry: matchmaking can fail under load
                    print(f"  {method}: FAILED ({r.error}); retrying", flush=True)
                    r = swarm.run(method)
                    if not r.ok:
                        raise RuntimeError(f"{method} failed twice: {r.error}")
                if rep:
                    runs[method].append(r)
            if rep:
                print(
                    f"  rep {rep}/{args.reps}: "
                    + " | ".join(
                        f"{m} {sum(runs[m][-1].bytes_sent):,} B sent, {runs[m][-1].wire_bytes_step:,} B TCP"
                        for m in methods
                    ),
                    flush=True,
                )

    measured = {}
    for method, rs in runs.items():
        sent = [sum(r.bytes_sent) for r in rs]
        received = [sum(r.bytes_received) for r in rs]
        wire = [r.wire_bytes for r in rs]
        wire_step = [r.wire_bytes_step for r in rs]
        measured[method] = {
            "bytes_sent_per_peer": statistics.median(sent) / args.peers,
            "bytes_sent_total": sent,
            "bytes_received_total": received,
            "stable": len(set(sent)) == 1 and sent == received,
            "wire_bytes_allreduce_per_peer": statistics.median(wire) / args.peers,
            "wire_bytes_step_per_peer": statistics.median(wire_step) / args.peers,
            "wire_bytes_step_total": wire_step,
            "payload_bytes_per_peer_ideal": 2 * (args.peers - 1) / args.peers * numel * BITS[method] / 8,
            "seconds_median": round(statistics.median(r.time for r in rs), 4),
        }
        m = measured[method]
        m["framing_overhead_vs_ideal"] = round(m["bytes_sent_per_peer"] / m["payload_bytes_per_peer_ideal"] - 1, 5)
    dp_step = measured["none"]["bytes_sent_per_peer"]
    dp_step_wire = measured["none"]["wire_bytes_allreduce_per_peer"]  # a fixed DP group matchmakes nothing per step
    configs = {}
    for steps in args.local_steps:
        for method in args.compressions:
            m = measured[method]
            ideal = steps * 32 / BITS[method]
            target = 0.9 * ideal
            entry = {
                "local_steps": steps,
                "compression": method,
                "bits_per_value": BITS[method],
                "tokens_per_step": tokens_per_step,
                "bytes_per_round_photon": m["bytes_sent_per_peer"],
                "bytes_per_step_dp": dp_step,
            }
            for suffix, photon_round, dp in (
                ("", m["bytes_sent_per_peer"], dp_step),
                ("_wire", m["wire_bytes_step_per_peer"], dp_step_wire),
            ):
                per_token_photon = photon_round / (steps * tokens_per_step)
                per_token_dp = dp / tokens_per_step
                reduction = per_token_dp / per_token_photon
                entry.update(
                    {
                        f"bytes_per_token_photon{suffix}": round(per_token_photon, 6),
                        f"bytes_per_token_dp{suffix}": round(per_token_dp, 6),
                        f"reduction{suffix}": round(reduction, 3),
                        f"meets_target{suffix}": reduction >= target,
                        f"overhead_fraction{suffix}": round(1 - reduction / ideal, 5),
                    }
                )
            entry["target"] = round(target, 3)
            configs[f"{method}_{steps}steps"] = entry

    print(f"\nper all-reduce of {numel:,} values among {args.peers} peers, per peer (median of {args.reps}):")
    print(
        f"  {'method':<14} {'averager B':>12} {'ideal B':>12} {'framing':>8} {'TCP B (a-r)':>12} "
        f"{'TCP B (step)':>12} {'stable':>6}"
    )
    for method, m in measured.items():
        print(
            f"  {method:<14} {m['bytes_sent_per_peer']:>12,.0f} {m['payload_bytes_per_peer_ideal']:>12,.0f} "
            f"{m['framing_overhead_vs_ideal']:>8.2%} {m['wire_bytes_allreduce_per_peer']:>12,.0f} "
            f"{m['wire_bytes_step_per_peer']:>12,.0f} {str(m['stable']):>6}"
        )
    print("  ('none' is also data parallelism's per-step all-reduce; TCP (step) includes matchmaking)")
    head = (
        f"\n{'local steps':>11} {'compression':<14} {'photon B/tok':>13} {'DP B/tok':>10} {'reduction':>10} "
        f"{'target':>8} {'met':>5} {'overhead':>9} | {'wire red.':>10} {'met':>5} {'overhead':>9}"
    )
    print(head + "\n" + "-" * len(head))
    for c in configs.values():
        print(
            f"{c['local_steps']:>11} {c['compression']:<14} {c['bytes_per_token_photon']:>13.4f} "
            f"{c['bytes_per_token_dp']:>10.2f} {c['reduction']:>9.1f}x {c['target']:>7.1f}x "
            f"{'yes' if c['meets_target'] else 'NO':>5} {c['overhead_fraction']:>9.2%} | "
            f"{c['reduction_wire']:>9.1f}x {'yes' if c['meets_target_wire'] else 'NO':>5} "
            f"{c['overhead_fraction_wire']:>9.2%}"
        )

    result = {
        "configs": configs,
        "measured": measured,
        "settings": {
            "model": args.model,
            "parameters": numel,
            "tensors": len(shapes),
            "vocab_size": args.vocab_size,
            "peers": args.peers,
            "batch_size": args.batch_size,
            "seq_len": seq_len,
            "tokens_per_step": tokens_per_step,
            "reps": args.reps,
            "part_size_bytes": args.part_size_kib * 1024,
            "bytes": "averager-counted bytes_sent per peer (serialised tensor parts after compression); "
            "_wire: TCP payload between the peers' p2pds, photon per whole step (matchmaking "
            "included), DP per all-reduce",
        },
        "machine": machine_info(),
        "elapsed_s": round(time.perf_counter() - t0, 1),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"elapsed {result['elapsed_s']:.0f} s")
    save_json(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
