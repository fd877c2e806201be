"""Property-based fuzzing of the coordinator's HTTP API from its own OpenAPI document.

Schemathesis generates requests that fit the schema (positive) and requests that break it
(negative) for every operation, against a live coordinator on loopback whose apps hold rounds in
each stage, so round operations meet both their own stage and the others. Every response must:
not be a 5xx; have a documented status code, content type, headers and body schema; reject
schema-breaking input with a 4xx; and, on authenticated operations, fail without the credential
or with a wrong one.

    EDGEPERSO_FUZZ_EXAMPLES=500 pytest tests/federated/test_api_fuzz.py   # a longer run
    python scripts/fuzz_coordinator.py --max-examples 500                 # the same
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from _fixtures import (
    ADMIN_TOKEN,
    Server,
    enrol,
    initial_model,
    join_secure,
    masked_input,
    new_app,
    open_round,
    round_stage,
    share_keys,
)
from edgeperso_federated import CoordinatorConfig, create_app
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from edgeperso.federation import RoundTask
from edgeperso.federation._wire import encode_tensors

MAX_EXAMPLES = int(os.environ.get("EDGEPERSO_FUZZ_EXAMPLES", "5"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
    ignored_auth,
]
# The operations, read from the app itself (no server needed to collect the tests).
_DOCUMENT = create_app(CoordinatorConfig(admin_token="x" * 16, database_url="sqlite://")).openapi()
OPERATIONS = [
    (method.upper(), path) for path, methods in _DOCUMENT["paths"].items() for method in methods
]
SECURED = [(m, p) for m, p in OPERATIONS if _DOCUMENT["paths"][p][m.lower()].get("security")]
STAGES = ["join", "share_keys", "masked_input", "unmasking", "upload"]


@dataclass
class Scene:
    """An app whose open round is in `stage`, and a device of that app that is in the round
    (or, in the join stage, may join it)."""

    stage: str
    app_id: str
    round_id: str
    device_token: str


@dataclass
class Fuzzed:
    server: Server
    schema: Any
    scenes: list[Scene]


def _scene(server: Server, stage: str) -> Scene:
    """Drive three real devices through the protocol until the round is in `stage`."""
    app = f"fuzz-{stage}-{uuid.uuid4().hex[:6]}"
    key = new_app(server, app)
    secure = stage != "upload"
    rid = open_round(
        server, app, cohort_size=3, min_survivors=3, secure=secure, stage_timeout_s=600
    )
    devices = [enrol(server, app, key) for _ in range(3)]
    scene = Scene(stage, app, rid, devices[0][1])
    if stage == "join":
        return scene
    task = RoundTask.from_json(devices[0][0].get("/v1/task").json(), initial_model())
    if not secure:
        for client, _ in devices:
            assert client.post(f"/v1/rounds/{rid}/join", json={}).status_code == 200
        return scene
    clients = [join_secure(client, rid) for client, _ in devices]
    if stage == "share_keys":
        return scene
    for (client, _), secagg in zip(devices, clients, strict=True):
        share_keys(client, secagg)
    if stage == "masked_input":
        return scene
    octet = {"Content-Type": "application/octet-stream"}
    for seed, ((client, _), secagg) in enumerate(zip(devices, clients, strict=True)):
        _, masked = masked_input(client, secagg, task, seed)
        body = encode_tensors({"masked": masked})
        put = client.put(f"/v1/rounds/{rid}/masked", content=body, headers=octet)
        assert put.status_code == 204, put.text
    return scene


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    root = tmp_path_factory.mktemp("fuzz")
    # The fuzzer sends hundreds of requests per device credential: rate limits have their own
    # test.
    server = Server.sqlite(root, "--max-body-bytes", "200000", "--device-rate", "100000").start()
    try:
        scenes = [_scene(server, stage) for stage in STAGES]
        for scene in scenes:
            assert round_stage(server, scene.app_id, scene.round_id)["stage"] == scene.stage
        schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
        yield Fuzzed(server, schema, scenes)
    finally:
        server.kill()
    log = (root / "coordinator.log").read_text()
    assert "Traceback" not in log, log[-4000:]


def _path_parameters(path: str, scene: Scene) -> dict[str, Any]:
    known = {"app_id": scene.app_id, "round_id": scene.round_id, "version": "0"}
    return {name: value for name, value in known.items() if "{" + name + "}" in path}


def _credential(path: str, scene: Scene) -> dict[str, str]:
    if path == "/v1/devices":
        return {}
    token = ADMIN_TOKEN if path.startswith("/v1/admin/") else scene.device_token
    return {"Authorization": f"Bearer {token}"}


def _run(
    fuzzed: Fuzzed, method: str, path: str, mode: GenerationMode, scene: Scene, real: bool
) -> None:
    operation = fuzzed.schema[path][method]
    fixed = _path_parameters(path, scene) if real else None
    auth = _credential(path, scene)

    strategy = operation.as_strategy(generation_mode=mode, path_parameters=fixed, headers=auth)

    @given(case=strategy)
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def check(case: Any) -> None:
        response = case.call(headers=auth, timeout=30)
        case.validate_response(response, checks=CHECKS, headers=auth)

    check()


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_every_operation_answers_generated_requests_as_its_schema_says(
    fuzzed: Fuzzed, method: str, path: str, mode: GenerationMode
) -> None:
    # Round operations meet a round in each stage; the others need one app and device.
    scenes = fuzzed.scenes if "{round_id}" in path else fuzzed.scenes[:1]
    positive = mode == GenerationMode.POSITIVE
    if positive or _breakable(method, path, path_fixed=True):
        for scene in scenes:
            _run(fuzzed, method, path, mode, scene, real=True)
    if "{" in path and (positive or _breakable(method, path, path_fixed=False)):
        _run(fuzzed, method, path, mode, fuzzed.scenes[0], real=False)  # unknown identifiers


def _breakable(method: str, path: str, *, path_fixed: bool) -> bool:
    """Whether a request with the credential fixed can break the schema: through a query
    parameter, a constrained path parameter (when not fixed), or a body other than raw bytes
    (which any bytes fit). Missing and wrong credentials have their own test."""
    operation = _DOCUMENT["paths"][path][method.lower()]
    for parameter in operation.get("parameters", []):
        unconstrained = set(parameter["schema"]) <= {"type", "title"}
        if parameter["in"] != "path" or not (path_fixed or unconstrained):
            return True
    media = operation.get("requestBody", {}).get("content", {})
    return any(kind != "application/octet-stream" for kind in media)


@pytest.mark.parametrize(("method", "path"), SECURED, ids=[f"{m} {p}" for m, p in SECURED])
def test_authenticated_operations_refuse_missing_and_wrong_credentials(
    fuzzed: Fuzzed, method: str, path: str
) -> None:
    scene = fuzzed.scenes[2]  # a round in progress: the credential is all that is wrong
    operation = fuzzed.schema[path][method]
    wrong_token = "0123456789abcdef0123456789abcdef.not-the-token"
    wrong = {"device": wrong_token, "operator": "not-the-admin-token"}
    scheme = next(iter(_DOCUMENT["paths"][path][method.lower()]["security"][0]))

    @given(case=operation.as_strategy(path_parameters=_path_parameters(path, scene)))
    @settings(
        max_examples=max(2, MAX_EXAMPLES // 2),
        deadline=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    def check(case: Any) -> None:
        case.headers = {k: v for k, v in (case.headers or {}).items() if k != "Authorization"}
        missing = case.call(timeout=30)
        assert missing.status_code == 401, missing.text
        assert missing.json()["error"] == "unauthenticated"
        assert missing.headers["www-authenticate"] == ["Bearer"]
        refused = case.call(headers={"Authorization": f"Bearer {wrong[scheme]}"}, timeout=30)
        assert refused.status_code in (401, 403), refused.text
        assert refused.json()["error"] in ("unauthenticated", "forbidden")

    check()
