"""What a round reports: its record (the --metrics-file line) and its log line."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RoundResult:
    """What one round did; becomes a metrics record and a log line."""

    round: int
    step: int
    outcome: str  # averaged | alone | late | skipped
    group_size: int = 1
    tokens: int = 0  # the group's tokens this round
    own_tokens: int = 0  # this peer's tokens trained this round
    tokens_in_theta: int = 0  # this peer's tokens that entered theta this round (own + carried from a late round)
    carried_tokens: int = 0  # this round's tokens held over into the next round (a late round)
    wasted_tokens: int = 0  # tokens that reached nobody (a diverged update)
    staleness: int = 0
    loss: float | None = None
    val_loss: float | None = None
    val_ppl: float | None = None
    train_s: float = 0.0
    matchmaking_s: float = 0.0  # from the end of training to the start of the all-reduce: idle time
    allreduce_s: float = 0.0
    sync_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    outer_norm: float = 0.0
    reconciled: bool = False
    lost_fraction: float = 0.0  # of the values this member averaged, the share whose reducer failed it
    reconcile_failed: bool = False  # the group's theta merge failed part-way for this member (it kept its own)
    clipped_parts: int = 0  # parts of groupmates' updates our reducer clipped (robust aggregation)
    dropped_parts: int = 0  # parts our reducer left out for pointing away from the others
    offenders: list[str] = field(default_factory=list)  # whose parts those were
    theta_hash: str = ""
    params: int = 0  # values averaged per round (for comparing with per-step data parallelism)
    group: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out.pop("group")
        out["group_peers"] = self.group
        return out


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def format_round_line(r: RoundResult, tokens_per_s: float) -> str:
    parts = [
        f"round {r.round}",
        f"step {r.step}",
        f"{r.outcome}",
        f"group {r.group_size}",
        f"{r.tokens:,} tok",
        f"loss {r.loss:.4f}" if r.loss is not None else "loss -",
    ]
    if r.val_ppl is not None:
        parts.append(f"val ppl {r.val_ppl:.2f}")
    if r.carried_tokens:
        parts.append(f"carried {r.carried_tokens:,} tok (staleness {r.staleness})")
    parts += [
        f"train {r.train_s:.1f}s",
        f"wait {r.matchmaking_s:.1f}s",
        f"all-reduce {r.allreduce_s:.2f}s",
        f"sent {_fmt_bytes(r.bytes_sent)}",
        f"received {_fmt_bytes(r.bytes_received)}",
        *([f"clipped {r.clipped_parts} / dropped {r.dropped_parts} parts"] if r.offenders else []),
        f"outer step {r.outer_norm:.3g}",
        f"{tokens_per_s:,.0f} tok/s",
    ]
    return " | ".join(parts)
