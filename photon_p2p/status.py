"""What ``photon-status`` shows: a run's manifest and its live peers, gathered from the DHT as a client.

``gather()`` reads the run's manifest (the canonical one of the valid records) and the peers' heartbeats into one
plain dict, the very object ``--json`` prints; ``render()`` turns that dict into the table. Everything read comes
from other peers and is untrusted: invalid records are dropped and counted (``rejected_records``), and strings
from heartbeats are stripped of control characters before they reach a terminal.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, TextIO

from photon_p2p.errors import SwarmError

logger = logging.getLogger(__name__)

MAX_TOKENIZER_JSON = 64 << 20  # a manifest's tokenizer is zlib-compressed: bound what we inflate
CLEAR_SCREEN = "\x1b[H\x1b[2J"
LEADERBOARD_ROWS = 10


@dataclass(kw_only=True)
class StatusOptions:
    initial_peers: list[str]
    run_id: str
    as_json: bool = False
    watch: float | None = None  # seconds between refreshes; None: print once
    join_timeout: float = 15.0
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    manifest_attempts: int = 2  # a node that has just joined may need a moment to find the records
    serve: tuple[str, int] | None = None  # (host, port): serve the web dashboard (photon_p2p/dashboard) instead
    serve_period: float = 5.0  # seconds between the dashboard's DHT reads


# --------------------------------------------------------------------------------------------------------------
# summaries (pure functions of validated records, so they are unit-testable without a swarm)


def count_parameters(shape: Any) -> int:
    """Parameters of the model a manifest describes (same count as ``Transformer.num_params()``), without torch."""
    d, hd = shape.d_model, shape.d_model // shape.n_heads
    attention = 2 * d * shape.n_heads * hd + 2 * d * shape.n_kv_heads * hd  # q, o and k, v projections
    mlp = 3 * d * shape.ffn_hidden  # SwiGLU: gate, up, down
    per_layer = attention + mlp + 2 * d  # plus two RMSNorm weights
    embeddings = shape.vocab_size * d * (1 if shape.tie_embeddings else 2)
    return shape.n_layers * per_layer + embeddings + d  # plus the final norm


def human_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def _tokenizer_info(manifest: Any) -> tuple[str, int | None]:
    """(name, vocabulary size) of the tokenizer a manifest carries; ("unreadable", None) if it cannot be read."""
    from photon_p2p.data import tokenizer_from_json
    from photon_p2p.errors import DataError

    try:
        inflater = zlib.decompressobj()
        text = inflater.decompress(manifest.tokenizer_json, MAX_TOKENIZER_JSON)
        if inflater.unconsumed_tail:
            raise ValueError("too large")
        tok = tokenizer_from_json(text.decode("utf-8"), origin="the run's tokenizer")
    except (zlib.error, UnicodeDecodeError, ValueError, DataError):
        return "unreadable", None
    return tok.name, tok.vocab_size


def manifest_summary(run: Any, candidates: int = 1, owners: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """``owners``: each distinct (owner, manifest hash) published under the run id (one, unless a run is contested)."""
    m = run.manifest
    tokenizer, vocab = _tokenizer_info(m)
    return {
        "hash": run.hash,
        "creator": run.record.creator,
        "owner": run.record.creator,  # with the run id, what names the run: volunteers pass it as --run-owner
        "owners": owners or [{"owner": run.record.creator, "hash": run.hash}],
        "created_at": run.record.created_at,
        "protocol": m.protocol,
        "software": m.software,
        "model_preset": m.preset,
        "parameters": count_parameters(m.model),
        "model": m.model.model_dump(),
        "tokenizer": tokenizer,
        "tokenizer_vocab": vocab,
        "tokenizer_fingerprint": m.tokenizer_fingerprint,
        "local_steps": m.round.local_steps,
        "round_seconds": m.round.round_seconds,
        "outer_optimizer": m.round.outer_optimizer,
        "outer_lr": m.round.outer_lr,
        "outer_momentum": m.round.outer_momentum,
        "compression": m.round.compression,
        "max_steps": m.train.max_steps,
        "batch_size": m.train.batch_size,
        "lr": m.train.lr,
        "candidates": candidates,
    }


def peer_row(hb: Any, now: float) -> dict[str, Any]:
    return {
        "peer_id": hb.peer_id,
        "stage": hb.stage,
        "round": hb.round,
        "step": hb.step,
        "tokens": hb.tokens,
        "tokens_per_s": hb.tokens_per_s,
        "loss": hb.loss,
        "val_ppl": hb.val_ppl,
        "device": hb.device,
        "version": hb.version,
        "last_seen_s": round(max(0.0, now - hb.time), 1),
        "client_mode": hb.client_mode,
        "theta_hash": hb.theta_hash,
        "last_round": hb.last_round.model_dump() if hb.last_round else None,
    }


def leaderboard(contributions: dict[str, Any], live: set[str]) -> list[dict[str, Any]]:
    """Peers by tokens that entered theta (each figure is signed by, and only claimed by, that peer)."""
    rows = [
        {
            "peer_id": c.peer_id,
            "tokens": c.tokens,
            "rounds_averaged": c.rounds_averaged,
            "rounds": c.rounds,
            "live": c.peer_id in live,
            "first_seen": c.first_seen,
            "last_update": c.time,
        }
        for c in contributions.values()
    ]
    return sorted(rows, key=lambda r: (-r["tokens"], r["peer_id"]))


def theta_agreement(peers: list[dict[str, Any]]) -> dict[str, int]:
    """How many peers at the swarm's newest round hold each theta hash (one entry: they agree; several: the swarm
    has split). Only peers at the same round can agree: a peer still averaging round r holds the theta that the
    peers already at r + 1 replaced a moment ago."""
    settled = [p for p in peers if p["theta_hash"] and p["stage"] not in ("starting", "syncing", "left")]
    if not settled:
        return {}
    newest = max(p["round"] for p in settled)
    counts: dict[str, int] = {}
    for p in settled:
        if p["round"] == newest:
            counts[p["theta_hash"]] = counts.get(p["theta_hash"], 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def gather(calls: Any, run_id: str, *, attempts: int = 2, known: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run's status as one JSON-ready dict. Raises SwarmError (listing the runs seen) if the run is unknown;
    ``known`` is a manifest summary from an earlier call, kept if the manifest has since disappeared."""
    from photon_p2p.swarm.heartbeat import read_contributions, read_heartbeats
    from photon_p2p.swarm.manifest import fetch_manifests, list_runs, pick_canonical, unknown_run_message
    from photon_p2p.swarm.records import RejectCounter

    rejects = RejectCounter()
    candidates: list[Any] = []
    for attempt in range(attempts):
        candidates = fetch_manifests(calls, run_id, rejects)
        if candidates or known is not None:
            break
        if attempt + 1 < attempts:
            time.sleep(1.0)
    if candidates:
        owners = sorted({(c.record.creator, c.hash) for c in candidates})
        manifest = manifest_summary(
            pick_canonical(candidates), len(candidates), [{"owner": o, "hash": h} for o, h in owners]
        )
    elif known is not None:
        manifest = known
    else:
        raise SwarmError(unknown_run_message(run_id, list_runs(calls, RejectCounter())))
    beats = read_heartbeats(calls, run_id, rejects)
    now = time.time()
    peers = [peer_row(hb, now) for _, hb in sorted(beats.items())]
    board = leaderboard(read_contributions(calls, run_id, rejects), set(beats))
    return {
        "run_id": run_id,
        "manifest": manifest,
        "peers": peers,
        "total_tokens_per_s": round(sum(p["tokens_per_s"] for p in peers), 1),
        "theta_agreement": theta_agreement(peers),
        "leaderboard": board,
        "rejected_records": rejects.total,
        "rejected_reasons": dict(sorted(rejects.counts.items())),
    }


# --------------------------------------------------------------------------------------------------------------
# rendering


def _clean(text: Any) -> str:
    """Untrusted strings go to a terminal: no escape sequences, no newlines."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def short_peer_id(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 12 else f"{peer_id[:4]}..{peer_id[-6:]}"


def _fmt_seconds(s: float) -> str:
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.0f}h"


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], numeric: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in [header, *rows]
    ]


def render(status: dict[str, Any]) -> str:
    m = status["manifest"]
    vocab = f" ({m['tokenizer_vocab']:,} tokens)" if m["tokenizer_vocab"] is not None else ""
    shape = m["model"]
    schedule = (
        f"{m['round_seconds']:g}s rounds"
        if m["round_seconds"] is not None
        else f"{m['local_steps']} local steps per round"
    )
    lines = [
        f"run {_clean(status['run_id'])}  manifest {m['hash'][:12]}  created by {short_peer_id(m['creator'])} "
        f"{_fmt_seconds(max(0.0, time.time() - m['created_at']))} ago  (photon-p2p {_clean(m['software'])})",
        f"model {_clean(m['model_preset'])}: {human_count(m['parameters'])} parameters ({shape['n_layers']} layers, "
        f"d_model {shape['d_model']}, seq {shape['max_seq_len']}); tokenizer {_clean(m['tokenizer'])}{vocab}",
        f"{schedule}, outer {m['outer_optimizer']} lr {m['outer_lr']:g}, compression {m['compression']}, "
        f"max steps {m['max_steps']:,}, batch {m['batch_size']}, inner lr {m['lr']:g}",
        f"owner {_clean(m.get('owner', m['creator']))} (volunteers join with --run-id {_clean(status['run_id'])} "
        f"--run-owner {_clean(m.get('owner', m['creator']))})",
        "",
    ]
    peers = status["peers"]
    if peers:
        header = ("PEER", "STAGE", "ROUND", "STEP", "TOKENS/S", "LOSS", "VAL PPL", "DEVICE", "SEEN")
        rows = [
            (
                short_peer_id(p["peer_id"]) + (" (client)" if p["client_mode"] else ""),
                _clean(p["stage"]),
                str(p["round"]),
                f"{p['step']:,}",
                f"{p['tokens_per_s']:,.0f}",
                _fmt(p["loss"], ".4f"),
                _fmt(p["val_ppl"], ".2f"),
                _clean(p["device"]),
                _fmt_seconds(p["last_seen_s"]),
            )
            for p in peers
        ]
        lines += _table(header, rows, numeric={2, 3, 4, 5, 6, 8})
        lines.append("")
        lines.append(
            f"{len(peers)} live peer{'s' if len(peers) != 1 else ''}, total throughput "
            f"{status['total_tokens_per_s']:,.0f} tokens/s"
        )
        agreement = status.get("theta_agreement") or {}
        if len(agreement) == 1:
            ((h, n),) = agreement.items()
            lines.append(f"theta: the peers at the newest round agree ({n} on {_clean(h)[:12]})")
        elif agreement:
            split = ", ".join(f"{_clean(h)[:12]} ({n})" for h, n in agreement.items())
            lines.append(
                f"theta: the swarm holds {len(agreement)} different models: {split} (they merge when their "
                f"peers next average together)"
            )
    else:
        lines.append("no live peers (a peer shows up within seconds of joining; heartbeats expire after ~12 s)")
    board = status.get("leaderboard") or []
    if board:
        lines += ["", "CONTRIBUTIONS (tokens that entered theta, as each peer reports it)"]
        header = ("PEER", "TOKENS", "ROUNDS", "AVERAGED", "")
        rows = [
            (
                short_peer_id(r["peer_id"]),
                f"{r['tokens']:,}",
                str(r["rounds"]),
                str(r["rounds_averaged"]),
                "live" if r["live"] else f"left {_fmt_seconds(max(0.0, time.time() - r['last_update']))} ago",
            )
            for r in board[:LEADERBOARD_ROWS]
        ]
        lines += _table(header, rows, numeric={1, 2, 3})
        if len(board) > LEADERBOARD_ROWS:
            lines.append(f"... and {len(board) - LEADERBOARD_ROWS} more (--json lists all)")
    contested = {o["hash"] for o in m.get("owners", [])}
    if len(contested) > 1:
        listed = "; ".join(f"{_clean(o['owner'])} (manifest {_clean(o['hash'][:12])})" for o in m["owners"])
        lines.append(
            f"warning: manifests with different settings were published under this run id by: {listed}; peers "
            f"refuse to join without --run-owner. Showing the earliest"
        )
    elif m.get("candidates", 1) > 1:
        lines.append(
            f"note: {m['candidates']} valid manifests were published for this run; showing the canonical (earliest) one"
        )
    if status["rejected_records"]:
        reasons = ", ".join(f"{k} ({v})" for k, v in status["rejected_reasons"].items())
        n = status["rejected_records"]
        lines.append(f"dropped {n} invalid record{'s' if n != 1 else ''}: {reasons}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------
# the command


def run_status(opts: StatusOptions, *, out: TextIO | None = None) -> int:
    """Join as a client, print the status once (or every ``opts.watch`` seconds until Ctrl-C), always leave."""
    from photon_p2p.swarm.dht import DHTCalls, start_dht, stop_dht
    from photon_p2p.swarm.identity import Identity

    out = out or sys.stdout
    scratch = tempfile.TemporaryDirectory(prefix="photon-status-")
    dht = None
    try:
        dht = start_dht(
            initial_peers=opts.initial_peers,
            host_maddrs=opts.host_maddrs,
            identity=Identity.ephemeral(scratch.name),
            client_mode=True,
            join_timeout=opts.join_timeout,
        )
        calls = DHTCalls(dht)
        status = gather(calls, opts.run_id, attempts=opts.manifest_attempts)
        if opts.serve is not None:  # a web page instead of the terminal, until Ctrl-C
            from photon_p2p.dashboard.server import Dashboard, serve_until_stopped

            known = status["manifest"]
            dashboard = Dashboard(
                lambda run_id: gather(calls, run_id, attempts=1, known=known),
                run_id=opts.run_id,
                period=opts.serve_period,
                initial=status,
            )
            serve_until_stopped(
                dashboard,
                *opts.serve,
                out=out,
                alive=dht.is_alive,
                dead="the DHT client process died; run photon-status again",
            )
            return 0
        _show(status, opts, out)
        while opts.watch is not None:
            time.sleep(opts.watch)
            if not dht.is_alive():
                raise SwarmError("the DHT client process died; run photon-status again")
            try:
                status = gather(calls, opts.run_id, attempts=1, known=status["manifest"])
            except (TimeoutError, RuntimeError) as e:  # a slow DHT: say so (not into a JSON stream), keep watching
                print(
                    f"(DHT lookup failed: {e or type(e).__name__}; retrying)",
                    file=sys.stderr if opts.as_json else out,
                    flush=True,
                )
                continue
            _show(status, opts, out)
        return 0
    except KeyboardInterrupt:
        if opts.watch is None and opts.serve is None:
            raise
        return 0  # Ctrl-C (or SIGTERM) is how --watch and --serve end
    finally:
        stop_dht(dht)
        scratch.cleanup()


def _show(status: dict[str, Any], opts: StatusOptions, out: TextIO) -> None:
    if opts.as_json:
        out.write(json.dumps(status, sort_keys=False) + "\n")
    elif opts.watch is not None:
        out.write(CLEAR_SCREEN + render(status) + f"\n\n(refreshing every {opts.watch:g}s; Ctrl-C to quit)\n")
    else:
        out.write(render(status) + "\n")
    out.flush()
