"""The HTTP API on a live coordinator: authentication, isolation, validation, what is stored."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from _fixtures import (
    LABEL,
    LAYOUT,
    RAW_TEXT,
    Server,
    b64,
    enrol,
    initial_model,
    join_secure,
    local_update,
    masked_input,
    new_app,
    open_round,
    round_stage,
    share_keys,
)

from edgeperso.federation import FederationClient, FederationConfig, MemoryStateStore, RoundTask
from edgeperso.federation._secagg import encode_fixed_point
from edgeperso.federation._wire import decode_tensors, encode_tensors


def test_requests_without_a_valid_credential_are_refused(server: Server) -> None:
    app = f"app-{uuid.uuid4().hex[:8]}"
    key = new_app(server, app)
    assert httpx.get(f"{server.url}/v1/task").status_code == 401
    assert (
        httpx.get(f"{server.url}/v1/task", headers={"Authorization": "Bearer x.y"}).status_code
        == 401
    )
    wrong = httpx.post(f"{server.url}/v1/devices", json={"app_id": app, "enrolment_key": key + "x"})
    assert wrong.status_code == 401
    with enrol(server, app, key)[0] as device:
        assert device.post("/v1/admin/apps", json={"app_id": "evil"}).status_code == 403


def test_operator_input_that_no_round_can_use_is_refused_with_a_422_problem(
    server: Server,
) -> None:
    app = f"app-{uuid.uuid4().hex[:8]}"
    new_app(server, app, epsilon_budget=8.0)
    round_config = {"app_id": app, "model_version": 0, "cohort_size": 2, "min_survivors": 2}
    refused = [
        ({"noise_multiplier": 1e308}, "noise_multiplier must be in"),
        ({"noise_multiplier": float("inf")}, "noise_multiplier must be in"),
        (  # 1000 devices x 1e7 overflow the 32-bit ring: no device could encode its input
            {"cohort_size": 1000, "min_survivors": 500, "clip_norm": 1e7, "noise_multiplier": 1.0},
            "no device could encode",
        ),
    ]
    with server.admin() as admin:
        for change, detail in refused:
            body = json.dumps(round_config | change)  # Python's JSON writes inf as Infinity
            response = admin.post(
                "/v1/admin/rounds", content=body, headers={"Content-Type": "application/json"}
            )
            assert response.status_code == 422, response.text
            assert detail in response.json()["detail"]
        for layout in ("not json", "[1]"):
            payload = encode_tensors({"x": np.zeros(1, np.float32)}, {"layout": layout})
            response = admin.put(f"/v1/admin/apps/{app}/models/7", content=payload)
            assert response.status_code == 422, response.text
            assert "'layout'" in response.json()["detail"]
        # The app is not blocked: a round it can run opens.
        assert admin.post("/v1/admin/rounds", json=round_config).status_code == 422  # no noise
        ok = admin.post("/v1/admin/rounds", json=round_config | {"noise_multiplier": 1.0})
        assert ok.status_code == 201, ok.text


def test_a_secure_round_rejects_malformed_late_replayed_and_foreign_uploads_and_still_completes(
    server: Server,
) -> None:
    app, other = f"app-{uuid.uuid4().hex[:8]}", f"app-{uuid.uuid4().hex[:8]}"
    key, other_key = new_app(server, app), new_app(server, other)
    rid = open_round(server, app, cohort_size=3, min_survivors=3, stage_timeout_s=30)
    devices = [enrol(server, app, key)[0] for _ in range(3)]
    outsider, _ = enrol(server, other, other_key)
    task = RoundTask.from_json(devices[0].get("/v1/task").json(), initial_model())
    base = f"/v1/rounds/{rid}"
    assert outsider.get(base).status_code == 404  # another app's round does not exist for it
    assert devices[0].post("/v1/rounds/nope/join", json={}).status_code == 404
    low_order = {"c_pk": b64(bytes(32)), "s_pk": b64(b"\x01" + bytes(31))}
    refused = devices[0].post(f"{base}/join", json=low_order)
    assert refused.status_code == 422 and "low-order" in refused.json()["detail"]
    clients = [join_secure(d, rid) for d in devices]
    # Joining again with other keys is a replay.
    replay = {"c_pk": b64(b"1" * 32), "s_pk": b64(b"2" * 32)}
    assert devices[0].post(f"{base}/join", json=replay).status_code == 409
    for d, c in zip(devices, clients):
        share_keys(d, c)
    vectors = []
    for seed, (d, c) in enumerate(zip(devices, clients)):
        vector, masked = masked_input(d, c, task, seed)
        vectors.append(vector)
        octet = {"Content-Type": "application/octet-stream"}
        bad = [
            encode_tensors({"masked": masked.astype(np.float32)}),  # wrong dtype
            encode_tensors({"masked": masked[:-1]}),  # wrong shape
            encode_tensors({"other": masked}),  # wrong name
            b"\x00" * 7,  # not safetensors
        ]
        for payload in bad:
            response = d.put(f"{base}/masked", content=payload, headers=octet)
            assert response.status_code == 422, response.text
            assert response.json()["error"] == "invalid_input"
        assert d.put(f"{base}/masked", content=b"\x00" * 300_000, headers=octet).status_code == 413
        good = encode_tensors({"masked": masked})
        if seed == 0:
            assert d.put(f"{base}/masked", content=good, headers=octet).status_code == 204
            assert d.put(f"{base}/masked", content=good, headers=octet).status_code == 204  # retry
            replay = encode_tensors({"masked": masked + np.uint32(1)})
            assert d.put(f"{base}/masked", content=replay, headers=octet).status_code == 409
        else:
            assert d.put(f"{base}/masked", content=good, headers=octet).status_code == 204
        assert outsider.put(f"{base}/masked", content=good, headers=octet).status_code == 404
    for d, c in zip(devices, clients):
        survivors = d.get(f"{base}/survivors").json()["survivors"]
        shares = [{"of": o, "kind": k, "share": b64(s)} for o, k, s in c.reveal(survivors)]
        assert d.post(f"{base}/reveal", json={"shares": shares}).status_code == 204
    assert round_stage(server, app, rid)["stage"] == "published"
    late = devices[0].put(
        f"{base}/masked", content=encode_tensors({"masked": masked}), headers=octet
    )
    assert late.status_code == 409 and "late" in late.json()["detail"]
    # Nothing was half-applied: the published model is the mean of the three good uploads.
    published, _ = decode_tensors(devices[0].get("/v1/models/1").content)
    global_sum = np.sum(vectors, axis=0)[:4]
    np.testing.assert_allclose(
        published["head_bias"], initial_model()["head_bias"] + global_sum / 3, atol=1e-5
    )
    _assert_nothing_individual_is_stored(server, task, vectors)


def _assert_nothing_individual_is_stored(
    server: Server, task: RoundTask, vectors: list[np.ndarray]
) -> None:
    """Scan the database files and the coordinator's log for any individual update, text or label."""
    db_path = Path(server.database_url.removeprefix("sqlite:///"))
    stored = b"".join(p.read_bytes() for p in db_path.parent.glob(db_path.name + "*"))
    stored += server.log_path.read_bytes()
    for vector in vectors:
        for encoded in (
            encode_fixed_point(vector, task.fixed_point_scale).tobytes(),
            vector.astype(np.float32).tobytes(),
            vector.tobytes(),
        ):
            nonzero = encoded[: 4 * LAYOUT.global_size]  # the global block is never all zero
            assert nonzero not in stored
    for secret in (RAW_TEXT, LABEL):
        assert secret.encode() not in stored


def test_plain_rounds_reject_nan_and_updates_outside_one_persona_block(server: Server) -> None:
    app = f"app-{uuid.uuid4().hex[:8]}"
    key = new_app(server, app)
    rid = open_round(server, app, cohort_size=2, min_survivors=2, secure=False, join_timeout_s=60)
    device, _ = enrol(server, app, key)
    assert device.post(f"/v1/rounds/{rid}/join", json={}).status_code == 200
    assert enrol(server, app, key)[0].post(f"/v1/rounds/{rid}/join", json={}).status_code == 200
    octet = {"Content-Type": "application/octet-stream"}
    nan = np.zeros(LAYOUT.length, np.float32)
    nan[0] = np.nan
    two_blocks = np.ones(LAYOUT.length, np.float32) * 0.01
    for payload in (nan, two_blocks):
        response = device.put(
            f"/v1/rounds/{rid}/update", content=encode_tensors({"update": payload}), headers=octet
        )
        assert response.status_code == 422, response.text


@pytest.mark.parametrize("dropout", [0.05, 0.10])
def test_dropout_of_5_and_10_percent_still_publishes(server: Server, dropout: float) -> None:
    """20 devices over real HTTP; the dropped ones stop after sharing their keys."""
    app = f"app-{uuid.uuid4().hex[:8]}"
    key = new_app(server, app)
    cohort = 20
    rid = open_round(
        server, app, cohort_size=cohort, min_survivors=15, stage_timeout_s=3, target_dropout=dropout
    )
    dropped = set(range(round(dropout * cohort)))
    outcomes: dict[int, str] = {}

    class StopAfterShares(MemoryStateStore):
        def put(self, k: str, value: bytes) -> None:
            super().put(k, value)
            if (
                k == "federation.round"
                and "shares" in json.loads(decode_tensors(value)[1]["record"])["sent"]
            ):
                raise SystemExit  # the app dies: nothing more is sent

    def run(seed: int) -> None:
        state = StopAfterShares() if seed in dropped else MemoryStateStore()
        config = FederationConfig(server.url, app, key, opt_in=True, backoff_s=0.1)
        with FederationClient(config, state) as client:
            task = client.check_in()
            assert task is not None
            try:
                outcomes[seed] = client.contribute(
                    task, **local_update(task, seed), timeout_s=60
                ).status
            except SystemExit:
                outcomes[seed] = "died"

    threads = [threading.Thread(target=run, args=(s,)) for s in range(cohort)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    assert [outcomes[s] for s in sorted(dropped)] == ["died"] * len(dropped)
    assert {outcomes[s] for s in range(cohort) if s not in dropped} == {"published"}
    assert round_stage(server, app, rid)["stage"] == "published"
