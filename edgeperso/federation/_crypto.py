"""The federation's only use of `cryptography.hazmat`: key agreement, share sealing, mask PRG.

An auditor of secure aggregation reads this file: X25519 keys, HKDF-SHA256 to derive
symmetric keys from shared secrets, AES-256-GCM to seal Shamir shares between two devices
(the coordinator routes them but cannot read them), and AES-256-CTR as the pseudo-random
generator that expands a 32-byte seed into a mask over the ring Z_2^32.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from edgeperso._errors import InvalidInputError, TamperedError

KEY_BYTES = 32
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


def agree(private: bytes, peer_public: bytes, info: bytes) -> bytes:
    """HKDF-SHA256 of the X25519 shared secret, bound to `info` (purpose and round)."""
    if len(private) != KEY_BYTES or len(peer_public) != KEY_BYTES:
        raise InvalidInputError("X25519 keys are 32 bytes; got a key of another length")
    try:
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(peer_public)
        )
    except ValueError as exc:  # an all-zero shared secret: a low-order public key
        raise InvalidInputError("a peer's public key is invalid (low order point)") from exc
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


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


def prg_uint32(seed: bytes, length: int) -> np.ndarray:
    """`length` pseudo-random uint32 (the AES-256-CTR keystream of `seed`, little-endian)."""
    if len(seed) != KEY_BYTES:
        raise InvalidInputError("mask seeds are 32 bytes")
    nbytes = 4 * length
    # update_into wants room for one block more than the input; the keystream of zeros is
    # the CTR keystream itself.
    buffer = bytearray(nbytes + 15)
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
    encryptor.update_into(bytes(nbytes), buffer)
    return np.frombuffer(buffer, dtype="<u4", count=length)


def public_key(private: bytes) -> bytes:
    """The X25519 public key of a raw private key (checks a reconstructed key)."""
    key = X25519PrivateKey.from_private_bytes(private)
    return key.public_key().public_bytes(_RAW, serialization.PublicFormat.Raw)
