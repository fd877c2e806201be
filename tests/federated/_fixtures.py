"""Shared helpers of the federated suite: a model, deterministic devices, a live coordinator."""

from __future__ import annotations

import base64
import datetime
import ipaddress
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgeperso.federation import FederatedParam, PersonaLayout, RoundTask
from edgeperso.federation._layout import persona_key
from edgeperso.federation._protocol import SecAggClient
from edgeperso.federation._secagg import encode_fixed_point
from edgeperso.federation._update import build_contribution
from edgeperso.federation._wire import encode_tensors

ADMIN_TOKEN = "test-admin-token-0123456789"
LAYOUT = PersonaLayout(
    (
        FederatedParam("head_bias", (4,), "global"),
        FederatedParam("shared_lora_a", (6, 2), "global", trainable=False),
        FederatedParam("shared_lora_b", (2, 5), "global"),
        FederatedParam("persona_head", (3, 4), "persona"),
    ),
    num_personas=3,
    summary_dim=4,
)
CENTROIDS = np.array([[3, 0, 0, 0], [0, 3, 0, 0], [0, 0, 3, 0]], dtype=np.float32)
# Strings that stand for a user's raw text and labels: they must never reach the coordinator.
RAW_TEXT = "my secret diary entry about Zanzibar"
LABEL = "label:very-private-emotion"


def initial_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    model: dict[str, np.ndarray] = {}
    for p in LAYOUT.params:
        if p.level == "global":
            model[p.name] = rng.normal(size=p.shape).astype(np.float32)
        else:
            for k in range(LAYOUT.num_personas):
                model[persona_key(k, p.name)] = rng.normal(size=p.shape).astype(np.float32)
    model["centroids"] = CENTROIDS.copy()
    return model


def model_payload(model: dict[str, np.ndarray] | None = None) -> bytes:
    return encode_tensors(model or initial_model(), {"layout": json.dumps(LAYOUT.to_json())})


def device_data(seed: int) -> dict[str, Any]:
    """A device's local result: its persona-ish summary and the training step it took.

    The raw text and label exist on the device (they drive the fake training) and must not
    leave it."""
    rng = np.random.default_rng(1000 + seed)
    persona = seed % LAYOUT.num_personas
    summary = CENTROIDS[persona] + rng.normal(scale=0.1, size=4)
    text_signal = sum(map(ord, RAW_TEXT + LABEL)) % 7
    steps = {
        p.name: rng.normal(scale=0.05, size=p.shape) * (1 + text_signal / 10)
        for p in LAYOUT.params
        if p.trainable
    }
    return {"summary": summary, "steps": steps, "examples": 10 + seed}


def local_update(task: RoundTask, seed: int) -> dict[str, Any]:
    data = device_data(seed)
    before = task.params_for(task.persona_for(data["summary"]))
    after = {k: v + data["steps"][k] if k in data["steps"] else v for k, v in before.items()}
    return {
        "before": before,
        "after": after,
        "summary": data["summary"],
        "num_examples": data["examples"],
    }


def contribution(task: RoundTask, seed: int) -> np.ndarray:
    update = local_update(task, seed)
    vector, _ = build_contribution(
        task, update["before"], update["after"], update["summary"], update["num_examples"]
    )
    return vector


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def issue_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A private CA and a server certificate it signs for 127.0.0.1 and localhost:
    (ca.pem, cert.pem, key.pem)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "EdgePerso test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def wait_until(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll `predicate` until truthy (bounded); the suite never sleeps blindly."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@dataclass
class Server:
    """`edgeperso-coordinator serve` in a subprocess on a loopback port."""

    database_url: str
    log_path: Path
    port: int = 0
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None
    ca_file: Path | None = None  # set when extra_args serve HTTPS: the CA that signed its cert

    @property
    def url(self) -> str:
        scheme = "http" if self.ca_file is None else "https"
        return f"{scheme}://127.0.0.1:{self.port}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        return True if self.ca_file is None else ssl.create_default_context(cafile=self.ca_file)

    @classmethod
    def sqlite(cls, root: Path, *extra_args: str) -> Server:
        """A coordinator (not started yet) with its SQLite database and log in `root`."""
        return cls(f"sqlite:///{root / 'coordinator.db'}", root / "coordinator.log", 0, extra_args)

    def start(self) -> Server:
        self.port = self.port or free_port()
        env = {**os.environ, "EDGEPERSO_ADMIN_TOKEN": ADMIN_TOKEN}
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgeperso_federated._cli",
                "serve",
                "--database-url",
                self.database_url,
                "--port",
                str(self.port),
                "--tick-s",
                "0.05",
                *self.extra_args,
            ],
            env=env,
            stdout=log,
            stderr=log,
        )
        log.close()
        try:
            wait_until(self._ready, 30, "the coordinator to accept connections")
        except AssertionError:
            self.kill()  # never leave a half-started coordinator behind
            raise
        return self

    def _ready(self) -> bool:
        assert self.process is not None and self.process.poll() is None, "coordinator exited"
        try:
            response = httpx.get(self.url + "/openapi.json", timeout=1, verify=self.verify)
            return response.status_code == 200
        except httpx.TransportError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            timeout=30,
            verify=self.verify,
        )


def new_app(server: Server, app_id: str, **app: Any) -> str:
    with server.admin() as admin:
        response = admin.post("/v1/admin/apps", json={"app_id": app_id, **app})
        assert response.status_code == 201, response.text
        key = str(response.json()["enrolment_key"])
        put = admin.put(f"/v1/admin/apps/{app_id}/models/0", content=model_payload())
        assert put.status_code == 204, put.text
    return key


def open_round(server: Server, app_id: str, **config: Any) -> str:
    # These rounds check arithmetic on cohorts of 2-5 devices: a floor of one device's weight
    # (the default, 3, is for privacy and has its own test).
    body = {"app_id": app_id, "model_version": 0, "min_persona_weight": 1.0, **config}
    with server.admin() as admin:
        response = admin.post("/v1/admin/rounds", json=body)
        assert response.status_code == 201, response.text
        return str(response.json()["round_id"])


def round_stage(server: Server, app_id: str, round_id: str) -> dict[str, Any]:
    with server.admin() as admin:
        result: dict[str, Any] = admin.get(f"/v1/admin/apps/{app_id}/rounds/{round_id}").json()
        return result


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def enrol(server: Server, app: str, key: str) -> tuple[httpx.Client, str]:
    """A new device of `app`: an HTTP client that sends its credential, and the credential."""
    enrolled = httpx.post(f"{server.url}/v1/devices", json={"app_id": app, "enrolment_key": key})
    assert enrolled.status_code == 201, enrolled.text
    token = f"{enrolled.json()['device_id']}.{enrolled.json()['token']}"
    client = httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    return client, token


# The secure protocol's device steps over raw HTTP, for tests that send something else between
# them; the real device code is FederationClient.


def join_secure(device: httpx.Client, round_id: str) -> SecAggClient:
    """Join a secure round with fresh key pairs."""
    secagg = SecAggClient.start(round_id)
    keys = {"c_pk": b64(secagg.c_pk), "s_pk": b64(secagg.s_pk)}
    joined = device.post(f"/v1/rounds/{round_id}/join", json=keys)
    assert joined.status_code == 200, joined.text
    return secagg


def share_keys(device: httpx.Client, secagg: SecAggClient) -> None:
    """Seal Shamir shares of the device's secrets to its neighbours and send them."""
    base = f"/v1/rounds/{secagg.round_id}"
    nb = device.get(f"{base}/neighbours").json()
    peers = {
        p["index"]: (base64.b64decode(p["c_pk"]), base64.b64decode(p["s_pk"]))
        for p in nb["neighbours"]
    }
    sealed = secagg.share_keys(nb["index"], peers, nb["threshold"])
    body = {"shares": [{"to": v, "sealed": b64(c)} for v, c in sealed.items()]}
    sent = device.post(f"{base}/shares", json=body)
    assert sent.status_code == 204, sent.text


def joined_with_keys(
    coord: Any, app_id: str, key: str, round_id: str, n: int
) -> tuple[list[Any], list[SecAggClient]]:
    """`n` devices of an in-process Coordinator, enrolled, joined to the secure round and
    past key sharing: (their Devices, their SecAgg clients)."""
    from edgeperso_federated._rounds import Device

    devices = [Device(coord.enrol(app_id, key)[0], app_id) for _ in range(n)]
    clients = [SecAggClient.start(round_id) for _ in devices]
    for d, c in zip(devices, clients, strict=True):
        coord.join(round_id, d, c.c_pk, c.s_pk)
    for d, c in zip(devices, clients, strict=True):
        nb = coord.neighbours(round_id, d)
        peers = {p["index"]: (p["c_pk"], p["s_pk"]) for p in nb["neighbours"]}
        coord.submit_shares(round_id, d, c.share_keys(nb["index"], peers, nb["threshold"]))
    return devices, clients


def masked_input(
    device: httpx.Client, secagg: SecAggClient, task: RoundTask, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(the device's contribution [L] float64, its masked upload [L] uint32), masked with the
    shares in its inbox; not sent."""
    vector = contribution(task, seed)
    inbox = {
        s["from"]: base64.b64decode(s["sealed"])
        for s in device.get(f"/v1/rounds/{secagg.round_id}/inbox").json()["shares"]
    }
    return vector, secagg.masked_input(encode_fixed_point(vector, task.fixed_point_scale), inbox)


def find_postgres_bin() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    return candidates[-1].parent if candidates else None
