"""The encrypted backup container around a database snapshot.

Layout (all integers big-endian)::

    b"EPBACKUP1\\n" || u32 n || header (n bytes of JSON) || chunks
    header = {"v": 1, "kek": <KEK provider parameters>, "file_key": <wrapped key, hex>}
    chunk  = u32 m || sealed (m bytes), plaintext <= 1 MiB

Each chunk is sealed under a random file key with associated data binding the SHA-256 of the
header, the chunk index and whether it is the last chunk, so reordering, dropping, truncating
or appending chunks fails authentication. The snapshot inside is itself a store whose data keys
are wrapped under the backup's KEK, so the backup opens without the original device's keystore.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from edgeperso._errors import TamperedError, UnsupportedError
from edgeperso.store import _crypto
from edgeperso.store._codec import ad
from edgeperso.store._keys import KeyProvider

__all__ = ["read_backup", "write_backup"]

_MAGIC = b"EPBACKUP1\n"
_CHUNK = 1 << 20
_MAX_HEADER = 1 << 16
_FILE_KEY_AD = ad("backup", b"", b"", "file_key")


def _chunk_ad(header_hash: bytes, index: int, last: bool) -> bytes:
    return ad("backup", header_hash, index.to_bytes(8, "big"), "last" if last else "chunk")


def write_backup(snapshot: Path, dest: Path, kek: bytes, params: Mapping[str, Any]) -> None:
    """Seal `snapshot` into `dest` (written to a temporary name, fsynced, then renamed)."""
    file_key = _crypto.random_key()
    header = json.dumps(
        {
            "v": 1,
            "kek": dict(params),
            "file_key": _crypto.wrap_key(kek, file_key, _FILE_KEY_AD).hex(),
        },
        sort_keys=True,
    ).encode()
    header_hash = hashlib.sha256(header).digest()
    sealer = _crypto.SealingKey(file_key)
    tmp = dest.with_name(f".{dest.name}.{_crypto.random_bytes(4).hex()}.tmp")
    try:
        with snapshot.open("rb") as src, tmp.open("xb") as out:
            os.chmod(tmp, 0o600)
            out.write(_MAGIC + len(header).to_bytes(4, "big") + header)
            chunk = src.read(_CHUNK)
            index = 0
            while True:
                following = src.read(_CHUNK)
                sealed = sealer.seal(chunk, _chunk_ad(header_hash, index, not following))
                out.write(len(sealed).to_bytes(4, "big") + sealed)
                if not following:
                    break
                chunk, index = following, index + 1
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def _read_exact(src: BinaryIO, n: int) -> bytes:
    data = src.read(n)
    if len(data) != n:
        raise TamperedError("the backup file is truncated; use an intact copy")
    return data


def read_backup(src_path: Path, dest: Path, key: KeyProvider) -> None:
    """Authenticate and decrypt a backup into `dest` (a new file), or raise; `dest` is
    removed on failure."""
    try:
        with src_path.open("rb") as src, dest.open("xb") as out:
            os.chmod(dest, 0o600)
            if src.read(len(_MAGIC)) != _MAGIC:
                raise TamperedError("not an EdgePerso backup file (bad magic)")
            size = int.from_bytes(_read_exact(src, 4), "big")
            if size > _MAX_HEADER:
                raise TamperedError("the backup header is implausibly large: damaged file")
            header = _read_exact(src, size)
            try:
                meta = json.loads(header)
                version, params, wrapped = meta["v"], meta["kek"], bytes.fromhex(meta["file_key"])
            except (ValueError, KeyError, TypeError):
                raise TamperedError("the backup header is unreadable: damaged file") from None
            if version != 1:
                raise UnsupportedError(f"backup format {version} is newer than this EdgePerso")
            sealer = _crypto.SealingKey(_crypto.unwrap_key(key.kek(params), wrapped, _FILE_KEY_AD))
            header_hash = hashlib.sha256(header).digest()
            index, last = 0, False
            while not last:
                length = int.from_bytes(_read_exact(src, 4), "big")
                if length > _CHUNK + _crypto.SEAL_OVERHEAD:
                    raise TamperedError("a backup chunk has an impossible length: damaged file")
                sealed = _read_exact(src, length)
                try:
                    plain = sealer.open(sealed, _chunk_ad(header_hash, index, False))
                except TamperedError:
                    plain = sealer.open(sealed, _chunk_ad(header_hash, index, True))
                    last = True
                out.write(plain)
                index += 1
            if src.read(1):
                raise TamperedError("the backup file has data after its last chunk")
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
