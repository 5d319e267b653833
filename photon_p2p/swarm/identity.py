"""Peer identities: the private key behind a peer ID, and the signatures that bind records to it.

We use hivemind's identity file format (a libp2p protobuf holding an RSA key), so the same file gives p2pd its
peer ID *and* signs this peer's DHT records. A libp2p RSA peer ID is the multihash of the public key, so a reader
checks two things: the signature verifies with the public key carried in the record, and that key hashes to the
claimed peer ID. Nobody can publish a heartbeat in another peer's name.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import multihash
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2

from photon_p2p.errors import SwarmError

_PADDING = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
_HASH = hashes.SHA256()


def peer_id_from_public_key(public_key_der: bytes) -> PeerID:
    """The libp2p peer ID of an RSA public key (DER SubjectPublicKeyInfo), as p2pd computes it."""
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=public_key_der).SerializeToString()
    return PeerID(multihash.encode(hashlib.sha256(encoded).digest(), multihash.coerce_code("sha2-256")))


# Signatures already found valid, by digest of (key, data, signature). Every DHT node re-validates each record it
# stores or retrieves, and every peer reads every heartbeat several times between two republications: at 16 peers on
# one machine RSA verification (key parsing included) was 15% of a DHT process's CPU (py-spy), nearly all of it on
# records it had verified before. Only digests are kept (32 bytes each; a manifest can be 1 MB), and only valid
# signatures, so a stranger's junk is never cached: it costs one verification each time, as before.
_VERIFIED_MAX = 4096
_verified: OrderedDict[bytes, None] = OrderedDict()
_verified_lock = threading.Lock()


def _digest(public_key_der: bytes, data: bytes, signature: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=32)
    for part in (public_key_der, data, signature):  # length-prefixed: no two triples share a digest input
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.digest()


def verify_signature(public_key_der: bytes, data: bytes, signature: bytes) -> bool:
    """Whether ``signature`` over ``data`` verifies with the RSA key ``public_key_der`` (>= 2048 bits)."""
    if not all(isinstance(x, bytes) for x in (public_key_der, data, signature)):
        return False
    digest = _digest(public_key_der, data, signature)
    with _verified_lock:
        if digest in _verified:
            _verified.move_to_end(digest)
            return True
    if not _verify_rsa(public_key_der, data, signature):
        return False
    with _verified_lock:
        _verified[digest] = None
        while len(_verified) > _VERIFIED_MAX:
            _verified.popitem(last=False)
    return True


def _verify_rsa(public_key_der: bytes, data: bytes, signature: bytes) -> bool:
    try:
        key = serialization.load_der_public_key(public_key_der)
        if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
            return False
        key.verify(signature, data, _PADDING, _HASH)
        return True
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):  # garbage keys raise any of these
        return False


class Identity:
    """A peer's RSA key, stored in a hivemind/libp2p identity file that p2pd reads too."""

    def __init__(self, path: Path, private_key: rsa.RSAPrivateKey):
        self.path = path
        self._key = private_key
        self.public_key_der = private_key.public_key().public_bytes(
            encoding=serialization.Encoding.DER, format=serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.peer_id = peer_id_from_public_key(self.public_key_der)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, _PADDING, _HASH)

    @classmethod
    def load_or_create(cls, path: str | Path, *, flag: str = "--identity-path") -> Identity:
        """Load ``path``, or create it (mode 0600) if it does not exist. Loose permissions are refused."""
        path = Path(path).expanduser()
        if not path.exists():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise SwarmError(f"{flag} {path}: cannot create its directory ({e.strerror})") from None
            key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            _write_private(path, key)
            return cls(path, key)
        try:
            mode = path.stat().st_mode
        except OSError as e:
            raise SwarmError(f"{flag} {path}: cannot read ({e.strerror})") from None
        if not stat.S_ISREG(mode):
            raise SwarmError(f"{flag} {path}: not a regular file")
        if mode & 0o077:
            raise SwarmError(
                f"{flag} {path}: private key is accessible by other users (mode {stat.S_IMODE(mode):o});"
                f" run: chmod 600 {path}"
            )
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SwarmError(f"{flag} {path}: cannot read ({e.strerror})") from None
        try:
            proto = crypto_pb2.PrivateKey.FromString(data)
            if proto.key_type != crypto_pb2.RSA:
                raise ValueError("not an RSA key")
            key = serialization.load_der_private_key(proto.data, password=None)
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ValueError("not an RSA key")
        except Exception as e:  # protobuf and cryptography raise many types for garbage input
            raise SwarmError(
                f"{flag} {path}: not a hivemind/libp2p RSA identity file ({e}); move it away to create a new identity"
            ) from None
        return cls(path, key)

    @classmethod
    def ephemeral(cls, directory: str | Path) -> Identity:
        """A fresh identity in a private temporary file (p2pd needs a file to read its key from)."""
        fd, name = tempfile.mkstemp(prefix="identity-", suffix=".key", dir=directory)
        os.close(fd)
        os.unlink(name)
        return cls.load_or_create(name)


def _write_private(path: Path, key: rsa.RSAPrivateKey) -> None:
    der = key.private_bytes(
        encoding=serialization.Encoding.DER,
        format=serialization.PrivateFormat.TraditionalOpenSSL,
        encryption_algorithm=serialization.NoEncryption(),
    )
    data = crypto_pb2.PrivateKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    # create with 0600 from the start: the key must never be readable by others, even briefly
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
