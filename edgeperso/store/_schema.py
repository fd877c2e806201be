"""The store's SQLite schema and its migrations (schema version = PRAGMA user_version).

Visible in clear by design: table shapes, row counts, ciphertext sizes (plaintext + 29 bytes),
record ids (insertion order), user pseudonyms (HMAC of the app's user id), blob and state-key
pseudonyms, blob version numbers. Everything else is a sealed BLOB.
"""

from __future__ import annotations

import sqlite3

from edgeperso._errors import TamperedError, UnsupportedError

__all__ = ["APPLICATION_ID", "SCHEMA_VERSION", "TABLES", "check_version", "create", "migrate"]

# "EPst": lets `file` and our own open tell an EdgePerso store from another SQLite file.
APPLICATION_ID = 0x45507374

# Record tables and the columns (besides uid) that identify a row; each row's sealed body
# is bound to (table, uid, these columns) through the AEAD's associated data.
TABLES: dict[str, tuple[str, ...]] = {
    "examples": ("id",),
    "feedback": ("id",),
    "embeddings": ("id",),
    "blobs": ("name", "version"),
    "state": ("key",),
}

# _MIGRATIONS[i] takes a database from schema version i to i + 1; index 0 creates it.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE meta (k TEXT PRIMARY KEY, v BLOB NOT NULL) WITHOUT ROWID;
    CREATE TABLE users (
        uid BLOB PRIMARY KEY,
        wrapped_key BLOB NOT NULL,
        manifest BLOB NOT NULL
    ) WITHOUT ROWID;
    CREATE TABLE examples (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        uid BLOB NOT NULL,
        body BLOB NOT NULL
    );
    CREATE INDEX examples_uid ON examples (uid, id);
    CREATE TABLE feedback (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        uid BLOB NOT NULL,
        body BLOB NOT NULL
    );
    CREATE INDEX feedback_uid ON feedback (uid, id);
    CREATE TABLE embeddings (
        uid BLOB NOT NULL,
        id INTEGER NOT NULL,
        body BLOB NOT NULL,
        PRIMARY KEY (uid, id)
    ) WITHOUT ROWID;
    CREATE TABLE blobs (
        uid BLOB NOT NULL,
        name BLOB NOT NULL,
        version INTEGER NOT NULL,
        body BLOB NOT NULL,
        PRIMARY KEY (uid, name, version)
    );
    CREATE TABLE state (
        uid BLOB NOT NULL,
        key BLOB NOT NULL,
        body BLOB NOT NULL,
        PRIMARY KEY (uid, key)
    ) WITHOUT ROWID;
    """,
)
SCHEMA_VERSION = len(_MIGRATIONS)


def create(conn: sqlite3.Connection) -> None:
    """Create the current schema in an empty database, inside the caller's transaction."""
    migrate(conn, 0)
    conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")


def check_version(version: int) -> None:
    """Raise unless a store at schema `version` can be opened (possibly after migrating)."""
    if version > SCHEMA_VERSION:
        raise UnsupportedError(
            f"this store has schema version {version}, newer than this EdgePerso supports "
            f"({SCHEMA_VERSION}); upgrade EdgePerso to open it"
        )
    if version < 0:
        raise TamperedError("the store's schema version is negative: the header is damaged")


def migrate(conn: sqlite3.Connection, version: int) -> None:
    """Bring the schema from `version` to SCHEMA_VERSION, inside the caller's transaction."""
    check_version(version)
    for step in range(version, SCHEMA_VERSION):
        # executescript would COMMIT the caller's transaction; run statements one by one.
        for statement in _MIGRATIONS[step].split(";"):
            if statement.strip():
                conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
