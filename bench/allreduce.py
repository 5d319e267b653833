"""Benchmark: seconds to average N fp32 values among P peers on loopback, hivemind Butterfly All-Reduce (our
``PhotonAverager``) against ``torch.distributed`` gloo ``all_reduce``, same machine, same run.

For every (size, peers) configuration it starts P real peer processes (bench/_swarm.py: each with its own hivemind
DHT, p2pd and PhotonAverager, plus one gloo rank) and then, in every repetition, runs one gloo ``all_reduce`` and one
averaging step per compression (``none``, ``blockwise8bit``, ``fp16``), in an order that rotates from repetition to
repetition so that load from other processes hits every method alike. What is timed is the all-reduce itself: the
averager's matchmaking is done first (``step(wait=False, require_trigger=True)`` until ``AWAITING_TRIGGER``), all peers
are released together, each peer times ``allow_allreduce()`` -> result (gloo: ``all_reduce``, a SUM: gloo has no
AVG, and the division is not timed), and a repetition's time is its slowest peer's. One untimed warm-up operation per
method comes first (gloo connects lazily; the first 8-bit step pays for bitsandbytes). Every result is checked
against the true mean at 2048 positions (and must be identical on every peer).

    .venv/bin/python bench/allreduce.py                      # 10M and 100M values x 2 and 4 peers, 5 reps
    .venv/bin/python bench/allreduce.py --quick              # 1M values, 2 peers, 2 reps: a smoke run (~1 min)
    .venv/bin/python bench/allreduce.py --sizes 10M --peers 2 --compressions none --reps 9 --stock
    .venv/bin/python bench/allreduce.py --sizes 10M --rate 20,100,1000 --reps 3   # field links (root; see below)

``--rate MBIT`` (comma list or repeated) runs every configuration once per rate with each peer on its own emulated
machine (photon_p2p/testbed.py: a network namespace per peer on one bridge, ``tbf`` at that rate both ways on every
link, 10.x addresses; gloo uses the same links). It needs root; results then go to ``allreduce_field.json``, with
``_<rate>mbit`` appended to every configuration label.

How to read the output: one line per repetition, then a table of median seconds per method and the ratio
hivemind/gloo for each compression (targets from issue 4: <= 1.5x uncompressed, <= 1.0x with 8-bit). ``cpu s`` is the
CPU time all peers' processes used during the operation, by kind (peer main process, averager, p2pd): on loopback
the cost of the averager is CPU, not bytes. Results go to ``bench/results/allreduce.json``: top-level
``ratio_<compression>_<size>_<peers>peers`` keys, and per configuration and method the median, every repetition,
bytes sent per peer (as the averager counts them, after compression) and bytes that crossed loopback (TCP payload).
A full run takes ~15-25 minutes on 2 cores, most of it 100M values x 4 peers (``--budget-s`` caps each
configuration: repetitions are reduced, never below 3, with a notice).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _swarm import COMPRESSIONS, Swarm, SwarmSpec, load_average, machine_info, parse_size, save_json, size_label

RESULTS = Path(__file__).resolve().parent / "results" / "allreduce.json"
FIELD_RESULTS = RESULTS.with_name("allreduce_field.json")
TARGETS = {"none": 1.5, "blockwise8bit": 1.0}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="10M,100M", help="fp32 values per peer, comma-separated (default: 10M,100M)")
    p.add_argument("--peers", default="2,4", help="group sizes, comma-separated (default: 2,4)")
    p.add_argument(
        "--compressions",
        default="none,blockwise8bit,fp16",
        help=f"averager compressions, comma-separated, from {', '.join(COMPRESSIONS)} "
        "(default: none,blockwise8bit,fp16)",
    )
    p.add_argument("--reps", type=int, default=5, help="timed repetitions of every method (default: 5)")
    p.add_argument("--quick", action="store_true", help="smoke run: --sizes 1M --peers 2 --reps 2 unless given")
    p.add_argument(
        "--stock",
        action="store_true",
        help="also time hivemind's own DecentralizedAverager, uncompressed (method 'stock'), to see what "
        "our runner's extra work costs",
    )
    p.add_argument(
        "--part-size-kib",
        type=int,
        default=512,
        help="averager part_size_bytes in KiB (default: 512, hivemind's and photon-peer's)",
    )
    p.add_argument(
        "--prefetch", type=int, default=None, help="parts (de)serialised ahead per stream (default: hivemind's 1)"
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=900.0,
        help="per configuration, fewer reps (at least 3) if the warm-up says they would take longer (default: 900)",
    )
    p.add_argument(
        "--rate",
        action="append",
        default=[],
        metavar="MBIT",
        help="emulated link rate in Mbit/s (both directions, every peer on its own host), comma-separated "
        "or repeated; every configuration runs once per rate (default: loopback)",
    )
    p.add_argument(
        "--output", default=None, help=f"where to save the JSON (default: {RESULTS}; with --rate {FIELD_RESULTS})"
    )
    args = p.parse_args(argv)
    given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
    if args.quick:
        args.sizes = args.sizes if "--sizes" in given else "1M"
        args.peers = args.peers if "--peers" in given else "2"
        args.reps = args.reps if "--reps" in given else 2
    args.sizes = [parse_size(s) for s in args.sizes.split(",")]
    args.peers = [int(n) for n in args.peers.split(",")]
    args.compressions = [c.strip() for c in args.compressions.split(",")]
    try:
        args.rate = [float(r) for item in args.rate for r in item.split(",") if r.strip()]
    except ValueError:
        p.error("--rate: Mbit/s numbers, e.g. --rate 20,100,1000")
    if any(r <= 0 for r in args.rate):
        p.error("--rate must be positive")
    args.output = args.output or str(FIELD_RESULTS if args.rate else RESULTS)
    bad = [c for c in args.compressions if c not in COMPRESSIONS]
    if bad:
        p.error(f"--compressions: unknown {', '.join(bad)}; choose from {', '.join(COMPRESSIONS)}")
    if min(args.peers) < 2 or args.reps < 1:
        p.error("--peers must be at least 2 and --reps at least 1")
    return args


def rate_label(rate: float | None) -> str:
    return "" if rate is None else f"_{rate:g}mbit"


def run_config(size: int, n: int, args: argparse.Namespace, rate: float | None = None) -> dict:
    methods = ["gloo"] + args.compressions + (["stock"] if args.stock else [])
    settings = {"part_size_bytes": args.part_size_kib * 1024}
    if args.prefetch is not None:
        settings["prefetch"] = args.prefetch
    label = f"{size_label(size)}_{n}peers{rate_label(rate)}"
    where = "loopback" if rate is None else f"{rate:g} Mbit/s links"
    print(
        f"\n== {size_label(size)} fp32 values ({size * 4 / 2**20:,.0f} MiB) x {n} peers, {where}: starting peers",
        flush=True,
    )
    t_start = time.perf_counter()
    runs: dict[str, list] = {m: [] for m in methods}
    failures: dict[str, list[str]] = {m: [] for m in methods}
    with contextlib.ExitStack() as stack:
        hosts = None
        if rate is not None:
            from photon_p2p.testbed import FieldTestbed, HostSpec

            testbed = stack.enter_context(FieldTestbed([HostSpec(f"peer{r}", rate_mbit=rate) for r in range(n)]))
            hosts = list(testbed.hosts.values())
        spec = SwarmSpec(
            n=n, shapes=[(size,)], gloo=True, stock=args.stock, part_size_bytes=settings["part_size_bytes"], hosts=hosts
        )
        swarm = stack.enter_context(Swarm(spec))
        print(f"   peers up in {time.perf_counter() - t_start:.1f} s; warm-up", flush=True)

        def attempt(method: str, tries: int = 3):
            for _ in range(tries):
                r = swarm.run(method, **({} if method == "gloo" else settings))
                if r.ok:
                    return r
                failures[method].append(r.error)
                print(f"   {method}: FAILED ({r.error}); retrying", flush=True)
            raise RuntimeError(f"{method} failed {tries} times in a row: {failures[method][-tries:]}")

        t_warm = time.perf_counter()
        warm = {m: attempt(m) for m in methods}
        per_rep = time.perf_counter() - t_warm
        print(
            "   warm-up: "
            + ", ".join(f"{m} {r.time:.3f} s" for m, r in warm.items())
            + f" ({per_rep:.0f} s with matchmaking)",
            flush=True,
        )
        reps = args.reps
        if per_rep * reps > args.budget_s and reps > 3:
            reps = max(3, int(args.budget_s // per_rep))
            print(
                f"   NOTE: {args.reps} reps would take ~{per_rep * args.reps:.0f} s (> --budget-s "
                f"{args.budget_s:.0f}); running {reps} reps instead",
                flush=True,
            )
        for rep in range(reps):
            order = methods[rep % len(methods) :] + methods[: rep % len(methods)]
            line = []
            for method in order:
                r = attempt(method)
                runs[method].append(r)
                line.append(f"{method} {r.time:.3f}")
            print(f"   rep {rep + 1}/{reps}: " + " | ".join(line) + " s", flush=True)
    gloo_median = statistics.median(r.time for r in runs["gloo"])
    out = {
        "values": size,
        "peers": n,
        "rate_mbit": rate,
        "reps": reps,
        "reps_requested": args.reps,
        "seconds_total": round(time.perf_counter() - t_start, 1),
        "methods": {},
    }
    for method, rs in runs.items():
        median = statistics.median(r.time for r in rs)
        entry = {
            "median_s": round(median, 5),
            "min_s": round(min(r.time for r in rs), 5),
            "reps_s": [round(r.time, 5) for r in rs],
            "cpu_s_median": {k: round(statistics.median(r.cpu_s[k] for r in rs), 3) for k in rs[0].cpu_s},
            "max_error": max(r.max_error for r in rs),
            "failures": failures[method],
            "min_available_gib": round(min(r.min_available_gib for r in rs), 2),
        }
        if method != "gloo":
            entry["ratio_vs_gloo"] = round(median / gloo_median, 3)
            entry["wire_bytes"] = statistics.median(r.wire_bytes for r in rs)
            if rs[0].bytes_sent:
                entry["bytes_sent_per_peer"] = statistics.median(statistics.mean(r.bytes_sent) for r in rs)
        out["methods"][method] = entry
    print(f"   done in {out['seconds_total']:.0f} s ({label})", flush=True)
    return out


def print_table(configs: dict, methods: list[str]) -> None:
    head = f"{'config':<22} {'gloo s':>8} " + " ".join(f"{m + ' s':>15} {'x gloo':>7}" for m in methods)
    print("\n" + head + "\n" + "-" * len(head))
    for label, c in configs.items():
        row = f"{label:<22} {c['methods']['gloo']['median_s']:>8.3f} "
        for m in methods:
            e = c["methods"][m]
            row += f"{e['median_s']:>15.3f} {e['ratio_vs_gloo']:>6.1f}x "
        print(row)
    print("targets: " + ", ".join(f"{k} <= {v}x gloo" for k, v in TARGETS.items()))
    print("cpu seconds per operation (median, all peers; peer = gloo's or step()'s process, averager, dht, p2pd):")
    for label, c in configs.items():
        for m, e in c["methods"].items():
            cpu = ", ".join(f"{k} {v:.2f}" for k, v in e["cpu_s_median"].items() if v >= 0.005)
            print(f"  {label:<22} {m:<14} {cpu}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the peers are stopped on the way out
    t0 = time.perf_counter()
    load_start = load_average()
    rates = args.rate or [None]
    print(
        f"allreduce benchmark: sizes {', '.join(map(size_label, args.sizes))}, peers {args.peers}, "
        f"compressions {args.compressions}, {args.reps} reps, "
        f"{'rates ' + str(args.rate) + ' Mbit/s' if args.rate else 'loopback'}; load average {load_start}",
        flush=True,
    )
    if args.rate:
        from photon_p2p.testbed import available

        ok, reason = available()
        if not ok:
            print(f"error: --rate needs the field testbed: {reason}", file=sys.stderr)
            return 2
    configs = {}
    for rate in rates:
        for n in args.peers:
            for size in args.sizes:
                configs[f"{size_label(size)}_{n}peers{rate_label(rate)}"] = run_config(size, n, args, rate)
    methods = args.compressions + (["stock"] if args.stock else [])
    print_table(configs, methods)
    result: dict = {}
    for label, c in configs.items():
        for m in methods:
            result[f"ratio_{m}_{label}"] = c["methods"][m]["ratio_vs_gloo"]
    result["meets_targets"] = {
        k: v <= TARGETS[k.split("_")[1]] for k, v in result.items() if k.split("_")[1] in TARGETS
    }
    result.update(
        {
            "targets": {"ratio_max_" + k: v for k, v in TARGETS.items()},
            "configs": configs,
            "settings": {
                "sizes": args.sizes,
                "peers": args.peers,
                "compressions": args.compressions,
                "reps": args.reps,
                "rate_mbit": args.rate or None,
                "links": "loopback"
                if not args.rate
                else "photon_p2p.testbed: netns per peer, bridge, tbf rate R "
                "burst 256kb latency 200ms on both veth ends",
                "part_size_bytes": args.part_size_kib * 1024,
                "prefetch": args.prefetch,
                "stock": args.stock,
                "timed": "allow_allreduce() -> result (matchmaking done before); gloo all_reduce SUM; slowest "
                "peer per repetition; median over repetitions",
            },
            "machine": machine_info(),
            "load_average": {"start": load_start, "end": load_average()},
            "elapsed_s": round(time.perf_counter() - t0, 1),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    print(f"elapsed {result['elapsed_s']:.0f} s; load average at the end {result['load_average']['end']}")
    save_json(args.output, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
