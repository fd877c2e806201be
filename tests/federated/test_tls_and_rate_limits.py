"""Transport options on a live coordinator: HTTPS with a private CA, and per-device rate limits."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator

import httpx
import pytest
from _fixtures import Server, issue_certificates, local_update, new_app, open_round, round_stage

from edgeperso.federation import (
    CoordinatorUnavailableError,
    FederationClient,
    FederationConfig,
    MemoryStateStore,
)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("tls")
    ca, cert, key = issue_certificates(root)
    server = Server(
        f"sqlite:///{root / 'coordinator.db'}",
        root / "coordinator.log",
        extra_args=("--ssl-certfile", str(cert), "--ssl-keyfile", str(key)),
        ca_file=ca,
    ).start()
    yield server
    server.kill()


def test_devices_that_trust_the_ca_complete_a_secure_round_over_https(tls_server: Server) -> None:
    app = f"app-{uuid.uuid4().hex[:8]}"
    key = new_app(tls_server, app)
    rid = open_round(tls_server, app, cohort_size=3, min_survivors=3, stage_timeout_s=30)
    outcomes: dict[int, str] = {}

    def device(seed: int) -> None:
        config = FederationConfig(
            tls_server.url, app, key, opt_in=True, verify_tls=str(tls_server.ca_file)
        )
        with FederationClient(config, MemoryStateStore()) as client:
            task = client.check_in()
            assert task is not None
            outcomes[seed] = client.contribute(
                task, **local_update(task, seed), timeout_s=60
            ).status

    threads = [threading.Thread(target=device, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert outcomes == {0: "published", 1: "published", 2: "published"}
    assert round_stage(tls_server, app, rid)["stage"] == "published"


def test_a_client_without_the_ca_refuses_the_coordinator_and_plain_http_is_not_served(
    tls_server: Server,
) -> None:
    config = FederationConfig(tls_server.url, "any-app", "any-key", opt_in=True, retries=0)
    with (
        FederationClient(config, MemoryStateStore()) as client,  # system CAs only
        pytest.raises(CoordinatorUnavailableError, match="TLS certificate did not verify"),
    ):
        client.check_in()
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{tls_server.url}/openapi.json")
    plain = tls_server.url.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{plain}/openapi.json", timeout=5)


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("limits")
    server = Server(
        f"sqlite:///{root / 'coordinator.db'}",
        root / "coordinator.log",
        extra_args=(
            *("--device-rate", "2", "--device-burst", "5"),
            *("--enrol-rate", "0.5", "--enrol-burst", "4"),
        ),
    ).start()
    yield server
    server.kill()


def _enrol(server: Server, app: str, key: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/devices", json={"app_id": app, "enrolment_key": key})


def test_a_device_over_its_rate_gets_429_and_the_others_are_unaffected(limited: Server) -> None:
    app = f"app-{uuid.uuid4().hex[:8]}"
    key = new_app(limited, app)
    credentials = [_enrol(limited, app, key).json() for _ in range(2)]
    busy, calm = (
        httpx.Client(
            base_url=limited.url, headers={"Authorization": f"Bearer {c['device_id']}.{c['token']}"}
        )
        for c in credentials
    )
    assert [busy.get("/v1/task").status_code for _ in range(5)] == [204] * 5  # the burst
    refused = busy.get("/v1/task")
    assert refused.status_code == 429
    assert refused.json()["error"] == "rate_limited"
    assert "too many requests from this device" in refused.json()["detail"]
    assert 0 < float(refused.headers["Retry-After"]) <= 0.5  # one token at 2 per second
    assert calm.get("/v1/task").status_code == 204  # another device's bucket is its own
    # The device client waits as Retry-After says and then gets through.
    state = MemoryStateStore()
    state.put("federation.credential", json.dumps(credentials[0]).encode())
    config = FederationConfig(limited.url, app, key, opt_in=True, retries=3)
    with FederationClient(config, state) as client:
        assert client.check_in() is None  # no round is open: 204, after the 429
    busy.close()
    calm.close()


def test_enrolments_from_one_address_are_rate_limited(limited: Server) -> None:
    app = f"app-{uuid.uuid4().hex[:8]}"
    key = new_app(limited, app)
    statuses = [_enrol(limited, app, key) for _ in range(6)]  # the burst is 4
    refused = [r for r in statuses if r.status_code == 429]
    assert refused, [r.status_code for r in statuses]
    assert "too many requests from this address" in refused[0].json()["detail"]
    assert all(r.status_code in (201, 429) for r in statuses)
