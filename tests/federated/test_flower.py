"""EdgePerso rounds through Flower's simulation engine (ray), checked against plain numpy.

One simulation with five SuperNodes runs every scenario in turn, because starting the engine
is the slow part: plain mean, plain trimmed mean, a device that tries to send a user-level
parameter, a SecAgg+ round, a SecAgg+ round in which a device drops after sharing its keys,
and plain DP rounds until the privacy budget refuses one. Each published model is compared
with the same quantities computed here from the devices' raw deltas.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")  # no call to api.flower.ai
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# No GPUs here; without this ray warns that its default will change.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")

import dataclasses
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip(
    "flwr", reason="Flower is optional: pip install --no-deps -r federated/requirements-flower.txt"
)
pytest.importorskip("ray", reason="Flower's simulation engine needs ray: flwr[simulation]")

from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
from dp_accounting.rdp import RdpAccountant
from edgeperso_federated import RoundConfig
from edgeperso_federated.flower import (
    FlowerRounds,
    LocalUpdate,
    PublishedRound,
    client_app,
    quantization_range,
    run_rounds,
    secaggplus_workflow,
)
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from edgeperso import BudgetExhaustedError, InvalidInputError
from edgeperso.federation import RoundTask
from edgeperso.federation._layout import persona_key

# The model and the devices' data are the deployment test's Flower app's (flower_app/).
sys.path.insert(0, str(Path(__file__).parent / "flower_app"))
from edgeperso_flwr_app.task import LAYOUT, device_data, initial_model

NODES = 5
DROPPED = 3  # leaves the dropout round after sharing its keys
LEAKER = 4  # tries to send a user-level parameter in the "leak" round
# DP rounds: noise multiplier, sampling probability, delta, and the seed of the server's noise.
Z, Q, DELTA, SEED = 1.0, 0.1, 1e-5, 7


def train(task: RoundTask, context: Context) -> LocalUpdate:
    """The device: local "training" adds its delta to the persona/global parameters."""
    node = int(context.node_config["partition-id"])
    scenario, server_round = task.round_id.split("/")
    if scenario == "dropout" and node == DROPPED:
        raise ConnectionError("the device went offline")
    data = device_data(node, scenario, int(server_round))
    before = task.params_for(task.persona_for(data.summary))
    after = {name: value + data.delta.get(name, 0.0) for name, value in before.items()}
    if scenario == "leak" and node == LEAKER:
        after["user_lora_b"] = np.ones((4, 3))
    return LocalUpdate(before, after, data.summary, data.num_examples)


def config(scenario: str, **overrides: Any) -> RoundConfig:
    values: dict[str, Any] = dict(
        app_id=scenario,
        model_version=0,
        cohort_size=NODES,
        min_survivors=3,
        secure=False,
        clip_norm=1.0,
        summary_clip=2.5,
        weight_cap=6.0,
        # Generous: the first round of a fresh ray cluster waits for its actors to start and
        # import, which took over 60 s on a loaded 2-core machine. No scenario waits for a
        # timeout to pass (the dropout device fails fast), so this costs nothing otherwise.
        join_timeout_s=300.0,
        stage_timeout_s=300.0,
        min_persona_weight=1.0,  # 5 nodes, 2 personas: arithmetic, not the privacy floor
    )
    return RoundConfig(**(values | overrides))


SCENARIOS: dict[str, tuple[RoundConfig, int]] = {
    "plain": (config("plain"), 1),
    "trimmed": (config("trimmed", aggregator="trimmed_mean", trim_fraction=0.2), 1),
    "leak": (config("leak"), 1),
    "secure": (config("secure", secure=True), 1),
    "dropout": (config("dropout", secure=True), 1),
    "dp": (config("dp", noise_multiplier=Z, sampling_probability=Q), 3),
}


def epsilon_after(rounds: int) -> float:
    accountant = RdpAccountant()
    for _ in range(rounds):
        accountant.compose(PoissonSampledDpEvent(Q, GaussianDpEvent(Z)))
    return float(accountant.get_epsilon(DELTA))


@dataclasses.dataclass
class Run:
    rounds: dict[str, FlowerRounds]
    published: dict[str, list[PublishedRound]]
    seconds: dict[str, float]
    error: BaseException | None
    wall_s: float


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    # Flower writes a telemetry source id under FLWR_HOME (~/.flwr by default) even with
    # telemetry off; keep it out of the real home.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FLWR_HOME", str(tmp_path_factory.mktemp("flwr-home")))
        return _simulate()


def _simulate() -> Run:
    rounds: dict[str, FlowerRounds] = {}
    published: dict[str, list[PublishedRound]] = {}
    seconds: dict[str, float] = {}
    budget = (epsilon_after(2) + epsilon_after(3)) / 2  # pays for two DP rounds, not three
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        for scenario, (round_config, num_rounds) in SCENARIOS.items():
            dp = scenario == "dp"
            rounds[scenario] = FlowerRounds(
                initial_model(),
                LAYOUT,
                round_config,
                epsilon_budget=budget if dp else None,
                delta=DELTA,
                seed=SEED,
            )
            start = time.perf_counter()
            try:
                published[scenario] = run_rounds(grid, context, rounds[scenario], num_rounds)
            finally:
                seconds[scenario] = time.perf_counter() - start

    backend = {
        "client_resources": {"num_cpus": 2},
        "init_args": {"num_cpus": 2, "include_dashboard": False},
    }
    start = time.perf_counter()
    error: BaseException | None = None
    try:
        run_simulation(
            server,
            client_app(train, allow_plain_rounds=True),
            num_supernodes=NODES,
            backend_config=backend,
        )
    except BudgetExhaustedError as exc:
        error = exc
    wall_s = time.perf_counter() - start
    print(f"\nFlower simulation {wall_s:.1f} s:", {k: round(v, 2) for k, v in seconds.items()})
    return Run(rounds, published, seconds, error, wall_s)


# ---- the same quantities in plain numpy --------------------------------------------------


def wire(x: np.ndarray) -> np.ndarray:
    """A float64 value as a plain upload carries it (float32)."""
    return x.astype(np.float32).astype(np.float64)


def contribution(node: int, scenario: str, server_round: int, model: dict[str, np.ndarray]):
    """(persona, clipped global delta [16], clipped persona delta [6], summary [3], weight)."""
    data = device_data(node, scenario, server_round)
    persona = int(np.argmin(np.linalg.norm(model["centroids"] - data.summary, axis=1)))
    global_delta = np.concatenate([data.delta["head_bias"], data.delta["shared_lora_b"].ravel()])
    persona_delta = data.delta["persona_head"].ravel()
    norm = np.linalg.norm(np.concatenate([global_delta, persona_delta]))
    clip = min(1.0, 1.0 / norm)
    summary = data.summary * min(1.0, 2.5 / np.linalg.norm(data.summary))
    weight = min(1.0, data.num_examples / 6.0)
    return persona, clip * global_delta, clip * persona_delta, summary, weight


def expected_model(
    model: dict[str, np.ndarray],
    scenario: str,
    server_round: int,
    nodes: list[int],
    *,
    float32_uploads: bool = False,
    noise: np.ndarray | None = None,  # [36] DP noise added to the summed vector
) -> dict[str, np.ndarray]:
    g_sum, p_sum, s_sum, w_sum = np.zeros(16), np.zeros((2, 6)), np.zeros((2, 3)), np.zeros(2)
    for node in nodes:
        persona, g, p, s, w = contribution(node, scenario, server_round, model)
        parts = [w * g, w * p, w * s, np.array([w])]
        if float32_uploads:
            parts = [wire(x) for x in parts]
        g_sum += parts[0]
        p_sum[persona] += parts[1]
        s_sum[persona] += parts[2]
        w_sum[persona] += parts[3][0]
    if noise is not None:
        g_sum += noise[:16]
        blocks = noise[16:].reshape(2, 10)
        p_sum, s_sum, w_sum = p_sum + blocks[:, :6], s_sum + blocks[:, 6:9], w_sum + blocks[:, 9]
    out = {name: value.copy() for name, value in model.items()}
    if w_sum.sum() >= 1.0:
        g_mean = g_sum / w_sum.sum()
        out["head_bias"] = (model["head_bias"] + g_mean[:4]).astype(np.float32)
        out["shared_lora_b"] = (model["shared_lora_b"] + g_mean[4:].reshape(4, 3)).astype(
            np.float32
        )
    for k in range(2):
        if w_sum[k] < 1.0:  # min_persona_weight: too little weight keeps the persona as it was
            continue
        key = persona_key(k, "persona_head")
        out[key] = (model[key] + (p_sum[k] / w_sum[k]).reshape(3, 2)).astype(np.float32)
        out["centroids"][k] = (s_sum[k] / w_sum[k]).astype(np.float32)
    return out


def expected_trimmed(model: dict[str, np.ndarray], trim_fraction: float) -> dict[str, np.ndarray]:
    """Coordinate-wise trimmed means of the unweighted float32 uploads, per block."""

    def unweighted(x: np.ndarray, w: float) -> np.ndarray:
        return wire(w * x) / wire(np.array(w))

    def trimmed(rows: list[np.ndarray]) -> np.ndarray:
        cut = int(trim_fraction * len(rows))
        return np.sort(np.stack(rows), axis=0)[cut : len(rows) - cut].mean(axis=0)

    rows = [contribution(node, "trimmed", 1, model) for node in range(NODES)]
    out = {name: value.copy() for name, value in model.items()}
    g_mean = trimmed([unweighted(g, w) for _, g, _, _, w in rows])
    out["head_bias"] = (model["head_bias"] + g_mean[:4]).astype(np.float32)
    out["shared_lora_b"] = (model["shared_lora_b"] + g_mean[4:].reshape(4, 3)).astype(np.float32)
    for k in range(2):
        members = [r for r in rows if r[0] == k]
        p_mean = trimmed([unweighted(p, w) for _, _, p, _, w in members])
        key = persona_key(k, "persona_head")
        out[key] = (model[key] + p_mean.reshape(3, 2)).astype(np.float32)
        out["centroids"][k] = np.mean([unweighted(s, w) for _, _, _, s, w in members], axis=0)
    return out


def assert_models_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], atol: float):
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=atol, err_msg=name)


# Published models are float32: `old + mean delta` rounds to within ~1e-7 of the float64 value.
FLOAT32_ATOL = 1e-6
# Flower's SecAgg+ stochastic rounding: at most 2c/q per device and coordinate (c = 2.5 here).
SECAGG_ATOL = FLOAT32_ATOL + NODES * 2 * 2.5 / quantization_range(NODES)


# ---- the tests ---------------------------------------------------------------------------


def test_plain_round_equals_numpy_weighted_means(run: Run) -> None:
    (published,) = run.published["plain"]
    assert published.survivors == NODES and published.model_version == 1
    want = expected_model(initial_model(), "plain", 1, list(range(NODES)), float32_uploads=True)
    assert_models_close(dict(published.model), want, FLOAT32_ATOL)


def test_frozen_lora_a_is_shared_and_only_b_is_averaged(run: Run) -> None:
    model = initial_model()
    for scenario in ("plain", "secure"):
        got = run.published[scenario][0].model
        np.testing.assert_array_equal(got["shared_lora_a"], model["shared_lora_a"])
        assert not np.allclose(got["shared_lora_b"], model["shared_lora_b"])


def test_trimmed_mean_round_equals_numpy(run: Run) -> None:
    (published,) = run.published["trimmed"]
    want = expected_trimmed(initial_model(), trim_fraction=0.2)
    assert_models_close(dict(published.model), want, FLOAT32_ATOL)


def test_user_level_parameter_never_leaves_the_device(run: Run) -> None:
    (published,) = run.published["leak"]
    assert published.survivors == NODES - 1
    honest = [n for n in range(NODES) if n != LEAKER]
    want = expected_model(initial_model(), "leak", 1, honest, float32_uploads=True)
    assert_models_close(dict(published.model), want, FLOAT32_ATOL)


def test_secaggplus_round_equals_numpy_within_quantization(run: Run) -> None:
    (published,) = run.published["secure"]
    assert published.survivors == NODES
    want = expected_model(initial_model(), "secure", 1, list(range(NODES)))
    assert_models_close(dict(published.model), want, SECAGG_ATOL)


def test_secaggplus_round_survives_a_dropout_after_key_sharing(run: Run) -> None:
    (published,) = run.published["dropout"]
    assert published.survivors == NODES - 1
    survivors = [n for n in range(NODES) if n != DROPPED]
    want = expected_model(initial_model(), "dropout", 1, survivors)
    # Without node 3, persona 1 has less than min_persona_weight and keeps its parameters.
    np.testing.assert_array_equal(
        want[persona_key(1, "persona_head")], initial_model()[persona_key(1, "persona_head")]
    )
    assert_models_close(dict(published.model), want, SECAGG_ATOL)


def test_dp_rounds_add_calibrated_noise_and_report_the_accountants_epsilon(run: Run) -> None:
    published = run.rounds["dp"].published
    assert [p.server_round for p in published] == [1, 2]
    assert published[0].epsilon == pytest.approx(epsilon_after(1), rel=1e-12)
    assert published[1].epsilon == pytest.approx(epsilon_after(2), rel=1e-12)
    std = Z * np.sqrt(1.0**2 + 2.5**2 + 1.0)  # z x sensitivity (clip, summary clip, weight)
    noise = np.random.default_rng(SEED)
    model = initial_model()
    for server_round, result in enumerate(published, start=1):
        draw = noise.normal(0.0, std, size=LAYOUT.length)
        model = expected_model(
            model, "dp", server_round, list(range(NODES)), float32_uploads=True, noise=draw
        )
        assert_models_close(dict(result.model), model, FLOAT32_ATOL)


def test_a_round_past_the_privacy_budget_is_refused(run: Run) -> None:
    assert isinstance(run.error, BudgetExhaustedError)
    assert "over the app's budget" in str(run.error)
    assert len(run.rounds["dp"].published) == 2


def test_secaggplus_is_sized_from_cohort_and_target_dropout() -> None:
    for dropout, shares, threshold in ((0.05, 23, 12), (0.10, 35, 18)):
        workflow = secaggplus_workflow(
            config("big", secure=True, cohort_size=100, min_survivors=80, target_dropout=dropout)
        )
        assert (workflow.num_shares, workflow.reconstruction_threshold) == (shares, threshold)
    small = secaggplus_workflow(config("small", secure=True))
    assert (small.num_shares, small.reconstruction_threshold) == (NODES, 3)
    with pytest.raises(InvalidInputError, match="at least 3"):
        secaggplus_workflow(config("pair", secure=True, cohort_size=2, min_survivors=2))


def test_a_persona_at_the_weight_floor_is_updated_whichever_way_secaggplus_rounds() -> None:
    """SecAgg+'s stochastic rounding returns one device's weight of 1 (the default
    min_persona_weight) as 1 minus a quantization step about one time in five; the persona
    must be updated either way, as a plain round would."""
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    cfg = config("floor", secure=True)
    q = quantization_range(NODES)
    weights = {
        float(dequantize(quantize([np.array([1.0])], 2.5, q), 2.5, q)[0][0]) for _ in range(200)
    }
    assert min(weights) < 1.0 <= max(weights)  # both ways, with Flower's own functions
    start = LAYOUT.global_size
    for weight in sorted(weights):
        total = np.zeros(LAYOUT.length)
        total[start : start + LAYOUT.persona_size] = 0.5 * weight  # one device's persona delta
        total[start + LAYOUT.block_size - 1] = weight
        published = FlowerRounds(initial_model(), LAYOUT, cfg).publish_sum(1, total, 1)
        key = persona_key(0, "persona_head")
        np.testing.assert_allclose(published.model[key], initial_model()[key] + 0.5, atol=1e-6)


def test_a_plain_update_with_a_weight_no_device_gives_is_refused_as_by_the_coordinator() -> None:
    """A subnormal weight and a tiny summary: the trimmed mean divides each upload by its
    weight, so this would publish a centroid near 1e38."""
    rounds = FlowerRounds(initial_model(), LAYOUT, config("tiny", aggregator="trimmed_mean"))
    evil = np.zeros(LAYOUT.length, np.float32)
    start = LAYOUT.global_size
    evil[start + LAYOUT.persona_size] = 1e-6
    evil[start + LAYOUT.block_size - 1] = 1e-45
    with pytest.raises(InvalidInputError, match="weight"):
        rounds.check_plain(evil)


@pytest.mark.parametrize("allowed", [False, True])
def test_the_client_app_answers_plain_rounds_only_when_the_app_allows_them(
    allowed: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ClientApp called as a SuperNode calls it, with an empty plain-round message: the
    default refuses before reading it; allowed, it goes on to read the (missing) task."""
    from edgeperso_federated.flower._records import PLAIN_TRAIN
    from flwr.app import Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from edgeperso import UnsupportedError

    for name in ("_run_id", "_node_id", "_task_id"):  # what a SuperNode's process sets
        monkeypatch.setattr(TaskIdentity, name, 1)
    trained: list[RoundTask] = []
    app = client_app(lambda task, context: trained.append(task), allow_plain_rounds=allowed)
    message = Message(RecordDict(), dst_node_id=1, message_type=PLAIN_TRAIN)
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    expected = KeyError if allowed else UnsupportedError
    with pytest.raises(expected):
        app(message, context)
    assert trained == []


def test_the_device_package_never_imports_flower() -> None:
    code = (
        "import sys, edgeperso, edgeperso.federation, edgeperso_federated\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flwr', 'ray')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_client_app_imports_none_of_the_coordinator() -> None:
    """Flower starts a ClientApp process per message: it loads the device side only."""
    code = (
        "import sys\n"
        "from edgeperso_federated.flower import LocalUpdate, client_app\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'sqlalchemy', 'fastapi', 'uvicorn', 'dp_accounting', 'scipy'}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
