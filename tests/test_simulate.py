"""The in-process reference (photon_p2p/swarm/simulate.py, ``photon-swarm --simulate``) computes what it claims.

Proves: with one peer and fedavg at outer lr 1 the simulator *is* centralised training (same seed, same batches,
parameters equal to fp tolerance); K peers holding identical data and seed average to exactly what each trained;
the emulated Butterfly All-Reduce returns the token-weighted mean (known 2-peer case, with and without robust
aggregation) and, compressed, moves it by no more than hivemind's codecs allow (none: exact; fp16: ~1e-3
relative; blockwise 8-bit: ~1-2% relative RMS), identically for every member; bad flags fail with one line. The
slow test runs a real 2-peer photon-swarm and the simulator with the same flags and seeds and checks the real
swarm ends no more than 2% above the simulator's val loss, having trained at least its tokens.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from photon_p2p.cli.peer import parse_config
from photon_p2p.cli.swarm import main as swarm_main
from photon_p2p.swarm.simulate import Simulator, butterfly_average
from photon_p2p.train.session import LocalSession

MICRO = ["--model", "micro", "--batch-size", "8", "--lr", "3e-3", "--eval-batches", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shared_data) -> Path:
    """~400 KB of real text (the start of tinyshakespeare), so each test tokenizes little."""
    with gzip.open(shared_data / "tinyshakespeare.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read(400_000)
    d = tmp_path_factory.mktemp("corpus")
    (d / "shakespeare.txt").write_text(text, encoding="utf-8")
    return d / "shakespeare.txt"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def _cfg(corpus: Path, cache: str, *extra: str):
    cfg, _ = parse_config(["--data", str(corpus), "--cache-dir", cache, "--no-progress", *MICRO, *extra])
    return cfg


def test_one_peer_fedavg_is_centralised_training(corpus, cache):
    flags = ("--max-steps", "12", "--local-steps", "4", "--outer-optimizer", "fedavg", "--outer-lr", "1")
    cfg = _cfg(corpus, cache, *flags)
    sim = Simulator(cfg, data=[str(corpus)], peers=1)
    result = sim.run()
    assert [r["step"] for r in result.rounds] == [4, 8, 12]
    central = LocalSession(_cfg(corpus, cache, *flags), progress=False)
    for _ in range(12):
        central.train_step()
    for t, p in zip(sim.theta, central.model.parameters(), strict=True):
        torch.testing.assert_close(t, p.detach(), rtol=0, atol=1e-5)
    assert result.val_loss == pytest.approx(central.evaluate()[0], rel=1e-4)


def test_identical_peers_average_to_each_of_them(corpus, cache, tmp_path):
    # three files with the same text, dealt out by-file: every peer trains on the same batches from the same seed
    copies = []
    for k in range(3):
        copies.append(tmp_path / f"copy{k}.txt")
        copies[-1].write_text(corpus.read_text(encoding="utf-8"), encoding="utf-8")
    cfg = _cfg(corpus, cache, "--max-steps", "6", "--local-steps", "3", "--compression", "none")
    sim = Simulator(cfg, data=[str(c) for c in copies], peers=3, split="by-file")
    sim.run_round()
    for s in sim.sessions:
        for t, p in zip(sim.theta, s.model.parameters(), strict=True):
            torch.testing.assert_close(t, p.detach(), rtol=0, atol=1e-6)


def test_two_peers_exact_weighted_mean():
    torch.manual_seed(0)
    a = [torch.randn(300, 70), torch.randn(5)]
    b = [torch.randn(300, 70), torch.randn(5)]
    for clip in (None, 2.0):  # similar norms: robust aggregation clips nothing and is the same mean
        out = butterfly_average([a, b], [1.0, 3.0], compression="none", robust_clip=clip)
        for o, x, y in zip(out, a, b, strict=True):
            torch.testing.assert_close(o, (1.0 * x + 3.0 * y) / 4.0, rtol=1e-6, atol=1e-7)
    # a 1000x-scaled update is clipped to 2x the smaller norm (robust.py), so it cannot dominate
    big = [1000 * t for t in b]
    out = butterfly_average([a, big], [1.0, 1.0], robust_clip=2.0)
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in out))
    assert norm < 3 * math.sqrt(sum(float(t.pow(2).sum()) for t in a))


@pytest.mark.parametrize(("compression", "bound"), [("none", 1e-6), ("fp16", 2e-3), ("blockwise8bit", 0.03)])
def test_compression_error_is_bounded(compression, bound):
    torch.manual_seed(1)
    # ~600k values: several 512 KiB parts per reducer, so part boundaries and reply encoding are exercised
    deltas = [[torch.randn(700, 600) * 1e-2, torch.randn(1000) * 1e-3] for _ in range(3)]
    exact = [sum(d[i] for d in deltas) / 3 for i in range(2)]
    got = butterfly_average(deltas, [1.0, 1.0, 1.0], compression=compression)
    err = math.sqrt(sum(float((g - e).pow(2).sum()) for g, e in zip(got, exact, strict=True)))
    ref = math.sqrt(sum(float(e.pow(2).sum()) for e in exact))
    assert err / ref <= bound, f"{compression}: relative error {err / ref:.2e}"
    if compression != "none":
        assert err > 0  # the codec really ran


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--peers", "0"], "--peers 0: must be at least 1"),
        (["--round-seconds", "5"], "--round-seconds cannot be simulated"),
        (["--compression", "zip"], "--compression"),
        (["--local-steps", "0"], "--local-steps"),
    ],
)
def test_cli_rejects_bad_flags_in_one_line(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) if flags[0] == "--compression" else _no_raise():
        rc = swarm_main(["--simulate", "--data", "x", "--workdir", str(tmp_path), *flags])
        assert rc == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err, err


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.slow
def test_real_swarm_is_no_worse_than_the_simulator(procs, tmp_path, corpus, cache):
    """The simulator is the swarm without timing: a real swarm with the same flags and seeds must not end more than
    2% (the issue's target) above its val loss. One-sided on purpose: real peers close a round on a *collective*
    token budget that they learn from heartbeats a moment late, so in sub-second rounds they train more than
    --local-steps (16-26% more tokens measured on an idle machine, landing ~10% *below* the simulator; see
    bench/README.md, convergence.py). What the test guarantees is that the real swarm trained at least the
    simulator's tokens and lost nothing on the way (broken averaging, a lost round) that costs more than 2%."""
    from tests.helpers.procs import console

    common = [*MICRO, "--max-steps", "160", "--local-steps", "20", "--eval-every", "160", "--compression", "none"]
    common += ["--cache-dir", cache]
    swarm = procs.start(
        console("photon-swarm")
        + ["--peers", "2", "--data", str(corpus), "--workdir", str(tmp_path / "real"), "--fresh", *common],
        "swarm",
    )
    assert swarm.wait(600) == 0, swarm.output()[-4000:]
    real, tokens = [], 0
    for k in range(2):
        recs = [json.loads(x) for x in (tmp_path / "real" / f"peer-{k}" / "metrics.jsonl").read_text().splitlines()]
        real.append([r for r in recs if r.get("val_loss") is not None][-1]["val_loss"])
        tokens = max(tokens, sum(r.get("tokens", 0) for r in recs if "outcome" in r))
    cfg = _cfg(
        corpus, cache, "--max-steps", "160", "--local-steps", "20", "--eval-every", "160", "--compression", "none"
    )
    sim = Simulator(cfg, data=[str(corpus)], peers=2).run()
    said = f"real {real} ({tokens:,} tokens) vs simulated {sim.val_loss:.4f} ({sim.tokens:,} tokens)"
    print(said)  # shown with pytest -s
    assert tokens >= sim.tokens, said
    for loss in real:
        assert loss <= sim.val_loss * 1.02, said
