"""Whole rounds against a live coordinator on loopback, with devices as separate processes."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
from _fixtures import (
    LAYOUT,
    Server,
    contribution,
    initial_model,
    new_app,
    open_round,
    round_stage,
    wait_until,
)

from edgeperso.federation import MemoryStateStore, RoundTask
from edgeperso.federation._layout import persona_key
from edgeperso.federation._secagg import fixed_point_scale

DEVICE = Path(__file__).with_name("device_main.py")


def _task(round_id: str, cohort: int) -> RoundTask:
    """The task as devices receive it, rebuilt here to compute the expected result."""
    task_json = {
        "round_id": round_id,
        "model_version": 0,
        **LAYOUT.to_json(),
        "clip_norm": 1.0,
        "summary_clip": 1.0,
        "weight_cap": None,
        "secure": True,
        "fixed_point_scale": fixed_point_scale(cohort, 1.0),
    }
    return RoundTask.from_json(task_json, initial_model())


def _expected_model(round_id: str, cohort: int, seeds: list[int]) -> dict[str, np.ndarray]:
    """old + mean delta per block, computed in the clear from the survivors' contributions."""
    task = _task(round_id, cohort)
    total = np.sum([contribution(task, s) for s in seeds], axis=0)
    global_sum, persona_sums, summaries, weights = LAYOUT.unpack(total)
    model = initial_model()
    for name, delta in LAYOUT.split(LAYOUT.global_params, global_sum / weights.sum()).items():
        model[name] = model[name] + delta
    for p in range(LAYOUT.num_personas):
        if weights[p] >= 1:
            for name, delta in LAYOUT.split(
                LAYOUT.persona_params, persona_sums[p] / weights[p]
            ).items():
                model[persona_key(p, name)] = model[persona_key(p, name)] + delta
            model["centroids"][p] = summaries[p] / weights[p]
    return model


def _spawn(
    server: Server, app: str, key: str, state: Path, seed: int, *extra: str
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        # "--": an enrolment key may start with "-" (token_urlsafe), which is not an option
        [sys.executable, str(DEVICE), *extra, "--", server.url, app, key, str(state), str(seed)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _exited(processes: list[subprocess.Popen[str]]) -> list[tuple[int, str]]:
    """(exit code, stderr tail) of each process that has ended: why a round stalled."""
    return [(p.returncode, p.communicate()[1][-2000:]) for p in processes if p.poll() is not None]


def _published_model(server: Server, app: str, key: str, version: int) -> dict[str, np.ndarray]:
    from edgeperso.federation import FederationClient, FederationConfig
    from edgeperso.federation._wire import decode_tensors

    config = FederationConfig(server.url, app, key, opt_in=True)
    with FederationClient(config, MemoryStateStore()) as client:
        model, _ = decode_tensors(client._request("GET", f"/v1/models/{version}").content)
    return model


def _assert_model(actual: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, atol=1e-5, err_msg=name)


def test_round_with_device_processes_publishes_the_mean_of_survivors_after_a_sigkill(
    database_url: str, tmp_path: Path
) -> None:
    server = Server(database_url, tmp_path / "coordinator.log").start()
    try:
        app = f"app-{uuid.uuid4().hex[:8]}"
        key = new_app(server, app)
        cohort = 5
        round_id = open_round(
            server, app, cohort_size=cohort, min_survivors=3, stage_timeout_s=8, target_dropout=0.1
        )
        devices = [_spawn(server, app, key, tmp_path / f"dev{s}", s) for s in range(cohort - 1)]
        # The fifth device dies (SIGKILL) right after it sent its key shares.
        victim = _spawn(server, app, key, tmp_path / "dev4", 4, "--die-after", "shares")
        assert victim.wait(timeout=60) == -9, victim.communicate()[1][-2000:]
        results = [d.communicate(timeout=90) for d in devices]
        outcomes = [json.loads(out) for out, _ in results]
        assert {o["status"] for o in outcomes} == {"published"}, [err[-2000:] for _, err in results]
        version = outcomes[0]["version"]
        assert version == 1
        expected = _expected_model(round_id, cohort, [0, 1, 2, 3])
        _assert_model(_published_model(server, app, key, version), expected)
        # Each device got back the parameters of its own (re-chosen) persona.
        for seed, outcome in enumerate(outcomes):
            persona = outcome["persona"]
            assert persona == seed % LAYOUT.num_personas
            np.testing.assert_allclose(
                outcome["params"]["persona_head"],
                expected[persona_key(persona, "persona_head")],
                atol=1e-5,
            )
        assert round_stage(server, app, round_id)["stage"] == "published"
    finally:
        server.kill()


def test_coordinator_killed_mid_round_restarts_and_the_round_completes(
    database_url: str, tmp_path: Path
) -> None:
    server = Server(database_url, tmp_path / "coordinator.log").start()
    try:
        app = f"app-{uuid.uuid4().hex[:8]}"
        key = new_app(server, app)
        cohort = 4
        round_id = open_round(server, app, cohort_size=cohort, min_survivors=4, stage_timeout_s=20)
        devices = [_spawn(server, app, key, tmp_path / f"dev{s}", s) for s in range(cohort - 1)]
        # The last device holds the round in unmasking: it uploaded, it has not revealed yet.
        held = _spawn(server, app, key, tmp_path / "dev3", 3, "--pause-after", "masked")
        try:
            wait_until(
                lambda: round_stage(server, app, round_id)["stage"] == "unmasking",
                60,
                "the round to reach the unmasking stage",
            )
        except AssertionError as exc:
            raise AssertionError(
                f"{exc}; devices that exited: {_exited([*devices, held])}"
            ) from None
        server.kill()  # SIGKILL: no shutdown hooks run
        server.start()  # same port, same database
        assert held.stdin is not None
        held.stdin.write("go\n")  # reveal now, to the restarted coordinator
        held.stdin.flush()
        outcomes = [json.loads(d.communicate(timeout=90)[0]) for d in [*devices, held]]
        assert {o["status"] for o in outcomes} == {"published"}
        expected = _expected_model(round_id, cohort, list(range(cohort)))
        _assert_model(_published_model(server, app, key, 1), expected)
    finally:
        server.kill()


def test_device_killed_by_the_os_resumes_after_restart_and_is_counted(
    server: Server, tmp_path: Path
) -> None:
    app = f"app-{uuid.uuid4().hex[:8]}"
    key = new_app(server, app)
    # Every device must be back within a stage's timeout: the restarted one starts a fresh
    # interpreter, which took seconds on a loaded 2-core machine. Slack only, never waited out.
    round_id = open_round(server, app, cohort_size=3, min_survivors=3, stage_timeout_s=45)
    devices = [_spawn(server, app, key, tmp_path / f"dev{s}", s) for s in range(2)]
    first = _spawn(server, app, key, tmp_path / "dev2", 2, "--die-after", "join")
    assert first.wait(timeout=60) == -9, first.communicate()[1][-2000:]
    again = _spawn(server, app, key, tmp_path / "dev2", 2, "--resume")
    results = [d.communicate(timeout=120) for d in [*devices, again]]
    outcomes = [json.loads(out) if out.strip() else {"status": None} for out, _ in results]
    assert {o["status"] for o in outcomes} == {"published"}, (
        outcomes,
        round_stage(server, app, round_id),
        [(d.returncode, err[-2000:]) for d, (_, err) in zip([*devices, again], results)],
    )
    expected = _expected_model(round_id, 3, [0, 1, 2])
    _assert_model(_published_model(server, app, key, 1), expected)
