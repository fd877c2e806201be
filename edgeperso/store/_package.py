"""A sealed, self-contained package of bytes that opens with a key provider alone.

Used to move a user's adapter between devices. Layout (integers big-endian)::

    b"EPSEALED1\\n" || u32 n || header (n bytes of JSON) || sealed payload
    header = {"v": 1, "kind": <what the payload is>, "kek": <KEK provider parameters>,
              "file_key": <wrapped random key, hex>}

The payload is sealed under a random file key with associated data binding the SHA-256 of
the whole header, so the kind, the KEK parameters and the wrapped key cannot be swapped.
It is the backup container's design for payloads that fit in memory (an adapter is
kilobytes to a few megabytes), without the chunking.
"""

from __future__ import annotations

import hashlib
import json

from edgeperso._errors import InvalidInputError, TamperedError, UnsupportedError, WrongKeyError
from edgeperso.store import _crypto
from edgeperso.store._codec import ad
from edgeperso.store._keys import KeyProvider

__all__ = ["open_package", "seal_package"]

_MAGIC = b"EPSEALED1\n"
_MAX_HEADER = 1 << 16
_FILE_KEY_AD = ad("package", b"", b"", "file_key")


def seal_package(payload: bytes, kind: str, key: KeyProvider) -> bytes:
    """Seal `payload` so that `open_package(..., kind, key)` alone opens it."""
    if not isinstance(key, KeyProvider):
        raise InvalidInputError("key must be a KeyringKey, PassphraseKey or RawKey")
    kek, params = key.new_kek()
    file_key = _crypto.random_key()
    header = json.dumps(
        {
            "v": 1,
            "kind": kind,
            "kek": dict(params),
            "file_key": _crypto.wrap_key(kek, file_key, _FILE_KEY_AD).hex(),
        },
        sort_keys=True,
    ).encode()
    sealed = _crypto.SealingKey(file_key).seal(payload, _payload_ad(header))
    return _MAGIC + len(header).to_bytes(4, "big") + header + sealed


def open_package(data: bytes, kind: str, key: KeyProvider) -> bytes:
    """Authenticate and decrypt a package of `kind`, or raise (TamperedError, WrongKeyError,
    UnsupportedError); never returns unauthenticated bytes."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidInputError("a sealed package is bytes")
    if not isinstance(key, KeyProvider):
        raise InvalidInputError("key must be a KeyringKey, PassphraseKey or RawKey")
    data = bytes(data)
    if not data.startswith(_MAGIC):
        raise TamperedError("not an EdgePerso sealed package (bad magic)")
    start = len(_MAGIC) + 4
    size = int.from_bytes(data[len(_MAGIC) : start], "big")
    if size > _MAX_HEADER or len(data) < start + size + _crypto.SEAL_OVERHEAD:
        raise TamperedError("the sealed package is truncated or its header length is damaged")
    header = data[start : start + size]
    try:
        meta = json.loads(header)
        version, found, params = meta["v"], meta["kind"], meta["kek"]
        wrapped = bytes.fromhex(meta["file_key"])
    except (ValueError, KeyError, TypeError):
        raise TamperedError("the sealed package's header is unreadable: damaged data") from None
    if version != 1:
        raise UnsupportedError(f"sealed package format {version} is newer than this EdgePerso")
    if found != kind:
        raise InvalidInputError(f"this sealed package holds a {found!r}, not a {kind!r}")
    # The store's own messages speak of "the store" and of restoring a backup: say what is
    # true of a package instead.
    try:
        file_key = _crypto.unwrap_key(key.kek(params), wrapped, _FILE_KEY_AD)
    except WrongKeyError:
        raise WrongKeyError(
            "this key or passphrase does not open the package: use the one it was sealed with"
        ) from None
    except TamperedError:
        raise TamperedError("the sealed package is damaged: export it again") from None
    try:
        return _crypto.SealingKey(file_key).open(data[start + size :], _payload_ad(header))
    except TamperedError:
        raise TamperedError("the sealed package is damaged: export it again") from None


def _payload_ad(header: bytes) -> bytes:
    return ad("package", hashlib.sha256(header).digest(), b"", "payload")
