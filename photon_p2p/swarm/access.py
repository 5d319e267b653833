"""Private runs: owner-issued tokens, and the checks that keep peers without one out of the DHT and the averaging.

A run's owner holds an Ed25519 key (``photon-bootstrap issue-token`` creates it, mode 0600). A token is the owner's
signature over ``(run id, peer ID, expiry)``; a libp2p RSA peer ID is the hash of the peer's public key, so a token
for a peer ID is a token for that key, and only the holder of the matching private key can use it. Tokens are not
secret (they name the owner's public key, not the private one) and are revoked only by expiry: issue short ones.

Two gates, because hivemind's authorizer covers DHT requests only:

- **DHT** (``PrivateRunAuthorizer``, hivemind's ``TokenAuthorizerBase``): every DHT request carries the sender's
  token and is signed with the sender's *peer identity* key (not hivemind's process-wide key), so the token's public
  key is the key that proves the request; every response carries the responder's token. A request without a valid
  token is refused with one line ("run R is private: this peer has no valid token (expired ...)") that travels back
  to the caller; a response without one is dropped. So an outsider can neither read nor write the run's records.
- **Averager** (``AccessControlMixin``): ``rpc_join_group``, ``rpc_aggregate_part``, ``rpc_download_state`` and the
  state-transfer RPCs check the caller's peer ID (``context.remote_id``, authenticated by libp2p). A member learns
  which peer IDs hold valid tokens by asking the caller itself (``rpc_photon_access_token``, a reverse call on the
  same connection) on first contact, verifies the token against the owner's key and the caller's peer ID, and
  caches the answer until the token expires (refusals for ``REFUSAL_TTL`` s, so a refused peer cannot make us
  call it back in a loop).

A refused peer learns why: ``explain_refusal`` pings the initial peers' DHT directly when the DHT could not join,
and the refusal line they send back becomes the peer's one-line error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import json
import logging
import os
import re
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator  # noqa: UP035 (hivemind reads typing.AsyncIterator hints of rpc_* methods)

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.proto.auth_pb2 import AccessToken
from hivemind.utils.auth import TokenAuthorizerBase
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from hivemind.utils.timed_storage import get_dht_time

from photon_p2p.errors import ConfigError, SwarmError
from photon_p2p.swarm.identity import Identity, peer_id_from_public_key

logger = logging.getLogger(__name__)

OWNER_PREFIX = "ed25519:"
TOKEN_KIND = "photon-p2p-run-token"
MAX_TOKEN_BYTES = 4096
REFUSAL_TTL = 30.0  # seconds a refused peer stays refused before we ask it for a token again
TOKEN_FETCH_TIMEOUT = 5.0
_SIGNED_CONTEXT = b"photon-p2p run token v1\0"  # domain separation: this key signs nothing else with this prefix
_REFUSAL = re.compile(r"run [A-Za-z0-9_-]{1,64} is private: [^'\"\\]*")


class AccessRefused(Exception):
    """Raised inside an RPC handler: hivemind sends ``str(e)`` back to the caller as the error of its call."""


def format_time(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def parse_duration(text: str, *, flag: str) -> float:
    """``7d``, ``12h``, ``30m``, ``90s`` or plain seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if not match or float(match.group(1)) <= 0:
        raise ConfigError(f"{flag} {text!r}: give a duration such as 7d, 12h, 30m or 90s")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


# --------------------------------------------------------------------------------------------------------------
# the owner's key


def owner_public_text(key: ed25519.Ed25519PublicKey) -> str:
    """The owner's public key as one pasteable word."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return OWNER_PREFIX + base64.b64encode(raw).decode()


def parse_owner_public(text: str) -> ed25519.Ed25519PublicKey:
    if not isinstance(text, str) or not text.startswith(OWNER_PREFIX):
        raise ValueError(f"expected {OWNER_PREFIX}<base64>")
    raw = base64.b64decode(text[len(OWNER_PREFIX) :], validate=True)
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key has 32 bytes")
    return ed25519.Ed25519PublicKey.from_public_bytes(raw)


def load_or_create_owner_key(path: str | Path, *, flag: str = "--owner-key") -> tuple[ed25519.Ed25519PrivateKey, bool]:
    """The owner's private key (PEM), created with mode 0600 if missing; loose permissions are refused."""
    path = Path(path).expanduser()
    if not path.exists():
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # 0600 from the first byte: the key is never readable by others, even briefly
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as e:
            raise ConfigError(f"{flag} {path}: cannot create ({e.strerror})") from None
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        return key, True
    try:
        mode = path.stat().st_mode
        if mode & 0o077:
            raise ConfigError(
                f"{flag} {path}: private key is accessible by other users (mode {stat.S_IMODE(mode):o}); "
                f"run: chmod 600 {path}"
            )
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ConfigError:
        raise
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read ({e.strerror})") from None
    except (ValueError, TypeError):
        raise ConfigError(f"{flag} {path}: not an owner key (an unencrypted Ed25519 PEM file)") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ConfigError(f"{flag} {path}: not an Ed25519 key")
    return key, False


# --------------------------------------------------------------------------------------------------------------
# tokens


def _signed_bytes(run_id: str, peer_id: str, expires_at: int) -> bytes:
    return _SIGNED_CONTEXT + json.dumps([run_id, peer_id, expires_at], separators=(",", ":")).encode()


@dataclass(frozen=True)
class Token:
    run_id: str
    peer_id: str  # base58
    expires_at: int  # unix seconds
    owner: str  # ed25519:<base64>
    signature: bytes

    def signed_by(self, owner: ed25519.Ed25519PublicKey) -> bool:
        try:
            owner.verify(self.signature, _signed_bytes(self.run_id, self.peer_id, self.expires_at))
            return True
        except InvalidSignature:
            return False

    def to_json(self) -> str:
        return json.dumps(
            {
                "kind": TOKEN_KIND,
                "run_id": self.run_id,
                "peer_id": self.peer_id,
                "expires_at": self.expires_at,
                "expires": format_time(self.expires_at),  # for people; the signed value is expires_at
                "owner": self.owner,
                "signature": base64.b64encode(self.signature).decode(),
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> Token:
        """Strict parse of untrusted bytes; ValueError says what is wrong."""
        if len(raw) > MAX_TOKEN_BYTES:
            raise ValueError(f"larger than {MAX_TOKEN_BYTES} bytes")
        try:
            d = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise ValueError("not JSON") from None
        if not isinstance(d, dict) or d.get("kind") != TOKEN_KIND:
            raise ValueError(f"not a {TOKEN_KIND}")
        run_id, peer_id, expires_at, owner = d.get("run_id"), d.get("peer_id"), d.get("expires_at"), d.get("owner")
        if not (isinstance(run_id, str) and isinstance(peer_id, str) and isinstance(owner, str)):
            raise ValueError("run_id, peer_id and owner must be strings")
        if not isinstance(expires_at, int) or isinstance(expires_at, bool) or not 0 < expires_at < 1 << 40:
            raise ValueError("expires_at must be unix seconds")
        parse_owner_public(owner)
        try:
            signature = base64.b64decode(d.get("signature", ""), validate=True)
        except (binascii.Error, TypeError):
            raise ValueError("signature is not base64") from None
        return cls(run_id, peer_id, expires_at, owner, signature)


def issue_token(owner_key: ed25519.Ed25519PrivateKey, *, run_id: str, peer_id: str, expires_at: float) -> Token:
    expires = int(expires_at)
    return Token(
        run_id=run_id,
        peer_id=peer_id,
        expires_at=expires,
        owner=owner_public_text(owner_key.public_key()),
        signature=owner_key.sign(_signed_bytes(run_id, peer_id, expires)),
    )


def load_token(path: str | Path, *, flag: str = "--token") -> Token:
    path = Path(path).expanduser()
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read ({e.strerror})") from None
    try:
        token = Token.from_json(raw)
    except ValueError as e:
        raise ConfigError(f"{flag} {path}: not a run token ({e}); ask the run's owner for one") from None
    if not token.signed_by(parse_owner_public(token.owner)):
        raise ConfigError(f"{flag} {path}: damaged (its signature does not verify); ask the run's owner for a new one")
    return token


def check_peer_id(text: str, *, flag: str) -> str:
    try:
        PeerID.from_base58(text)
    except Exception:  # base58 and multihash raise several types
        raise ConfigError(f"{flag} {text!r}: not a peer ID (e.g. 12D3KooW..., as photon-peer prints)") from None
    return text


# --------------------------------------------------------------------------------------------------------------
# what a member of a private run knows, and the checks it makes


def _hivemind_key(identity: Identity) -> RSAPrivateKey:
    """The peer's identity key in hivemind's wrapper, so DHT requests are signed by the key behind the peer ID."""
    key = RSAPrivateKey.__new__(RSAPrivateKey)
    key._private_key = identity._key
    return key


class RunAccess:
    """A private run: its id and owner key (from this peer's own token), and this peer's token and identity."""

    def __init__(self, token: Token, identity: Identity):
        self.token, self.identity = token, identity
        self.run_id = token.run_id
        self.owner = parse_owner_public(token.owner)
        self._peer_ids: dict[bytes, str | None] = {}  # OpenSSH public key -> peer ID (parsing it is not free)

    def refusal(self, why: str) -> str:
        # no quotes in the reasons: the line travels inside a repr'd exception and is cut out at the first quote
        return f"run {self.run_id} is private: this peer has no valid token ({why})"

    def why_invalid(self, token: Token | None, peer_id: str, now: float | None = None) -> str | None:
        """None if ``token`` lets ``peer_id`` into this run now; else a few words saying why not."""
        now = time.time() if now is None else now
        if token is None:
            return "none given"
        if token.owner != self.token.owner:
            return f"signed by another key ({token.owner[:20]}...), not by the run owner"
        if not token.signed_by(self.owner):
            return "not signed by the run owner key"
        if token.run_id != self.run_id:
            return f"issued for run {token.run_id}"
        if token.peer_id != peer_id:
            return f"issued for peer {token.peer_id}, not {peer_id}"
        if token.expires_at <= now:
            return f"expired {format_time(token.expires_at)}"
        return None

    def own_problem(self) -> str | None:
        return self.why_invalid(self.token, self.identity.peer_id.to_base58())

    # ---- hivemind's AccessToken: username "RUN PEER_ID", public_key the peer's RSA key (OpenSSH form)
    def access_token(self) -> AccessToken:
        return AccessToken(
            username=f"{self.token.run_id} {self.token.peer_id}",
            public_key=_hivemind_key(self.identity).get_public_key().to_bytes(),
            expiration_time=str(self.token.expires_at),
            signature=self.token.signature,
        )

    def _peer_id_of(self, ssh_key: bytes) -> str | None:
        if ssh_key not in self._peer_ids:
            try:
                rsa_key = RSAPublicKey.from_bytes(ssh_key)._public_key
                der = rsa_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
                self._peer_ids[ssh_key] = peer_id_from_public_key(der).to_base58()
            except Exception:  # garbage keys raise many types
                self._peer_ids[ssh_key] = None
            if len(self._peer_ids) > 4096:
                self._peer_ids.pop(next(iter(self._peer_ids)))
        return self._peer_ids[ssh_key]

    def why_invalid_access(self, access: AccessToken) -> str | None:
        if not access.public_key and not access.signature:
            return "none given"
        peer_id = self._peer_id_of(access.public_key)
        run_id, _, claimed = access.username.partition(" ")
        if peer_id is None or not access.expiration_time.isdigit() or len(access.expiration_time) > 12:
            return "malformed"
        token = Token(run_id, claimed, int(access.expiration_time), self.token.owner, access.signature)
        return self.why_invalid(token, peer_id, now=get_dht_time())


class PrivateRunAuthorizer(TokenAuthorizerBase):
    """hivemind's DHT authorizer for a private run: requests and responses carry run tokens (module docstring)."""

    def __init__(self, access: RunAccess):
        super().__init__(local_private_key=_hivemind_key(access.identity))
        self.access = access
        self._last_log: dict[str, float] = {}

    async def get_token(self) -> AccessToken:
        return self.access.access_token()

    def is_token_valid(self, access_token: AccessToken) -> bool:
        return self.access.why_invalid_access(access_token) is None

    def does_token_need_refreshing(self, access_token: AccessToken) -> bool:
        return False  # a token is renewed by restarting with a new --token; expiry stops the peer (see peer.py)

    async def refresh_token_if_needed(self) -> None:
        # hivemind's version asserts that our own token is valid: with an expired one we still ask, and the other
        # side tells us why it refuses (the refusal line is the point)
        if self._local_access_token is None:
            self._local_access_token = await self.get_token()

    async def validate_request(self, request: Any) -> bool:
        auth = request.auth
        why = self.access.why_invalid_access(auth.client_access_token) if auth.HasField("client_access_token") else None
        if not auth.HasField("client_access_token"):
            why = "none given"
        if why is None and not await super().validate_request(request):
            why = "the request's signature or time is wrong (clock off by more than a minute, or a replay)"
        if why is not None:
            self._log_refusal(why)
            raise AccessRefused(self.access.refusal(why))
        return True

    def _log_refusal(self, why: str) -> None:
        now = time.monotonic()
        if now - self._last_log.get(why, -1e9) >= 60:  # one line per reason a minute: an outsider may retry a lot
            self._last_log[why] = now
            logger.warning(
                "refused a DHT request: run %s is private and the sender has no valid token (%s)",
                self.access.run_id,
                why,
            )


class _DropRefusalTracebacks(logging.Filter):
    """hivemind logs a traceback for each exception a stream handler raises; a refusal is logged in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, AccessRefused)


def install_log_filter() -> None:
    """Call after quiet_hivemind (the handlers exist then), before the DHT and averager fork."""
    for handler in logging.getLogger("hivemind").handlers + logging.getLogger().handlers:
        handler.addFilter(_DropRefusalTracebacks())


# --------------------------------------------------------------------------------------------------------------
# the averager's gate


class AccessControlMixin:
    """``class PhotonAverager(AccessControlMixin, StateTransferMixin, DecentralizedAverager)``; pass ``access=``
    (a RunAccess) for a private run, nothing for a public one."""

    def __init__(self, *args: Any, access: RunAccess | None = None, **kwargs: Any):
        self._access = access
        self._allowed: dict[PeerID, float] = {}  # peer -> its token's expiry (in the averager process)
        self._refused: dict[PeerID, tuple[float, str]] = {}
        self._fetching: dict[PeerID, asyncio.Future] = {}
        self._refusals_logged: dict[tuple[PeerID, str], float] = {}
        super().__init__(*args, **kwargs)
        if access is not None and self.client_mode and self.is_alive():
            # hivemind registers no handlers in client mode; the one that hands out our token must still answer
            self._outer_pipe.send(("_access_serve_token", [], {}))

    async def _access_serve_token(self) -> None:
        name = self._get_handle_name(self.prefix, "rpc_photon_access_token")
        await self._p2p.add_protobuf_handler(name, self.rpc_photon_access_token, averaging_pb2.DownloadRequest)

    async def rpc_photon_access_token(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> averaging_pb2.DownloadData:
        """Our token, to anyone who asks: it is not secret (only our key can use it)."""
        token = b"" if self._access is None else self._access.token.to_json().encode()
        return averaging_pb2.DownloadData(metadata=token)

    async def _access_check(self, context: P2PContext, what: str) -> None:
        if self._access is None or context.remote_id == self.peer_id:
            return
        peer, now = context.remote_id, time.time()
        if self._allowed.get(peer, 0.0) > now:
            return
        refused = self._refused.get(peer)
        if refused is not None and refused[0] > now:
            self._refuse(peer, what)
        future = self._fetching.get(peer)
        if future is None:
            future = self._fetching[peer] = asyncio.ensure_future(self._access_fetch(peer))
            future.add_done_callback(lambda _: self._fetching.pop(peer, None))
        why = await asyncio.shield(future)
        if why is None:
            return
        self._refused[peer] = (time.time() + REFUSAL_TTL, self._access.refusal(why))
        if len(self._refused) > 4096:
            self._refused.pop(next(iter(self._refused)))
        self._refuse(peer, what)

    def _refuse(self, peer: PeerID, what: str) -> None:
        line = self._refused[peer][1]
        # one log line per peer and door every REFUSAL_TTL seconds: an outsider may knock in a loop
        if self._refusals_logged.get((peer, what), 0.0) <= time.time():
            self._refusals_logged[(peer, what)] = time.time() + REFUSAL_TTL
            if len(self._refusals_logged) > 4096:
                self._refusals_logged.pop(next(iter(self._refusals_logged)))
            logger.warning("refused to let %s %s: %s", peer, what, line.replace("this peer", "it"))
        raise AccessRefused(line)

    async def _access_fetch(self, peer: PeerID) -> str | None:
        try:
            stub = self.get_stub(self._p2p, peer, namespace=self.prefix)
            reply = await stub.rpc_photon_access_token(averaging_pb2.DownloadRequest(), timeout=TOKEN_FETCH_TIMEOUT)
            token = Token.from_json(reply.metadata) if reply.metadata else None
        except Exception as e:  # an outsider may answer anything, or nothing
            logger.debug("no token from %s: %r", peer, e)
            token = None
        why = self._access.why_invalid(token, peer.to_base58())
        if why is None:
            self._allowed[peer] = float(token.expires_at)
            self._refused.pop(peer, None)
        return why

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        await self._access_check(context, "join its averaging group")
        async for message in super().rpc_join_group(request, context):
            yield message

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        await self._access_check(context, "send it averaging parts")
        async for message in super().rpc_aggregate_part(stream, context):
            yield message

    async def rpc_download_state(
        self, request: averaging_pb2.DownloadRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        await self._access_check(context, "download its state")
        async for message in super().rpc_download_state(request, context):
            yield message

    async def rpc_photon_state_describe(
        self, request: averaging_pb2.DownloadData, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        await self._access_check(context, "download its state")
        async for message in super().rpc_photon_state_describe(request, context):
            yield message

    async def rpc_photon_state_read(
        self, request: averaging_pb2.DownloadData, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.DownloadData]:
        await self._access_check(context, "download its state")
        async for message in super().rpc_photon_state_read(request, context):
            yield message


# --------------------------------------------------------------------------------------------------------------
# telling a refused peer why


def refusal_in(text: str) -> str | None:
    """The refusal line inside an error text that went through hivemind (repr'd, prefixed), if there is one."""
    match = _REFUSAL.search(text)
    return match.group(0).rstrip() if match else None


def explain_refusal(initial_peers: Sequence[str], access: RunAccess | None, timeout: float = 15.0) -> str | None:
    """After our DHT could not join: ask the initial peers' DHT directly, as our DHT did, and return the refusal
    line one of them sends back (None if none refuses: the failure was something else)."""
    from hivemind.p2p import P2P
    from hivemind.proto import dht_pb2

    authorizer = PrivateRunAuthorizer(access) if access is not None else None

    async def probe() -> str | None:
        p2p = await P2P.create(initial_peers=list(initial_peers))
        try:
            for addr in initial_peers:
                request = dht_pb2.PingRequest(validate=False)
                if authorizer is not None:
                    await authorizer.sign_request(request, None)
                try:
                    peer = PeerID.from_base58(addr.rsplit("/p2p/", 1)[1])
                    await asyncio.wait_for(
                        p2p.call_protobuf_handler(peer, "DHTProtocol.rpc_ping", request, dht_pb2.PingResponse), timeout
                    )
                except Exception as e:  # the refusal comes back as an error; anything else means "not a refusal"
                    line = refusal_in(str(e))
                    if line:
                        return line
            return None
        finally:
            await p2p.shutdown()

    try:
        return asyncio.run(asyncio.wait_for(probe(), timeout * max(1, len(initial_peers)) + 10))
    except Exception as e:
        logger.debug("could not ask the initial peers why they refused: %r", e)
        return None


def member_hint(peer_id: str) -> str:
    return (
        f"send this peer's ID {peer_id} to the run's owner for a token (photon-bootstrap issue-token --peer {peer_id})"
    )


def refusal_error(line: str, peer_id: str) -> SwarmError:
    return SwarmError(f"{line}; {member_hint(peer_id)}")


def watch_expiry(access: RunAccess) -> Any:
    """At the token's expiry, say so and stop this peer the way SIGTERM does: between steps, checkpoint saved.
    (The swarm refuses an expired token anyway; stopping ourselves makes that a clean stop, not a stall.)"""
    import signal
    import threading

    def expire() -> None:
        logger.warning(
            "run %s: this peer's token expired %s: stopping (the checkpoint keeps its progress); ask the run's owner "
            "for a new token and restart with --token NEW_FILE --resume",
            access.run_id,
            format_time(access.token.expires_at),
        )
        os.kill(os.getpid(), signal.SIGTERM)

    timer = threading.Timer(max(0.0, access.token.expires_at - time.time()), expire)
    timer.daemon = True
    timer.start()
    return timer


def open_access(
    token_path: str | None,
    identity: Identity | None,
    *,
    alone: bool,
    run_id: str | None = None,
    who: str = "this peer",
) -> RunAccess | None:
    """``--token``: this node's access to a private run (None for a public one), for ``run_id`` if given. Alone (no
    --initial-peers) it checks its own token; joining others, it lets them decide (their refusal is the error)."""
    if not token_path:
        return None
    token = load_token(token_path)
    if run_id is not None and token.run_id != run_id:
        raise ConfigError(f"--token {token_path}: issued for run {token.run_id}, but --run-id is {run_id}")
    access = RunAccess(token, identity)
    problem = access.own_problem()
    if problem is not None and alone:
        raise SwarmError(access.refusal(problem).replace("this peer", who))
    return access


def start_dht_with_access(access: RunAccess | None, identity: Identity | None, **kwargs: Any) -> Any:
    """``start_dht`` with the run's authorizer when private; if the initial peers would not have us, the refusal
    line they send back becomes the error."""
    from photon_p2p.swarm.dht import start_dht

    authorizer = PrivateRunAuthorizer(access) if access is not None else None
    try:
        return start_dht(identity=identity, authorizer=authorizer, **kwargs)
    except SwarmError:
        initial_peers = kwargs.get("initial_peers") or []
        line = explain_refusal(initial_peers, access) if initial_peers else None
        if line is None or identity is None:
            raise
        raise refusal_error(line, identity.peer_id.to_base58()) from None
