"""The encrypted store: one SQLite file per app profile, every value sealed per user.

Key hierarchy: KEK (from a KeyProvider) wraps a store secret and one data key per user.
The store secret yields, through HKDF, the pseudonym key (user ids, blob names and state
keys become HMACs), the digest key and the counter key. Each user's manifest (sealed under
their data key) holds the user id, per-table row counts and XOR digests of the rows' tags,
and blob versions; the meta table holds an HMAC over (write counter, XOR of all manifests).
So on top of per-value AEAD, a full read detects dropped, added or replayed rows, and open
detects a replaced manifest or (with the rollback counter) an older copy of the whole file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from edgeperso._errors import (
    EdgePersoError,
    InvalidInputError,
    LockedError,
    RollbackError,
    StorageError,
    TamperedError,
    UnsupportedError,
    WrongKeyError,
)
from edgeperso._paths import check_path
from edgeperso.store import _backup, _crypto, _keys, _schema
from edgeperso.store._codec import (
    FORMAT_VERSION,
    Example,
    Feedback,
    JSONValue,
    ad,
    check_json,
    check_unicode,
    check_user,
    decode_array,
    decode_json,
    encode_array,
    encode_json,
    example_from_json,
    feedback_from_json,
)
from edgeperso.store._counter import Counter, KeyringCounter, SidecarCounter, open_counter
from edgeperso.store._keys import KeyProvider
from edgeperso.store._lock import UserLock

__all__ = ["Store", "StoreConfig"]

logger = logging.getLogger(__name__)

_MAX_BLOB = 256 << 20
_LOCK_NAME = re.compile(r"[0-9a-f]{32}")  # a user lock file: its pseudonym's first 16 bytes
_MANIFEST_AD_FIELD = "manifest"

# SQLite primary result codes (sqlite3.h) that say "retry later" or "the disk refused".
_BUSY_CODES = {5, 6}  # SQLITE_BUSY, SQLITE_LOCKED
_FULL = 13
_STORAGE_CODES = {3, 7, 8, 10, 14, 22}  # PERM, NOMEM, READONLY, IOERR, CANTOPEN, NOLFS


@dataclass(frozen=True)
class StoreConfig:
    """How a store is opened. The defaults suit an app; tests shrink the limits."""

    rollback_counter: SidecarCounter | KeyringCounter | None = field(default_factory=SidecarCounter)
    busy_timeout_s: float = 5.0  # wait this long for another writer before LockedError
    max_key_uses: int = 1 << 30  # seals per data key before it is rotated (AES-GCM: < 2**32)
    create: bool = True  # create the store if the file does not exist

    def __post_init__(self) -> None:
        if not isinstance(self.rollback_counter, SidecarCounter | KeyringCounter | None):
            raise InvalidInputError("rollback_counter: SidecarCounter, KeyringCounter or None")
        if isinstance(self.busy_timeout_s, bool) or not (
            isinstance(self.busy_timeout_s, int | float) and 0 <= self.busy_timeout_s < 3600
        ):
            raise InvalidInputError("busy_timeout_s must be a number of seconds in [0, 3600)")
        if not isinstance(self.create, bool):
            raise InvalidInputError("create must be True or False")
        if isinstance(self.max_key_uses, bool) or not (
            isinstance(self.max_key_uses, int) and 64 <= self.max_key_uses <= 1 << 31
        ):
            raise InvalidInputError("max_key_uses must be an int in [64, 2**31]")


# SQLite reports a damaged schema in messages Python then fails to decode as UTF-8.
_DB_ERRORS = (sqlite3.Error, UnicodeDecodeError)


def _sqlite_error(exc: Exception) -> EdgePersoError:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    name = getattr(exc, "sqlite_errorname", type(exc).__name__)
    if code in _BUSY_CODES:
        return LockedError(
            "the store is locked by another process or connection; retry later or raise "
            "StoreConfig.busy_timeout_s"
        )
    if code == _FULL:
        return StorageError("the disk is full; nothing was written. Free space and retry")
    if code in _STORAGE_CODES:
        return StorageError(f"the storage layer failed ({name}); check the disk and permissions")
    return TamperedError(
        f"the database file is damaged or is not an EdgePerso store ({name}); "
        "restore it from a backup"
    )


def _check_blob(data: object) -> bytes:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidInputError("blob data must be bytes")
    payload = data.tobytes() if isinstance(data, memoryview) else bytes(data)  # any layout
    if len(payload) > _MAX_BLOB:
        raise InvalidInputError(f"a blob is at most {_MAX_BLOB >> 20} MiB")
    return payload


def _check_keep(keep: object) -> None:
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise InvalidInputError("keep must be a positive int or None")


def _blob(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise TamperedError("a stored value has the wrong type: the database was modified")
    return value


def _rec(values: Sequence[object]) -> bytes:
    """A row's identifying columns as the record id bound into associated data."""
    out = b""
    for value in values:
        if isinstance(value, int) and 0 <= value < 1 << 63:
            out += value.to_bytes(8, "big")
        elif isinstance(value, bytes) and len(value) == 32:
            out += value
        else:
            raise TamperedError("a record id has the wrong type: the database was modified")
    return out


def _check_ids(ids: Iterable[int], what: str) -> list[int]:
    if isinstance(ids, str | bytes) or not isinstance(ids, Iterable):
        raise InvalidInputError(f"{what} must be a list of record ids (positive ints)")
    out = list(ids)
    for i in out:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 < i < 1 << 63:
            raise InvalidInputError(f"{what} must be positive ints (record ids)")
    return out


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 256:
        raise InvalidInputError(f"{what} must be a non-empty str of at most 256 characters")
    check_unicode(value, what)
    return value


def _check_version(version: object) -> int | None:
    if version is not None and (
        isinstance(version, bool) or not isinstance(version, int) or version < 1
    ):
        raise InvalidInputError("version must be a positive int (a blob version) or None")
    return version


def _connect(path: Path, timeout: float) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
    try:
        for pragma in (
            "journal_mode = WAL",
            "synchronous = FULL",
            "fullfsync = ON",  # macOS: F_FULLFSYNC; a no-op elsewhere
            "checkpoint_fullfsync = ON",
            "secure_delete = ON",
            "trusted_schema = OFF",
            "cell_size_check = ON",
        ):
            conn.execute(f"PRAGMA {pragma}")
    except BaseException:
        conn.close()
        raise
    return conn


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _secret_ad(store_id: bytes) -> bytes:
    return ad("meta", store_id, b"secret", "key")


def _user_key_ad(store_id: bytes, uid: bytes) -> bytes:
    return ad("users", uid, store_id, "key")


def _manifest_ad(uid: bytes) -> bytes:
    return ad("users", uid, b"", _MANIFEST_AD_FIELD)


class _User:
    """One user's data key and manifest inside a transaction."""

    def __init__(
        self, uid: bytes, key: _crypto.SealingKey, wrapped: bytes, manifest: dict[str, Any]
    ) -> None:
        self.uid = uid
        self.key = key
        self.wrapped = wrapped
        self.name: str = manifest["user"]
        self.uses: int = manifest["uses"]
        self.counts: dict[str, int] = {t: int(v["n"]) for t, v in manifest["tables"].items()}
        self.digests: dict[str, int] = {t: int(v["d"], 16) for t, v in manifest["tables"].items()}
        self.blobs: dict[str, dict[str, Any]] = manifest["blobs"]
        self.old_hash: int | None = None  # PRF of the stored manifest; None for a new user
        self.dirty = False

    def manifest(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "user": self.name,
            "uses": self.uses,
            "tables": {
                t: {"n": self.counts[t], "d": f"{self.digests[t]:064x}"} for t in self.counts
            },
            "blobs": self.blobs,
        }


class _Txn:
    """One SQLite transaction plus the authenticated state it reads and updates."""

    def __init__(self, store: Store) -> None:
        self._s = store
        self.conn = store._conn
        self._users: dict[bytes, _User] = {}
        # users rows as one table scan saw them (set by verify_users); reads look users up
        # here, so a damaged index cannot hide a user that the digest check counted.
        self._scanned: dict[bytes, tuple[object, object]] | None = None
        self._digest_delta = 0
        self.counter, self.digest = self._load_state()

    def _load_state(self) -> tuple[int, int]:
        rows = dict(
            self.conn.execute(
                "SELECT k, v FROM meta WHERE k IN ('counter', 'tag', 'digest', 'secret')"
            )
        )
        if rows.get("secret") != self._s._wrapped_secret:
            raise WrongKeyError(
                "the store's key changed after this process opened it (rotate_kek in another "
                "process, or the file was replaced); open the store again with the new key"
            )
        counter, digest, tag = rows.get("counter"), rows.get("digest"), rows.get("tag")
        if (
            not isinstance(counter, int)
            or not 0 <= counter < 1 << 63
            or not isinstance(digest, bytes)
            or len(digest) != 32
        ):
            raise TamperedError("the store's state record is missing or damaged")
        if _crypto.mac(self._s._counter_key, *self._s._state_parts(counter, digest)) != tag:
            raise TamperedError("the store's state record failed authentication")
        return counter, int.from_bytes(digest, "big")

    def verify_users(self) -> None:
        total = 0
        scanned: dict[bytes, tuple[object, object]] = {}
        for uid, wrapped, manifest in self.conn.execute(
            "SELECT uid, wrapped_key, manifest FROM users"
        ):
            total ^= _crypto.prf_of_sealed(self._s._digest_key, _blob(manifest))
            scanned[_blob(uid)] = (wrapped, manifest)
        self._scanned = scanned
        if total != self.digest:
            raise TamperedError(
                "a user's records were removed or replaced by an older copy; "
                "restore the store from a backup"
            )

    def user(self, name: str, *, create: bool) -> _User | None:
        uid = self._s._pseudonym(name)
        if uid in self._users:
            return self._users[uid]
        if self._scanned is not None:
            row = self._scanned.get(uid)
        else:
            row = self.conn.execute(
                "SELECT wrapped_key, manifest FROM users WHERE uid = ?", (uid,)
            ).fetchone()
        if row is None:
            if not create:
                return None
            user = self._new_user(uid, name)
        else:
            wrapped, sealed = _blob(row[0]), _blob(row[1])
            key = self._s._user_key(uid, wrapped)
            manifest = decode_json(key.open(sealed, _manifest_ad(uid)))
            try:
                user = _User(uid, key, wrapped, manifest)
            except (KeyError, TypeError, ValueError, AttributeError):
                raise TamperedError("an authenticated user manifest is malformed") from None
            if user.name != name:
                raise TamperedError("a user manifest names another user")
            user.old_hash = _crypto.prf_of_sealed(self._s._digest_key, sealed)
        self._users[uid] = user
        return user

    def all_users(self) -> list[_User]:
        """Every user, from the scan of `verify_users` (which must run first)."""
        assert self._scanned is not None, "verify_users() must run first"
        out = []
        for uid, (wrapped, sealed) in self._scanned.items():
            key = self._s._user_key(uid, _blob(wrapped))
            manifest = decode_json(key.open(_blob(sealed), _manifest_ad(uid)))
            name = manifest.get("user")
            if not isinstance(name, str) or self._s._pseudonym(name) != uid:
                raise TamperedError("a user manifest does not match its row")
            found = self.user(name, create=False)
            assert found is not None  # the row was just read in this transaction
            out.append(found)
        return out

    def _new_user(self, uid: bytes, name: str) -> _User:
        key = _crypto.random_key()
        wrapped = _crypto.wrap_key(self._s._kek, key, _user_key_ad(self._s._store_id, uid))
        manifest = {"user": name, "uses": 0, "tables": {}, "blobs": {}}
        user = _User(uid, _crypto.SealingKey(key), wrapped, manifest)
        user.dirty = True
        return user

    def reserve(self, user: _User, seals: int) -> None:
        """Rotate the user's data key first if `seals` more would pass the limit."""
        if user.uses + seals + 1 > self._s._config.max_key_uses:
            logger.info("data key reached its use limit; rotating it")
            self.rotate(user)

    def _account(self, user: _User, table: str, body: bytes, sign: int) -> None:
        user.counts[table] = user.counts.get(table, 0) + sign
        user.digests[table] = user.digests.get(table, 0) ^ _crypto.prf_of_sealed(
            self._s._digest_key, body
        )
        user.dirty = True

    def seal(self, user: _User, table: str, rec: bytes, plaintext: bytes) -> bytes:
        body = user.key.seal(plaintext, ad(table, user.uid, rec, "body"))
        user.uses += 1
        self._account(user, table, body, +1)
        return body

    def unaccount(self, user: _User, table: str, body: object) -> None:
        self._account(user, table, _blob(body), -1)

    def rows(self, user: _User, table: str) -> list[tuple[tuple[Any, ...], bytes]]:
        """All of a user's rows in `table`, authenticated and checked against the manifest."""
        cols = _schema.TABLES[table]
        query = (
            f"SELECT {', '.join(cols)}, body FROM {table} WHERE uid = ? ORDER BY {', '.join(cols)}"
        )
        out = []
        digest = 0
        for row in self.conn.execute(query, (user.uid,)):
            body = _blob(row[-1])
            digest ^= _crypto.prf_of_sealed(self._s._digest_key, body)
            plain = user.key.open(body, ad(table, user.uid, _rec(row[:-1]), "body"))
            out.append((tuple(row[:-1]), plain))
        if len(out) != user.counts.get(table, 0) or digest != user.digests.get(table, 0):
            raise TamperedError(
                f"the user's {table} do not match their manifest (rows dropped, added or "
                "replayed); restore the store from a backup"
            )
        return out

    def rotate(self, user: _User) -> None:
        """Re-encrypt all of a user's rows under a fresh data key."""
        new = _crypto.random_key()
        sealer = _crypto.SealingKey(new)
        rows = {table: self.rows(user, table) for table in _schema.TABLES}
        old_key = user.key
        user.key = sealer
        user.wrapped = _crypto.wrap_key(
            self._s._kek, new, _user_key_ad(self._s._store_id, user.uid)
        )
        user.counts, user.digests, user.uses = {}, {}, 0
        for table, table_rows in rows.items():
            cols = _schema.TABLES[table]
            where = " AND ".join(f"{c} = ?" for c in cols)
            updates = [
                (self.seal(user, table, _rec(keys), plain), user.uid, *keys)
                for keys, plain in table_rows
            ]
            self.conn.executemany(f"UPDATE {table} SET body = ? WHERE uid = ? AND {where}", updates)
        user.dirty = True
        self._s._forget_key(user.uid, old_key)

    def forget(self, user: _User) -> None:
        for table in _schema.TABLES:
            self.conn.execute(f"DELETE FROM {table} WHERE uid = ?", (user.uid,))
        self.conn.execute("DELETE FROM users WHERE uid = ?", (user.uid,))
        if user.old_hash is not None:
            self._digest_delta ^= user.old_hash
        del self._users[user.uid]
        self._s._forget_key(user.uid, user.key)

    def finish(self) -> int:
        """Reseal changed manifests, advance the counter, re-tag the state; return counter."""
        digest_key = self._s._digest_key
        for user in self._users.values():
            if not user.dirty:
                continue
            user.uses += 1
            sealed = user.key.seal(encode_json(user.manifest()), _manifest_ad(user.uid))
            new_hash = _crypto.prf_of_sealed(digest_key, sealed)
            self._digest_delta ^= (user.old_hash or 0) ^ new_hash
            self.conn.execute(
                "INSERT OR REPLACE INTO users (uid, wrapped_key, manifest) VALUES (?, ?, ?)",
                (user.uid, user.wrapped, sealed),
            )
        counter = self.counter + 1
        digest = (self.digest ^ self._digest_delta).to_bytes(32, "big")
        tag = _crypto.mac(self._s._counter_key, *self._s._state_parts(counter, digest))
        self.conn.executemany(
            "UPDATE meta SET v = ? WHERE k = ?",
            [(counter, "counter"), (digest, "digest"), (tag, "tag")],
        )
        return counter


class Store:
    """An encrypted per-user store. Open it with `Store.open(path, key=...)`; thread-safe.

    Every method that takes `user` takes the app's own user id (a non-empty str); the file
    only ever holds a keyed pseudonym of it.
    """

    def __init__(
        self,
        conn: sqlite3.Connection,
        path: Path,
        config: StoreConfig,
        store_id: bytes,
        kek: bytes,
        kek_params: Mapping[str, Any],
        secret: bytes,
        wrapped_secret: bytes,
    ) -> None:
        self._conn = conn
        self._path = path
        self._config = config
        self._store_id = store_id
        self._kek = kek
        self._kek_params = dict(kek_params)
        # The store secret as wrapped under self._kek: every transaction compares it with the
        # file's, so that after a rotate_kek by another process this one stops at once
        # instead of failing to unwrap data keys, or wrapping new ones under a retired KEK.
        self._wrapped_secret = wrapped_secret
        self._pseudonym_key = _crypto.subkey(secret, b"edgeperso.store pseudonyms")
        self._digest_key = _crypto.subkey(secret, b"edgeperso.store digests")
        self._counter_key = _crypto.subkey(secret, b"edgeperso.store counter")
        self._counter: Counter | None = open_counter(config.rollback_counter, path)
        self._mutex = threading.RLock()
        self._pseudonyms: dict[str, bytes] = {}
        self._user_keys: dict[tuple[bytes, bytes], _crypto.SealingKey] = {}
        self._closed = False

    # ---- opening and creating -------------------------------------------------------------

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], key: KeyProvider, config: StoreConfig | None = None
    ) -> Store:
        """Open the store at `path`, creating it if absent (unless `config.create` is False).

        Raises WrongKeyError, KeyUnavailableError, TamperedError, RollbackError,
        UnsupportedError (schema too new), LockedError or StorageError; none changes the file.
        """
        check_path(path)
        if not isinstance(key, KeyProvider):
            raise InvalidInputError("key must be a KeyringKey, PassphraseKey or RawKey")
        config = StoreConfig() if config is None else config
        if not isinstance(config, StoreConfig):
            raise InvalidInputError("config must be a StoreConfig")
        file = Path(path)
        if not file.exists():
            if not config.create:
                raise InvalidInputError("no store exists at this path (config.create is False)")
            counter = open_counter(config.rollback_counter, file)
            if counter is not None and counter.exists():
                raise _rollback_missing()
            _create(file, key, config)
        try:
            conn = _connect(file, config.busy_timeout_s)
        except _DB_ERRORS as exc:
            raise _sqlite_error(exc) from exc
        try:
            store = cls._load(conn, file, key, config)
        except _DB_ERRORS as exc:
            conn.close()
            raise _sqlite_error(exc) from exc
        except BaseException:
            conn.close()
            raise
        return store

    @classmethod
    def _load(
        cls, conn: sqlite3.Connection, path: Path, key: KeyProvider, config: StoreConfig
    ) -> Store:
        (app_id,) = conn.execute("PRAGMA application_id").fetchone()
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if app_id != _schema.APPLICATION_ID:
            raise TamperedError("this file is not an EdgePerso store, or its header is damaged")
        _schema.check_version(version)
        if version != _schema.SCHEMA_VERSION:
            conn.execute("BEGIN IMMEDIATE")
            try:
                _schema.migrate(conn, version)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        meta = dict(conn.execute("SELECT k, v FROM meta"))
        fmt, store_id = meta.get("format"), meta.get("store_id")
        if not isinstance(fmt, int) or not isinstance(store_id, bytes) or len(store_id) != 16:
            raise TamperedError("the store header is missing or damaged")
        if fmt > FORMAT_VERSION:
            raise UnsupportedError(
                f"this store uses record format {fmt}; upgrade EdgePerso to open it"
            )
        if fmt < FORMAT_VERSION:
            raise TamperedError("the store header names an impossible record format")
        try:
            params = json.loads(_blob(meta.get("kek")))
        except (ValueError, UnicodeDecodeError):
            params = None
        if not isinstance(params, dict):
            raise TamperedError("the store's key header is damaged")
        kek = key.kek(params)
        wrapped = _blob(meta.get("secret"))
        secret = _crypto.unwrap_key(kek, wrapped, _secret_ad(store_id))
        store = cls(conn, path, config, store_id, kek, params, secret, wrapped)
        store._check_rollback()
        store._remove_orphan_locks()
        retired = meta.get("kek_retired")
        if retired is not None:
            store._retire(retired)
        return store

    def _check_rollback(self) -> None:
        # The recorded counter first, the database's second: writers commit before they
        # advance the record, so every value recorded by then is already committed. Read the
        # other way round, another process's commit and record between the two reads would
        # look like an older file.
        recorded = None
        if self._counter is not None:
            recorded = self._counter.read(self._counter_key, self._store_id)
        with self._txn(write=False) as txn:
            txn.verify_users()
            counter = txn.counter
        if self._counter is None:
            return
        if recorded is not None and recorded > counter:
            raise _rollback_older(counter, recorded)
        self._counter.advance(self._counter_key, self._store_id, counter)

    def _retire(self, params_json: object) -> None:
        try:
            _keys.retire(json.loads(_blob(params_json)))
        except EdgePersoError:
            raise
        except Exception:
            logger.warning("could not delete a retired key-encryption key; will retry on open")
            return
        with self._txn(write=True) as txn:
            txn.conn.execute("DELETE FROM meta WHERE k = 'kek_retired'")

    # ---- internals --------------------------------------------------------------------------

    def _state_parts(self, counter: int, digest: bytes) -> tuple[bytes, ...]:
        return (b"state", self._store_id, counter.to_bytes(8, "big"), digest)

    def _pseudonym(self, name: str) -> bytes:
        uid = self._pseudonyms.get(name)
        if uid is None:
            uid = _crypto.mac(self._pseudonym_key, b"user", name.encode("utf-8"))
            self._pseudonyms[name] = uid
        return uid

    def _tag(self, kind: bytes, uid: bytes, name: str) -> bytes:
        return _crypto.mac(self._pseudonym_key, kind, uid, name.encode("utf-8"))

    def _user_key(self, uid: bytes, wrapped: bytes) -> _crypto.SealingKey:
        key = self._user_keys.get((uid, wrapped))
        if key is None:
            try:
                raw = _crypto.unwrap_key(self._kek, wrapped, _user_key_ad(self._store_id, uid))
            except WrongKeyError:
                raise TamperedError(
                    "a user's data key failed authentication: the database was modified"
                ) from None
            key = _crypto.SealingKey(raw)
            self._user_keys[(uid, wrapped)] = key
        return key

    def _forget_key(self, uid: bytes, key: _crypto.SealingKey) -> None:
        for cached in [k for k, v in self._user_keys.items() if k[0] == uid or v is key]:
            del self._user_keys[cached]

    @contextmanager
    def _txn(self, *, write: bool) -> Iterator[_Txn]:
        with self._mutex:
            if self._closed:
                raise InvalidInputError("the store is closed")
            conn = self._conn
            counter: int | None = None
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    txn = _Txn(self)
                    yield txn
                    if write:
                        counter = txn.finish()
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except _DB_ERRORS as exc:
                raise _sqlite_error(exc) from exc
            if counter is not None and self._counter is not None:
                self._counter.advance(self._counter_key, self._store_id, counter)

    # ---- users ------------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    def users(self) -> list[str]:
        """The app user ids that have data in this store, sorted."""
        with self._txn(write=False) as txn:
            txn.verify_users()
            return sorted(user.name for user in txn.all_users())

    def user_version(self, user: str) -> bytes | None:
        """A token that changes whenever anything of `user`'s is written, by this process or
        another (a digest of the user's sealed manifest, which every write reseals with a
        fresh nonce); None when the user has no data. It is for caches of decrypted data:
        it is read without verification, so a changed token only means "read again", and
        that read verifies as always."""
        user = check_user(user)
        with self._mutex:
            if self._closed:
                raise InvalidInputError("the store is closed")
            try:
                row = self._conn.execute(
                    "SELECT manifest FROM users WHERE uid = ?", (self._pseudonym(user),)
                ).fetchone()
            except _DB_ERRORS as exc:
                raise _sqlite_error(exc) from exc
        return None if row is None else hashlib.sha256(_blob(row[0])).digest()

    def forget_user(self, user: str) -> bool:
        """Crypto-shred a user: delete their wrapped data key and every row, then checkpoint
        the WAL (TRUNCATE) and VACUUM so no page of the file keeps them. Returns False if the
        user had no data."""
        user = check_user(user)
        with self._txn(write=True) as txn:
            found = txn.user(user, create=False)
            if found is None:
                return False
            txn.forget(found)
        self._scrub()
        return True

    def _scrub(self) -> None:
        with self._mutex:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self._conn.execute("VACUUM")
                busy, _, _ = self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            except _DB_ERRORS as exc:
                raise _sqlite_error(exc) from exc
        if busy:
            # Another connection is reading an old snapshot; the old pages stay in the WAL
            # (sealed under a destroyed key) until the next checkpoint overwrites them.
            logger.warning("WAL checkpoint incomplete after shredding: a reader is active")

    # ---- examples and feedback --------------------------------------------------------------

    def add_examples(self, user: str, examples: Iterable[Example]) -> list[int]:
        """Add examples in one transaction; returns their new ids, in order."""
        user = check_user(user)
        items = _typed(examples, Example, "examples")
        return self._add(user, "examples", [encode_json(e.to_json()) for e in items])

    def examples(self, user: str) -> list[Example]:
        """All of the user's examples, by id (oldest first)."""
        return [example_from_json(decode_json(p), i) for i, p in self._read_table(user, "examples")]

    def update_examples(self, user: str, examples: Iterable[Example]) -> None:
        """Replace examples in place (matched by `id`); every id must exist."""
        user = check_user(user)
        items = _typed(examples, Example, "examples")
        if any(e.id is None for e in items):
            raise InvalidInputError("update_examples needs examples with their ids set")
        ids = _check_ids([e.id for e in items if e.id is not None], "example ids")
        with self._txn(write=True) as txn:
            found = txn.user(user, create=False)
            if found is None:
                raise InvalidInputError("this user has no examples to update")
            txn.reserve(found, len(items))
            updates = []
            for rid, item in zip(ids, items, strict=True):
                row = txn.conn.execute(
                    "SELECT body FROM examples WHERE id = ? AND uid = ?", (rid, found.uid)
                ).fetchone()
                if row is None:
                    raise InvalidInputError(f"no example with id {rid} for this user")
                txn.unaccount(found, "examples", row[0])
                body = txn.seal(found, "examples", _rec([rid]), encode_json(item.to_json()))
                updates.append((body, rid))
            txn.conn.executemany("UPDATE examples SET body = ? WHERE id = ?", updates)

    def delete_examples(self, user: str, ids: Iterable[int]) -> int:
        """Delete examples (and their cached embeddings); returns how many existed."""
        id_list = _check_ids(ids, "ids")
        return self._delete(user, ("examples", "embeddings"), id_list)

    def add_feedback(self, user: str, events: Iterable[Feedback]) -> list[int]:
        """Add feedback events in one transaction; returns their new ids."""
        user = check_user(user)
        items = _typed(events, Feedback, "events")
        return self._add(user, "feedback", [encode_json(e.to_json()) for e in items])

    def feedback(self, user: str) -> list[Feedback]:
        """All of the user's feedback events, by id."""
        return [
            feedback_from_json(decode_json(p), i) for i, p in self._read_table(user, "feedback")
        ]

    def delete_feedback(self, user: str, ids: Iterable[int]) -> int:
        return self._delete(user, ("feedback",), _check_ids(ids, "ids"))

    def _add(self, user: str, table: str, plaintexts: list[bytes]) -> list[int]:
        if not plaintexts:
            return []
        with self._txn(write=True) as txn:
            found = txn.user(user, create=True)
            assert found is not None  # create=True always yields a user
            txn.reserve(found, len(plaintexts))
            # AUTOINCREMENT hands out max(ever used) + 1; taking the ids up front lets one
            # executemany insert the whole batch, and ids are never reused after deletes.
            (seq,) = txn.conn.execute(
                "SELECT coalesce(max(seq), 0) FROM sqlite_sequence WHERE name = ?", (table,)
            ).fetchone()
            (top,) = txn.conn.execute(f"SELECT coalesce(max(id), 0) FROM {table}").fetchone()
            first = max(int(seq), int(top)) + 1
            ids = list(range(first, first + len(plaintexts)))
            rows = [
                (rid, found.uid, txn.seal(found, table, _rec([rid]), plain))
                for rid, plain in zip(ids, plaintexts, strict=True)
            ]
            txn.conn.executemany(f"INSERT INTO {table} (id, uid, body) VALUES (?, ?, ?)", rows)
        return ids

    def _read_table(self, user: str, table: str) -> list[tuple[int, bytes]]:
        user = check_user(user)
        with self._txn(write=False) as txn:
            txn.verify_users()
            found = txn.user(user, create=False)
            if found is None:
                return []
            return [(keys[0], plain) for keys, plain in txn.rows(found, table)]

    def _delete(self, user: str, tables: Sequence[str], ids: list[int]) -> int:
        user = check_user(user)
        if not ids:
            return 0
        removed = 0
        with self._txn(write=True) as txn:
            found = txn.user(user, create=False)
            if found is None:
                return 0
            for table in tables:
                for rid in ids:
                    row = txn.conn.execute(
                        f"SELECT body FROM {table} WHERE uid = ? AND id = ?", (found.uid, rid)
                    ).fetchone()
                    if row is None:
                        continue
                    txn.unaccount(found, table, row[0])
                    txn.conn.execute(
                        f"DELETE FROM {table} WHERE uid = ? AND id = ?", (found.uid, rid)
                    )
                    removed += table == tables[0]
        return removed

    # ---- embeddings -------------------------------------------------------------------------

    def put_embeddings(
        self, user: str, vectors: Mapping[int, np.ndarray], *, only_examples: bool = False
    ) -> int:
        """Cache embedding vectors keyed by example id (stored as float32; replaces old).
        Returns how many were stored.

        With `only_examples`, a vector is stored only if its id is one of the user's
        examples at the time of the write (checked in the same transaction), and a user
        with no data is not created: vectors computed from examples that were deleted or
        shredded meanwhile are dropped, never written back.
        """
        user = check_user(user)
        if not isinstance(vectors, Mapping):
            raise InvalidInputError("vectors must be a mapping of example id to array")
        ids = _check_ids(vectors.keys(), "embedding keys")
        encoded = [encode_array(vectors[i]) for i in ids]
        if not ids:
            return 0
        with self._txn(write=True) as txn:
            found = txn.user(user, create=not only_examples)
            if found is None:
                return 0
            if only_examples:
                current: set[int] = set()
                for start in range(0, len(ids), 500):  # within SQLite's variable limit
                    chunk = ids[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    current.update(
                        int(row[0])
                        for row in txn.conn.execute(
                            f"SELECT id FROM examples WHERE uid = ? AND id IN ({marks})",
                            (found.uid, *chunk),
                        )
                    )
                kept = [(i, e) for i, e in zip(ids, encoded, strict=True) if i in current]
                ids, encoded = [i for i, _ in kept], [e for _, e in kept]
                if not ids:
                    return 0
            txn.reserve(found, len(ids))
            rows = []
            for rid, plain in zip(ids, encoded, strict=True):
                old = txn.conn.execute(
                    "SELECT body FROM embeddings WHERE uid = ? AND id = ?", (found.uid, rid)
                ).fetchone()
                if old is not None:
                    txn.unaccount(found, "embeddings", old[0])
                rows.append((found.uid, rid, txn.seal(found, "embeddings", _rec([rid]), plain)))
            txn.conn.executemany(
                "INSERT OR REPLACE INTO embeddings (uid, id, body) VALUES (?, ?, ?)", rows
            )
        return len(ids)

    def embeddings(self, user: str) -> dict[int, np.ndarray]:
        """All cached embeddings of the user: example id -> float32 array."""
        return {i: decode_array(p) for i, p in self._read_table(user, "embeddings")}

    def delete_embeddings(self, user: str, ids: Iterable[int] | None = None) -> int:
        """Drop cached embeddings (all of them when `ids` is None)."""
        if ids is None:
            ids = list(self.embeddings(user))
        return self._delete(user, ("embeddings",), _check_ids(ids, "ids"))

    # ---- blobs ------------------------------------------------------------------------------

    def put_blob(self, user: str, name: str, data: bytes, *, keep: int | None = None) -> int:
        """Store a new version of a named blob (adapter, optimizer state, checkpoint).

        Returns its version (1, 2, ...; never reused). With `keep`, only the newest `keep`
        versions remain afterwards.
        """
        user = check_user(user)
        name = _check_name(name, "blob name")
        payload = _check_blob(data)
        _check_keep(keep)
        with self._txn(write=True) as txn:
            found = txn.user(user, create=True)
            assert found is not None
            return self._write_blob(txn, found, name, payload, keep)

    def update_blob(
        self,
        user: str,
        name: str,
        update: Callable[[bytes | None], bytes],
        *,
        keep: int | None = None,
    ) -> int:
        """Read the newest version of a blob and store `update(newest)` (None when there is
        none) as the next, in one write transaction: no other writer, in this process or
        another, comes in between. `update` runs inside that transaction and must not call
        the store. Returns the new version."""
        user = check_user(user)
        name = _check_name(name, "blob name")
        if not callable(update):
            raise InvalidInputError("update must be a function of the newest blob (or None)")
        _check_keep(keep)
        with self._txn(write=True) as txn:
            txn.verify_users()
            found = txn.user(user, create=True)
            assert found is not None
            payload = _check_blob(update(self._read_blob(txn, found, name, None)))
            return self._write_blob(txn, found, name, payload, keep)

    def _write_blob(
        self, txn: _Txn, found: _User, name: str, payload: bytes, keep: int | None
    ) -> int:
        txn.reserve(found, 1)
        tag = self._tag(b"blob", found.uid, name)
        entry = found.blobs.setdefault(tag.hex(), {"name": name, "next": 1, "versions": []})
        version = int(entry["next"])
        entry["next"] = version + 1
        body = txn.seal(found, "blobs", _rec([tag, version]), payload)
        txn.conn.execute(
            "INSERT INTO blobs (uid, name, version, body) VALUES (?, ?, ?, ?)",
            (found.uid, tag, version, body),
        )
        entry["versions"].append(version)
        if keep is not None:
            for old in entry["versions"][:-keep]:
                self._drop_blob(txn, found, tag, old)
            entry["versions"] = entry["versions"][-keep:]
        return version

    def get_blob(self, user: str, name: str, version: int | None = None) -> bytes | None:
        """A blob version (the newest when `version` is None), or None if there is none."""
        user = check_user(user)
        name = _check_name(name, "blob name")
        version = _check_version(version)
        with self._txn(write=False) as txn:
            txn.verify_users()
            found = txn.user(user, create=False)
            if found is None:
                return None
            return self._read_blob(txn, found, name, version)

    def _read_blob(self, txn: _Txn, found: _User, name: str, version: int | None) -> bytes | None:
        tag = self._tag(b"blob", found.uid, name)
        versions = found.blobs.get(tag.hex(), {}).get("versions", [])
        if version is None and versions:
            version = versions[-1]
        if version not in versions:
            return None
        assert version is not None
        body = self._blob_body(txn, found, tag, version)
        return found.key.open(body, ad("blobs", found.uid, _rec([tag, version]), "body"))

    def blobs(self, user: str) -> dict[str, list[int]]:
        """The user's blob names and their stored versions (oldest first)."""
        user = check_user(user)
        with self._txn(write=False) as txn:
            txn.verify_users()
            found = txn.user(user, create=False)
            if found is None:
                return {}
            return {e["name"]: list(e["versions"]) for e in found.blobs.values() if e["versions"]}

    def delete_blob(self, user: str, name: str, version: int | None = None) -> int:
        """Delete one version, or every version when `version` is None; returns the count."""
        user = check_user(user)
        name = _check_name(name, "blob name")
        version = _check_version(version)
        with self._txn(write=True) as txn:
            found = txn.user(user, create=False)
            if found is None:
                return 0
            tag = self._tag(b"blob", found.uid, name)
            entry = found.blobs.get(tag.hex())
            if entry is None:
                return 0
            doomed = [v for v in entry["versions"] if version is None or v == version]
            for old in doomed:
                self._drop_blob(txn, found, tag, old)
            entry["versions"] = [v for v in entry["versions"] if v not in doomed]
            found.dirty = True
            return len(doomed)

    @staticmethod
    def _blob_body(txn: _Txn, user: _User, tag: bytes, version: int) -> bytes:
        """The sealed body of a blob version the user's manifest lists."""
        row = txn.conn.execute(
            "SELECT body FROM blobs WHERE uid = ? AND name = ? AND version = ?",
            (user.uid, tag, version),
        ).fetchone()
        if row is None:
            raise TamperedError("a blob listed in the user's manifest is missing")
        return _blob(row[0])

    @classmethod
    def _drop_blob(cls, txn: _Txn, user: _User, tag: bytes, version: int) -> None:
        txn.unaccount(user, "blobs", cls._blob_body(txn, user, tag, version))
        txn.conn.execute(
            "DELETE FROM blobs WHERE uid = ? AND name = ? AND version = ?",
            (user.uid, tag, version),
        )

    # ---- state ------------------------------------------------------------------------------

    def set_state(self, user: str, key: str, value: JSONValue, *, create: bool = True) -> bool:
        """Set a small JSON value (federated bookkeeping: round ids, budgets spent). With
        `create=False` a user with no data is left so (returns False, nothing written)."""
        user = check_user(user)
        key = _check_name(key, "state key")
        check_json(value, "state value")
        plain = encode_json({"v": FORMAT_VERSION, "key": key, "value": value})
        with self._txn(write=True) as txn:
            found = txn.user(user, create=create)
            if found is None:
                return False
            txn.reserve(found, 1)
            tag = self._tag(b"state", found.uid, key)
            old = txn.conn.execute(
                "SELECT body FROM state WHERE uid = ? AND key = ?", (found.uid, tag)
            ).fetchone()
            if old is not None:
                txn.unaccount(found, "state", old[0])
            body = txn.seal(found, "state", _rec([tag]), plain)
            txn.conn.execute(
                "INSERT OR REPLACE INTO state (uid, key, body) VALUES (?, ?, ?)",
                (found.uid, tag, body),
            )
        return True

    def state(self, user: str) -> dict[str, JSONValue]:
        """All of the user's state values."""
        out: dict[str, JSONValue] = {}
        for _, plain in self._read_table(user, "state"):
            obj = decode_json(plain)
            if not isinstance(obj.get("key"), str) or "value" not in obj:
                raise TamperedError("an authenticated state record is malformed")
            out[obj["key"]] = obj["value"]
        return out

    def get_state(self, user: str, key: str, default: JSONValue = None) -> JSONValue:
        # Through the full, manifest-checked read: a deleted row must not read as `default`.
        return self.state(user).get(_check_name(key, "state key"), default)

    def delete_state(self, user: str, key: str) -> bool:
        user = check_user(user)
        key = _check_name(key, "state key")
        with self._txn(write=True) as txn:
            found = txn.user(user, create=False)
            if found is None:
                return False
            tag = self._tag(b"state", found.uid, key)
            old = txn.conn.execute(
                "SELECT body FROM state WHERE uid = ? AND key = ?", (found.uid, tag)
            ).fetchone()
            if old is None:
                return False
            txn.unaccount(found, "state", old[0])
            txn.conn.execute("DELETE FROM state WHERE uid = ? AND key = ?", (found.uid, tag))
            return True

    # ---- keys -------------------------------------------------------------------------------

    def rotate_user_key(self, user: str) -> None:
        """Re-encrypt all of a user's data under a fresh data key."""
        user = check_user(user)
        with self._txn(write=True) as txn:
            found = txn.user(user, create=False)
            if found is None:
                raise InvalidInputError("this user has no data in the store")
            txn.rotate(found)

    def rotate_kek(self, new_key: KeyProvider) -> None:
        """Re-wrap the store secret and every data key under a new KEK (no data re-encrypted).

        The store is then opened with `new_key`. A keystore entry of the old KEK is deleted.
        """
        if not isinstance(new_key, KeyProvider):
            raise InvalidInputError("new_key must be a KeyringKey, PassphraseKey or RawKey")
        kek, params = new_key.new_kek()
        old_params = self._kek_params
        with self._txn(write=True) as txn:
            wrapped = _rewrap(txn.conn, self._store_id, self._kek, kek, params)
            txn.conn.execute(
                "INSERT OR REPLACE INTO meta (k, v) VALUES ('kek_retired', ?)",
                (json.dumps(old_params).encode(),),
            )
            self._kek, self._kek_params, self._wrapped_secret = kek, dict(params), wrapped
        self._user_keys.clear()
        self._retire(json.dumps(old_params).encode())

    # ---- backup -----------------------------------------------------------------------------

    def export_backup(self, dest: str | os.PathLike[str], key: KeyProvider) -> None:
        """Write an encrypted backup of the whole store to `dest` (must not exist).

        The backup opens with `key` alone (e.g. a PassphraseKey to move to a new device).
        """
        target = _new_path(dest, "dest")
        if not isinstance(key, KeyProvider):
            raise InvalidInputError("key must be a KeyringKey, PassphraseKey or RawKey")
        kek, params = key.new_kek()
        snapshot = target.with_name(f".{target.name}.{_crypto.random_bytes(4).hex()}.snapshot")
        try:
            with self._mutex:
                if self._closed:
                    raise InvalidInputError("the store is closed")
                self._conn.execute("VACUUM INTO ?", (str(snapshot),))
            conn = sqlite3.connect(snapshot, isolation_level=None)
            try:
                conn.execute("PRAGMA journal_mode = DELETE")
                conn.execute("BEGIN IMMEDIATE")
                _rewrap(conn, self._store_id, self._kek, kek, params)
                conn.execute("DELETE FROM meta WHERE k = 'kek_retired'")
                conn.execute("COMMIT")
            finally:
                conn.close()
            _backup.write_backup(snapshot, target, kek, params)
        except _DB_ERRORS as exc:
            raise _sqlite_error(exc) from exc
        except OSError as exc:
            raise StorageError(f"cannot write the backup ({exc.strerror})") from exc
        finally:
            for leftover in ("", "-journal", "-wal", "-shm"):
                Path(f"{snapshot}{leftover}").unlink(missing_ok=True)

    @classmethod
    def import_backup(
        cls,
        backup: str | os.PathLike[str],
        path: str | os.PathLike[str],
        key: KeyProvider,
        config: StoreConfig | None = None,
    ) -> Store:
        """Restore a backup into a new store at `path` (must not exist) and open it.

        The restored store starts a new rollback history at the backup's state.
        """
        source = check_path(backup, "backup")
        if not source.is_file():
            raise InvalidInputError("backup must be the path of an existing backup file")
        target = _new_path(path, "path")
        if not isinstance(key, KeyProvider):
            raise InvalidInputError("key must be a KeyringKey, PassphraseKey or RawKey")
        config = StoreConfig() if config is None else config
        staging = target.with_name(f".{target.name}.{_crypto.random_bytes(4).hex()}.importing")
        try:
            _backup.read_backup(source, staging, key)
            check = cls.open(staging, key, replace(config, rollback_counter=None, create=False))
            try:
                check.integrity_check()
                store_id, counter_key = check._store_id, check._counter_key
                with check._txn(write=False) as txn:
                    counter_value = txn.counter
            finally:
                check.close()
            os.link(staging, target)
            _fsync_dir(target.parent)
        except FileExistsError:
            raise InvalidInputError(
                "a store already exists at path; refusing to overwrite"
            ) from None
        except OSError as exc:
            raise StorageError(f"cannot write the restored store ({exc.strerror})") from exc
        finally:
            for leftover in ("", "-wal", "-shm"):
                Path(f"{staging}{leftover}").unlink(missing_ok=True)
        counter = open_counter(config.rollback_counter, target)
        if counter is not None:
            counter.reset(counter_key, store_id, counter_value)
        return cls.open(target, key, config)

    # ---- integrity, locks, lifecycle -------------------------------------------------------

    def integrity_check(self) -> None:
        """Verify the whole file: SQLite structure, state tag, every manifest, every record.

        Raises TamperedError on the first problem; returns None if everything verifies.
        """
        with self._txn(write=False) as txn:
            problems = [r for (r,) in txn.conn.execute("PRAGMA integrity_check") if r != "ok"]
            if problems:
                raise TamperedError("SQLite reports structural damage; restore from a backup")
            txn.verify_users()
            for found in txn.all_users():
                for table in _schema.TABLES:
                    txn.rows(found, table)

    def _locks_folder(self) -> Path:
        return self._path.with_name(self._path.name + ".locks")

    def _remove_orphan_locks(self) -> None:
        """Remove the lock files of users with no data that nobody holds: left by a process
        killed between a forget's shred and its removal of the user's lock file, which would
        otherwise go on saying that this user trained here."""
        try:
            names = {n for n in os.listdir(self._locks_folder()) if _LOCK_NAME.fullmatch(n)}
        except OSError:  # no folder yet, or unreadable: nothing to clean
            return
        if not names:
            return
        with self._txn(write=False) as txn:
            known = {_blob(uid).hex()[:32] for (uid,) in txn.conn.execute("SELECT uid FROM users")}
        for name in sorted(names - known):
            try:
                lock = UserLock(self._locks_folder() / name)
            except (LockedError, StorageError, UnsupportedError):  # held by a trainer now
                continue
            lock.remove()

    def lock_user(self, user: str) -> UserLock:
        """Take this user's cross-process advisory lock, or raise LockedError if held.

        Use it as a context manager: ``with store.lock_user(uid): train(...)``.
        """
        uid = self._pseudonym(check_user(user))
        return UserLock(self._locks_folder() / f"{uid.hex()[:32]}")

    def close(self) -> None:
        with self._mutex:
            if not self._closed:
                self._closed = True
                self._user_keys.clear()
                self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _rollback_missing() -> RollbackError:
    return RollbackError(
        "the store file is missing but its rollback counter exists: the store was deleted "
        "or moved. Restore it, import a backup, or delete the counter to start afresh"
    )


def _rollback_older(found: int, recorded: int) -> RollbackError:
    return RollbackError(
        f"the store is at write {found} but this device recorded write {recorded}: an "
        "older copy replaced it. Restore the current file or import a backup deliberately"
    )


def _typed(items: Iterable[Any], kind: type, what: str) -> list[Any]:
    if isinstance(items, str | bytes) or not isinstance(items, Iterable):
        raise InvalidInputError(f"{what} must be an iterable of {kind.__name__}")
    out = list(items)
    for item in out:
        if not isinstance(item, kind):
            raise InvalidInputError(f"{what} must contain only {kind.__name__} objects")
    return out


def _new_path(value: object, what: str) -> Path:
    target = check_path(value, what)
    if target.exists():
        raise InvalidInputError(f"{what} already exists; refusing to overwrite it")
    return target


def _rewrap(
    conn: sqlite3.Connection,
    store_id: bytes,
    old_kek: bytes,
    new_kek: bytes,
    params: Mapping[str, Any],
) -> bytes:
    """Re-wrap the store secret and every user's data key under `new_kek`; returns the
    newly wrapped secret."""
    (wrapped,) = conn.execute("SELECT v FROM meta WHERE k = 'secret'").fetchone()
    secret = _crypto.unwrap_key(old_kek, _blob(wrapped), _secret_ad(store_id))
    rewrapped = _crypto.wrap_key(new_kek, secret, _secret_ad(store_id))
    conn.executemany(
        "UPDATE meta SET v = ? WHERE k = ?",
        [(rewrapped, "secret"), (json.dumps(dict(params)).encode(), "kek")],
    )
    updates = []
    for uid, user_wrapped in conn.execute("SELECT uid, wrapped_key FROM users").fetchall():
        key_ad = _user_key_ad(store_id, _blob(uid))
        try:
            key = _crypto.unwrap_key(old_kek, _blob(user_wrapped), key_ad)
        except WrongKeyError:
            raise TamperedError("a user's data key failed authentication") from None
        updates.append((_crypto.wrap_key(new_kek, key, key_ad), uid))
    conn.executemany("UPDATE users SET wrapped_key = ? WHERE uid = ?", updates)
    return rewrapped


def _create(path: Path, key: KeyProvider, config: StoreConfig) -> None:
    """Build a new store under a temporary name, then link it into place atomically.

    Linking fails if another process created the store first; then that store is used and
    the KEK made here is retired.
    """
    kek, params = key.new_kek()
    store_id = _crypto.random_bytes(16)
    secret = _crypto.random_key()
    counter_key = _crypto.subkey(secret, b"edgeperso.store counter")
    digest = bytes(32)
    state = (b"state", store_id, (0).to_bytes(8, "big"), digest)
    staging = path.with_name(f".{path.name}.{_crypto.random_bytes(4).hex()}.creating")
    try:
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        conn = _connect(staging, config.busy_timeout_s)
        try:
            conn.execute("BEGIN IMMEDIATE")
            _schema.create(conn)
            conn.executemany(
                "INSERT INTO meta (k, v) VALUES (?, ?)",
                [
                    ("format", FORMAT_VERSION),
                    ("store_id", store_id),
                    ("kek", json.dumps(params).encode()),
                    ("secret", _crypto.wrap_key(kek, secret, _secret_ad(store_id))),
                    ("counter", 0),
                    ("digest", digest),
                    ("tag", _crypto.mac(counter_key, *state)),
                ],
            )
            conn.execute("COMMIT")
        finally:
            conn.close()  # the last close checkpoints the WAL into the file and removes it
        fd = os.open(staging, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(staging, path)
        except FileExistsError:
            _keys.retire(params)
            return
        _fsync_dir(path.parent)
    except _DB_ERRORS as exc:
        raise _sqlite_error(exc) from exc
    except OSError as exc:
        raise StorageError(f"cannot create the store ({exc.strerror})") from exc
    finally:
        for leftover in ("", "-wal", "-shm"):
            Path(f"{staging}{leftover}").unlink(missing_ok=True)
    counter = open_counter(config.rollback_counter, path)
    if counter is not None:
        counter.reset(counter_key, store_id, 0)
