"""The operator's client (AdminClient) against a live coordinator on loopback."""

from __future__ import annotations

import json
import threading
import uuid
from pathlib import Path

import httpx
import numpy as np
import pytest
from _fixtures import (
    ADMIN_TOKEN,
    CENTROIDS,
    LAYOUT,
    Server,
    enrol,
    free_port,
    initial_model,
    local_update,
)
from edgeperso_federated import AdminClient, RoundConfig, load_model, save_model
from edgeperso_federated import initial_model as persona_model
from edgeperso_federated._cli import main as cli
from edgeperso_federated._errors import (
    AuthError,
    ForbiddenError,
    NotFoundError,
    RateLimitedError,
    RoundConflictError,
)

from edgeperso import BudgetExhaustedError, InvalidInputError
from edgeperso.federation import (
    CoordinatorUnavailableError,
    FederationClient,
    FederationConfig,
    MemoryStateStore,
)
from edgeperso.federation._layout import persona_key
from edgeperso.federation._wire import encode_tensors


def _app(admin: AdminClient, **app: float) -> tuple[str, str]:
    """A new app with model version 0: (app_id, enrolment key)."""
    app_id = f"app-{uuid.uuid4().hex[:8]}"
    key = admin.create_app(app_id, **app)
    admin.put_model(app_id, 0, LAYOUT, initial_model())
    return app_id, key


def _contribute(server: Server, app_id: str, key: str, seeds: range) -> dict[int, str]:
    """Devices (threads, real HTTP) that check in and contribute: seed -> outcome status."""
    outcomes: dict[int, str] = {}

    def run(seed: int) -> None:
        config = FederationConfig(server.url, app_id, key, opt_in=True, backoff_s=0.1)
        with FederationClient(config, MemoryStateStore()) as client:
            task = client.check_in()
            assert task is not None
            outcome = client.contribute(task, **local_update(task, seed), timeout_s=60)
            outcomes[seed] = outcome.status

    threads = [threading.Thread(target=run, args=(s,)) for s in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=90)
    return outcomes


def test_an_operator_sets_up_an_app_runs_a_round_and_reads_the_ledger(server: Server) -> None:
    with AdminClient(server.url, ADMIN_TOKEN) as admin:
        app_id, key = _app(admin, epsilon_budget=50.0, delta=1e-5)
        config = RoundConfig(
            app_id,
            0,
            cohort_size=3,
            min_survivors=3,
            stage_timeout_s=30,
            noise_multiplier=1.0,
            sampling_probability=0.1,
        )
        opened = admin.create_round(config)
        assert opened.projected_epsilon is not None and 0 < opened.projected_epsilon < 50
        waiting = admin.round_status(app_id, opened.round_id)
        assert (waiting.stage, waiting.closed, waiting.published_version) == ("join", False, None)

        outcomes = _contribute(server, app_id, key, range(3))

        state = admin.wait_for_round(app_id, opened.round_id, timeout_s=30)
        assert outcomes == {0: "published", 1: "published", 2: "published"}
        assert (state.stage, state.closed, state.published_version) == ("published", True, 1)
        [entry] = admin.privacy_ledger(app_id)
        assert entry.round_id == opened.round_id
        assert (entry.noise_multiplier, entry.sampling_probability, entry.delta) == (1.0, 0.1, 1e-5)
        assert entry.epsilon == pytest.approx(opened.projected_epsilon)


def test_initial_model_starts_every_persona_from_the_same_parameters() -> None:
    params = {p.name: np.full(p.shape, 0.5, np.float32) for p in LAYOUT.params}
    model = persona_model(LAYOUT, params, CENTROIDS)
    assert set(model) == set(LAYOUT.model_tensors())
    for k in range(LAYOUT.num_personas):
        np.testing.assert_array_equal(model[persona_key(k, "persona_head")], 0.5)
    np.testing.assert_array_equal(model["centroids"], CENTROIDS)
    with pytest.raises(InvalidInputError, match="lacks"):
        persona_model(LAYOUT, {k: v for k, v in params.items() if k != "head_bias"}, CENTROIDS)
    with pytest.raises(InvalidInputError, match="centroids"):
        persona_model(LAYOUT, params, CENTROIDS[:2])


def test_refusals_raise_typed_errors_with_the_coordinators_message(server: Server) -> None:
    with AdminClient(server.url, ADMIN_TOKEN) as admin:
        app_id, _ = _app(admin, epsilon_budget=0.01)
        with pytest.raises(RoundConflictError, match="already exists"):
            admin.create_app(app_id)
        with pytest.raises(RoundConflictError, match=r"version 0 of .* already exists"):
            admin.put_model(app_id, 0, LAYOUT, initial_model())
        with pytest.raises(InvalidInputError, match="noise_multiplier > 0"):
            admin.create_round(RoundConfig(app_id, 0, cohort_size=3, min_survivors=3))
        dp = RoundConfig(app_id, 0, cohort_size=3, min_survivors=3, noise_multiplier=1.0)
        with pytest.raises(BudgetExhaustedError, match="over the app's budget"):
            admin.create_round(dp)
        with pytest.raises(NotFoundError, match="no app"):
            admin.create_round(RoundConfig("no-such-app", 0, cohort_size=3, min_survivors=3))
        with pytest.raises(NotFoundError, match="no round"):
            admin.round_status(app_id, "no-such-round")
        with pytest.raises(NotFoundError):
            admin.privacy_ledger("no-such-app")
        with pytest.raises(InvalidInputError, match=r"'centroids' is F32\[2, 4\]"):
            admin.put_model(app_id, 1, LAYOUT, {**initial_model(), "centroids": CENTROIDS[:2]})
    wrong = AdminClient(server.url, "not-the-admin-token")
    with wrong, pytest.raises(ForbiddenError, match="admin token"):
        wrong.create_app("evil")


def test_one_round_at_a_time_and_waiting_is_bounded(server: Server) -> None:
    with AdminClient(server.url, ADMIN_TOKEN) as admin:
        app_id, _ = _app(admin)
        config = RoundConfig(app_id, 0, cohort_size=3, min_survivors=3, join_timeout_s=60)
        opened = admin.create_round(config)
        with pytest.raises(RoundConflictError, match="still running"):
            admin.create_round(config)
        with pytest.raises(CoordinatorUnavailableError, match="still in stage 'join'"):
            admin.wait_for_round(app_id, opened.round_id, timeout_s=0.3, poll_s=0.1)


def test_transport_failures_server_errors_and_rate_limits_are_typed() -> None:
    nobody = AdminClient(f"http://127.0.0.1:{free_port()}", ADMIN_TOKEN)
    with nobody, pytest.raises(CoordinatorUnavailableError, match="cannot be reached"):
        nobody.create_app("notes")

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/privacy"):
            problem = {"error": "rate_limited", "detail": "too many requests"}
            return httpx.Response(429, json=problem, headers={"Retry-After": "2.50"})
        if request.url.path.endswith("/rounds"):
            problem = {"error": "unauthenticated", "detail": "send Authorization"}
            return httpx.Response(401, json=problem, headers={"WWW-Authenticate": "Bearer"})
        return httpx.Response(502, text="bad gateway")

    with AdminClient("http://coordinator", ADMIN_TOKEN, transport=httpx.MockTransport(answer)) as a:
        with pytest.raises(RateLimitedError, match="too many requests") as limited:
            a.privacy_ledger("notes")
        assert limited.value.retry_after_s == 2.5
        with pytest.raises(AuthError, match="send Authorization") as refused:
            a.create_round(RoundConfig("notes", 0, cohort_size=3, min_survivors=3))
        assert not isinstance(refused.value, ForbiddenError)
        with pytest.raises(CoordinatorUnavailableError, match="HTTP 502"):
            a.create_app("notes")
    with pytest.raises(InvalidInputError, match="http"):
        AdminClient("coordinator:8080", ADMIN_TOKEN)
    with pytest.raises(InvalidInputError, match="admin_token"):
        AdminClient("http://coordinator", "")


def test_the_cli_creates_an_app_uploads_its_model_opens_a_round_and_reports_its_stage(
    server: Server,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """The shell walk-through of docs/federated.md."""
    monkeypatch.setenv("EDGEPERSO_ADMIN_TOKEN", ADMIN_TOKEN)
    app_id, where = f"app-{uuid.uuid4().hex[:8]}", ["--url", server.url]
    assert cli(["create-app", app_id, "--epsilon-budget", "20", *where]) == 0
    enrol(server, app_id, capsys.readouterr().out.strip())  # the printed key enrols devices
    save_model(tmp_path / "model.safetensors", LAYOUT, initial_model())
    assert cli(["put-model", app_id, "0", str(tmp_path / "model.safetensors"), *where]) == 0
    assert json.loads(capsys.readouterr().out) == {"app_id": app_id, "version": 0}
    assert cli(["put-model", app_id, "0", str(tmp_path / "model.safetensors"), *where]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli(["put-model", app_id, "1", str(tmp_path / "missing.safetensors"), *where]) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    config = {"app_id": app_id, "model_version": 0, "cohort_size": 3, "min_survivors": 3}
    config |= {"noise_multiplier": 1.0, "sampling_probability": 0.01}
    assert cli(["create-round", json.dumps(config), *where]) == 0
    opened = json.loads(capsys.readouterr().out)
    assert opened["projected_epsilon"] > 0
    assert cli(["status", app_id, opened["round_id"], *where]) == 0
    assert json.loads(capsys.readouterr().out)["stage"] == "join"
    assert cli(["create-app", app_id, *where]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_missing_ca_bundle_is_named_in_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"missing\.pem"):
        AdminClient("https://coordinator", ADMIN_TOKEN, verify_tls=str(tmp_path / "missing.pem"))


def test_a_saved_model_file_loads_back_and_a_foreign_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_model(path, LAYOUT, initial_model())
    layout, tensors = load_model(path)
    assert layout == LAYOUT
    for name, value in initial_model().items():
        np.testing.assert_array_equal(tensors[name], value)
    (tmp_path / "plain.safetensors").write_bytes(encode_tensors(initial_model()))
    with pytest.raises(InvalidInputError, match="no JSON 'layout'"):
        load_model(tmp_path / "plain.safetensors")
