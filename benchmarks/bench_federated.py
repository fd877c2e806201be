"""One federated round on loopback: wall time, coordinator CPU and memory, bytes per device.

    python benchmarks/bench_federated.py [--clients 100 1000] [--params 100000]

The coordinator runs as `edgeperso-coordinator serve` (SQLite) in a subprocess; devices are
bounded asyncio tasks in this process running the real device protocol (SecAggClient) over
HTTP. Secure aggregation (SecAgg+, k and t from a 5% target dropout) and plain FedAvg are
timed for each cohort size; the CPU model and flags are printed beside the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from edgeperso.federation import FederatedParam, PersonaLayout
from edgeperso.federation._protocol import SecAggClient
from edgeperso.federation._secagg import encode_fixed_point, secagg_params
from edgeperso.federation._wire import encode_tensors

ADMIN = "bench-admin-token-0123456789"
CONCURRENCY = 64  # devices doing work at once; the others wait on long polls


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _proc(pid: int) -> tuple[float, int]:
    """(CPU seconds user+system, peak RSS bytes) of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    peak = next(
        int(line.split()[1]) * 1024
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if line.startswith("VmHWM")
    )
    return cpu, peak


def cpu_info() -> dict[str, str]:
    text = Path("/proc/cpuinfo").read_text()
    first = dict(
        (k.strip(), v.strip())
        for k, _, v in (line.partition(":") for line in text.splitlines())
        if v
    )
    flags = set(first.get("flags", "").split())
    wanted = ["avx2", "avx512f", "avx512_vnni", "aes", "sha_ni", "vaes"]
    return {
        "model": first.get("model name", "?"),
        "cores": str(os.cpu_count()),
        "flags": " ".join(f for f in wanted if f in flags),
    }


async def _wait(call: Any, base: str, stage: str) -> str:
    seen = None
    while True:
        params = {"wait": "20"} | ({"seen": seen} if seen else {})
        seen = (await call("GET", base, params=params)).json()["stage"]
        if seen == stage or seen in ("published", "aborted"):
            return str(seen)


async def _device(
    client: httpx.AsyncClient,
    token: str,
    rid: str,
    vector: np.ndarray,
    scale: float,
    secure: bool,
    gate: asyncio.Semaphore,
    sent: list[int],
) -> str:
    """One device; `sent` collects the bytes of each request body and headers it sends."""
    headers = {"Authorization": f"Bearer {token}"}

    async def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
        request = client.build_request(
            method, path, headers={**headers, **kwargs.pop("headers", {})}, **kwargs
        )
        sent.append(len(request.content) + sum(len(k) + len(v) for k, v in request.headers.raw))
        for attempt in range(3):
            try:
                return await client.send(request)
            except httpx.TransportError:
                # uvicorn closes idle keep-alive connections; a reused one can be gone. Every
                # request is idempotent (the coordinator accepts identical retries).
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    base = f"/v1/rounds/{rid}"
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    octet = {"Content-Type": "application/octet-stream"}
    if not secure:
        async with gate:
            await call("POST", f"{base}/join", json={})
        await _wait(call, base, "upload")
        async with gate:
            body = encode_tensors({"update": vector.astype(np.float32)})
            await call("PUT", f"{base}/update", content=body, headers=octet)
        return await _wait(call, base, "published")
    secagg = SecAggClient.start(rid)
    async with gate:
        await call(
            "POST", f"{base}/join", json={"c_pk": b64(secagg.c_pk), "s_pk": b64(secagg.s_pk)}
        )
    await _wait(call, base, "share_keys")
    async with gate:
        nb = (await call("GET", f"{base}/neighbours")).json()
        peers = {
            p["index"]: (base64.b64decode(p["c_pk"]), base64.b64decode(p["s_pk"]))
            for p in nb["neighbours"]
        }
        sealed = secagg.share_keys(nb["index"], peers, nb["threshold"])
        shares = [{"to": v, "sealed": b64(c)} for v, c in sealed.items()]
        await call("POST", f"{base}/shares", json={"shares": shares})
    await _wait(call, base, "masked_input")
    async with gate:
        inbox = (await call("GET", f"{base}/inbox")).json()["shares"]
        masked = secagg.masked_input(
            encode_fixed_point(vector, scale),
            {s["from"]: base64.b64decode(s["sealed"]) for s in inbox},
        )
        await call(
            "PUT", f"{base}/masked", content=encode_tensors({"masked": masked}), headers=octet
        )
    await _wait(call, base, "unmasking")
    async with gate:
        survivors = (await call("GET", f"{base}/survivors")).json()["survivors"]
        revealed = [{"of": o, "kind": k, "share": b64(s)} for o, k, s in secagg.reveal(survivors)]
        await call("POST", f"{base}/reveal", json={"shares": revealed})
    return await _wait(call, base, "published")


async def one_round(url: str, pid: int, clients: int, params: int, secure: bool) -> dict[str, Any]:
    admin = httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300
    )
    app = f"bench-{clients}-{'secure' if secure else 'plain'}"
    key = (await admin.post("/v1/admin/apps", json={"app_id": app})).json()["enrolment_key"]
    layout = PersonaLayout((FederatedParam("w", (params,), "global"),), 1, 0)
    model = {"w": np.zeros(params, np.float32), "centroids": np.zeros((1, 0), np.float32)}
    payload = encode_tensors(model, {"layout": json.dumps(layout.to_json())})
    await admin.put(f"/v1/admin/apps/{app}/models/0", content=payload)
    async with httpx.AsyncClient(base_url=url, timeout=60) as enrol:
        tokens = []
        for _ in range(clients):
            c = (await enrol.post("/v1/devices", json={"app_id": app, "enrolment_key": key})).json()
            tokens.append(f"{c['device_id']}.{c['token']}")
    config = {
        "app_id": app,
        "model_version": 0,
        "cohort_size": clients,
        "min_survivors": clients // 2,
        "secure": secure,
        "join_timeout_s": 600,
        "stage_timeout_s": 600,
        "target_dropout": 0.05,
    }
    rid = (await admin.post("/v1/admin/rounds", json=config)).json()["round_id"]
    task = (
        await httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {tokens[0]}"}).get(
            "/v1/task"
        )
    ).json()
    rng = np.random.default_rng(0)
    vectors = []
    for _ in range(clients):
        v = rng.normal(size=params + 1)
        v[:-1] *= 0.9 / np.linalg.norm(v[:-1])
        v[-1] = 1.0  # the persona count
        vectors.append(v)
    gate = asyncio.Semaphore(CONCURRENCY)
    sent: list[list[int]] = [[] for _ in range(clients)]
    cpu0, _ = _proc(pid)
    start = time.perf_counter()
    # One connection pool for all simulated devices: creating a client per device costs more
    # than the protocol itself. Every device still authenticates with its own credential.
    limits = httpx.Limits(max_connections=clients + 16, max_keepalive_connections=clients + 16)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        results = await asyncio.gather(
            *(
                _device(
                    client,
                    tokens[i],
                    rid,
                    vectors[i],
                    task["fixed_point_scale"],
                    secure,
                    gate,
                    sent[i],
                )
                for i in range(clients)
            )
        )
    wall = time.perf_counter() - start
    cpu1, peak = _proc(pid)
    await admin.aclose()
    assert set(results) == {"published"}, set(results)
    k_t = secagg_params(clients, 0.05) if secure else None
    return {
        "clients": clients,
        "params": params,
        "mode": "secagg+" if secure else "plain",
        "k": k_t.neighbours if k_t else None,
        "t": k_t.threshold if k_t else None,
        "wall_s": round(wall, 2),
        "coordinator_cpu_s": round(cpu1 - cpu0, 2),
        "coordinator_peak_rss_mib": round(peak / 2**20, 1),
        "bytes_sent_per_client": int(np.mean([sum(s) for s in sent])),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument("--modes", nargs="+", default=["secure", "plain"])
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # one socket per simulated device
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = _port()
    with tempfile.TemporaryDirectory() as tmp:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgeperso_federated._cli",
                "serve",
                "--port",
                str(port),
                "--database-url",
                f"sqlite:///{tmp}/bench.db",
                "--max-body-bytes",
                str(16 * 2**20),
                "--enrol-rate",
                "10000",
            ],
            env={**os.environ, "EDGEPERSO_ADMIN_TOKEN": ADMIN},
            stderr=open(os.environ.get("BENCH_LOG", os.devnull), "w"),  # noqa: SIM115
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    httpx.get(url + "/openapi.json", timeout=1)
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            rows = []
            for clients in args.clients:
                for secure in [m == "secure" for m in args.modes]:
                    rows.append(
                        asyncio.run(one_round(url, server.pid, clients, args.params, secure))
                    )
                    print(json.dumps(rows[-1]), flush=True)
        finally:
            server.kill()
    print(json.dumps({"cpu": cpu_info()}))


if __name__ == "__main__":
    main()
