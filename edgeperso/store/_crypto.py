"""Every cryptographic operation of the store, and the only `cryptography.hazmat` import.

An auditor reads this file and the call sites in the store. Choices:

* AEAD: AES-256-GCM with a random 96-bit nonce per seal. A sealed value is
  ``version (1 byte) || nonce (12) || ciphertext || tag (16)``. Random nonces are safe
  for up to 2**32 seals per key; the store counts seals per key and rotates far earlier.
* Key wrapping: the same AEAD under the key-encryption key, with associated data that names
  the store and the wrapped key's role, so a wrapped key cannot be moved to another slot.
* MACs: HMAC-SHA256 with subkeys from HKDF-SHA256; used for pseudonyms, state digests and the
  rollback counter (no nonce, so no usage limit).
* Passphrases: Argon2id where the linked OpenSSL provides it, scrypt otherwise.
"""

from __future__ import annotations

import functools
import hmac
import os
from hashlib import blake2b, sha256

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from edgeperso._errors import TamperedError, WrongKeyError

__all__ = [
    "KEY_BYTES",
    "SEAL_OVERHEAD",
    "SealingKey",
    "argon2id_available",
    "derive_argon2id",
    "derive_scrypt",
    "mac",
    "prf_of_sealed",
    "random_bytes",
    "random_key",
    "subkey",
    "unwrap_key",
    "wrap_key",
]

KEY_BYTES = 32
_NONCE_BYTES = 12
_TAG_BYTES = 16
_SEAL_VERSION = b"\x01"  # 1 = AES-256-GCM, random 96-bit nonce
SEAL_OVERHEAD = len(_SEAL_VERSION) + _NONCE_BYTES + _TAG_BYTES


def random_bytes(n: int) -> bytes:
    return os.urandom(n)


def random_key() -> bytes:
    return os.urandom(KEY_BYTES)


class SealingKey:
    """An AES-256-GCM key that seals and opens values under associated data."""

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError("a sealing key is 32 bytes")
        self._aead = AESGCM(key)

    def seal(self, plaintext: bytes, ad: bytes) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _SEAL_VERSION + nonce + self._aead.encrypt(nonce, plaintext, ad)

    def open(self, sealed: bytes, ad: bytes) -> bytes:
        """Return the plaintext, or raise TamperedError; never returns unauthenticated bytes."""
        if len(sealed) < SEAL_OVERHEAD or sealed[:1] != _SEAL_VERSION:
            raise TamperedError("a sealed value is truncated or has an unknown format")
        nonce = sealed[1 : 1 + _NONCE_BYTES]
        try:
            # A memoryview: slicing bytes would copy a whole (possibly 100 MB) blob first.
            return self._aead.decrypt(nonce, memoryview(sealed)[1 + _NONCE_BYTES :], ad)
        except InvalidTag:
            raise TamperedError(
                "a sealed value failed authentication (modified, moved to another record, "
                "or sealed under another key); restore the store from a backup"
            ) from None


def wrap_key(kek: bytes, key: bytes, ad: bytes) -> bytes:
    return SealingKey(kek).seal(key, ad)


def unwrap_key(kek: bytes, wrapped: bytes, ad: bytes) -> bytes:
    """Unwrap, mapping failure to WrongKeyError: a wrong key is far likelier than tampering."""
    try:
        key = SealingKey(kek).open(wrapped, ad)
    except TamperedError:
        raise WrongKeyError(
            "the key or passphrase does not open this store (or its key header is damaged); "
            "check the key provider and passphrase"
        ) from None
    if len(key) != KEY_BYTES:
        raise WrongKeyError("the unwrapped key has the wrong length; the key header is damaged")
    return key


def subkey(secret: bytes, purpose: bytes) -> bytes:
    """A 256-bit key for one purpose, from a 256-bit secret (HKDF-SHA256, no salt)."""
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=purpose).derive(secret)


def mac(key: bytes, *parts: bytes) -> bytes:
    """HMAC-SHA256 over length-prefixed parts, so part boundaries cannot be shifted."""
    h = hmac.new(key, digestmod=sha256)
    for part in parts:
        h.update(len(part).to_bytes(8, "big"))
        h.update(part)
    return h.digest()


def prf_of_sealed(key: bytes, sealed: bytes) -> int:
    """A keyed 256-bit PRF of a sealed value's tag, for XOR set digests over records.

    The tag already authenticates the value and its associated data; keying the PRF keeps
    an attacker who sees old tags from combining them to match a digest.
    """
    return int.from_bytes(blake2b(sealed[-_TAG_BYTES:], key=key, digest_size=32).digest(), "big")


@functools.cache
def argon2id_available() -> bool:
    try:
        derive_argon2id(b"probe", b"\x00" * 16, memory_kib=8, iterations=1, lanes=1)
    except UnsupportedAlgorithm:
        return False
    return True


def derive_argon2id(
    secret: bytes, salt: bytes, *, memory_kib: int, iterations: int, lanes: int
) -> bytes:
    return Argon2id(
        salt=salt,
        length=KEY_BYTES,
        iterations=iterations,
        lanes=lanes,
        memory_cost=memory_kib,
    ).derive(secret)


def derive_scrypt(secret: bytes, salt: bytes, *, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=KEY_BYTES, n=n, r=r, p=p).derive(secret)
