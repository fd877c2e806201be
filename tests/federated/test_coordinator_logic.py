"""The coordinator's round logic in-process (no HTTP): personas, DP, robust aggregation."""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from _fixtures import (
    ADMIN_TOKEN,
    LAYOUT,
    contribution,
    initial_model,
    joined_with_keys,
    local_update,
    model_payload,
)
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
from dp_accounting.rdp import RdpAccountant
from edgeperso_federated import (
    Coordinator,
    CoordinatorConfig,
    RoundConfig,
    _aggregate,
    _db,
    _privacy,
    _rounds,
)
from edgeperso_federated._db import masked_sums, uploads
from edgeperso_federated._errors import RoundConflictError
from edgeperso_federated._rounds import Device

from edgeperso import BudgetExhaustedError, InvalidInputError
from edgeperso.federation import RoundTask
from edgeperso.federation._layout import persona_key
from edgeperso.federation._protocol import SecAggClient
from edgeperso.federation._secagg import encode_fixed_point
from edgeperso.federation._update import build_contribution
from edgeperso.federation._wire import decode_tensors, encode_tensors


@pytest.fixture
def coordinator(tmp_path: Path) -> Coordinator:
    config = CoordinatorConfig(
        admin_token=ADMIN_TOKEN, database_url=f"sqlite:///{tmp_path / 'c.db'}"
    )
    return Coordinator(config)


def _app(coord: Coordinator, **app: Any) -> tuple[str, str]:
    app_id = f"app-{uuid.uuid4().hex[:6]}"
    key = coord.create_app(app_id, app.get("epsilon_budget"), app.get("delta", 1e-5))
    coord.put_model(app_id, 0, model_payload())
    return app_id, key


def _drive(
    coord: Coordinator, app_id: str, key: str, vectors: list[np.ndarray], task: dict[str, Any]
) -> dict[str, Any]:
    """Devices join, and run every stage through the coordinator's methods."""
    rid = task["round_id"]
    devices = [Device(coord.enrol(app_id, key)[0], app_id) for _ in vectors]
    if not task["secure"]:
        for d in devices:
            coord.join(rid, d, None, None)
        for d, v in zip(devices, vectors):
            coord.submit_upload(rid, d, encode_tensors({"update": v.astype(np.float32)}))
        return coord.status(rid, app_id)
    clients = [SecAggClient.start(rid) for _ in devices]
    for d, c in zip(devices, clients):
        coord.join(rid, d, c.c_pk, c.s_pk)
    for d, c in zip(devices, clients):
        nb = coord.neighbours(rid, d)
        peers = {p["index"]: (p["c_pk"], p["s_pk"]) for p in nb["neighbours"]}
        coord.submit_shares(rid, d, c.share_keys(nb["index"], peers, nb["threshold"]))
    for d, c, v in zip(devices, clients, vectors):
        inbox = {s["from"]: s["sealed"] for s in coord.inbox(rid, d)}
        masked = c.masked_input(encode_fixed_point(v, task["fixed_point_scale"]), inbox)
        coord.submit_upload(rid, d, encode_tensors({"masked": masked}))
    for d, c in zip(devices, clients):
        coord.submit_reveal(rid, d, c.reveal(coord.survivors(rid, d)))
    return coord.status(rid, app_id)


def _round(
    coord: Coordinator, app_id: str, n: int, **config: Any
) -> tuple[dict[str, Any], RoundTask]:
    config.setdefault("min_persona_weight", 1.0)  # arithmetic on a few devices: see _fixtures
    coord.create_round(
        RoundConfig(app_id=app_id, model_version=0, cohort_size=n, min_survivors=2, **config)
    )
    task = coord.task(app_id)
    assert task is not None
    return task, RoundTask.from_json(task, initial_model())


def test_persona_sums_and_counts_match_a_plain_computation(coordinator: Coordinator) -> None:
    app_id, key = _app(coordinator)
    task_json, task = _round(coordinator, app_id, 7)
    vectors = [contribution(task, seed) for seed in range(7)]
    status = _drive(coordinator, app_id, key, vectors, task_json)
    assert status["stage"] == "published"
    model, _ = decode_tensors(coordinator.model(app_id, status["published_version"]))
    _, persona_sums, summaries, weights = LAYOUT.unpack(np.sum(vectors, axis=0))
    np.testing.assert_array_equal(weights, [3, 2, 2])  # seeds 0..6 mod 3 personas
    start = initial_model()
    for p in range(3):
        np.testing.assert_allclose(
            model[persona_key(p, "persona_head")],
            start[persona_key(p, "persona_head")] + (persona_sums[p] / weights[p]).reshape(3, 4),
            atol=1e-5,
        )
        np.testing.assert_allclose(model["centroids"][p], summaries[p] / weights[p], atol=1e-5)
    # The frozen shared LoRA A is never averaged: it stays bit-identical.
    np.testing.assert_array_equal(model["shared_lora_a"], start["shared_lora_a"])


def test_by_default_a_persona_fewer_than_three_devices_chose_keeps_its_parameters(
    coordinator: Coordinator,
) -> None:
    """At a floor of one device, a persona that one device chose was published as that
    device's own delta, and its centroid as its user's summary (the texts' mean embedding)."""
    assert RoundConfig.min_persona_weight == 3.0
    app_id, key = _app(coordinator)
    task_json, task = _round(coordinator, app_id, 7, min_persona_weight=3.0)
    vectors = [contribution(task, seed) for seed in range(7)]  # personas 0..6 mod 3: 3, 2, 2
    status = _drive(coordinator, app_id, key, vectors, task_json)
    assert status["stage"] == "published"
    model, _ = decode_tensors(coordinator.model(app_id, status["published_version"]))
    start = initial_model()
    name = persona_key(0, "persona_head")
    assert not np.allclose(model[name], start[name])  # three devices: updated
    for p in (1, 2):  # two devices each: kept
        name = persona_key(p, "persona_head")
        np.testing.assert_array_equal(model[name], start[name])
        np.testing.assert_array_equal(model["centroids"][p], start["centroids"][p])


def test_a_persona_at_the_weight_floor_is_updated_despite_the_sums_rounding() -> None:
    """A secure sum decodes a summed weight of exactly min_persona_weight as a hair below it;
    within the encoding's error bound it still counts, beyond it it does not."""
    config = RoundConfig(
        app_id="a", model_version=0, cohort_size=4, min_survivors=3, min_persona_weight=1.0
    )
    total = np.zeros(LAYOUT.length)
    total[LAYOUT.global_size + LAYOUT.block_size - 1] = 1.0 - 1e-9  # persona 0's weight
    total[LAYOUT.global_size : LAYOUT.global_size + LAYOUT.persona_size] = 0.5
    error = _aggregate.fixed_point_error(4, 2.0**20)  # 4 values rounded to steps of 2^-20
    assert np.isnan(_aggregate.means_of_sum(total, LAYOUT, config).persona_means[0]).all()
    means = _aggregate.means_of_sum(total, LAYOUT, config, weight_error=error)
    np.testing.assert_allclose(means.persona_means[0], 0.5 / (1.0 - 1e-9))
    total[LAYOUT.global_size + LAYOUT.block_size - 1] = 1.0 - 2 * error
    means = _aggregate.means_of_sum(total, LAYOUT, config, weight_error=error)
    assert np.isnan(means.persona_means[0]).all()


def test_dp_epsilon_per_round_matches_dp_accounting_and_the_budget_stops_rounds(
    coordinator: Coordinator,
) -> None:
    app_id, key = _app(coordinator, epsilon_budget=2.2, delta=1e-5)
    z, q = 4.0, 1.0  # four rounds fit (epsilon 1.01, 1.48, 1.85, 2.17), the fifth would not
    published = 0
    while True:
        try:
            task_json, task = _round(
                coordinator, app_id, 3, noise_multiplier=z, sampling_probability=q
            )
        except BudgetExhaustedError as exc:
            assert "budget" in str(exc)
            break
        vectors = [contribution(task, seed) for seed in range(3)]
        assert _drive(coordinator, app_id, key, vectors, task_json)["stage"] == "published"
        published += 1
        assert published <= 4, "the budget should have stopped the fifth round"
    ledger = coordinator.privacy_ledger(app_id)
    assert len(ledger) == published
    for rounds_so_far, entry in enumerate(ledger, start=1):
        accountant = RdpAccountant()
        accountant.compose(
            SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), rounds_so_far)
        )
        assert entry["epsilon"] == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    assert published == 4 and ledger[-1]["epsilon"] <= 2.2


def test_a_round_missing_its_minimum_aborts_and_publishes_nothing(coordinator: Coordinator) -> None:
    app_id, key = _app(coordinator)
    coordinator.create_round(
        RoundConfig(
            app_id=app_id, model_version=0, cohort_size=5, min_survivors=4, join_timeout_s=1
        )
    )
    task = coordinator.task(app_id)
    assert task is not None
    device = Device(coordinator.enrol(app_id, key)[0], app_id)
    client = SecAggClient.start(task["round_id"])
    coordinator.join(task["round_id"], device, client.c_pk, client.s_pk)
    coordinator.tick(now=task["stage_deadline"] + 1)
    status = coordinator.status(task["round_id"], app_id)
    assert status["stage"] == "aborted" and "joined" in status["reason"]
    with pytest.raises(Exception, match="no model version 1"):
        coordinator.model(app_id, 1)


def test_trimmed_mean_resists_a_poisoned_update_when_secure_aggregation_is_off(
    coordinator: Coordinator,
) -> None:
    app_id, key = _app(coordinator)
    task_json, task = _round(
        coordinator, app_id, 10, secure=False, aggregator="trimmed_mean", trim_fraction=0.2
    )
    honest = [contribution(task, 3 * seed) for seed in range(9)]  # all persona 0
    poisoned = honest[0].copy()
    poisoned[: LAYOUT.global_size] = 1.0  # norm far above the clip: bounded, then trimmed
    status = _drive(coordinator, app_id, key, [*honest, poisoned], task_json)
    model, _ = decode_tensors(coordinator.model(app_id, status["published_version"]))
    shift = model["head_bias"] - initial_model()["head_bias"]
    # The server re-clips each upload, then drops the 2 lowest and 2 highest of the 10 values
    # of each coordinate (trim 0.2): computed here by hand, it is what was published.
    config = RoundConfig(app_id, 0, cohort_size=10, min_survivors=2, secure=False)
    bounded = np.array([_aggregate.bound_norm(v, LAYOUT, config)[:4] for v in [*honest, poisoned]])
    assert np.all(bounded[-1] == bounded.max(axis=0))  # clipped, still the largest everywhere
    trimmed = np.sort(bounded, axis=0)[2:8].mean(axis=0)
    np.testing.assert_allclose(shift, trimmed, atol=1e-6)
    # Control: untrimmed, the poisoned device would pull every coordinate up by over 0.02;
    # trimmed, each coordinate ends nearer the honest devices' own mean than that.
    honest_mean = bounded[:-1].mean(axis=0)
    pulled = bounded.mean(axis=0) - honest_mean
    assert np.all(pulled > 0.02)
    assert np.all(np.abs(shift - honest_mean) < pulled)


def test_a_device_learns_only_which_of_its_own_neighbours_survived(
    coordinator: Coordinator,
) -> None:
    """With 30 devices the SecAgg+ graph is sparse (k = 22): the survivor list a device gets
    covers itself and the neighbours that sent it shares, not the whole cohort."""
    app_id, key = _app(coordinator)
    task_json, task = _round(coordinator, app_id, 30, target_dropout=0.05)
    rid = task_json["round_id"]
    devices = [Device(coordinator.enrol(app_id, key)[0], app_id) for _ in range(30)]
    clients = [SecAggClient.start(rid) for _ in devices]
    for d, c in zip(devices, clients, strict=True):
        coordinator.join(rid, d, c.c_pk, c.s_pk)
    around: dict[int, set[int]] = {}
    for d, c in zip(devices, clients, strict=True):
        nb = coordinator.neighbours(rid, d)
        around[nb["index"]] = {p["index"] for p in nb["neighbours"]}
        peers = {p["index"]: (p["c_pk"], p["s_pk"]) for p in nb["neighbours"]}
        coordinator.submit_shares(rid, d, c.share_keys(nb["index"], peers, nb["threshold"]))
    assert {len(v) for v in around.values()} == {22}
    vector = contribution(task, 0)
    # The last device shared its keys and drops before uploading.
    for d, c in zip(devices[:-1], clients[:-1], strict=True):
        inbox = {s["from"]: s["sealed"] for s in coordinator.inbox(rid, d)}
        masked = c.masked_input(encode_fixed_point(vector, task.fixed_point_scale), inbox)
        coordinator.submit_upload(rid, d, encode_tensors({"masked": masked}))
    coordinator.tick(now=coordinator.status(rid, app_id)["stage_deadline"] + 1)
    quiet_index = clients[-1].index
    for d, c in zip(devices[:-1], clients[:-1], strict=True):
        survivors = set(coordinator.survivors(rid, d))
        assert survivors == ({c.index} | around[c.index]) - {quiet_index}
        coordinator.submit_reveal(rid, d, c.reveal(survivors))
    status = coordinator.status(rid, app_id)
    assert status["stage"] == "published", status


def test_a_secure_round_keeps_a_running_masked_sum_not_the_uploads(
    coordinator: Coordinator,
) -> None:
    app_id, key = _app(coordinator)
    task_json, task = _round(coordinator, app_id, 4)
    rid = task_json["round_id"]
    devices, clients = joined_with_keys(coordinator, app_id, key, rid, 4)
    masked = []
    for seed, (d, c) in enumerate(zip(devices[:3], clients[:3], strict=True)):
        inbox = {s["from"]: s["sealed"] for s in coordinator.inbox(rid, d)}
        vector = encode_fixed_point(contribution(task, seed), task.fixed_point_scale)
        masked.append(c.masked_input(vector, inbox))
        coordinator.submit_upload(rid, d, encode_tensors({"masked": masked[-1]}))
    with coordinator.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(uploads)).scalar() == 0
        stored = conn.execute(sa.select(masked_sums.c.vector)).scalars().all()
    expected = np.zeros(LAYOUT.length, np.uint32)
    for y in masked:
        expected += y
    assert len(stored) == 1
    np.testing.assert_array_equal(np.frombuffer(stored[0], dtype="<u4"), expected)


def _filled_round(coordinator: Coordinator, round_id: str, cohort: int) -> None:
    """A secure round of `cohort` devices halfway through masked_input, written directly."""
    rng = np.random.default_rng(cohort)
    digest = "d" * 64
    with coordinator.engine.begin() as conn:
        conn.execute(_db.apps.insert(), {"app_id": "a", "enrolment_key_hash": "", "delta": 1e-6})
        conn.execute(
            _db.rounds.insert(),
            {
                "round_id": round_id,
                "app_id": "a",
                "config": "{}",
                "stage": "masked_input",
                "stage_deadline": 0.0,
                "created": 0.0,
            },
        )
        conn.execute(
            _db.participants.insert(),
            [
                {
                    "round_id": round_id,
                    "idx": i,
                    "device_id": f"device-{i}",
                    "c_pk": rng.bytes(32),
                    "s_pk": rng.bytes(32),
                    "join_digest": digest,
                    "shares_digest": digest,
                    "upload_digest": digest if i % 2 else None,
                }
                for i in range(1, cohort + 1)
            ],
        )
        conn.execute(
            _db.shares.insert(),
            [
                {
                    "round_id": round_id,
                    "sender": i,
                    "recipient": (i + d) % cohort + 1,
                    "sealed": b"",
                }
                for i in range(1, cohort + 1)
                for d in range(24)
            ],
        )


def _vm_steps(coordinator: Coordinator, query: Any, params: dict[str, Any]) -> int:
    """SQLite virtual-machine instructions (in tens) that running `query` takes."""
    steps = 0

    def count() -> int:
        nonlocal steps
        steps += 1
        return 0  # carry on

    with coordinator.engine.connect() as conn:
        driver = conn.connection.dbapi_connection
        assert driver is not None
        driver.set_progress_handler(count, 10)
        conn.execute(query, params).all()
        driver.set_progress_handler(None, 10)
    return steps


_HOT = ["_PARTICIPANT", "_LAST_INDEX", "_KEY_CLASH", "_PEERS", "_INBOX", "_SENDERS"]


@pytest.mark.parametrize(
    "statement", _HOT + [f"_PENDING:{column}:{expected}" for column, expected in _rounds._PENDING]
)
def test_per_request_queries_cost_the_same_in_a_round_of_100_or_2000_devices(
    tmp_path: Path, statement: str
) -> None:
    """Every device request runs these. Work that grows with the round (a scan of its rows)
    would make a stage of n devices cost O(n^2): with 1,000 devices the shares table holds
    24,000 rows. SQLite's virtual-machine steps measure the work."""
    name, *key = statement.split(":")
    query = getattr(_rounds, name)
    query = query[tuple(key)] if key else query
    steps = {}
    for cohort in (100, 2000):
        config = CoordinatorConfig(
            admin_token=ADMIN_TOKEN, database_url=f"sqlite:///{tmp_path / f'{cohort}.db'}"
        )
        coordinator = Coordinator(config)
        _filled_round(coordinator, "r", cohort)
        params = {"round_id": "r", "device_id": "device-50", "recipient": 50}
        params |= {"c_pk": b"x" * 32, "s_pk": b"y" * 32, "around": list(range(40, 64))}
        steps[cohort] = _vm_steps(coordinator, query, params)
    assert steps[2000] < 1.5 * steps[100] + 20, steps


def test_a_device_cannot_join_with_a_key_already_in_the_round(coordinator: Coordinator) -> None:
    app_id, key = _app(coordinator)
    task_json, _ = _round(coordinator, app_id, 5)
    rid = task_json["round_id"]
    first, second = (Device(coordinator.enrol(app_id, key)[0], app_id) for _ in range(2))
    mine, other = SecAggClient.start(rid), SecAggClient.start(rid)
    coordinator.join(rid, first, mine.c_pk, mine.s_pk)
    for c_pk, s_pk in [(mine.c_pk, other.s_pk), (other.c_pk, mine.c_pk), (other.s_pk, mine.s_pk)]:
        with pytest.raises(RoundConflictError, match="already in use"):
            coordinator.join(rid, second, c_pk, s_pk)
    assert coordinator.join(rid, second, other.c_pk, other.s_pk) == 2


@pytest.mark.parametrize("bad", ["c_pk", "s_pk"])
def test_a_device_cannot_join_with_a_low_order_key(coordinator: Coordinator, bad: str) -> None:
    """An all-zero key would make every honest neighbour's key agreement fail."""
    app_id, key = _app(coordinator)
    task_json, _ = _round(coordinator, app_id, 3)
    rid = task_json["round_id"]
    device = Device(coordinator.enrol(app_id, key)[0], app_id)
    mine = SecAggClient.start(rid)
    keys = {"c_pk": mine.c_pk, "s_pk": mine.s_pk, bad: bytes(32)}
    with pytest.raises(InvalidInputError, match=f"{bad} is a low-order X25519 point"):
        coordinator.join(rid, device, keys["c_pk"], keys["s_pk"])
    assert coordinator.join(rid, device, mine.c_pk, mine.s_pk) == 1


def _plain_vector(weight: float, summary_norm: float) -> np.ndarray:
    """A hand-made plain upload in persona 0's block: no deltas, a summary and a weight."""
    vector = np.zeros(LAYOUT.length, np.float32)
    start = LAYOUT.global_size
    vector[start + LAYOUT.persona_size] = summary_norm
    vector[start + LAYOUT.block_size - 1] = weight
    return vector


@pytest.mark.parametrize(
    ("weight_cap", "weight", "summary_norm"),
    [
        (None, 1e-45, 1e-6),  # subnormal: the trimmed mean's centroid would be 1e-6 / 1e-45
        (None, 0.5, 0.0),  # without a weight cap every device weighs exactly 1
        (10.0, 0.05, 0.0),  # one example already weighs 1 / weight_cap
        (1e6, 1e-6, 1.9e-6),  # within weight x summary_clip + 1e-6, far over it relatively
    ],
)
def test_a_plain_update_with_a_weight_no_device_gives_or_an_oversized_summary_is_refused(
    coordinator: Coordinator, weight_cap: float | None, weight: float, summary_norm: float
) -> None:
    app_id, key = _app(coordinator)
    task_json, task = _round(
        coordinator, app_id, 2, secure=False, aggregator="trimmed_mean", weight_cap=weight_cap
    )
    rid = task_json["round_id"]
    devices = [Device(coordinator.enrol(app_id, key)[0], app_id) for _ in range(2)]
    for d in devices:
        coordinator.join(rid, d, None, None)
    evil = encode_tensors({"update": _plain_vector(weight, summary_norm)})
    with pytest.raises(InvalidInputError, match=r"weigh|summary_clip"):
        coordinator.submit_upload(rid, devices[0], evil)
    # A device that trained on a single example gives the smallest weight, and is accepted.
    update = local_update(task, 0)
    update["num_examples"] = 1
    vector, _ = build_contribution(task, **update)
    coordinator.submit_upload(
        rid, devices[0], encode_tensors({"update": vector.astype(np.float32)})
    )


@pytest.mark.parametrize("z", [float("inf"), float("nan"), 1e308, -1.0])
def test_a_noise_multiplier_the_accountant_cannot_book_is_refused(z: float) -> None:
    """inf would book epsilon 0 and publish an unchanged model as a new version."""
    with pytest.raises(InvalidInputError, match="noise_multiplier must be in"):
        RoundConfig("a", 0, cohort_size=2, min_survivors=2, noise_multiplier=z)
    with pytest.raises(InvalidInputError, match="accountant"):
        _privacy.epsilon([(1e308, 1.0)], 1e-6)


@pytest.mark.parametrize("cap", [0.5, 0.0, float("inf")])
def test_a_weight_cap_devices_would_refuse_is_refused_when_the_round_is_created(
    cap: float,
) -> None:
    """Devices refuse a task whose weight_cap is below 1 example; a round opened with one
    would abort with nobody joined and no reason given."""
    with pytest.raises(InvalidInputError, match="weight_cap must be a number of examples >= 1"):
        RoundConfig("a", 0, cohort_size=2, min_survivors=2, weight_cap=cap)
    RoundConfig("a", 0, cohort_size=2, min_survivors=2, weight_cap=1.0)


def test_a_secure_round_no_device_can_encode_is_refused_when_it_is_created(
    coordinator: Coordinator,
) -> None:
    app_id, _ = _app(coordinator)
    huge = RoundConfig(app_id, 0, cohort_size=1000, min_survivors=500, clip_norm=1e7)
    with pytest.raises(InvalidInputError, match="lower the clip norm or the cohort size"):
        coordinator.create_round(huge)
    assert coordinator.task(app_id) is None  # nothing was opened; a plain round may run
    coordinator.create_round(dataclasses.replace(huge, secure=False))


def test_a_new_sqlite_database_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """It holds token hashes, masked uploads and per-persona sums; a umask of 022 made it,
    and its WAL, world-readable."""
    old = os.umask(0o022)
    try:
        database = tmp_path / "fresh.db"
        coordinator = Coordinator(
            CoordinatorConfig(admin_token=ADMIN_TOKEN, database_url=f"sqlite:///{database}")
        )
        _app(coordinator)  # a write: the WAL file exists now
    finally:
        os.umask(old)
    made = [p for p in tmp_path.iterdir() if p.name.startswith("fresh.db")]
    assert database in made and len(made) >= 2
    assert {p.name: p.stat().st_mode & 0o777 for p in made} == {p.name: 0o600 for p in made}
