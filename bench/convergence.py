"""Benchmark: Photon's convergence claims at an equal token budget, on the three real corpora in ../shared/data.

Every run trains the same model from the same seed on the same number of tokens and is evaluated on ONE fixed
held-out mix: the first ``--eval-windows`` windows of the validation documents of each corpus (Austen, Linux docs,
Shakespeare; equal thirds, whatever the corpora's sizes). The tokenizer is a byte-level BPE trained on the
training documents only (the shard builder's own hash split decides which documents are held out).

    (a) centralised: one process, batch = the sum of the peers' batches, its best lr from ``--central-lrs``
    (b) fedavg: ``--peers`` peers, local batch ``--batch-size``, lr ``--fed-lrs[0]``, outer lr 1 (Photon's recipe)
    (c) nesterov: the same with DiLoCo's outer step (lr 0.7, momentum 0.9)
    (d) heterogeneous: 3 peers dealt one corpus each (``--split by-file``) against 3 peers with IID shares
    (e) compression: (b) with none / fp16 / blockwise 8-bit
    (+) a sweep of what could close a fedavg/centralised gap: the other ``--fed-lrs`` and ``--sweep-local-steps``
    (+) the real swarm: ``photon-swarm`` with ``--peers`` real processes and (b)'s flags (``--real-steps`` steps),
        against the simulator with the same flags and seeds, both evaluated as the peers evaluate (skip: --no-real)

(a)-(e) and the sweeps run in photon_p2p/swarm/simulate.py, the in-process reference (``photon-swarm --simulate``):
the same data shares, model, inner loop, outer optimizers and round rules as photon-peer, with exact averaging and
hivemind's codecs emulating compression. Sweeps are what it is for; the real-swarm row says how far a real swarm
is from it. The centralised run is the simulator with one peer (fedavg, outer lr 1: tests/test_simulate.py proves
that is centralised training to fp tolerance), so it is evaluated at the same token counts as the federated runs.

Targets (ratios from this one run): fedavg ppl <= centralised; fedavg reaches centralised's final ppl in <= 0.6x the
rounds nesterov needs; heterogeneous within 5% of IID; 8-bit costs <= 1% ppl; real swarm within 2% val loss of the
simulator. Writes bench/results/convergence.json and bench/results/convergence.png (curves against tokens and
rounds).

    .venv/bin/python bench/convergence.py --quick      # micro model, a few rounds, no real swarm (~3 minutes)
    .venv/bin/python bench/convergence.py              # the full run (see bench/README.md for its size and time)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _swarm import load_average, machine_info, save_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DATA = (ROOT / ".." / "shared" / "data").resolve()
CORPORA = ("austen_6_novels.txt.gz", "linux_kernel_docs_6.1.txt.gz", "tinyshakespeare.txt.gz")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="micro model, few rounds, no real swarm (~3 minutes)")
    p.add_argument("--model", default="tiny", help="model preset (default: tiny)")
    p.add_argument("--vocab-size", type=int, default=2048, help="BPE vocabulary (default: 2048)")
    p.add_argument("--peers", type=int, default=4, help="peers of (b), (c), (e) and the real swarm (default: 4)")
    p.add_argument("--batch-size", type=int, default=8, help="each peer's batch (default: 8)")
    p.add_argument("--max-steps", type=int, default=400, help="steps per peer: the token budget (default: 400)")
    p.add_argument("--local-steps", type=int, default=25, help="inner steps per round (default: 25)")
    p.add_argument("--fed-lrs", default="3e-3,6e-3", help="peers' lr; the first is (b)'s, the rest a sweep")
    p.add_argument("--central-lrs", default="1e-3,2e-3,4e-3", help="centralised lr sweep (default: 1e-3,2e-3,4e-3)")
    p.add_argument("--sweep-local-steps", default="", help="extra fedavg runs with these --local-steps (e.g. 10)")
    p.add_argument("--eval-windows", type=int, default=64, help="held-out windows per corpus (default: 64)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of the simulator (default 1: on a shared, loaded machine a second thread that is not "
        "scheduled stalls every parallel op)",
    )
    p.add_argument("--no-real", action="store_true", help="skip the real photon-swarm comparison")
    p.add_argument("--real-steps", type=int, default=None, help="steps per peer of the real swarm (default: all)")
    p.add_argument("--workdir", default="runs/bench-convergence", help="tokenizer, shards and real-swarm runs")
    p.add_argument("--replot", metavar="JSON", help="only recompute ratios and the figure from a saved result file")
    p.add_argument("--only", default="", help="comma-separated subset of runs (for debugging)")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.vocab_size, args.max_steps, args.local_steps = "micro", 512, 48, 12
        args.central_lrs, args.fed_lrs, args.eval_windows, args.no_real = "2e-3,4e-3", "4e-3", 16, True
    return args


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


# ----------------------------------------------------------------------------------------------------------------
# data: the training split for the tokenizer, and the held-out mix


def train_tokenizer(files: list[Path], vocab: int, workdir: Path, val_fraction: float) -> Path:
    """A BPE trained on the training documents only (the shard builder's hash rule decides held-out ones)."""
    from photon_p2p.data import resolve_paths, train_bpe
    from photon_p2p.data.sources import iter_documents

    out = workdir / f"bpe{vocab}.json"
    if out.exists():
        return out
    threshold = int(val_fraction * 2**64)
    split_dir = workdir / "train-split"
    split_dir.mkdir(parents=True, exist_ok=True)
    for f in files:
        with gzip.open(split_dir / f.name, "wt", encoding="utf-8") as w:
            for doc in iter_documents(resolve_paths([str(f)])):
                h = int.from_bytes(hashlib.blake2b(doc.text.encode("utf-8"), digest_size=8).digest(), "big")
                if h >= threshold:
                    w.write(doc.text + "\n")
    train_bpe([str(split_dir)], vocab, str(out), progress=False)
    return out


def heldout_mix(files: list[Path], tokenizer_path: Path, seq_len: int, windows: int, cache: str, val_fraction: float):
    """The first ``windows`` validation windows of each corpus, concatenated: one fixed held-out mix."""
    import numpy as np

    from photon_p2p.data import load_tokenizer, prepare_dataset

    tok = load_tokenizer(str(tokenizer_path))
    parts = []
    for f in files:
        val = prepare_dataset([str(f)], tok, cache_dir=cache, val_fraction=val_fraction, progress=False).val
        n = min(len(val) - 1, windows * seq_len) // seq_len * seq_len
        parts.append(np.asarray(val[: n + 1], dtype=np.int64)[:n])
    # windows of seq_len + 1 tokens start every seq_len tokens: one trailing token closes the last window
    mix = np.concatenate(parts + [parts[-1][:1]])
    return mix, [len(p) // seq_len for p in parts]


# ----------------------------------------------------------------------------------------------------------------
# runs


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.files = [DATA / c for c in CORPORA]
        self.work = (ROOT / args.workdir).resolve() if not Path(args.workdir).is_absolute() else Path(args.workdir)
        self.work.mkdir(parents=True, exist_ok=True)
        self.cache = str(self.work / "shards")
        from photon_p2p.config import DataConfig

        self.val_fraction = DataConfig().val_fraction
        t0 = time.perf_counter()
        self.tokenizer = train_tokenizer(self.files, args.vocab_size, self.work, self.val_fraction)
        from photon_p2p.model import PRESETS

        self.seq_len = PRESETS[args.model]["max_seq_len"]
        self.val, self.val_windows = heldout_mix(
            self.files, self.tokenizer, self.seq_len, args.eval_windows, self.cache, self.val_fraction
        )
        print(f"tokenizer and shards ready in {time.perf_counter() - t0:.0f}s; held-out mix {self.val_windows} windows")
        self.runs: dict[str, dict[str, Any]] = {}

    def flags(self, *, batch: int, lr: float, outer: str = "fedavg", compression: str = "none", **kw: Any) -> list[str]:
        a = self.args
        out = [
            "--model", a.model, "--tokenizer", str(self.tokenizer), "--cache-dir", self.cache, "--no-progress",
            "--batch-size", str(batch), "--lr", str(lr), "--max-steps", str(kw.get("max_steps", a.max_steps)),
            "--local-steps", str(kw.get("local_steps", a.local_steps)), "--outer-optimizer", outer,
            "--compression", compression, "--eval-every", str(kw.get("local_steps", a.local_steps)),
            "--threads", str(kw.get("threads", a.threads)),
        ]  # fmt: skip
        if outer == "fedavg":
            out += ["--outer-lr", "1"]
        return out

    def simulate(self, name: str, *, peers: int, split: str = "iid", val: Any = "mix", **kw: Any) -> dict[str, Any]:
        from photon_p2p.cli.peer import parse_config
        from photon_p2p.swarm.simulate import Simulator

        if self.args.only and name not in self.args.only.split(","):
            return {}
        flags = self.flags(**kw)
        cfg, _ = parse_config(["--data", *map(str, self.files), *flags])
        t0 = time.perf_counter()
        sim = Simulator(
            cfg, data=[str(f) for f in self.files], peers=peers, split=split, val_tokens=self.val if val else None
        )
        res = sim.run()
        curve = [
            dict(round=r["round"] + 1, step=r["step"], tokens=r["tokens_total"], val_loss=r["val_loss"],
                 val_ppl=r["val_ppl"])
            for r in res.rounds if r.get("val_loss") is not None
        ]  # fmt: skip
        run = dict(
            peers=peers, split=split, flags=flags, curve=curve, val_loss=res.val_loss, val_ppl=res.val_ppl,
            tokens=res.tokens, seconds=round(time.perf_counter() - t0, 1), params=res.params,
            tokens_per_s=round(res.tokens / max(res.seconds, 1e-9), 1),
        )  # fmt: skip
        self.runs[name] = run
        self.save_partial()
        print(
            f"{name:28} peers {peers} {split:7} | {res.tokens:>10,} tok | val loss {res.val_loss:.4f} | "
            f"ppl {res.val_ppl:8.2f} | {run['seconds']:.0f}s ({run['tokens_per_s']:,.0f} tok/s)",
            flush=True,
        )
        return run

    def save_partial(self) -> None:
        """Every finished run is on disk at once: a late failure or Ctrl-C loses only the run in progress."""
        name = "convergence_quick" if self.args.quick else "convergence"
        (RESULTS / f"{name}.partial.json").write_text(
            json.dumps(dict(config=vars(self.args), runs=self.runs), indent=1)
        )

    def real_swarm(self, name: str, *, peers: int, **kw: Any) -> dict[str, Any]:
        """photon-swarm with real processes; peers evaluate on their own validation split (the whole corpus's)."""
        flags = self.flags(**kw, threads=1)
        workdir = self.work / name
        cmd = [str(Path(sys.executable).parent / "photon-swarm"), "--peers", str(peers), "--data"]
        cmd += [*map(str, self.files), "--workdir", str(workdir), "--fresh", "--threads", "1", *flags]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=3600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
        if proc.returncode != 0:  # recorded, not fatal: every other figure of the run is still worth saving
            why = err.decode(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            self.runs[name] = dict(peers=peers, flags=flags, error=f"photon-swarm exited {proc.returncode}: {why[0]}")
            self.save_partial()
            print(f"{name:28} FAILED: {self.runs[name]['error']}")
            return {}
        finals = []
        for k in range(peers):
            recs = [json.loads(x) for x in (workdir / f"peer-{k}" / "metrics.jsonl").read_text().splitlines()]
            evals = [r for r in recs if r.get("val_loss") is not None]
            finals.append(evals[-1]["val_loss"])
            outcomes = [r.get("outcome") for r in recs if "outcome" in r]
        run = dict(
            peers=peers, flags=flags, val_loss_per_peer=finals, val_loss=sum(finals) / len(finals),
            rounds_averaged=outcomes.count("averaged"), rounds=len(outcomes),
            seconds=round(time.perf_counter() - t0, 1),
        )  # fmt: skip
        self.runs[name] = run
        print(
            f"{name:28} real {peers} peers | val loss per peer {[round(x, 4) for x in finals]} | {run['seconds']:.0f}s"
        )
        return run


def rounds_to(curve: list[dict[str, Any]], ppl: float | None) -> int | None:
    """The first round whose evaluation reaches ``ppl`` (None: never within the budget)."""
    if ppl is None:
        return None
    return next((c["round"] for c in curve if c["val_ppl"] <= ppl), None)


def analyse(runs: dict[str, dict[str, Any]]) -> tuple[float | None, dict[str, Any], dict[str, bool | None]]:
    """The centralised run's best lr, the ratios and the targets, from the runs alone (also for --replot)."""
    central = {float(k.removeprefix("central_lr")): r for k, r in runs.items() if k.startswith("central_lr") and r}
    best_lr = min(central, key=lambda x: central[x]["val_loss"]) if central else None
    fed, nest = runs.get("fedavg"), runs.get("nesterov") or {}
    het, iid, q8, f16 = (runs.get(k) for k in ("by_file_3peers", "iid_3peers", "fedavg_blockwise8bit", "fedavg_fp16"))
    real, sim_ref = runs.get("real_swarm"), runs.get("reference_for_real")
    ratios: dict[str, Any] = {}
    if best_lr is not None and fed:
        c = central[best_lr]
        ratios["fedavg_over_central_ppl"] = fed["val_ppl"] / c["val_ppl"]
        r_fed, r_nest = rounds_to(fed["curve"], c["val_ppl"]), rounds_to(nest.get("curve", []), c["val_ppl"])
        ratios["rounds_to_central_fedavg"], ratios["rounds_to_central_nesterov"] = r_fed, r_nest
        ratios["fedavg_over_nesterov_rounds"] = r_fed / r_nest if r_fed and r_nest else None
        if nest:
            ratios["nesterov_over_central_ppl"] = nest["val_ppl"] / c["val_ppl"]
            # where neither reaches centralised: the rounds fedavg needs to reach nesterov's final ppl, over nesterov's
            r_at = rounds_to(fed["curve"], nest["val_ppl"])
            ratios["fedavg_rounds_to_nesterov_final_over_nesterov_rounds"] = (
                r_at / nest["curve"][-1]["round"] if r_at else None
            )
        sweep = {k: r for k, r in runs.items() if k == "fedavg" or k.startswith(("fedavg_lr", "fedavg_H"))}
        best_fed = min(sweep, key=lambda k: sweep[k]["val_ppl"])
        ratios["best_fedavg_sweep_run"] = best_fed
        ratios["best_fedavg_sweep_over_central_ppl"] = sweep[best_fed]["val_ppl"] / c["val_ppl"]
    if het and iid:
        ratios["heterogeneous_over_iid_ppl"] = het["val_ppl"] / iid["val_ppl"]
    if fed and q8:
        ratios["8bit_over_none_ppl"] = q8["val_ppl"] / fed["val_ppl"]
    if fed and f16:
        ratios["fp16_over_none_ppl"] = f16["val_ppl"] / fed["val_ppl"]
    if real and sim_ref and "val_loss" in real:
        ratios["real_over_sim_val_loss"] = real["val_loss"] / sim_ref["val_loss"]
    targets = {
        "fedavg_ppl_le_central": _le(ratios.get("fedavg_over_central_ppl"), 1.0),
        "fedavg_rounds_le_0.6_nesterov": _le(ratios.get("fedavg_over_nesterov_rounds"), 0.6),
        "heterogeneous_within_5pct_of_iid": _le(ratios.get("heterogeneous_over_iid_ppl"), 1.05),
        "8bit_costs_le_1pct": _le(ratios.get("8bit_over_none_ppl"), 1.01),
        "real_within_2pct_of_sim": None
        if "real_over_sim_val_loss" not in ratios
        else abs(ratios["real_over_sim_val_loss"] - 1) <= 0.02,
    }
    return best_lr, ratios, targets


def report(ratios: dict[str, Any], targets: dict[str, Any]) -> None:
    print("\nratios:")
    for k, v in ratios.items():
        print(f"  {k:36} {round(v, 4) if isinstance(v, float) else v}")
    print("targets:", json.dumps(targets))


def replot(path: Path) -> int:
    """--replot: ratios, targets and the figure again from a saved (or partial) result file."""
    data = json.loads(path.read_text())
    best_lr, ratios, targets = analyse(data["runs"])
    report(ratios, targets)
    data.update(ratios=ratios, targets=targets)
    data.setdefault("machine", machine_info())
    data.setdefault("config", {})["central_best_lr"] = best_lr
    out = path.with_name(path.name.replace(".partial", ""))
    save_json(out, data)
    plot(data["runs"], out.with_suffix(".png"), best_lr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot:
        return replot(Path(args.replot))
    if not all((DATA / c).exists() for c in CORPORA):
        print(f"skipped: the corpora {', '.join(CORPORA)} are not in {DATA} (../shared/data)")
        return 0
    import torch

    torch.manual_seed(0)
    started = time.perf_counter()
    b = Bench(args)
    P, B = args.peers, args.batch_size
    fed_lrs, central_lrs = floats(args.fed_lrs), floats(args.central_lrs)
    lr = fed_lrs[0]
    print(f"budget: {P} peers x {args.max_steps} steps x batch {B} x {b.seq_len} tokens; rounds of {args.local_steps}")

    # (a) centralised: batch P x B, its own best lr
    for x in central_lrs:
        b.simulate(f"central_lr{x:g}", peers=1, batch=P * B, lr=x)
    # (b), (c), (e)
    b.simulate("fedavg", peers=P, batch=B, lr=lr)
    b.simulate("nesterov", peers=P, batch=B, lr=lr, outer="nesterov")
    for c in ("fp16", "blockwise8bit"):
        b.simulate(f"fedavg_{c}", peers=P, batch=B, lr=lr, compression=c)
    # (d): one corpus per peer against IID shares, 3 peers each
    b.simulate("by_file_3peers", peers=3, split="by-file", batch=B, lr=lr)
    b.simulate("iid_3peers", peers=3, batch=B, lr=lr)
    # what could close a gap to centralised
    for x in fed_lrs[1:]:
        b.simulate(f"fedavg_lr{x:g}", peers=P, batch=B, lr=x)
    for h in [int(x) for x in args.sweep_local_steps.split(",") if x.strip()]:
        b.simulate(f"fedavg_H{h}", peers=P, batch=B, lr=lr, local_steps=h)
    # the real swarm against the simulator, same flags and seeds, evaluated the way the peers evaluate
    if not args.no_real:
        steps = args.real_steps or args.max_steps
        b.simulate("reference_for_real", peers=P, batch=B, lr=lr, max_steps=steps, val=None)
        b.real_swarm("real_swarm", peers=P, batch=B, lr=lr, max_steps=steps)

    best_lr, ratios, targets = analyse(b.runs)
    report(ratios, targets)
    out = dict(
        config=dict(vars(args), seq_len=b.seq_len, central_best_lr=best_lr, heldout_windows=b.val_windows),
        ratios=ratios, targets=targets, runs=b.runs, machine=machine_info(), load_average=load_average(),
        seconds=round(time.perf_counter() - started, 1),
    )  # fmt: skip
    name = "convergence_quick" if args.quick else "convergence"
    save_json(RESULTS / f"{name}.json", out)
    (RESULTS / f"{name}.partial.json").unlink(missing_ok=True)
    plot(b.runs, RESULTS / f"{name}.png", best_lr)
    return 0


def _le(x: float | None, bound: float) -> bool | None:
    return None if x is None else bool(x <= bound)


def plot(runs: dict[str, dict[str, Any]], path: Path, best_lr: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_r) = plt.subplots(1, 2, figsize=(13, 5))
    for name, r in runs.items():
        if not r.get("curve") or name == "reference_for_real":  # (the real swarm has no curve: peers' own val)
            continue
        if name.startswith("central") and best_lr is not None and name != f"central_lr{best_lr:g}":
            continue
        xs_t = [c["tokens"] for c in r["curve"]]
        ys = [c["val_ppl"] for c in r["curve"]]
        ax_t.plot(xs_t, ys, label=name, marker=".")
        if r["peers"] > 1:
            ax_r.plot([c["round"] for c in r["curve"]], ys, label=name, marker=".")
    best = runs.get(f"central_lr{best_lr:g}") if best_lr is not None else None
    if best:
        ax_r.axhline(best["val_ppl"], color="k", ls="--", lw=1, label="centralised final")
    for ax, xl in ((ax_t, "tokens trained (all peers)"), (ax_r, "rounds")):
        ax.set_xlabel(xl)
        ax.set_ylabel("val perplexity (held-out mix)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("photon-p2p convergence at equal tokens (in-process reference)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


if __name__ == "__main__":
    sys.exit(main())
