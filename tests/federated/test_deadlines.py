"""Rounds never get stuck: a round whose result cannot be computed aborts with a reason, and
neither one failing round nor one failing tick stops the deadlines of the others."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from _fixtures import (
    ADMIN_TOKEN,
    contribution,
    initial_model,
    joined_with_keys,
    model_payload,
)
from edgeperso_federated import Coordinator, CoordinatorConfig, RoundConfig, create_app

from edgeperso.federation import RoundTask
from edgeperso.federation._secagg import SHARE_BYTES, encode_fixed_point
from edgeperso.federation._wire import encode_tensors


def _config(tmp_path: Path, **service: Any) -> CoordinatorConfig:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    return CoordinatorConfig(admin_token=ADMIN_TOKEN, database_url=url, **service)


def _app(coord: Coordinator) -> tuple[str, str]:
    app_id = f"app-{uuid.uuid4().hex[:6]}"
    key = coord.create_app(app_id, None, 1e-5)
    coord.put_model(app_id, 0, model_payload())
    return app_id, key


def _round(coord: Coordinator, app_id: str, **config: Any) -> str:
    opened = coord.create_round(RoundConfig(app_id, 0, cohort_size=4, min_survivors=3, **config))
    return str(opened["round_id"])


def test_a_wrong_revealed_share_aborts_the_round_and_the_app_can_open_another(
    tmp_path: Path,
) -> None:
    """Device 1 reveals right-length garbage: the masks cannot be removed. The honest devices'
    reveals are still accepted, and the round aborts instead of staying in unmasking."""
    coord = Coordinator(_config(tmp_path))
    app_id, key = _app(coord)
    rid = _round(coord, app_id)
    task_json = coord.task(app_id)
    assert task_json is not None
    task = RoundTask.from_json(task_json, initial_model())
    devices, clients = joined_with_keys(coord, app_id, key, rid, 4)
    for seed, (d, c) in enumerate(zip(devices, clients, strict=True)):
        inbox = {s["from"]: s["sealed"] for s in coord.inbox(rid, d)}
        vector = encode_fixed_point(contribution(task, seed), task.fixed_point_scale)
        coord.submit_upload(rid, d, encode_tensors({"masked": c.masked_input(vector, inbox)}))
    for i, (d, c) in enumerate(zip(devices, clients, strict=True)):
        revealed = c.reveal(coord.survivors(rid, d))
        if i == 0:
            revealed = [(o, k, bytes(SHARE_BYTES - 1) + b"\x07") for o, k, _ in revealed]
        coord.submit_reveal(rid, d, revealed)
    status = coord.status(rid, app_id)
    assert status["stage"] == "aborted", status
    assert "masks could not be removed" in status["reason"]
    assert "inconsistent" in status["reason"]
    coord.tick(now=status["stage_deadline"] + 60)
    _round(coord, app_id)  # the app is not blocked by a round that never ends


def test_a_round_that_fails_to_close_does_not_stop_the_other_rounds_deadlines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    coord = Coordinator(_config(tmp_path))
    broken, fine = (_round(coord, _app(coord)[0], join_timeout_s=1) for _ in range(2))
    close = coord._close

    def close_or_fail(conn: sa.Connection, row: Any, config: RoundConfig) -> None:
        if row.round_id == broken:
            raise sa.exc.OperationalError("UPDATE rounds", {}, Exception("disk I/O error"))
        close(conn, row, config)

    monkeypatch.setattr(coord, "_close", close_or_fail)
    with caplog.at_level(logging.ERROR, logger="edgeperso_federated"):
        coord.tick(now=coord.status(fine, None)["stage_deadline"] + 1)
    assert coord.status(fine, None)["stage"] == "aborted"
    assert coord.status(broken, None)["stage"] == "join"  # rolled back; retried next tick
    [logged] = [r for r in caplog.records if r.exc_info]
    assert broken in logged.getMessage()


def test_the_deadline_task_logs_a_failing_tick_and_keeps_ticking(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    config = _config(tmp_path, tick_s=0.01)
    coord = Coordinator(config)
    calls: list[float | None] = []
    ticking = asyncio.Event()

    def tick(now: float | None = None) -> None:
        calls.append(now)
        if len(calls) == 1:  # e.g. PostgreSQL restarting under the coordinator
            raise sa.exc.OperationalError("SELECT", {}, Exception("connection refused"))
        if len(calls) >= 3:
            ticking.set()

    async def serve() -> None:
        app = create_app(config, coord)
        async with app.router.lifespan_context(app):  # what uvicorn runs around serving
            await asyncio.wait_for(ticking.wait(), timeout=10)

    monkeypatch.setattr(coord, "tick", tick)
    with caplog.at_level(logging.ERROR, logger="edgeperso_federated"):
        asyncio.run(serve())
    assert len(calls) >= 3
    assert any(r.exc_info and "connection refused" in str(r.exc_info[1]) for r in caplog.records)
