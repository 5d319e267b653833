"""Benchmark: robust aggregation against one hostile peer in four, with real photon-peer processes on 127.0.0.1.

Scenarios (same seed, data, model and token budget; 4 peers that start together, ``--min-group-size 3``: the three
honest peers never wait for the attacker, whose own rounds may fail):

``clean-off``   no attacker, ``--no-robust-aggregation``: the reference
``clean-on``    no attacker, robust aggregation on: its cost on a clean run (decides the default)
``nan``         peer 4 sends NaN every round (PHOTON_FAULTS nan_send@1+)
``scale``       peer 4 sends 1e6 x its update (scale_update@1+:1e6)
``flip``        peer 4 sends its update sign-flipped (flip_update@1+)
``random``      peer 4 sends Gaussian noise with 1e3 x its update's norm (random_update@1+:1e3)
``scale-off``   the scale attack with robust aggregation off (what the defence prevents; only with ``--unprotected``)

Attacks start at round 1 (round 0 is clean, so the attacker has trained an honest update to distort). For each
scenario: the final validation loss and perplexity of an honest peer (the same on every honest peer: they share
theta), the parts clipped and dropped by the reducers (round metrics), and the relative difference to ``clean-off``.
Targets (issue 16): every attack within 2% of the clean run's val loss; ``clean-on`` costs < 1% perplexity.

    .venv/bin/python bench/robust.py                 # all scenarios (~3 minutes each on 2 shared cores)
    .venv/bin/python bench/robust.py --scenarios clean-off,scale --max-steps 60

Results go to ``bench/results/robust.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results" / "robust.json"
BIN = Path(sys.executable).parent
ATTACKS = {
    "clean-off": (None, False),
    "clean-on": (None, True),
    "nan": ("nan_send@1+", True),
    "scale": ("scale_update@1+:1e6", True),
    "flip": ("flip_update@1+", True),
    "random": ("random_update@1+:1e3", True),
    "scale-off": ("scale_update@1+:1e6", False),
}
DEFAULT = "clean-off,clean-on,nan,scale,flip,random"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scenarios", default=DEFAULT, help=f"comma-separated, of {', '.join(ATTACKS)}")
    p.add_argument("--unprotected", action="store_true", help="also run scale-off (robust aggregation off)")
    p.add_argument("--peers", type=int, default=4)
    p.add_argument("--model", default="micro")
    p.add_argument("--max-steps", type=int, default=80)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per scenario")
    return p.parse_args(argv)


def _start(workdir: Path, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    d = workdir / name
    d.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ, TMPDIR=tempfile.mkdtemp(prefix=f"pr-{name}-", dir="/tmp"), PYTHONUNBUFFERED="1")
    full_env.pop("PHOTON_FAULTS", None)
    full_env.update(env or {})
    with (d / "out.log").open("wb") as out:
        return subprocess.Popen(argv, cwd=d, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)


def _bootstrap(workdir: Path, procs: list[subprocess.Popen]) -> str:
    procs.append(_start(workdir, "boot", [str(BIN / "photon-bootstrap"), "--host-maddrs", "/ip4/127.0.0.1/tcp/0"]))
    log, deadline = workdir / "boot" / "out.log", time.monotonic() + 120
    while time.monotonic() < deadline:
        m = re.search(r"/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+", log.read_text(errors="replace"))
        if m:
            return m.group(0)
        time.sleep(0.3)
    raise RuntimeError(f"bootstrap did not start: {log.read_text()[-2000:]}")


def _records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_scenario(name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from photon_p2p.runtime import stop_groups

    fault, robust = ATTACKS[name]
    procs: list[subprocess.Popen] = []
    t0 = time.monotonic()
    try:
        entry = _bootstrap(workdir, procs)
        flags = [
            "--initial-peers", entry, "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--run-id", f"robust-{name}",
            "--data", "default", "--model", args.model,
            "--max-steps", str(args.max_steps), "--local-steps", str(args.local_steps),
            "--batch-size", str(args.batch_size), "--eval-every", str(args.max_steps), "--eval-batches",
            str(args.eval_batches), "--wait-for-peers", str(args.peers), "--min-group-size", str(args.peers - 1),
            "--quorum-timeout", "600", "--matchmaking-time", "5", "--allreduce-timeout", "60", "--threads", "1",
            "--metrics-file", "metrics.jsonl", "--no-progress", "--seed", "0",
            "--robust-aggregation" if robust else "--no-robust-aggregation",
        ]  # fmt: skip
        names = [f"p{i}" for i in range(args.peers)]
        for i, peer in enumerate(names):
            env = {"PHOTON_FAULTS": fault} if fault and i == len(names) - 1 else None
            procs.append(_start(workdir, peer, [str(BIN / "photon-peer"), *flags, "--cache-dir", "../cache"], env))
        deadline = time.monotonic() + args.timeout
        for p, peer in zip(procs[1:], names, strict=True):
            code = p.wait(max(1.0, deadline - time.monotonic()))
            if code != 0:
                raise RuntimeError(f"{peer} exited {code}: {(workdir / peer / 'out.log').read_text()[-3000:]}")
    finally:
        stop_groups(procs, grace=10.0)
    honest = names[0]
    recs = _records(workdir / honest / "metrics.jsonl")
    evals = [r for r in recs if r.get("val_loss") is not None]
    rounds = {r["round"]: r for r in recs if "outcome" in r}
    all_rounds = [r for peer in names for r in _records(workdir / peer / "metrics.jsonl") if "outcome" in r]
    hashes = {r["theta_hash"] for peer in names[:-1] for r in _records(workdir / peer / "metrics.jsonl")[-1:]}
    if fault:
        assert "injecting" in (workdir / names[-1] / "out.log").read_text(), f"{name}: the attack never happened"
    return {
        "fault": fault,
        "robust": robust,
        "val_loss": evals[-1]["val_loss"] if evals else None,
        "val_ppl": evals[-1]["val_ppl"] if evals else None,
        "rounds": len(rounds),
        "averaged_rounds": sum(1 for r in rounds.values() if r["outcome"] == "averaged"),
        "clipped_parts": sum(r.get("clipped_parts", 0) for r in all_rounds),
        "dropped_parts": sum(r.get("dropped_parts", 0) for r in all_rounds),
        "skipped_rounds": sum(1 for r in rounds.values() if r["outcome"] == "skipped"),
        "honest_theta_agree": len(hashes) == 1,
        "seconds": round(time.monotonic() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from _swarm import machine_info, save_json

    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    if args.unprotected and "scale-off" not in scenarios:
        scenarios.append("scale-off")
    unknown = [s for s in scenarios if s not in ATTACKS]
    if unknown:
        print(f"error: unknown scenario(s) {unknown}; choose from {', '.join(ATTACKS)}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="photon-robust-") as tmp:
        for name in scenarios:
            print(f"--- {name}", flush=True)
            results[name] = run_scenario(name, args, Path(tmp) / name)
            print(json.dumps(results[name]), flush=True)
    base = results.get("clean-off", {}).get("val_loss")
    print(f"\n{'scenario':<10} {'val loss':>9} {'val ppl':>9} {'vs clean':>9} {'clipped':>8} {'dropped':>8}")
    for name, r in results.items():
        loss = r["val_loss"]
        rel = (loss / base - 1) if base and loss is not None and math.isfinite(loss) else None
        r["loss_vs_clean"] = rel
        print(
            f"{name:<10} {loss if loss is not None else float('nan'):>9.4f} "
            f"{r['val_ppl'] if r['val_ppl'] is not None else float('nan'):>9.2f} "
            f"{'' if rel is None else f'{rel:+.2%}':>9} {r['clipped_parts']:>8} {r['dropped_parts']:>8}"
        )
    attacks = [n for n in results if n not in ("clean-off", "clean-on", "scale-off")]
    summary = {
        "attacks_within_2pct": all(
            results[n]["loss_vs_clean"] is not None and abs(results[n]["loss_vs_clean"]) <= 0.02 for n in attacks
        )
        if base
        else None,
        "robust_clean_ppl_cost": (results["clean-on"]["val_ppl"] / results["clean-off"]["val_ppl"] - 1)
        if "clean-on" in results and "clean-off" in results and results["clean-off"]["val_ppl"]
        else None,
    }
    print(json.dumps(summary))
    save_json(RESULTS, {"summary": summary, "scenarios": results, "config": vars(args), "machine": machine_info()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
