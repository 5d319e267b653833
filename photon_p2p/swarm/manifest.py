"""The run manifest: what every peer of a run must agree on, published in the DHT under the run id.

Creating vs joining: a peer looks for the run's manifest first. If there is one, it adopts everything it did not
set itself, and is refused (with the list of differing fields) if something it *did* set conflicts. If there is
none, it publishes its own proposal, waits a moment for simultaneous creators, and everybody picks the same
winner: the earliest valid record (ties broken by peer ID). With identical settings the winner does not even
matter: the manifest hash covers settings only, so all those peers average together anyway.

A run is named by its id and its owner's key. ``created_at`` is whatever the signer chose, so "earliest" only
settles a race between creators of a brand-new run; a joiner facing manifests with different settings needs
--run-owner (or the owner its checkpoint pinned) and is otherwise refused with the list of candidates.
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
    MAX_CLOCK_SKEW_S,
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
# manifests created this recently are a run being started right now (simultaneous creators, then earliest wins);
# with different settings, an older one is only accepted from the owner --run-owner names
CREATION_WINDOW_S = 30.0
# a creator reads the run's proposals until none has appeared for settle_s, at most SETTLE_MAX_FACTOR x settle_s
SETTLE_POLL_S = 0.5
SETTLE_MAX_FACTOR = 5


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
            if record.created_at > time.time() + MAX_CLOCK_SKEW_S:
                raise RecordRejected("created in the future")  # would sort last today, first when it is "old"
        except RecordRejected as e:
            rejects.add("manifest", e.reason)
            continue
        out.append(RunManifest(record=record, raw=item.value))
    return out


def pick_canonical(candidates: list[RunManifest]) -> RunManifest:
    """Among manifests that are all acceptable (same owner, or simultaneous creators), the earliest one."""
    return min(candidates, key=lambda c: (c.record.created_at, c.record.creator))


def describe_candidates(candidates: list[RunManifest]) -> str:
    """``<owner> (manifest <hash>, created <UTC time>)`` for each distinct manifest: what a refusal lists."""
    seen: dict[tuple[str, str], RunManifest] = {}
    for c in sorted(candidates, key=lambda c: (c.record.created_at, c.record.creator)):
        seen.setdefault((c.record.creator, c.hash), c)
    return "; ".join(
        f"{c.record.creator} (manifest {c.hash[:12]}, created "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(c.record.created_at))} UTC)"
        for c in seen.values()
    )


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
    settle_s: float = 5.0,
    owner: str | None = None,
    pinned_owner: str | None = None,
    owner_wait_s: float = 120.0,
) -> RunManifest:
    """Find the run's manifest or create it; refuse if the user's explicit settings conflict with it.

    A run is named by its id *and* its owner (the creator's peer ID): ``owner`` (--run-owner) or else
    ``pinned_owner`` (the owner this peer's checkpoint accepted before) must have signed the manifest. With neither,
    several manifests with different settings are refused with the list of candidates, unless they were all created
    within the last CREATION_WINDOW_S (creators racing to start the same run: the earliest wins, as for creators).
    A peer whose owner is another peer waits up to ``owner_wait_s`` for the owner's manifest when there is none yet.
    """
    rejects = RejectCounter()
    run_id = proposal.run_id
    me = identity.peer_id.to_base58()
    want = owner or pinned_owner
    candidates = fetch_manifests(calls, run_id, rejects)
    if want and want != me and not candidates:
        # the owner may simply not be up yet (peers of a resumed run restart in any order): wait for its manifest
        logger.info("waiting up to %.0fs for the run's owner %s to publish run '%s'", owner_wait_s, want, run_id)
        deadline = time.monotonic() + owner_wait_s
        while not candidates and time.monotonic() < deadline:
            time.sleep(2.0)
            candidates = fetch_manifests(calls, run_id, rejects)
    if want:
        theirs = [c for c in candidates if c.record.creator == want]
        if candidates and not theirs:
            source = "--run-owner" if owner else "this peer's checkpoint (the run it trained before)"
            raise SwarmError(
                f"run '{run_id}' is not the one owned by {want} ({source}): its manifest is signed by "
                f"{describe_candidates(candidates)}; refusing it. Check --run-owner and --run-id"
            )
        if not theirs and want != me:
            raise SwarmError(
                unknown_run_message(run_id, list_runs(calls, rejects))
                + f" (no manifest signed by its owner {want}; check --run-owner)"
            )
        candidates = theirs
    else:
        check_one_run(run_id, candidates)
    if not candidates:
        if join_existing:
            raise SwarmError(
                unknown_run_message(run_id, list_runs(calls, rejects)) + " (--join-existing refuses to start a new run)"
            )
        record = ManifestRecord(manifest=proposal, creator=identity.peer_id.to_base58(), created_at=time.time())
        mine = RunManifest(record=record, raw=sign_record(record, identity))
        publish(calls, mine)
        logger.info(
            "no manifest for run '%s' yet: proposed one (hash %s); reading proposals of simultaneous creators until "
            "none is new for %.0fs",
            run_id,
            mine.hash[:12],
            settle_s,
        )
        candidates = [
            c
            for c in settle_proposals(calls, run_id, rejects, [mine], settle_s)
            if not want or c.record.creator == want
        ]
        candidates = candidates or [mine]
    elif not want and all_recent(candidates):
        # a run being created right now: a creator whose proposal is still spreading may hold the earliest one, and
        # a peer that picked from its first read chose another winner than the creators (a CI failure)
        candidates = settle_proposals(calls, run_id, rejects, candidates, settle_s)
        check_one_run(run_id, candidates)
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


def check_one_run(run_id: str, candidates: list[RunManifest]) -> None:
    """An established run has one manifest; a second one with other settings under another key is a mistake or a
    hijack, and ``created_at`` is whatever its signer chose: refuse rather than guess which one is genuine (several
    proposals all created in the last CREATION_WINDOW_S are creators racing to start it: earliest wins)."""
    if len({c.hash for c in candidates}) > 1 and not all_recent(candidates):
        raise SwarmError(
            f"run '{run_id}' has manifests with different settings from different creators: "
            f"{describe_candidates(candidates)}. Ask the run's owner which one is theirs and add "
            f"--run-owner PEER_ID (or use another --run-id)"
        )


def settle_proposals(
    calls: DHTCalls, run_id: str, rejects: RejectCounter, seen: list[RunManifest], settle_s: float
) -> list[RunManifest]:
    """Read the run's proposals until none has been new for ``settle_s`` (at most SETTLE_MAX_FACTOR x that); returns
    every proposal seen. Simultaneous creators then all pick the earliest one; a proposal whose store lands late (its
    creator was slow on a loaded machine) still carries the earliest ``created_at``, and a peer that stopped reading
    before it landed would pick another winner than the rest."""
    found = {(c.record.creator, c.hash): c for c in seen}
    quiet_since = time.monotonic()
    deadline = quiet_since + settle_s * SETTLE_MAX_FACTOR
    while time.monotonic() - quiet_since < settle_s and time.monotonic() < deadline:
        time.sleep(min(SETTLE_POLL_S, settle_s))
        for c in fetch_manifests(calls, run_id, rejects):
            if (c.record.creator, c.hash) not in found:
                found[(c.record.creator, c.hash)] = c
                quiet_since = time.monotonic()
    return list(found.values())


def all_recent(candidates: list[RunManifest]) -> bool:
    """Whether every candidate was created in the last CREATION_WINDOW_S by its own clock (a run being started by
    several peers at once), so earliest-wins is how they agree. A clock that lags only makes a run look older,
    which leads to a refusal, never to a wrong pick."""
    now = time.time()
    return all(now - c.record.created_at <= CREATION_WINDOW_S for c in candidates)


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
