"""The federation's only use of `cryptography.hazmat`: key agreement, share sealing, mask PRG.

An auditor of secure aggregation reads this file: X25519 keys, HKDF-SHA256 to derive
symmetric keys from shared secrets, AES-256-GCM to seal Shamir shares between two devices
(the coordinator routes them but cannot read them), and AES-256-CTR as the pseudo-random
generator that expands a 32-byte seed into a mask over the ring Z_2^32.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import TypeVar

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgeperso._errors import InvalidInputError, TamperedError

KEY_BYTES = 32
_K = TypeVar("_K")
_NONCE_BYTES = 12
_RAW = serialization.Encoding.Raw


def random_seed() -> bytes:
    """32 bytes from the OS CSPRNG (self-mask seeds, round secrets)."""
    return os.urandom(KEY_BYTES)


def generate_keypair() -> tuple[bytes, bytes]:
    """A fresh X25519 key pair as (private raw bytes, public raw bytes)."""
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
    raw = private.private_bytes(_RAW, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return raw, public


@functools.cache
def _probe_key() -> X25519PrivateKey:
    """One throw-away key per process for check_public_key: any clamped key tells the
    low-order points apart, and generating one per check doubled its cost."""
    return X25519PrivateKey.generate()


def check_public_key(public: bytes, what: str = "public key") -> None:
    """InvalidInputError unless `public` is a usable X25519 public key: 32 bytes and not one of
    the low-order points, with which every key agreement gives the same all-zero secret.

    Every clamped private key is a multiple of the cofactor 8 below the prime subgroup's order,
    so an agreement with a throw-away key fails exactly for the low-order points."""
    if len(public) != KEY_BYTES:
        raise InvalidInputError(f"{what} must be a {KEY_BYTES}-byte X25519 key")
    try:
        _probe_key().exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError as exc:
        raise InvalidInputError(
            f"{what} is a low-order X25519 point, which makes every key agreement public; "
            "send the public key of a freshly generated key pair"
        ) from exc


def agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 of the X25519 shared secret, bound to `info` (purpose and round)."""
    return agree_many(private, {0: peer_public}, info)[0]


def agree_many(private: bytes, peers: Mapping[_K, bytes], info: bytes) -> dict[_K, bytes]:
    """`agree` with each of several peers' public keys (the private key is loaded once)."""
    if len(private) != KEY_BYTES or any(len(p) != KEY_BYTES for p in peers.values()):
        raise InvalidInputError("X25519 keys are 32 bytes; got a key of another length")
    key = X25519PrivateKey.from_private_bytes(private)
    derived: dict[_K, bytes] = {}
    for name, peer_public in peers.items():
        try:
            shared = key.exchange(X25519PublicKey.from_public_bytes(peer_public))
        except ValueError as exc:  # an all-zero shared secret: a low-order public key
            raise InvalidInputError("a peer's public key is invalid (low order point)") from exc
        hkdf = HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info)
        derived[name] = hkdf.derive(shared)
    return derived


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM with a random nonce; the nonce is prepended to the ciphertext."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def unseal(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Open `seal`'s output; TamperedError if it was modified, misrouted or replayed elsewhere."""
    if len(sealed) < _NONCE_BYTES + 16:
        raise TamperedError("a sealed secret-share is truncated; the round cannot use it")
    try:
        return AESGCM(key).decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], aad)
    except InvalidTag as exc:
        raise TamperedError("a sealed secret-share failed authentication; it was not used") from exc


class MaskExpander:
    """The pseudo-random generator: the AES-256-CTR keystream of a 32-byte seed read as
    `length` little-endian uint32. One output buffer serves every seed, so expanding the
    hundreds of masks of a round allocates nothing after the first."""

    def __init__(self, length: int) -> None:
        if length < 0:
            raise InvalidInputError("a mask length cannot be negative")
        self._zeros = bytes(4 * length)  # the CTR keystream is the encryption of zeros
        # update_into wants room for one block more than the input.
        self._buffer = bytearray(4 * length + 15)
        self._view = np.frombuffer(self._buffer, dtype="<u4", count=length)

    def expand(self, seed: bytes) -> np.ndarray:
        """[length] uint32; a view that the next call overwrites (copy it to keep it)."""
        if len(seed) != KEY_BYTES:
            raise InvalidInputError("mask seeds are 32 bytes")
        encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
        encryptor.update_into(self._zeros, self._buffer)
        return self._view


def prg_uint32(seed: bytes, length: int) -> np.ndarray:
    """`length` pseudo-random uint32 from `seed`, in a new array (see MaskExpander)."""
    return MaskExpander(length).expand(seed).copy()


def public_key(private: bytes) -> bytes:
    """The X25519 public key of a raw private key (checks a reconstructed key)."""
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
