"""What peers publish in the DHT, and how a reader decides whether to believe it.

Every record another peer wrote is untrusted. It travels as a signed envelope (msgpack)::

    {"b": body bytes (canonical msgpack of a schema below), "k": signer's public key (DER), "s": signature}

and is accepted only if (1) it is small, (2) the signature verifies, (3) the signer's key hashes to the peer ID
the record claims (heartbeats) or that the DHT subkey names, and (4) the body passes a strict pydantic schema
(no extra fields, no type coercion, bounded strings and numbers). Anything else is dropped and counted, never
raised into the caller: a forged record must not crash a reader.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from typing import Annotated, Any, TypeVar

import msgpack
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from photon_p2p.config import RoundConfig, Section, TrainConfig
from photon_p2p.swarm.identity import Identity, peer_id_from_public_key, verify_signature

logger = logging.getLogger(__name__)

PROTOCOL_VERSION = 2  # bump when what peers exchange changes incompatibly
MAX_RECORD_BYTES = 4 << 20  # a manifest carries the tokenizer; everything else is tiny
# how far another machine's clock may be ahead of ours: record times beyond it are refused (validators.py, readers)
MAX_CLOCK_SKEW_S = 60.0

ShortStr = Annotated[str, Field(max_length=128)]
PeerIdStr = Annotated[str, Field(min_length=8, max_length=128, pattern=r"^[1-9A-HJ-NP-Za-km-z]+$")]
HexHash = Annotated[str, Field(pattern=r"^[0-9a-f]{16,64}$")]
NonNegInt = Annotated[int, Field(ge=0, le=2**62)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    @field_validator("*", mode="after")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be finite")
        return value


Seconds = Annotated[float, Field(ge=0, le=1e7)]


class LastRound(Strict):
    """How this peer's last round went, for dashboards: where its time went and what came of it."""

    round: NonNegInt
    outcome: Annotated[str, Field(max_length=16)]
    tokens: NonNegInt  # this peer's tokens that entered theta
    train_s: Seconds
    matchmaking_s: Seconds
    allreduce_s: Seconds
    loss: float | None = None
    val_ppl: float | None = None


class Heartbeat(Strict):
    """A peer's progress, republished every few seconds with a short expiry (so a dead peer disappears)."""

    peer_id: PeerIdStr
    run_id: ShortStr
    manifest_hash: HexHash
    round: NonNegInt
    step: NonNegInt
    tokens: NonNegInt
    tokens_per_s: Annotated[float, Field(ge=0)]
    round_tokens: NonNegInt = 0  # tokens trained in the current round so far (rounds close on a collective budget)
    loss: float | None = None
    val_ppl: float | None = None
    theta_hash: Annotated[str, Field(max_length=64)] = ""
    stage: Annotated[str, Field(max_length=32)]
    device: Annotated[str, Field(max_length=64)]
    version: Annotated[str, Field(max_length=32)]
    client_mode: bool = False
    maddrs: Annotated[list[Annotated[str, Field(max_length=256)]], Field(max_length=8)] = []
    last_round: LastRound | None = None
    time: float


class Contribution(Strict):
    """What a peer has given the run so far, kept in the DHT for days (unlike heartbeats) so the leaderboard
    remembers peers that left. Signed by the peer, so nobody can write another's entry; the figures are the peer's
    own claim (a peer can only inflate its own line, which the leaderboard shows as such)."""

    peer_id: PeerIdStr
    run_id: ShortStr
    tokens: NonNegInt  # tokens of this peer that entered theta
    rounds: NonNegInt  # rounds finished (averaged, alone, late or skipped)
    rounds_averaged: NonNegInt
    first_seen: float
    time: float


class ModelShape(Strict):
    vocab_size: Annotated[int, Field(ge=2, le=10_000_000)]
    d_model: Annotated[int, Field(ge=1, le=65536)]
    n_layers: Annotated[int, Field(ge=1, le=1024)]
    n_heads: Annotated[int, Field(ge=1, le=1024)]
    n_kv_heads: Annotated[int, Field(ge=1, le=1024)]
    ffn_hidden: Annotated[int, Field(ge=1, le=1 << 20)]
    max_seq_len: Annotated[int, Field(ge=1, le=1 << 20)]
    rope_theta: float
    norm_eps: float
    tie_embeddings: bool
    init_std: float


def settings_schema(section: type[Section], name: str, doc: str) -> type[Strict]:
    """The manifest's schema for one section's run settings, derived from the fields config.py marks ``shared``:
    the same names and types (Literal choices kept), every one required, plus the field's ``ge`` bound."""
    fields: dict[str, Any] = {}
    for key, tp in section.shared_types().items():
        ge = section.shared_fields()[key].ge
        fields[key] = (tp if ge is None else Annotated[tp, Field(ge=ge)], ...)
    return create_model(name, __base__=Strict, __doc__=doc, __module__=__name__, **fields)


TrainSettings = settings_schema(
    TrainConfig, "TrainSettings", "The inner-loop settings everybody shares (the schedule runs on the global step)."
)
RoundSettings = settings_schema(RoundConfig, "RoundSettings", "The round settings everybody shares.")


class Manifest(Strict):
    """What everyone in a run must agree on. Its hash (settings only: no creator, no time) names the run's
    averaging namespace, so peers with identical settings always average together."""

    protocol: int
    run_id: ShortStr
    software: Annotated[str, Field(max_length=32)]
    preset: ShortStr
    model: ModelShape
    tokenizer_fingerprint: HexHash
    tokenizer_json: Annotated[bytes, Field(max_length=MAX_RECORD_BYTES)]  # zlib-compressed HF tokenizers JSON
    train: TrainSettings
    round: RoundSettings


class ManifestRecord(Strict):
    """A manifest as published: who created the run and when (the earliest valid record wins), signed by them."""

    manifest: Manifest
    creator: PeerIdStr
    created_at: float


class RunAnnouncement(Strict):
    """A short-lived note under the global runs key, so a peer asking for an unknown run id can list real ones."""

    run_id: ShortStr
    manifest_hash: HexHash
    time: float


class StateMeta(Strict):
    """Metadata sent with a state download (theta + outer optimizer state) from a donor to a joining peer."""

    run_id: ShortStr
    manifest_hash: HexHash
    round: NonNegInt
    step: NonNegInt
    theta_hash: Annotated[str, Field(max_length=64)]
    num_tensors: Annotated[int, Field(ge=0, le=1 << 20)]


class RoundGather(Strict):
    """What each group member tells its groupmates when a group is assembled (hivemind's all-gather)."""

    round: NonNegInt
    theta_hash: Annotated[str, Field(max_length=64)]
    tokens: NonNegInt
    steps: NonNegInt  # inner steps this round (differs between peers with --round-seconds)
    loss: float | None = None


M = TypeVar("M", bound=Strict)


def canonical(obj: Any) -> Any:
    """Sort dict keys recursively so equal records encode to identical bytes (hashes and signatures agree)."""
    if isinstance(obj, dict):
        return {k: canonical(obj[k]) for k in sorted(obj)}
    if isinstance(obj, (list, tuple)):
        return [canonical(v) for v in obj]
    return obj


def encode_body(record: Strict) -> bytes:
    return msgpack.packb(canonical(record.model_dump()), use_bin_type=True)


def record_hash(record: Strict) -> str:
    return hashlib.sha256(encode_body(record)).hexdigest()


def sign_record(record: Strict, identity: Identity) -> bytes:
    body = encode_body(record)
    return msgpack.packb({"b": body, "k": identity.public_key_der, "s": identity.sign(body)}, use_bin_type=True)


class RecordRejected(Exception):
    """An untrusted record failed a check; ``reason`` is short and safe to count and log."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def open_envelope(raw: Any, *, signer: str | None = None) -> tuple[bytes, str]:
    """Verify an envelope's signature. Returns (body bytes, signer peer ID). Raises RecordRejected, nothing else.

    :param signer: if given, the base58 peer ID the signing key must hash to (e.g. the DHT subkey)
    """
    if not isinstance(raw, bytes) or len(raw) > MAX_RECORD_BYTES:
        raise RecordRejected("not bytes or too large")
    try:
        env = msgpack.unpackb(raw, raw=False, strict_map_key=True, max_bin_len=MAX_RECORD_BYTES, max_ext_len=0)
    except Exception:  # msgpack raises a zoo of exception types on garbage
        raise RecordRejected("not msgpack") from None
    if not isinstance(env, dict) or set(env) != {"b", "k", "s"} or not all(isinstance(env[x], bytes) for x in env):
        raise RecordRejected("not a signed envelope")
    if not verify_signature(env["k"], env["b"], env["s"]):
        raise RecordRejected("bad signature")
    try:
        signer_id = peer_id_from_public_key(env["k"]).to_base58()
    except Exception:
        raise RecordRejected("bad public key") from None
    if signer is not None and signer_id != signer:
        raise RecordRejected("signed by another peer")
    return env["b"], signer_id


def parse_body(body: bytes, schema: type[M]) -> M:
    """An envelope's body as ``schema`` (strict). Raises RecordRejected("schema"), nothing else."""
    try:
        return schema.model_validate(msgpack.unpackb(body, raw=False, strict_map_key=True, max_ext_len=0))
    except Exception:  # pydantic, msgpack and anything a hostile body provokes
        raise RecordRejected("schema") from None


def open_record(raw: Any, schema: type[M], *, signer: str | None = None) -> tuple[M, str]:
    """Verify and parse an envelope. Returns (record, signer peer ID). Raises RecordRejected, nothing else.

    :param signer: if given, the base58 peer ID the signing key must hash to (e.g. the DHT subkey)
    """
    body, signer_id = open_envelope(raw, signer=signer)
    return parse_body(body, schema), signer_id


class RejectCounter:
    """Counts dropped records by reason; logs the first of each kind once, so a flood cannot spam the log."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    def add(self, what: str, reason: str) -> None:
        key = f"{what}: {reason}"
        if self.counts[key] == 0:
            logger.warning("dropped an invalid %s record (%s); further ones are only counted", what, reason)
        self.counts[key] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())
