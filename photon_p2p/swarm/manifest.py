"""The run manifest: what every peer of a run must agree on, published in the DHT under the run id.

Creating vs joining: a peer looks for the run's manifest first. If there is one, it adopts everything it did not
set itself, and is refused (with the list of differing fields) if something it *did* set conflicts. If there is
none, it publishes its own proposal, waits a moment for simultaneous creators, and everybody picks the same
winner: the earliest valid record (ties broken by peer ID). With identical settings the winner does not even
matter: the manifest hash covers settings only, so all those peers average together anyway.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from typing import Any

from photon_p2p import __version__
from photon_p2p.config import RoundConfig, RunConfig, Section, TrainConfig
from photon_p2p.data import Tokenizer, tokenizer_from_json
from photon_p2p.errors import SwarmError
from photon_p2p.model import ModelArgs
from photon_p2p.swarm.dht import DHTCalls
from photon_p2p.swarm.identity import Identity
from photon_p2p.swarm.records import (
    PROTOCOL_VERSION,
    Manifest,
    ManifestRecord,
    ModelShape,
    RecordRejected,
    RejectCounter,
    RoundSettings,
    RunAnnouncement,
    TrainSettings,
    open_record,
    record_hash,
    sign_record,
)

logger = logging.getLogger(__name__)
MAX_TOKENIZER_JSON_BYTES = 64 * 2**20

RUNS_KEY = "photon.runs"
MANIFEST_TTL = 600.0  # republished by every live peer, so a run outlives its creator
RUN_ANNOUNCEMENT_TTL = 120.0


def manifest_key(run_id: str) -> str:
    return f"photon.{run_id}.manifest"


@dataclass(frozen=True)
class RunManifest:
    """An accepted manifest with its signed envelope (republished verbatim by every peer)."""

    record: ManifestRecord
    raw: bytes

    @property
    def manifest(self) -> Manifest:
        return self.record.manifest

    @property
    def hash(self) -> str:
        return record_hash(self.record.manifest)


def build_manifest(cfg: RunConfig, tokenizer: Tokenizer, model_args: ModelArgs) -> Manifest:
    """This peer's proposal for the run, from its own configuration."""
    return Manifest(
        protocol=PROTOCOL_VERSION,
        run_id=cfg.swarm.run_id,
        software=__version__,
        preset=cfg.model.preset,
        model=ModelShape(**model_args.to_dict()),
        tokenizer_fingerprint=tokenizer.fingerprint,
        tokenizer_json=zlib.compress(tokenizer.to_json().encode("utf-8"), 9),
        train=TrainSettings(**cfg.train.shared_values()),
        round=RoundSettings(**cfg.round.shared_values()),
    )


def fetch_manifests(calls: DHTCalls, run_id: str, rejects: RejectCounter) -> list[RunManifest]:
    """Every valid manifest record published for ``run_id`` (invalid ones are dropped and counted)."""
    found = calls.get(manifest_key(run_id), latest=True)
    out = []
    entries = found.value if found is not None and isinstance(found.value, dict) else {}
    for subkey, item in entries.items():
        try:
            record, signer = open_record(
                getattr(item, "value", None), ManifestRecord, signer=subkey if isinstance(subkey, str) else "?"
            )
            if record.creator != signer or record.manifest.run_id != run_id:
                raise RecordRejected("creator or run id does not match")
        except RecordRejected as e:
            rejects.add("manifest", e.reason)
            continue
        out.append(RunManifest(record=record, raw=item.value))
    return out


def pick_canonical(candidates: list[RunManifest]) -> RunManifest:
    return min(candidates, key=lambda c: (c.record.created_at, c.record.creator))


def publish(calls: DHTCalls, run: RunManifest) -> bool:
    from hivemind.utils.timed_storage import get_dht_time

    return calls.store(
        manifest_key(run.manifest.run_id), run.raw, get_dht_time() + MANIFEST_TTL, subkey=run.record.creator
    )


def list_runs(calls: DHTCalls, rejects: RejectCounter) -> list[RunAnnouncement]:
    found = calls.get(RUNS_KEY, latest=True)
    out = []
    entries = found.value if found is not None and isinstance(found.value, dict) else {}
    for subkey, item in entries.items():
        try:
            ann, _ = open_record(getattr(item, "value", None), RunAnnouncement)
            if ann.run_id != subkey:
                raise RecordRejected("run id does not match its key")
        except RecordRejected as e:
            rejects.add("run announcement", e.reason)
            continue
        out.append(ann)
    return sorted(out, key=lambda a: a.run_id)


def announce_run(calls: DHTCalls, identity: Identity, run: RunManifest) -> None:
    from hivemind.utils.timed_storage import get_dht_time

    ann = RunAnnouncement(run_id=run.manifest.run_id, manifest_hash=run.hash, time=time.time())
    calls.store(RUNS_KEY, sign_record(ann, identity), get_dht_time() + RUN_ANNOUNCEMENT_TTL, subkey=ann.run_id)


def unknown_run_message(run_id: str, runs: list[RunAnnouncement]) -> str:
    seen = ", ".join(r.run_id for r in runs) if runs else "none"
    return f"run '{run_id}' was not found in the swarm (runs seen: {seen}); check --run-id"


# --------------------------------------------------------------------------------------------------------------
# agreeing on a manifest

# the config sections whose ``shared`` fields are the manifest's tables of the same name (config.py declares them)
_SETTINGS_SECTIONS: tuple[type[Section], ...] = (TrainConfig, RoundConfig)
_MODEL_FLAGS = ("model.preset", "model.seq_len", "model.vocab_size", "model.tie_embeddings", "data.tokenizer")


def settings_conflicts(run: Manifest, mine: Manifest, explicit: set[str]) -> list[str]:
    """Fields where the user's *explicit* settings differ from the run's. Defaults never conflict: they are
    simply replaced by the run's values. Per-peer choices (micro-batch, device, data) are not in the manifest."""
    diffs = []
    if run.protocol != mine.protocol:
        diffs.append(f"protocol: run {run.protocol}, this photon-p2p {mine.protocol} (upgrade to match)")
    if explicit & set(_MODEL_FLAGS):
        for key, value in run.model.model_dump().items():
            if getattr(mine.model, key) != value:
                diffs.append(f"model.{key}: run {value!r}, yours {getattr(mine.model, key)!r}")
    if "data.tokenizer" in explicit and run.tokenizer_fingerprint != mine.tokenizer_fingerprint:
        diffs.append(f"tokenizer: run {run.tokenizer_fingerprint[:12]}, yours {mine.tokenizer_fingerprint[:12]}")
    for section in _SETTINGS_SECTIONS:
        name = section.SECTION
        theirs, ours = getattr(run, name), getattr(mine, name)
        for key, spec in section.shared_fields().items():
            pinned = {f"{name}.{k}" for k in (key, *spec.implied_by)}
            if explicit & pinned and getattr(theirs, key) != getattr(ours, key):
                diffs.append(f"{name}.{key}: run {getattr(theirs, key)!r}, yours {getattr(ours, key)!r}")
    return diffs


def manifest_settings(m: Manifest) -> dict[str, Any]:
    """The manifest without the tokenizer's bytes, as plain data: what a swarm checkpoint records about its run."""
    return {
        "protocol": m.protocol,
        "preset": m.preset,
        "tokenizer": m.tokenizer_fingerprint,
        "model": m.model.model_dump(),
        "train": m.train.model_dump(),
        "round": m.round.model_dump(),
    }


def settings_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``section.key: checkpoint X, this run Y`` for every setting that differs between two manifest_settings."""
    diffs = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += [
                f"{key}.{sub}: checkpoint {a.get(sub)!r}, this run {b.get(sub)!r}"
                for sub in sorted(set(a) | set(b))
                if a.get(sub) != b.get(sub)
            ]
        elif a != b:
            diffs.append(f"{key}: checkpoint {a!r}, this run {b!r}")
    return diffs


def agree_on_manifest(
    calls: DHTCalls,
    identity: Identity,
    proposal: Manifest,
    explicit: set[str],
    *,
    join_existing: bool = False,
    settle_s: float = 3.0,
) -> RunManifest:
    """Find the run's manifest or create it; refuse if the user's explicit settings conflict with it."""
    rejects = RejectCounter()
    run_id = proposal.run_id
    candidates = fetch_manifests(calls, run_id, rejects)
    if not candidates:
        if join_existing:
            raise SwarmError(
                unknown_run_message(run_id, list_runs(calls, rejects)) + " (--join-existing refuses to start a new run)"
            )
        record = ManifestRecord(manifest=proposal, creator=identity.peer_id.to_base58(), created_at=time.time())
        mine = RunManifest(record=record, raw=sign_record(record, identity))
        publish(calls, mine)
        logger.info(
            "no manifest for run '%s' yet: proposed one (hash %s); waiting %.0fs for simultaneous creators",
            run_id,
            mine.hash[:12],
            settle_s,
        )
        time.sleep(settle_s)
        candidates = fetch_manifests(calls, run_id, rejects) or [mine]
    chosen = pick_canonical(candidates)
    conflicts = settings_conflicts(chosen.manifest, proposal, explicit)
    if conflicts:
        raise SwarmError(
            f"run '{run_id}' exists with different settings (created by {chosen.record.creator[:12]}"
            f"): {'; '.join(conflicts)}. Drop or change these settings, or use another --run-id"
        )
    if chosen.record.creator == identity.peer_id.to_base58():
        logger.info("started run '%s' (manifest %s)", run_id, chosen.hash[:12])
    else:
        logger.info(
            "joining run '%s' created by %s (manifest %s)", run_id, chosen.record.creator[:12], chosen.hash[:12]
        )
    return chosen


def adopt_manifest(cfg: RunConfig, manifest: Manifest) -> tuple[RunConfig, Tokenizer, ModelArgs]:
    """This peer's config with every shared setting taken from the run (per-peer settings are kept)."""
    import dataclasses

    try:
        # a zip bomb from a hostile manifest must not exhaust memory: real tokenizer files are a few MB
        unpacker = zlib.decompressobj()
        text = unpacker.decompress(manifest.tokenizer_json, MAX_TOKENIZER_JSON_BYTES)
        if unpacker.unconsumed_tail:
            raise SwarmError(
                f"the run's manifest carries a tokenizer larger than "
                f"{MAX_TOKENIZER_JSON_BYTES // 2**20} MB unpacked; refusing it"
            )
        tokenizer = tokenizer_from_json(text.decode("utf-8"))
    except (zlib.error, UnicodeDecodeError) as e:
        raise SwarmError(f"the run's manifest carries an unreadable tokenizer ({e})") from None
    if tokenizer.fingerprint != manifest.tokenizer_fingerprint:
        raise SwarmError("the run's manifest tokenizer does not match its fingerprint; refusing it")
    model_args = ModelArgs.from_dict(manifest.model.model_dump())
    m = manifest.model
    new = dataclasses.replace(
        cfg,
        model=dataclasses.replace(
            cfg.model,
            preset=manifest.preset,
            seq_len=m.max_seq_len,
            vocab_size=m.vocab_size,
            tie_embeddings=m.tie_embeddings,
        ),
        # a resolved setting (warmup_steps, outer_lr) is adopted as the run's number, never re-derived here
        **{
            s.SECTION: dataclasses.replace(getattr(cfg, s.SECTION), **getattr(manifest, s.SECTION).model_dump())
            for s in _SETTINGS_SECTIONS
        },
    )
    return new, tokenizer, model_args
