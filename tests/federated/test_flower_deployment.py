"""EdgePerso's Flower apps on Flower's deployment engine: real processes on loopback.

test_flower.py runs the apps in one process (ray simulation). Here a `flower-superlink` and
three `flower-supernode`s (SecAgg+'s minimum) run as subprocesses on 127.0.0.1, over TLS with a
certificate from a private CA (as in production; nothing runs `--insecure`), and `flwr run` submits the app in flower_app/ twice at once: a plain round and a SecAgg+
round. The app is built into a FAB, installed under a temporary FLWR_HOME and imported by
the `flwr-serverapp`/`flwr-clientapp` processes Flower starts; its ServerApp writes each
published model to the `out-dir` of its run config, which is compared here with the same
quantity computed in numpy from the devices' known deltas.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip(
    "flwr", reason="Flower is optional: pip install --no-deps -r federated/requirements-flower.txt"
)

from _fixtures import free_port, issue_certificates, wait_until
from edgeperso_federated.flower import quantization_range

from edgeperso.federation._layout import persona_key

APP = Path(__file__).parent / "flower_app"
sys.path.insert(0, str(APP))

from edgeperso_flwr_app.task import (  # noqa: E402 - needs the app folder on sys.path
    CLIP_NORM,
    MIN_PERSONA_WEIGHT,
    NODES,
    SUMMARY_CLIP,
    WEIGHT_CAP,
    device_data,
    initial_model,
)

pytestmark = pytest.mark.slow  # about a minute: see RUN_TIMEOUT_S

# Flower's own entry points; the SuperLink and SuperNodes start theirs (flower-superexec,
# flwr-serverapp, flwr-clientapp) by name, so this folder goes first on their PATH.
SCRIPTS = Path(sysconfig.get_path("scripts"))
SCENARIOS = ("plain", "secure")
# Each SecAgg+ stage starts one `flwr-clientapp` process per node, and Flower polls every 3 s
# on both sides: about a minute on a loaded 2-core machine. Bounds only, never waited out.
RUN_TIMEOUT_S = 300.0
START_TIMEOUT_S = 60.0


def _process_groups(roots: list[int]) -> set[int]:
    """Process groups of `roots` and all their descendants.

    The SuperLink starts its flower-superexec (and that one the ServerApps) in a new session,
    so killing the SuperLink's own group would leave them running.
    """
    children: dict[int, list[int]] = {}
    groups: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile, or not Linux
        pid = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(pid)
        groups[pid] = int(fields[2])
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        found.add(groups.get(pid, pid))
        todo.extend(children.get(pid, []))
    return found


@dataclasses.dataclass
class Deployment:
    """Flower processes of one test, each in its own process group, logs and state in `root`."""

    root: Path
    port: int = dataclasses.field(default_factory=free_port)
    processes: list[subprocess.Popen[bytes]] = dataclasses.field(default_factory=list)
    names: list[str] = dataclasses.field(default_factory=list)  # of their logs

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PATH": f"{SCRIPTS}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(self.root / "home"),  # Flower writes nothing there: the last test checks
            "FLWR_HOME": str(self.root / "flwr-home"),  # config, installed FABs, runtime state
            "FLWR_TELEMETRY_ENABLED": "0",
            # Every Flower process would ask api.flower.ai for updates, telemetry off or not.
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.25",  # 1 s by default, per started app
        }

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
        process = subprocess.Popen(
            [str(SCRIPTS / args[0]), *args[1:]],
            cwd=self.root,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.processes.append(process)
        self.names.append(name)
        return process

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else ""

    def logs(self) -> str:
        """The end of every process's log, for a failure message."""
        return "".join(f"\n--- {name}.log\n{self.log(name)}" for name in self.names)

    def stop(self) -> None:
        for group in _process_groups([p.pid for p in self.processes]):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        for process in self.processes:
            process.wait(timeout=30)


def _accepts(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def deployment(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Deployment:
    """A SuperLink and NODES SuperNodes; `flwr` reaches the SuperLink as connection "test"."""
    if not (SCRIPTS / "flower-superlink").exists():
        pytest.skip(f"Flower's executables are not in {SCRIPTS}")
    deployment = Deployment(tmp_path_factory.mktemp("flower"))
    request.addfinalizer(deployment.stop)
    ca, cert, key = issue_certificates(deployment.root)
    home = deployment.root / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "test"\n\n'
        f'[superlink.test]\naddress = "{deployment.address}"\nroot-certificates = "{ca}"\n\n'
        # The same SuperLink without the CA: used to check that plaintext is refused.
        f'[superlink.plaintext]\naddress = "{deployment.address}"\ninsecure = true\n'
    )
    superlink = deployment.start(
        "superlink",
        "flower-superlink",
        f"--ssl-ca-certfile={ca}",
        f"--ssl-certfile={cert}",
        f"--ssl-keyfile={key}",
        "--host=127.0.0.1",
        f"--port={deployment.port}",  # Fleet, Control and Runtime APIs, all HTTP
        # The app's dependencies are this environment's: no `uv sync` from the network.
        "--disable-runtime-dependency-installation",
    )
    for node in range(NODES):  # they retry until the SuperLink is up
        deployment.start(
            f"supernode-{node}",
            "flower-supernode",
            f"--root-certificates={ca}",
            f"--superlink={deployment.address}",
            f"--port={free_port()}",  # its Runtime API, for the ClientApp processes
            f"--node-config=partition-id={node}",
        )

    def superlink_up() -> bool:
        assert superlink.poll() is None, deployment.log("superlink")
        return _accepts(deployment.address)

    wait_until(superlink_up, START_TIMEOUT_S, "the SuperLink to listen")
    return deployment


@dataclasses.dataclass(frozen=True)
class Published:
    survivors: int
    model_version: int
    model: dict[str, np.ndarray]


@pytest.fixture(scope="module")
def published(deployment: Deployment) -> dict[str, Published]:
    """Both rounds, submitted at once with `flwr run --stream`, which returns when its run ends
    (with status 0 even when the run failed: what it published is what counts)."""
    out = deployment.root / "published"
    out.mkdir()
    start = time.monotonic()
    runs = {
        scenario: deployment.start(
            f"run-{scenario}",
            "flwr",
            "run",
            str(APP),
            "test",
            f'--run-config=scenario="{scenario}" out-dir="{out}"',
            "--stream",
        )
        for scenario in SCENARIOS
    }
    seconds: dict[str, float] = {}

    def finished() -> bool:
        for scenario, run in runs.items():
            if scenario not in seconds and run.poll() is not None:
                seconds[scenario] = round(time.monotonic() - start, 1)
        return len(seconds) == len(runs)

    try:
        wait_until(finished, RUN_TIMEOUT_S, "both `flwr run`s to return", interval_s=0.2)
    except AssertionError as exc:
        raise AssertionError(f"{exc}{deployment.logs()}") from None
    print(f"\nFlower deployment, seconds from `flwr run` to the end of each run: {seconds}")
    result: dict[str, Published] = {}
    for scenario in SCENARIOS:
        path = out / f"{scenario}.npz"
        assert path.exists(), f"the {scenario} run published nothing{deployment.logs()}"
        with np.load(path) as saved:
            model = {k.split("/", 1)[1]: saved[k] for k in saved.files if k.startswith("model/")}
            result[scenario] = Published(
                int(saved["survivors"]), int(saved["model_version"]), model
            )
    return result


# ---- the same quantities in plain numpy --------------------------------------------------


def expected_model(scenario: str, *, float32_uploads: bool) -> dict[str, np.ndarray]:
    """The initial model plus the clipped, weighted mean deltas of all NODES devices."""
    model = initial_model()
    g_sum, p_sum, s_sum, w_sum = np.zeros(16), np.zeros((2, 6)), np.zeros((2, 3)), np.zeros(2)
    for node in range(NODES):
        data = device_data(node, scenario)
        persona = int(np.argmin(np.linalg.norm(model["centroids"] - data.summary, axis=1)))
        g = np.concatenate([data.delta["head_bias"], data.delta["shared_lora_b"].ravel()])
        p = data.delta["persona_head"].ravel()
        clip = min(1.0, CLIP_NORM / np.linalg.norm(np.concatenate([g, p])))
        s = data.summary * min(1.0, SUMMARY_CLIP / np.linalg.norm(data.summary))
        w = min(1.0, data.num_examples / WEIGHT_CAP)
        parts = [w * clip * g, w * clip * p, w * s, np.array([w])]
        if float32_uploads:  # a plain upload carries float32
            parts = [x.astype(np.float32).astype(np.float64) for x in parts]
        g_sum += parts[0]
        p_sum[persona] += parts[1]
        s_sum[persona] += parts[2]
        w_sum[persona] += parts[3][0]
    # Every persona gets new parameters, and no quantized sum of weights could say otherwise.
    assert np.all(w_sum > MIN_PERSONA_WEIGHT + 1e-3), w_sum
    out = {name: value.copy() for name, value in model.items()}
    g_mean = g_sum / w_sum.sum()
    out["head_bias"] = (model["head_bias"] + g_mean[:4]).astype(np.float32)
    out["shared_lora_b"] = (model["shared_lora_b"] + g_mean[4:].reshape(4, 3)).astype(np.float32)
    for k in range(2):
        key = persona_key(k, "persona_head")
        out[key] = (model[key] + (p_sum[k] / w_sum[k]).reshape(3, 2)).astype(np.float32)
        out["centroids"][k] = (s_sum[k] / w_sum[k]).astype(np.float32)
    return out


def assert_models_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], atol: float):
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=atol, err_msg=name)


# Published models are float32: `old + mean delta` rounds to within ~1e-7 of the float64 value.
FLOAT32_ATOL = 1e-6
# Flower's SecAgg+ stochastic rounding: at most 2c/q per device and coordinate (c = 2.5 here).
SECAGG_ATOL = FLOAT32_ATOL + NODES * 2 * SUMMARY_CLIP / quantization_range(NODES)


# ---- the tests ---------------------------------------------------------------------------


def test_plain_round_across_processes_equals_numpy(published: dict[str, Published]) -> None:
    result = published["plain"]
    assert (result.survivors, result.model_version) == (NODES, 1)
    assert_models_close(result.model, expected_model("plain", float32_uploads=True), FLOAT32_ATOL)


def test_secaggplus_round_across_processes_equals_numpy(published: dict[str, Published]) -> None:
    result = published["secure"]
    assert (result.survivors, result.model_version) == (NODES, 1)
    assert_models_close(result.model, expected_model("secure", float32_uploads=False), SECAGG_ATOL)


def test_every_persona_and_only_trainable_parameters_changed(
    published: dict[str, Published],
) -> None:
    before = initial_model()
    for result in published.values():
        np.testing.assert_array_equal(result.model["shared_lora_a"], before["shared_lora_a"])
        for name in (
            "head_bias",
            "shared_lora_b",
            *(persona_key(k, "persona_head") for k in range(2)),
        ):
            assert not np.allclose(result.model[name], before[name]), name


def test_flower_state_stays_in_the_temporary_flwr_home(
    deployment: Deployment, published: dict[str, Published]
) -> None:
    """The ServerApp and ClientApps ran the FAB from FLWR_HOME; Flower left nothing in HOME.

    (onnxruntime, which edgeperso imports, keeps a database under HOME/.cache wherever it runs.)
    """
    (installed,) = (deployment.root / "flwr-home" / "apps").iterdir()
    assert installed.name.startswith("edgeperso.edgeperso-flwr-test.1.0.0.")
    assert (installed / "edgeperso_flwr_app" / "server_app.py").exists()
    assert not (deployment.root / "home" / ".flwr").exists()


def test_the_superlink_serves_tls_only(deployment: Deployment, published: dict[str, Published]):
    """`flwr` trusting the private CA lists both runs; the same call in plaintext is refused."""

    def flwr_ls(connection: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPTS / "flwr"), "ls", connection, "--format=json"],
            cwd=deployment.root,
            env=deployment.env,
            capture_output=True,
            text=True,
            timeout=START_TIMEOUT_S,
        )

    # `flwr ls --format=json` exits 0 either way; its JSON says whether it succeeded.
    listed = json.loads(flwr_ls("test").stdout)
    assert listed["success"], listed
    assert len(listed["runs"]) == len(SCENARIOS)
    refused = json.loads(flwr_ls("plaintext").stdout)
    assert not refused["success"]
    assert "Connection to the SuperLink is unavailable" in refused["error-message"]
