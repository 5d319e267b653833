"""Signatures found valid once are not verified again (photon_p2p/swarm/identity.py, ``verify_signature``).

Every DHT node re-validates each record it stores or retrieves, and peers read each heartbeat several times
between republications, so the same signature is checked over and over. Proves, with real RSA keys and signatures:
a valid signature is verified by RSA once and then answered from the cache; a tampered body, another key, a
swapped signature and non-bytes are refused every time and never cached (junk always costs its verification, as
before, and can never evict into a wrong answer); the cache keeps at most ``_VERIFIED_MAX`` digests, oldest out.
"""

from __future__ import annotations

import pytest

from photon_p2p.swarm import identity as identity_mod
from photon_p2p.swarm.identity import Identity, verify_signature


@pytest.fixture
def rsa_calls(monkeypatch):
    """Counts the real RSA verifications behind ``verify_signature``, on an empty cache."""
    calls = []
    real = identity_mod._verify_rsa
    monkeypatch.setattr(identity_mod, "_verified", type(identity_mod._verified)())
    monkeypatch.setattr(identity_mod, "_verify_rsa", lambda *a: calls.append(a) or real(*a))
    return calls


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return Identity.load_or_create(d / "a.key"), Identity.load_or_create(d / "b.key")


def test_a_valid_signature_is_verified_once(keys, rsa_calls):
    a, _ = keys
    sig = a.sign(b"heartbeat")
    assert all(verify_signature(a.public_key_der, b"heartbeat", sig) for _ in range(5))
    assert len(rsa_calls) == 1


def test_invalid_signatures_are_refused_every_time_and_never_cached(keys, rsa_calls):
    a, b = keys
    sig = a.sign(b"heartbeat")
    assert verify_signature(a.public_key_der, b"heartbeat", sig)  # cached now
    bad = [
        (a.public_key_der, b"heartbeaT", sig),  # tampered body
        (b.public_key_der, b"heartbeat", sig),  # another key
        (a.public_key_der, b"heartbeat", b.sign(b"heartbeat")),  # another signer's signature
        (a.public_key_der, b"heartbeat", sig[:-1] + bytes([sig[-1] ^ 1])),  # one bit flipped
        (a.public_key_der[:-1], b"heartbeat", sig),  # a broken key
    ]
    for _ in range(2):
        for triple in bad:
            assert verify_signature(*triple) is False
    assert len(rsa_calls) == 1 + 2 * len(bad)
    assert len(identity_mod._verified) == 1
    assert verify_signature(a.public_key_der, "heartbeat", sig) is False  # not bytes: refused before any work
    assert verify_signature(a.public_key_der, b"heartbeat", sig)
    assert len(rsa_calls) == 1 + 2 * len(bad)  # the valid one still from the cache


def test_the_cache_is_bounded_oldest_out(keys, rsa_calls, monkeypatch):
    a, _ = keys
    monkeypatch.setattr(identity_mod, "_VERIFIED_MAX", 3)
    signed = [(b"record %d" % i, a.sign(b"record %d" % i)) for i in range(5)]
    for data, sig in signed:
        assert verify_signature(a.public_key_der, data, sig)
    assert len(identity_mod._verified) == 3 and len(rsa_calls) == 5
    assert verify_signature(a.public_key_der, *signed[4])  # among the newest: cached
    assert len(rsa_calls) == 5
    assert verify_signature(a.public_key_der, *signed[0])  # evicted: verified again, and still valid
    assert len(rsa_calls) == 6
