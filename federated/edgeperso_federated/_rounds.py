"""The coordinator: apps, devices, models and the round state machine over the database.

Secure round:  join -> share_keys -> masked_input -> unmasking -> published | aborted
Plain round:   join -> upload -> published | aborted

A stage closes early when every device expected in it has submitted, otherwise at its
deadline. Every transition is one database transaction, so a coordinator killed at any point
restarts into a consistent round that resumes (or aborts at its deadline); a new model version,
the round's "published" mark and its privacy-ledger entry are written in a single transaction.
Methods are synchronous and meant to be called from one event loop (one process).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import sqlalchemy as sa

from edgeperso import BudgetExhaustedError, EdgePersoError, InvalidInputError
from edgeperso.federation._crypto import check_public_key
from edgeperso.federation._layout import PersonaLayout
from edgeperso.federation._secagg import (
    SHARE_BYTES,
    fixed_point_scale,
    neighbours_of,
    secagg_params,
)
from edgeperso.federation._wire import decode_tensors, encode_tensors, expect_tensors
from edgeperso_federated import _aggregate, _privacy
from edgeperso_federated._config import CoordinatorConfig, RoundConfig
from edgeperso_federated._db import (
    apps,
    connect,
    devices,
    masked_sums,
    models,
    participants,
    privacy,
    reveals,
    rounds,
    shares,
    uploads,
)
from edgeperso_federated._errors import AuthError, NotFoundError, RoundConflictError

logger = logging.getLogger(__name__)

FINAL = ("published", "aborted")
_MAX_SEALED = 512  # bytes of one sealed share pair (nonce + 132 + tag, with room)
_DIGESTS = ("join_digest", "shares_digest", "upload_digest", "reveal_digest")
_ROUND_DATA = (uploads, masked_sums, shares, reveals)  # deleted when the round ends
_FLOAT32_SLACK = 1e-4  # relative: float32 rounding of a device's weight and summary
# Statements run on every request, built once (SQLAlchemy then reuses their compiled form).
_P = participants.c
_ROUND_BY_ID = sa.select(rounds).where(rounds.c.round_id == sa.bindparam("round_id"))
_PARTICIPANT = sa.select(participants).where(
    _P.round_id == sa.bindparam("round_id"), _P.device_id == sa.bindparam("device_id")
)
_MARK = {
    column: participants.update()
    .where(_P.round_id == sa.bindparam("in_round"), _P.idx == sa.bindparam("at_idx"))
    .values({column: sa.bindparam("digest")})
    for column in _DIGESTS[1:]
}
_PENDING = {
    (column, expected): sa.select(_P.idx)
    .where(_P.round_id == sa.bindparam("round_id"), _P[expected].is_not(None), _P[column].is_(None))
    .limit(1)
    for column, expected in [
        ("shares_digest", "join_digest"),
        ("upload_digest", "shares_digest"),
        ("upload_digest", "join_digest"),
        ("reveal_digest", "upload_digest"),
    ]
}
# Each term repeats the round so that SQLite can answer it from the (round_id, key) indexes.
_KEY_CLASH = sa.select(_P.idx).where(
    sa.or_(
        *(
            sa.and_(_P.round_id == sa.bindparam("round_id"), column == sa.bindparam(key))
            for column in (_P.c_pk, _P.s_pk)
            for key in ("c_pk", "s_pk")
        )
    )
)
_LAST_INDEX = sa.select(sa.func.max(_P.idx)).where(_P.round_id == sa.bindparam("round_id"))
_PEERS = sa.select(_P.idx, _P.c_pk, _P.s_pk).where(
    _P.round_id == sa.bindparam("round_id"), _P.idx.in_(sa.bindparam("around", expanding=True))
)
_INBOX = sa.select(shares.c.sender, shares.c.sealed).where(
    shares.c.round_id == sa.bindparam("round_id"), shares.c.recipient == sa.bindparam("recipient")
)
_MASKED_SUM = sa.select(masked_sums.c.vector).where(
    masked_sums.c.round_id == sa.bindparam("round_id")
)
_SET_MASKED_SUM = masked_sums.update().where(masked_sums.c.round_id == sa.bindparam("in_round"))
_SENDERS = (
    sa.select(shares.c.sender, participants.c.upload_digest.is_not(None).label("uploaded"))
    .join(
        participants,
        sa.and_(
            participants.c.round_id == shares.c.round_id, participants.c.idx == shares.c.sender
        ),
    )
    .where(
        shares.c.round_id == sa.bindparam("round_id"),
        shares.c.recipient == sa.bindparam("recipient"),
    )
)
_PROGRESS = sa.select(*(sa.func.count(participants.c[column]) for column in _DIGESTS)).where(
    participants.c.round_id == sa.bindparam("round_id")
)


@dataclasses.dataclass(frozen=True)
class Device:
    device_id: str
    app_id: str


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


class Coordinator:
    def __init__(self, config: CoordinatorConfig, engine: sa.Engine | None = None) -> None:
        self.config = config
        self.engine = engine or connect(
            config.database_url, sqlite_synchronous=config.sqlite_synchronous
        )
        self._tokens: dict[str, tuple[str, str]] = {}  # device_id -> (token hash, app_id)
        self._layouts: dict[tuple[str, int], str] = {}  # (app_id, version) -> layout JSON
        self._listeners: list[Callable[[str], None]] = []
        self._discard_finished()

    def on_stage_change(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def _notify(self, round_id: str) -> None:
        for listener in self._listeners:
            listener(round_id)

    # ---- apps and devices ------------------------------------------------------------------

    def create_app(self, app_id: str, epsilon_budget: float | None, delta: float) -> str:
        """Register an app; returns its enrolment key (shown once, stored hashed)."""
        if not 0 < delta < 1:
            raise InvalidInputError("delta must be in (0, 1); 1/population or smaller is usual")
        if epsilon_budget is not None and not epsilon_budget > 0:
            raise InvalidInputError("epsilon_budget must be positive (or null: no DP budget)")
        key = secrets.token_urlsafe(24)
        with self.engine.begin() as conn:
            if conn.execute(sa.select(apps.c.app_id).where(apps.c.app_id == app_id)).first():
                raise RoundConflictError(f"app {app_id!r} already exists")
            conn.execute(
                apps.insert().values(
                    app_id=app_id,
                    enrolment_key_hash=_hash(key),
                    epsilon_budget=epsilon_budget,
                    delta=delta,
                )
            )
        return key

    def enrol(self, app_id: str, enrolment_key: str) -> tuple[str, str]:
        """A new device of `app_id`: (device_id, token). The token is stored hashed."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(apps).where(apps.c.app_id == app_id)).first()
            if row is None or not hmac.compare_digest(row.enrolment_key_hash, _hash(enrolment_key)):
                raise AuthError("unknown app or wrong enrolment key")
            device_id, token = uuid.uuid4().hex, secrets.token_urlsafe(32)
            conn.execute(
                devices.insert().values(
                    device_id=device_id, app_id=app_id, token_hash=_hash(token), created=time.time()
                )
            )
        self._tokens[device_id] = (_hash(token), app_id)
        return device_id, token

    def authenticate(self, credential: str) -> Device:
        device_id, _, token = credential.partition(".")
        known = self._tokens.get(device_id)
        if known is None:
            with self.engine.connect() as conn:
                row = conn.execute(
                    sa.select(devices).where(devices.c.device_id == device_id)
                ).first()
            if row is None:
                raise AuthError("unknown device credential; enrol again")
            known = self._tokens[device_id] = (row.token_hash, row.app_id)
        if not hmac.compare_digest(known[0], _hash(token)):
            raise AuthError("wrong device credential; enrol again")
        return Device(device_id, known[1])

    # ---- models ------------------------------------------------------------------------------

    def put_model(self, app_id: str, version: int, payload: bytes) -> None:
        """Store an initial or operator-provided model version (safetensors + layout metadata)."""
        tensors, meta = decode_tensors(payload)
        layout = PersonaLayout.from_metadata(meta, "the model payload")
        expect_tensors(tensors, layout.model_tensors())
        with self.engine.begin() as conn:
            self._app(conn, app_id)
            if self._model_row(conn, app_id, version, missing_ok=True) is not None:
                raise RoundConflictError(f"model version {version} of {app_id!r} already exists")
            self._insert_model(conn, app_id, version, layout, tensors, None)

    def model(self, app_id: str, version: int | None) -> bytes:
        with self.engine.connect() as conn:
            if version is None:
                version = conn.execute(
                    sa.select(sa.func.max(models.c.version)).where(models.c.app_id == app_id)
                ).scalar()
                if version is None:
                    raise NotFoundError(f"app {app_id!r} has no model yet")
            return bytes(self._model_row(conn, app_id, version).tensors)

    def _insert_model(
        self,
        conn: sa.Connection,
        app_id: str,
        version: int,
        layout: PersonaLayout,
        tensors: dict[str, np.ndarray],
        round_id: str | None,
    ) -> None:
        layout_json = json.dumps(layout.to_json())
        blob = encode_tensors(tensors, {"version": str(version), "layout": layout_json})
        conn.execute(
            models.insert().values(
                app_id=app_id, version=version, layout=layout_json, tensors=blob, round_id=round_id
            )
        )

    def _model_row(
        self, conn: sa.Connection, app_id: str, version: int, *, missing_ok: bool = False
    ) -> Any:
        row = conn.execute(
            sa.select(models).where(models.c.app_id == app_id, models.c.version == version)
        ).first()
        if row is None and not missing_ok:
            raise NotFoundError(f"app {app_id!r} has no model version {version}")
        return row

    def _app(self, conn: sa.Connection, app_id: str) -> Any:
        row = conn.execute(sa.select(apps).where(apps.c.app_id == app_id)).first()
        if row is None:
            raise NotFoundError(f"no app {app_id!r}")
        return row

    # ---- rounds: operator side ---------------------------------------------------------------

    def create_round(self, config: RoundConfig) -> dict[str, Any]:
        if config.secure:  # devices fixed-point encode their inputs: refuse what cannot be
            try:
                fixed_point_scale(config.cohort_size, config.value_bound)
            except InvalidInputError as exc:
                raise InvalidInputError(
                    f"no device could encode this secure round's inputs: {exc} (the bound is "
                    "max(clip_norm, summary_clip, 1)), or run it with secure=false"
                ) from exc
        with self.engine.begin() as conn:
            app = self._app(conn, config.app_id)
            self._model_row(conn, config.app_id, config.model_version)
            busy = conn.execute(
                sa.select(rounds.c.round_id).where(
                    rounds.c.app_id == config.app_id, rounds.c.stage.not_in(FINAL)
                )
            ).first()
            if busy is not None:
                raise RoundConflictError(f"round {busy.round_id} of this app is still running")
            projected = None
            if app.epsilon_budget is not None:
                if config.noise_multiplier <= 0:
                    raise InvalidInputError(
                        "this app has a privacy budget: set noise_multiplier > 0"
                    )
                spent = self._dp_rounds(conn, config.app_id)
                projected = _privacy.epsilon(
                    [*spent, (config.noise_multiplier, config.sampling_probability)], app.delta
                )
                if projected > app.epsilon_budget:
                    raise BudgetExhaustedError(
                        f"this round would bring epsilon to {projected:.3f}, over the app's "
                        f"budget {app.epsilon_budget}; no further rounds can run for this app"
                    )
            round_id = uuid.uuid4().hex
            conn.execute(
                rounds.insert().values(
                    round_id=round_id,
                    app_id=config.app_id,
                    config=json.dumps(config.to_json()),
                    stage="join",
                    stage_deadline=time.time() + config.join_timeout_s,
                    created=time.time(),
                )
            )
        logger.info("round %s opened (cohort %d)", round_id, config.cohort_size)
        return {"round_id": round_id, "projected_epsilon": projected}

    def _dp_rounds(self, conn: sa.Connection, app_id: str) -> list[tuple[float, float]]:
        """(z, q) of every published round of the app: the releases that cost privacy."""
        rows = conn.execute(
            sa.select(rounds.c.config)
            .where(rounds.c.app_id == app_id, rounds.c.stage == "published")
            .order_by(rounds.c.created)
        ).all()
        configs = [_round_config(r.config) for r in rows]
        return [(c.noise_multiplier, c.sampling_probability) for c in configs]

    def privacy_ledger(self, app_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            self._app(conn, app_id)
            rows = conn.execute(
                sa.select(privacy).where(privacy.c.app_id == app_id).order_by(privacy.c.epsilon)
            ).all()
        return [dict(r._mapping) for r in rows]

    # ---- rounds: device side -------------------------------------------------------------------

    def status(self, round_id: str, app_id: str | None) -> dict[str, Any]:
        """The round's stage, deadline and outcome; `app_id` None skips the ownership check
        (for callers that already made it, such as long polls parked on the round)."""
        with self.engine.connect() as conn:
            if app_id is None:
                row = conn.execute(_ROUND_BY_ID, {"round_id": round_id}).one()
            else:
                row = self._round(conn, round_id, app_id)
        return {
            "round_id": round_id,
            "stage": row.stage,
            "stage_deadline": row.stage_deadline,
            "published_version": row.published_version,
            "reason": row.reason,
        }

    def task(self, app_id: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(rounds).where(rounds.c.app_id == app_id, rounds.c.stage == "join")
            ).first()
            if row is None:
                return None
            config = _round_config(row.config)
            layout = json.loads(self._layout_json(conn, app_id, config.model_version))
        scale = fixed_point_scale(config.cohort_size, config.value_bound) if config.secure else 1.0
        return {
            "round_id": row.round_id,
            "model_version": config.model_version,
            **layout,
            "clip_norm": config.clip_norm,
            "summary_clip": config.summary_clip,
            "weight_cap": config.weight_cap,
            "secure": config.secure,
            "fixed_point_scale": scale,
            "stage_deadline": row.stage_deadline,
        }

    def join(self, round_id: str, device: Device, c_pk: bytes | None, s_pk: bytes | None) -> int:
        notify = False
        with self.engine.begin() as conn:
            row, config = self._stage(conn, round_id, device, "join")
            digest = _digest(b"%s|%s" % (c_pk or b"", s_pk or b""))
            mine = self._participant(conn, round_id, device, missing_ok=True)
            if mine is not None:
                if mine.join_digest != digest:
                    raise RoundConflictError("this device already joined with other keys")
                return int(mine.idx)
            if config.secure:
                if c_pk is None or s_pk is None or len(c_pk) != 32 or len(s_pk) != 32:
                    raise InvalidInputError("a secure round needs 32-byte c_pk and s_pk")
                # A low-order key would make every honest neighbour's key agreement fail.
                check_public_key(c_pk, "c_pk")
                check_public_key(s_pk, "s_pk")
                keys = {"round_id": round_id, "c_pk": c_pk, "s_pk": s_pk}
                clash = conn.execute(_KEY_CLASH, keys).first()
                if clash is not None or c_pk == s_pk:
                    raise RoundConflictError("these public keys are already in use in this round")
            elif c_pk is not None or s_pk is not None:
                raise InvalidInputError("a plain round takes no keys")
            count = self._last_index(conn, round_id)
            conn.execute(
                participants.insert(),
                {
                    "round_id": round_id,
                    "idx": count + 1,
                    "device_id": device.device_id,
                    "c_pk": c_pk,
                    "s_pk": s_pk,
                    "join_digest": digest,
                },
            )
            if count + 1 >= config.cohort_size:
                self._close(conn, row, config)
                notify = True
        if notify:
            self._notify(round_id)
        return count + 1

    def neighbours(self, round_id: str, device: Device) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row, _ = self._stage(conn, round_id, device, "share_keys")
            me = self._participant(conn, round_id, device)
            around = neighbours_of(me.idx, row.cohort, row.neighbours, row.graph_seed)
            peers = conn.execute(_PEERS, {"round_id": round_id, "around": around}).all()
        return {
            "index": me.idx,
            "threshold": row.threshold,
            "neighbours": [{"index": p.idx, "c_pk": p.c_pk, "s_pk": p.s_pk} for p in peers],
        }

    def submit_shares(self, round_id: str, device: Device, sealed: dict[int, bytes]) -> None:
        with self.engine.begin() as conn:
            row, config = self._stage(conn, round_id, device, "share_keys")
            me = self._participant(conn, round_id, device)
            digest = _digest(json.dumps(sorted((k, v.hex()) for k, v in sealed.items())).encode())
            if self._resubmitted(me.shares_digest, digest):
                return
            around = set(neighbours_of(me.idx, row.cohort, row.neighbours, row.graph_seed))
            if set(sealed) != around:
                raise InvalidInputError(
                    "shares must go to exactly this device's neighbours, once each"
                )
            if any(not 28 <= len(c) <= _MAX_SEALED for c in sealed.values()):
                raise InvalidInputError(f"a sealed share must be 28..{_MAX_SEALED} bytes")
            conn.execute(
                shares.insert(),
                [
                    {"round_id": round_id, "sender": me.idx, "recipient": v, "sealed": c}
                    for v, c in sealed.items()
                ],
            )
            self._mark(conn, round_id, me.idx, "shares_digest", digest)
            done = self._all_done(conn, round_id, "shares_digest", "join_digest")
            if done:
                self._close(conn, row, config)
        if done:
            self._notify(round_id)

    def inbox(self, round_id: str, device: Device) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            self._stage(conn, round_id, device, "masked_input")
            me = self._participant(conn, round_id, device)
            if me.shares_digest is None:
                raise RoundConflictError("this device did not share its keys in time")
            rows = conn.execute(_INBOX, {"round_id": round_id, "recipient": me.idx}).all()
        return [{"from": r.sender, "sealed": r.sealed} for r in rows]

    def submit_upload(self, round_id: str, device: Device, payload: bytes) -> None:
        with self.engine.begin() as conn:
            row = self._round(conn, round_id, device.app_id)
            config = _round_config(row.config)
            self._expect_stage(row, "masked_input" if config.secure else "upload")
            me = self._participant(conn, round_id, device)
            if config.secure and me.shares_digest is None:
                raise RoundConflictError("this device did not share its keys in time")
            digest = _digest(payload)
            if self._resubmitted(me.upload_digest, digest):
                return
            layout = self._layout(conn, device.app_id, config)
            tensors, _ = decode_tensors(payload)
            if config.secure:
                expect_tensors(tensors, {"masked": ("U32", (layout.length,))})
                self._add_masked(conn, round_id, tensors["masked"])
            else:
                expect_tensors(tensors, {"update": ("F32", (layout.length,))})
                vector = tensors["update"]
                _check_plain(vector, layout, config)
                conn.execute(
                    uploads.insert(),
                    {"round_id": round_id, "idx": me.idx, "vector": vector.tobytes()},
                )
            self._mark(conn, round_id, me.idx, "upload_digest", digest)
            expected = "shares_digest" if config.secure else "join_digest"
            done = self._all_done(conn, round_id, "upload_digest", expected)
            if done:
                self._close(conn, row, config)
        if done:
            self._notify(round_id)

    def _add_masked(self, conn: sa.Connection, round_id: str, masked: np.ndarray) -> None:
        """The round's running sum of masked inputs += `masked` (uint32, wraps mod 2^32)."""
        stored = conn.execute(_MASKED_SUM, {"round_id": round_id}).scalar()
        if stored is None:
            conn.execute(masked_sums.insert(), {"round_id": round_id, "vector": masked.tobytes()})
            return
        total = np.add(np.frombuffer(stored, dtype="<u4"), masked, dtype="<u4")
        conn.execute(_SET_MASKED_SUM, {"in_round": round_id, "vector": total.tobytes()})

    def survivors(self, round_id: str, device: Device) -> list[int]:
        """Of this device and the neighbours that sent it shares, those whose masked input
        arrived: all a device needs to decide which share of each neighbour to reveal."""
        with self.engine.connect() as conn:
            self._stage(conn, round_id, device, "unmasking")
            me = self._participant(conn, round_id, device)
            alive = [v for v, uploaded in self._senders(conn, round_id, me.idx).items() if uploaded]
        return sorted([me.idx, *alive] if me.upload_digest is not None else alive)

    def submit_reveal(
        self, round_id: str, device: Device, revealed: list[tuple[int, str, bytes]]
    ) -> None:
        with self.engine.begin() as conn:
            row, config = self._stage(conn, round_id, device, "unmasking")
            me = self._participant(conn, round_id, device)
            if me.upload_digest is None:
                raise RoundConflictError("this device's masked input did not arrive in time")
            digest = _digest(json.dumps(sorted((o, k, s.hex()) for o, k, s in revealed)).encode())
            if self._resubmitted(me.reveal_digest, digest):
                return
            senders = self._senders(conn, round_id, me.idx)
            owners = [o for o, _, _ in revealed]
            if len(owners) != len(set(owners)) or set(owners) != set(senders):
                raise InvalidInputError("reveal one share for each neighbour that sent shares")
            for owner, kind, share in revealed:
                if kind != ("b" if senders[owner] else "s") or len(share) != SHARE_BYTES:
                    raise InvalidInputError("reveal b shares of survivors, s shares of the dropped")
            conn.execute(
                reveals.insert(),
                [
                    {"round_id": round_id, "sender": me.idx, "of_idx": o, "kind": k, "share": s}
                    for o, k, s in revealed
                ],
            )
            self._mark(conn, round_id, me.idx, "reveal_digest", digest)
            done = self._all_done(conn, round_id, "reveal_digest", "upload_digest")
            if done:
                self._close(conn, row, config)
        if done:
            self._notify(round_id)

    # ---- deadlines and transitions ------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Close every stage whose deadline has passed (called periodically and at start)."""
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            due = [
                r.round_id
                for r in conn.execute(
                    sa.select(rounds.c.round_id).where(
                        rounds.c.stage.not_in(FINAL), rounds.c.stage_deadline < now
                    )
                )
            ]
        for round_id in due:
            try:
                closed = self._close_due(round_id, now)
            except Exception:  # a database error, or a bug: one round must not stop the others
                logger.exception("round %s: closing its stage failed; retrying next tick", round_id)
                continue
            if closed:
                self._notify(round_id)

    def _close_due(self, round_id: str, now: float) -> bool:
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(rounds).where(rounds.c.round_id == round_id)).first()
            if row is None or row.stage in FINAL or row.stage_deadline >= now:
                return False
            self._close(conn, row, _round_config(row.config))
        return True

    def _close(self, conn: sa.Connection, row: Any, config: RoundConfig) -> None:
        round_id, stage = row.round_id, row.stage
        deadline = time.time() + config.stage_timeout_s
        if stage == "join":
            joined = self._last_index(conn, round_id)
            if joined < max(config.min_survivors, 2 if config.secure else 1):
                return self._abort(conn, round_id, f"only {joined} devices joined")
            if not config.secure:
                return self._set(
                    conn, round_id, stage="upload", stage_deadline=deadline, cohort=joined
                )
            params = secagg_params(joined, config.target_dropout)
            return self._set(
                conn,
                round_id,
                stage="share_keys",
                stage_deadline=deadline,
                cohort=joined,
                neighbours=params.neighbours,
                threshold=params.threshold,
                graph_seed=secrets.randbits(62),
            )
        column = {
            "share_keys": "shares_digest",
            "masked_input": "upload_digest",
            "upload": "upload_digest",
        }
        if stage in column:
            alive = self._progress(conn, round_id)[column[stage]]
            if alive < config.min_survivors:
                return self._abort(conn, round_id, f"only {alive} devices completed {stage}")
            if stage == "share_keys":
                return self._set(conn, round_id, stage="masked_input", stage_deadline=deadline)
            if stage == "masked_input":
                return self._set(conn, round_id, stage="unmasking", stage_deadline=deadline)
        return self._publish(conn, row, config)

    def _publish(self, conn: sa.Connection, row: Any, config: RoundConfig) -> None:
        round_id = row.round_id
        try:
            layout = self._layout(conn, row.app_id, config)
            result = self._result(conn, row, config, layout)
        except EdgePersoError as exc:  # raised before anything was written
            return self._abort(conn, round_id, f"the round's result could not be computed: {exc}")
        if result is None:
            return None
        new, epsilon = result
        version = (
            1
            + conn.execute(
                sa.select(sa.func.max(models.c.version)).where(models.c.app_id == row.app_id)
            ).scalar_one()
        )
        self._insert_model(conn, row.app_id, version, layout, new, round_id)
        if epsilon is not None:
            conn.execute(
                privacy.insert().values(
                    round_id=round_id,
                    app_id=row.app_id,
                    noise_multiplier=config.noise_multiplier,
                    sampling_probability=config.sampling_probability,
                    epsilon=epsilon,
                    delta=self._app(conn, row.app_id).delta,
                )
            )
        self._set(conn, round_id, stage="published", published_version=version)
        self._discard(conn, round_id)
        logger.info("round %s published model version %d", round_id, version)
        return None

    def _result(
        self, conn: sa.Connection, row: Any, config: RoundConfig, layout: PersonaLayout
    ) -> tuple[dict[str, np.ndarray], float | None] | None:
        """(the next model, the app's epsilon after it) without writing anything, or None if
        the round was aborted."""
        if config.secure:
            total = self._unmask(conn, row, layout, config)
            if total is None:
                return None
            scale = fixed_point_scale(config.cohort_size, config.value_bound)
            means = _aggregate.means_of_sum(
                _aggregate.add_noise(total, config),
                layout,
                config,
                weight_error=_aggregate.fixed_point_error(config.cohort_size, scale),
            )
        else:
            plain = self._plain_uploads(conn, row.round_id, layout, config)
            if config.aggregator == "mean":
                total = np.zeros(layout.length)
                for vector in plain:  # one update in memory at a time
                    total += vector
                means = _aggregate.means_of_sum(_aggregate.add_noise(total, config), layout, config)
            else:
                means = _aggregate.trimmed_means(np.stack(list(plain)), layout, config)
        model, _ = decode_tensors(self._model_row(conn, row.app_id, config.model_version).tensors)
        new = _aggregate.next_model(model, layout, means, config)
        app = self._app(conn, row.app_id)
        if app.epsilon_budget is None:
            return new, None
        spent = self._dp_rounds(conn, row.app_id)
        event = (config.noise_multiplier, config.sampling_probability)
        return new, _privacy.epsilon([*spent, event], app.delta)

    def _unmask(
        self, conn: sa.Connection, row: Any, layout: PersonaLayout, config: RoundConfig
    ) -> np.ndarray | None:
        round_id, t = row.round_id, row.threshold
        members = conn.execute(
            sa.select(participants).where(participants.c.round_id == round_id)
        ).all()
        survivors = {p.idx for p in members if p.upload_digest is not None}
        dropped = {p.idx for p in members if p.shares_digest is not None} - survivors
        b_shares: dict[int, dict[int, bytes]] = {u: {} for u in survivors}
        s_shares: dict[int, dict[int, bytes]] = {}
        for r in conn.execute(sa.select(reveals).where(reveals.c.round_id == round_id)):
            target = b_shares if r.kind == "b" else s_shares
            target.setdefault(r.of_idx, {})[r.sender] = bytes(r.share)
        masked_with: dict[int, list[int]] = {u: [] for u in dropped}
        for r in conn.execute(
            sa.select(shares.c.sender, shares.c.recipient).where(
                shares.c.round_id == round_id, shares.c.sender.in_(dropped)
            )
        ):
            if r.recipient in survivors:
                masked_with[r.sender].append(r.recipient)
        needed = {u: b_shares[u] for u in survivors}
        needed |= {u: s_shares.get(u, {}) for u in dropped if masked_with[u]}
        short = [u for u, got in needed.items() if len(got) < t]
        if short:
            self._abort(conn, round_id, f"{len(short)} devices lack {t} revealed shares")
            return None
        keys = {p.idx: bytes(p.s_pk) for p in members}
        stored = conn.execute(_MASKED_SUM, {"round_id": round_id}).scalar()
        if stored is None:
            self._abort(conn, round_id, "the round's sum of masked inputs is missing")
            return None
        try:
            return _aggregate.secure_sum(
                round_id,
                [np.frombuffer(stored, dtype="<u4")],
                b_shares,
                {u: s_shares[u] for u in dropped if masked_with[u]},
                keys,
                {u: v for u, v in masked_with.items() if v},
                t,
                layout.length,
                fixed_point_scale(config.cohort_size, config.value_bound),
            )
        except EdgePersoError as exc:  # a device revealed a wrong share (or advertised a bad key)
            self._abort(conn, round_id, f"the masks could not be removed: {exc}")
            return None

    def _plain_uploads(
        self, conn: sa.Connection, round_id: str, layout: PersonaLayout, config: RoundConfig
    ) -> Iterator[np.ndarray]:
        for r in conn.execute(sa.select(uploads.c.vector).where(uploads.c.round_id == round_id)):
            vector = np.frombuffer(r.vector, dtype="<f4").astype(np.float64)
            yield _aggregate.bound_norm(vector, layout, config)

    def _abort(self, conn: sa.Connection, round_id: str, reason: str) -> None:
        self._set(conn, round_id, stage="aborted", reason=reason)
        self._discard(conn, round_id)
        logger.warning("round %s aborted: %s", round_id, reason)

    def _set(self, conn: sa.Connection, round_id: str, **values: Any) -> None:
        conn.execute(rounds.update().where(rounds.c.round_id == round_id).values(**values))
        if "stage" in values:
            logger.info("round %s -> %s", round_id, values["stage"])

    def _discard(self, conn: sa.Connection, round_id: str) -> None:
        """Drop a finished round's uploads or masked sum, sealed shares and reveals."""
        for table in _ROUND_DATA:
            conn.execute(table.delete().where(table.c.round_id == round_id))

    def _discard_finished(self) -> None:
        with self.engine.begin() as conn:
            done = sa.select(rounds.c.round_id).where(rounds.c.stage.in_(FINAL))
            for table in _ROUND_DATA:
                conn.execute(table.delete().where(table.c.round_id.in_(done)))

    # ---- small queries ---------------------------------------------------------------------

    def _round(self, conn: sa.Connection, round_id: str, app_id: str) -> Any:
        row = conn.execute(_ROUND_BY_ID, {"round_id": round_id}).first()
        if row is None or row.app_id != app_id:
            raise NotFoundError(f"no round {round_id!r} for this app")
        return row

    def _stage(
        self, conn: sa.Connection, round_id: str, device: Device, stage: str
    ) -> tuple[Any, RoundConfig]:
        row = self._round(conn, round_id, device.app_id)
        self._expect_stage(row, stage)
        return row, _round_config(row.config)

    @staticmethod
    def _expect_stage(row: Any, stage: str) -> None:
        if row.stage != stage:
            raise RoundConflictError(
                f"round is in stage {row.stage!r}, not {stage!r}: the request is late or early"
            )

    def _participant(
        self, conn: sa.Connection, round_id: str, device: Device, *, missing_ok: bool = False
    ) -> Any:
        row = conn.execute(
            _PARTICIPANT, {"round_id": round_id, "device_id": device.device_id}
        ).first()
        if row is None and not missing_ok:
            raise RoundConflictError("this device did not join this round")
        return row

    def _layout(self, conn: sa.Connection, app_id: str, config: RoundConfig) -> PersonaLayout:
        layout_json = self._layout_json(conn, app_id, config.model_version)
        layout: PersonaLayout = PersonaLayout.from_json(json.loads(layout_json))
        return layout

    def _layout_json(self, conn: sa.Connection, app_id: str, version: int) -> str:
        """The layout of a model version, without reading its tensors (versions never change,
        so it is read once)."""
        known = self._layouts.get((app_id, version))
        if known is not None:
            return known
        found = conn.execute(
            sa.select(models.c.layout).where(models.c.app_id == app_id, models.c.version == version)
        ).scalar()
        if found is None:
            raise NotFoundError(f"app {app_id!r} has no model version {version}")
        self._layouts[(app_id, version)] = str(found)
        return str(found)

    def _last_index(self, conn: sa.Connection, round_id: str) -> int:
        """The highest index given out so far: devices join as 1, 2, ... and never leave."""
        last = conn.execute(_LAST_INDEX, {"round_id": round_id}).scalar()
        return int(last or 0)

    def _progress(self, conn: sa.Connection, round_id: str) -> dict[str, int]:
        """How many participants have each digest column set (join_digest: all of them)."""
        counts = conn.execute(_PROGRESS, {"round_id": round_id}).one()
        return dict(zip(_DIGESTS, counts, strict=True))

    def _all_done(self, conn: sa.Connection, round_id: str, column: str, expected: str) -> bool:
        """Whether every participant that has `expected` set also has `column` set (an index
        on (round_id, column, expected) leads straight to the pending ones)."""
        return conn.execute(_PENDING[column, expected], {"round_id": round_id}).first() is None

    def _senders(self, conn: sa.Connection, round_id: str, recipient: int) -> dict[int, bool]:
        """The devices that sent `recipient` shares -> whether their masked input arrived."""
        rows = conn.execute(_SENDERS, {"round_id": round_id, "recipient": recipient})
        return {r.sender: bool(r.uploaded) for r in rows}

    def _mark(self, conn: sa.Connection, round_id: str, idx: int, column: str, digest: str) -> None:
        """Record that participant `idx` submitted a stage (`column`: its digest column)."""
        conn.execute(_MARK[column], {"in_round": round_id, "at_idx": idx, "digest": digest})

    @staticmethod
    def _resubmitted(previous: str | None, digest: str) -> bool:
        """True for an identical retry (accepted, nothing changes); a different one is a replay."""
        if previous is None:
            return False
        if previous != digest:
            raise RoundConflictError(
                "this device already submitted a different payload for this stage"
            )
        return True


@functools.lru_cache(maxsize=256)
def _round_config(stored: str) -> RoundConfig:
    """A round's configuration from its stored JSON (immutable, so parsed once)."""
    return RoundConfig.from_json(json.loads(stored))


def _check_plain(vector: np.ndarray, layout: PersonaLayout, config: RoundConfig) -> None:
    """A plain update has exactly one persona block, with a weight that a device can give and
    a summary of norm at most weight x summary_clip.

    The trimmed mean divides each update by its weight, so neither bound has an absolute slack:
    a device weighs min(1, num_examples / weight_cap) with num_examples >= 1 (exactly 1 without
    a weight cap), and scales its clipped summary by that weight.
    """
    _, persona_part, summaries, weights = layout.unpack(vector.astype(np.float64))
    active = np.flatnonzero(weights != 0)
    least = 1.0 if config.weight_cap is None else min(1.0, 1.0 / config.weight_cap)
    if len(active) != 1 or not least * (1 - _FLOAT32_SLACK) <= weights[active[0]] <= 1:
        weight_rule = (
            "exactly 1 (the round has no weight_cap)"
            if config.weight_cap is None
            else f"min(1, num_examples / weight_cap), in [{least:.6g}, 1]"
        )
        raise InvalidInputError(
            f"an update needs exactly one persona block, weighing {weight_rule}"
        )
    p, weight = int(active[0]), float(weights[active[0]])
    blocks = np.concatenate([persona_part, summaries], axis=1)
    if np.any(np.delete(blocks, p, axis=0)):
        raise InvalidInputError("persona blocks other than the device's own must be zero")
    if np.linalg.norm(summaries[p]) > config.summary_clip * weight * (1 + _FLOAT32_SLACK):
        raise InvalidInputError("the user-summary block exceeds weight x summary_clip")
