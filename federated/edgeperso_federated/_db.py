"""The coordinator's state: SQLAlchemy Core tables on SQLite (default) or PostgreSQL.

Everything a round needs to resume after a restart is here. A secure round stores no
individual contribution at all, only the running sum of its masked inputs; a plain round
stores its float32 updates. Both are deleted when the round ends.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event

metadata = sa.MetaData()

apps = sa.Table(
    "apps",
    metadata,
    sa.Column("app_id", sa.String(64), primary_key=True),
    sa.Column("enrolment_key_hash", sa.String(64), nullable=False),
    sa.Column("epsilon_budget", sa.Float, nullable=True),
    sa.Column("delta", sa.Float, nullable=False),
)

devices = sa.Table(
    "devices",
    metadata,
    sa.Column("device_id", sa.String(32), primary_key=True),
    sa.Column("app_id", sa.String(64), sa.ForeignKey("apps.app_id"), nullable=False),
    sa.Column("token_hash", sa.String(64), nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)

models = sa.Table(
    "models",
    metadata,
    sa.Column("app_id", sa.String(64), sa.ForeignKey("apps.app_id"), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("layout", sa.Text, nullable=False),  # JSON: params, num_personas, summary_dim
    sa.Column("tensors", sa.LargeBinary, nullable=False),  # safetensors
    sa.Column("round_id", sa.String(32), nullable=True),  # the round that produced it
)

rounds = sa.Table(
    "rounds",
    metadata,
    sa.Column("round_id", sa.String(32), primary_key=True),
    sa.Column("app_id", sa.String(64), sa.ForeignKey("apps.app_id"), nullable=False),
    sa.Column("config", sa.Text, nullable=False),  # JSON RoundConfig
    sa.Column("stage", sa.String(16), nullable=False),
    sa.Column("stage_deadline", sa.Float, nullable=False),
    sa.Column("cohort", sa.Integer, nullable=True),  # devices that joined
    sa.Column("neighbours", sa.Integer, nullable=True),
    sa.Column("threshold", sa.Integer, nullable=True),
    sa.Column("graph_seed", sa.BigInteger, nullable=True),
    sa.Column("published_version", sa.Integer, nullable=True),
    sa.Column("reason", sa.Text, nullable=True),  # why it aborted
    sa.Column("created", sa.Float, nullable=False),
)

participants = sa.Table(
    "participants",
    metadata,
    sa.Column("round_id", sa.String(32), sa.ForeignKey("rounds.round_id"), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("device_id", sa.String(32), nullable=False),
    sa.Column("c_pk", sa.LargeBinary, nullable=True),
    sa.Column("s_pk", sa.LargeBinary, nullable=True),
    # Digests of what each stage received: an identical retry is accepted, a different
    # second submission is a replay and is refused.
    sa.Column("join_digest", sa.String(64), nullable=False),
    sa.Column("shares_digest", sa.String(64), nullable=True),
    sa.Column("upload_digest", sa.String(64), nullable=True),
    sa.Column("reveal_digest", sa.String(64), nullable=True),
    sa.UniqueConstraint("round_id", "device_id"),
    # "Has every device that reached the previous stage submitted this one?" is asked after
    # each submission; these indexes find the devices still pending without scanning the round.
    sa.Index("ix_participants_shares_pending", "round_id", "shares_digest"),
    sa.Index("ix_participants_upload_pending", "round_id", "upload_digest", "shares_digest"),
    sa.Index("ix_participants_reveal_pending", "round_id", "reveal_digest", "upload_digest"),
    # A joining device's keys must not repeat any key already in the round.
    sa.Index("ix_participants_c_pk", "round_id", "c_pk"),
    sa.Index("ix_participants_s_pk", "round_id", "s_pk"),
)

shares = sa.Table(
    "shares",
    metadata,
    sa.Column("round_id", sa.String(32), primary_key=True),
    sa.Column("sender", sa.Integer, primary_key=True),
    sa.Column("recipient", sa.Integer, primary_key=True),
    sa.Column("sealed", sa.LargeBinary, nullable=False),  # AES-GCM: only the recipient opens it
    # A device's inbox and the senders it must reveal shares for. With `sender` in it, SQLite
    # prefers this index to the primary key's (which would scan the whole round).
    sa.Index("ix_shares_inbox", "round_id", "recipient", "sender"),
)

uploads = sa.Table(
    "uploads",
    metadata,
    sa.Column("round_id", sa.String(32), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True),
    sa.Column("vector", sa.LargeBinary, nullable=False),  # float32 update of a plain round
)

masked_sums = sa.Table(
    "masked_sums",
    metadata,
    sa.Column("round_id", sa.String(32), primary_key=True),
    # uint32 little-endian: sum of the masked inputs received so far, modulo 2^32. Updated in
    # the transaction that marks each upload, so it always matches the participants' digests.
    sa.Column("vector", sa.LargeBinary, nullable=False),
)

reveals = sa.Table(
    "reveals",
    metadata,
    sa.Column("round_id", sa.String(32), primary_key=True),
    sa.Column("sender", sa.Integer, primary_key=True),
    sa.Column("of_idx", sa.Integer, primary_key=True),
    sa.Column("kind", sa.String(1), nullable=False),  # "b": self-mask seed, "s": mask key
    sa.Column("share", sa.LargeBinary, nullable=False),
)

privacy = sa.Table(
    "privacy",
    metadata,
    sa.Column("round_id", sa.String(32), primary_key=True),
    sa.Column("app_id", sa.String(64), nullable=False),
    sa.Column("noise_multiplier", sa.Float, nullable=False),
    sa.Column("sampling_probability", sa.Float, nullable=False),
    sa.Column("epsilon", sa.Float, nullable=False),  # cumulative, after this round
    sa.Column("delta", sa.Float, nullable=False),
)


def _create_private(database: str | None) -> None:
    """Create a new SQLite file readable by its owner only, whatever the umask: it holds
    token hashes, masked uploads and per-persona sums. SQLite gives the -wal and -shm files
    the main file's permissions."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return
    # An existing database keeps the permissions its operator gave it; a folder that does not
    # exist is left for SQLite to report as it always has.
    with contextlib.suppress(OSError):
        os.close(os.open(database, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def connect(url: str, *, sqlite_synchronous: str = "NORMAL") -> sa.Engine:
    """An engine with the tables created; SQLite in WAL mode with foreign keys on."""
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    engine = sa.create_engine(url, future=True)
    if engine.dialect.name == "sqlite":
        _create_private(engine.url.database)

        @event.listens_for(engine, "connect")
        def _pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode survives a killed process; FULL also survives power loss.
            cursor.execute(f"PRAGMA synchronous={sqlite_synchronous}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

    metadata.create_all(engine)
    for table in metadata.sorted_tables:  # indexes added since an existing database was made
        for index in table.indexes:
            index.create(engine, checkfirst=True)
    return engine
