"""Store-time checks of DHT records: what every photon node (peers, photon-status, the bootstrap) refuses to keep.

Readers already drop bad records (records.py), but that is too late for one attack: hivemind keeps, per subkey,
the value with the latest expiration, and a *plain* value at a key blocks all of its subkeys. One store of a plain
value with a far-future expiration at a run's peers, manifest or averagers key would blind every peer for good,
however careful the readers. So every node validates what it is asked to store and what it gets back from a
search (hivemind's ``RecordValidatorBase``, the same hook its ``SchemaValidator`` and ``RSASignatureValidator``
use).

The bootstrap does not know run ids, and hivemind hands a validator the key only as a DHTID (a hash), so the check
cannot depend on the key's name. It classifies each record by its value instead, and every node applies the same
rules (a node that refused what another accepts would drop that node's whole answer to a search):

- a plain (non-subkey) value is refused everywhere: nothing in photon or in hivemind's averager stores one;
- our signed envelopes (records.py) must verify, parse as one of our schemas, be signed by the peer their subkey
  names (run announcements: be about the run their subkey names), stay under a size fitting their kind, and
  expire no later than their kind needs (heartbeats seconds, manifests MANIFEST_TTL, contributions 7 days) plus
  ``MAX_CLOCK_SKEW_S`` (manifests; no record may be dated further ahead than that either). Heartbeats,
  contributions and announcements expire at most their TTL after their own signed ``time`` (plus a few seconds),
  so a replayed old record cannot be re-stored with a later expiration than the original had: it cannot displace
  a newer one from the same peer (hivemind keeps the latest expiration per subkey), nor outlive the peer;
- hivemind's averager declarations (matchmaking groups: a bool; state sharing: a priority number or None) must
  have a peer ID as subkey and expire within ``MAX_AVERAGER_DECLARATION_S``. They are unsigned in hivemind, so a
  stranger can still declare made-up peer IDs (which time out in matchmaking), but no longer squat the key;
- anything else (a value of another type, a subkey that is neither a peer ID nor a run id) is refused.

Every check here holds for longer once it holds (expirations and times are compared with "now", which only grows),
because hivemind also validates records it *retrieves*: a check that turns false with age (e.g. "too old") would
later make a node throw away a whole dictionary it had accepted. Age limits belong to the readers (heartbeat.py).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import msgpack
import multihash
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from photon_p2p.swarm.heartbeat import CONTRIBUTION_TTL, HEARTBEAT_TTL
from photon_p2p.swarm.manifest import MANIFEST_TTL, RUN_ANNOUNCEMENT_TTL
from photon_p2p.swarm.records import (
    MAX_CLOCK_SKEW_S,
    MAX_RECORD_BYTES,
    Contribution,
    Heartbeat,
    ManifestRecord,
    RecordRejected,
    RunAnnouncement,
    open_envelope,
    parse_body,
)

logger = logging.getLogger(__name__)

SMALL_RECORD_BYTES = 16 << 10  # a heartbeat with 8 long multiaddrs is ~3 KB; only a manifest carries a tokenizer
# hivemind declares matchmaking for up to --matchmaking-time (plus its slack) and state sharing every 10 s here
MAX_AVERAGER_DECLARATION_S = 3600.0
EXPIRY_SLACK_S = 5.0  # signing and the store call between a record's time and its expiration being set
_MAX_PEER_ID_BYTES = 64  # a multihash of a key: 34-38 bytes for RSA and Ed25519 peer IDs

# kind -> (schema, most bytes, longest expiration after the record's own time / after now)
_KINDS: tuple[tuple[type, int, float], ...] = (
    (Heartbeat, SMALL_RECORD_BYTES, HEARTBEAT_TTL),
    (Contribution, SMALL_RECORD_BYTES, CONTRIBUTION_TTL),
    (RunAnnouncement, SMALL_RECORD_BYTES, RUN_ANNOUNCEMENT_TTL),
    (ManifestRecord, MAX_RECORD_BYTES, MANIFEST_TTL),
)


def _now() -> float:
    from hivemind.utils.timed_storage import get_dht_time

    return get_dht_time()


def _unpack(data: bytes, max_len: int) -> Any:
    """Plain msgpack only (hivemind's serializer would also build its extension types from a stranger's bytes)."""
    return msgpack.unpackb(
        data,
        raw=False,
        strict_map_key=True,
        max_bin_len=max_len,
        max_str_len=max_len,
        max_array_len=1024,
        max_map_len=1024,
        max_ext_len=0,
    )


def _is_peer_id_bytes(subkey: Any) -> bool:
    if not isinstance(subkey, bytes) or not 2 <= len(subkey) <= _MAX_PEER_ID_BYTES:
        return False
    try:
        digest = multihash.decode(subkey)
    except Exception:  # the multihash parser raises several types on junk
        return False
    # libp2p peer IDs: sha2-256 of the public key (RSA), or the key itself inlined (identity hash, Ed25519)
    return digest.code in (0x12, 0x00) and digest.length == len(digest.digest)


def check_envelope(raw: bytes, subkey: Any, expiration: float, now: float) -> str:
    """Why one of our signed records must not be stored ('' if it may). Pure: the unit and fuzz tests call it."""
    try:
        body, signer = open_envelope(raw)
    except RecordRejected as e:
        return e.reason
    for schema, max_bytes, ttl in _KINDS:
        try:
            record = parse_body(body, schema)
        except RecordRejected:
            continue  # another kind, perhaps
        if len(raw) > max_bytes:
            return "too large for its kind"
        if schema is RunAnnouncement:
            if subkey != record.run_id:
                return "run announcement under another run id"
        else:
            owner = record.creator if schema is ManifestRecord else record.peer_id
            if not (subkey == signer == owner):
                return "signed by another peer than its subkey names"
        written = record.created_at if schema is ManifestRecord else record.time
        if written > now + MAX_CLOCK_SKEW_S:
            return "dated in the future"
        if schema is ManifestRecord:
            # republished verbatim by every peer: its creation time says nothing about when it expires
            if expiration > now + ttl + MAX_CLOCK_SKEW_S:
                return "expiration too far ahead"
        elif expiration > written + ttl + EXPIRY_SLACK_S:
            # time and expiration come from the same (publisher's) clock, so no skew margin here: a replayed record
            # keeps the expiry its time allows and cannot outlast or displace a newer one from the same peer
            return "expiration too far ahead"
        return ""
    return "schema"


def check_record(key: bytes, subkey: bytes, value: bytes, expiration: float, now: float) -> str:
    """Why a record (as hivemind passes it: key hashed, subkey and value serialized) must be refused; '' if fine."""
    from hivemind.dht.protocol import DHTProtocol

    del key  # a hash: what the record is follows from its value, the same way on every node
    if subkey == DHTProtocol.IS_REGULAR_VALUE or subkey == DHTProtocol.IS_DICTIONARY:
        return "plain value (only subkeys are used)"
    if not isinstance(expiration, float | int) or not math.isfinite(expiration):
        return "expiration not finite"
    if not isinstance(value, bytes) or len(value) > MAX_RECORD_BYTES + 16:
        return "too large"
    try:
        sub = _unpack(subkey, 256)
        val = _unpack(value, MAX_RECORD_BYTES)
    except Exception:  # msgpack raises a zoo of exception types on garbage
        return "not msgpack"
    if isinstance(val, bytes):
        return check_envelope(val, sub, expiration, now)
    if val is None or type(val) in (bool, int, float):  # hivemind's averager: matchmaking or state-sharing entry
        if not _is_peer_id_bytes(sub):
            return "averager declaration without a peer ID subkey"
        if type(val) is float and not math.isfinite(val):
            return "averager priority not finite"
        if expiration > now + MAX_AVERAGER_DECLARATION_S + MAX_CLOCK_SKEW_S:
            return "expiration too far ahead"
        return ""
    return "unknown value type"


class PhotonRecordValidator(RecordValidatorBase):
    """hivemind record validator applying ``check_record`` on store and on retrieval, on every photon node.
    Refusals are logged at debug level (a flood must not fill the log); counted per reason in ``refused``."""

    def __init__(self) -> None:
        self.refused: dict[str, int] = {}

    def validate(self, record: DHTRecord) -> bool:
        try:
            reason = check_record(record.key, record.subkey, record.value, record.expiration_time, _now())
        except Exception as e:  # a validator that raises would break the DHT's request handler
            reason = f"error {type(e).__name__}"
        if reason:
            self.refused[reason] = self.refused.get(reason, 0) + 1
            logger.debug("refused a DHT record: %s", reason)
            return False
        return True

    @property
    def priority(self) -> int:
        return 5  # runs before nothing else of ours; below RSASignatureValidator (10), which would strip first

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return isinstance(other, PhotonRecordValidator)  # one is enough
