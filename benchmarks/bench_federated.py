"""One federated round on loopback: wall time, coordinator CPU and memory, bytes per device.

    python benchmarks/bench_federated.py [--clients 100 1000] [--params 100000]

For each cohort size and mode a fresh `edgeperso-coordinator serve` (SQLite, uvicorn) runs in
a subprocess; devices are asyncio tasks in this process running the real device protocol
(SecAggClient, fixed-point encoding, safetensors) over HTTP, at most CONCURRENCY of them
computing or sending at once while the others wait on long polls. Each device has its own
keep-alive HTTP/1.1 connection, as a phone would. Secure aggregation (SecAgg+, k and t from a
5 % target dropout) and plain FedAvg are timed; the published model is checked against the
mean computed in the clear. Results (with coordinator CPU per stage), the CPU model and flags
and the load average before and after each round go to benchmarks/out/federated.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h11
import httpx
import numpy as np

from edgeperso.federation import FederatedParam, PersonaLayout
from edgeperso.federation._protocol import SecAggClient
from edgeperso.federation._secagg import encode_fixed_point, secagg_params
from edgeperso.federation._wire import decode_tensors, encode_tensors

OUT = Path(__file__).parent / "out" / "federated.json"
ADMIN = "bench-admin-token-0123456789"
CONCURRENCY = 64  # devices computing or sending at once; the others wait on long polls
STAGES = ("join", "share_keys", "masked_input", "unmasking", "upload", "published", "aborted")


class BenchError(RuntimeError):
    """The coordinator refused a request or the round did not publish."""


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


def cpu_info() -> dict[str, Any]:
    text = Path("/proc/cpuinfo").read_text()
    first = dict(
        (k.strip(), v.strip())
        for k, _, v in (line.partition(":") for line in text.splitlines())
        if v
    )
    flags = set(first.get("flags", "").split())
    wanted = ["avx2", "avx512f", "avx512_vnni", "aes", "vaes", "sha_ni", "pclmulqdq"]
    return {
        "machine": platform.machine(),
        "model": first.get("model name", "?"),
        "cores": os.cpu_count(),
        "flags": [f for f in wanted if f in flags],
    }


def _load() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


class _Device:
    """One simulated device: its own keep-alive HTTP/1.1 connection (h11 over asyncio
    streams), its credential, and a count of the bytes and requests it sent.

    A phone's HTTP stack is native code; a Python client such as httpx spends more CPU per
    request than the coordinator does, and here it would share the two cores with it.
    """

    def __init__(self, host: str, port: int, token: str, gate: asyncio.Semaphore) -> None:
        self.host, self.port = host, port
        self.auth = f"Bearer {token}"
        self.gate = gate
        self.sent = 0
        self.requests = 0
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._h11 = h11.Connection(h11.CLIENT)

    async def call(
        self, method: str, target: str, body: Any = None, *, octet: bytes | None = None
    ) -> Any:
        """Send one request; the decoded JSON answer (None for 204). Retries a dropped
        connection (the coordinator closes keep-alive connections idle for 5 s, and a device
        that waited at the gate finds its own gone) and 429/503: every request is
        idempotent, the coordinator accepts identical retries."""
        if octet is not None:
            content, kind = octet, "application/octet-stream"
        else:
            content = b"" if body is None else json.dumps(body).encode()
            kind = "application/json"
        for attempt in range(6):
            try:
                status, headers, answer = await self._exchange(method, target, content, kind)
            except (OSError, EOFError, h11.ProtocolError):
                self.close()
                if attempt == 5:
                    raise
                continue
            if status < 400:
                return json.loads(answer) if answer else None
            if status not in (429, 503) or attempt == 5:
                raise BenchError(f"{method} {target}: HTTP {status} {answer[:300]!r}")
            await asyncio.sleep(float(headers.get(b"retry-after", b"0.1")))
        raise AssertionError("unreachable")

    async def _exchange(
        self, method: str, target: str, content: bytes, kind: str
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        if self._streams is None or self._streams[0].at_eof():
            self.close()
            self._streams = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._streams
        headers = [
            ("Host", f"{self.host}:{self.port}"),
            ("Authorization", self.auth),
            ("Content-Length", str(len(content))),
        ]
        if content:
            headers.append(("Content-Type", kind))
        request = self._h11.send(h11.Request(method=method, target=target, headers=headers))
        request += self._h11.send(h11.Data(data=content)) if content else b""
        request += self._h11.send(h11.EndOfMessage())
        self.sent += len(request)
        self.requests += 1
        writer.write(request)
        await writer.drain()
        response, chunks = None, []
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                self._h11.receive_data(await reader.read(1 << 16))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise EOFError("the coordinator closed the connection")
        assert response is not None
        if h11.MUST_CLOSE in (self._h11.our_state, self._h11.their_state):
            self.close()
        else:
            self._h11.start_next_cycle()
        return response.status_code, dict(response.headers), b"".join(chunks)

    def close(self) -> None:
        if self._streams is not None:
            self._streams[1].close()
        self._streams, self._h11 = None, h11.Connection(h11.CLIENT)

    async def wait(self, rid: str, stage: str, seen: str) -> str:
        """Long-poll until the round reaches `stage` (or ends); `seen` is the stage known now."""
        while True:
            seen = (await self.call("GET", f"/v1/rounds/{rid}?wait=20&seen={seen}"))["stage"]
            if seen == stage or seen in ("published", "aborted"):
                return seen
            if STAGES.index(seen) > STAGES.index(stage):
                raise BenchError(f"round went to {seen} before this device reached {stage}")


async def _plain(device: _Device, rid: str, vector: np.ndarray) -> str:
    base = f"/v1/rounds/{rid}"
    async with device.gate:
        await device.call("POST", f"{base}/join", {})
    await device.wait(rid, "upload", "join")
    async with device.gate:
        await device.call("PUT", f"{base}/update", octet=encode_tensors({"update": vector}))
    return await device.wait(rid, "published", "upload")


async def _secure(device: _Device, rid: str, vector: np.ndarray, scale: float) -> str:
    base = f"/v1/rounds/{rid}"

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    async with device.gate:
        secagg = SecAggClient.start(rid)
        keys = {"c_pk": b64(secagg.c_pk), "s_pk": b64(secagg.s_pk)}
        await device.call("POST", f"{base}/join", keys)
    await device.wait(rid, "share_keys", "join")
    async with device.gate:
        nb = await device.call("GET", f"{base}/neighbours")
        peers = {
            p["index"]: (base64.b64decode(p["c_pk"]), base64.b64decode(p["s_pk"]))
            for p in nb["neighbours"]
        }
        sealed = secagg.share_keys(nb["index"], peers, nb["threshold"])
        shares = [{"to": v, "sealed": b64(c)} for v, c in sealed.items()]
        await device.call("POST", f"{base}/shares", {"shares": shares})
    await device.wait(rid, "masked_input", "share_keys")
    async with device.gate:
        inbox = (await device.call("GET", f"{base}/inbox"))["shares"]
        masked = secagg.masked_input(
            encode_fixed_point(vector, scale),
            {s["from"]: base64.b64decode(s["sealed"]) for s in inbox},
        )
        await device.call("PUT", f"{base}/masked", octet=encode_tensors({"masked": masked}))
    await device.wait(rid, "unmasking", "masked_input")
    async with device.gate:
        survivors = (await device.call("GET", f"{base}/survivors"))["survivors"]
        revealed = [{"of": o, "kind": k, "share": b64(s)} for o, k, s in secagg.reveal(survivors)]
        await device.call("POST", f"{base}/reveal", {"shares": revealed})
    return await device.wait(rid, "published", "unmasking")


async def _watch(admin: httpx.AsyncClient, app: str, rid: str, pid: int) -> dict[str, Any]:
    """Wall and coordinator CPU seconds per stage, from the operator's view of the round."""
    stages: dict[str, Any] = {}
    stage, since, cpu = "join", time.perf_counter(), _proc(pid)[0]
    while stage not in ("published", "aborted"):
        await asyncio.sleep(0.25)
        now = (await admin.get(f"/v1/admin/apps/{app}/rounds/{rid}")).json()["stage"]
        if now != stage:
            t, c = time.perf_counter(), _proc(pid)[0]
            stages[stage] = {"wall_s": round(t - since, 2), "coordinator_cpu_s": round(c - cpu, 2)}
            stage, since, cpu = now, t, c
    return stages


def _vectors(clients: int, params: int) -> np.ndarray:
    """[clients, params + 1] float32: a delta of L2 norm 0.9 and the persona weight 1."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((clients, params + 1), dtype=np.float32)
    vectors[:, :-1] *= 0.9 / np.linalg.norm(vectors[:, :-1], axis=1, keepdims=True)
    vectors[:, -1] = 1.0
    return vectors


async def one_round(url: str, pid: int, clients: int, params: int, secure: bool) -> dict[str, Any]:
    admin = httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=300
    )
    app = f"bench-{clients}-{'secure' if secure else 'plain'}"
    key = (await admin.post("/v1/admin/apps", json={"app_id": app})).json()["enrolment_key"]
    layout = PersonaLayout((FederatedParam("w", (params,), "global"),), 1, 0)
    model = {"w": np.zeros(params, np.float32), "centroids": np.zeros((1, 0), np.float32)}
    payload = encode_tensors(model, {"layout": json.dumps(layout.to_json())})
    (await admin.put(f"/v1/admin/apps/{app}/models/0", content=payload)).raise_for_status()
    tokens = []
    for _ in range(clients):
        enrolled = await admin.post("/v1/devices", json={"app_id": app, "enrolment_key": key})
        enrolled.raise_for_status()
        tokens.append(f"{enrolled.json()['device_id']}.{enrolled.json()['token']}")
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
    opened = await admin.post("/v1/admin/rounds", json=config)
    opened.raise_for_status()
    rid = opened.json()["round_id"]
    auth = {"Authorization": f"Bearer {tokens[0]}"}
    task = (await admin.get("/v1/task", headers=auth)).json()
    vectors = _vectors(clients, params)
    gate = asyncio.Semaphore(CONCURRENCY)
    host, port = url.removeprefix("http://").split(":")
    devices = [_Device(host, int(port), token, gate) for token in tokens]
    cpu0, _ = _proc(pid)
    own0 = _proc(os.getpid())[0]
    load0 = _load()
    start = time.perf_counter()
    if secure:
        scale = float(task["fixed_point_scale"])
        runs = [_secure(d, rid, v, scale) for d, v in zip(devices, vectors, strict=True)]
    else:
        runs = [_plain(d, rid, v) for d, v in zip(devices, vectors, strict=True)]
    watch = asyncio.create_task(_watch(admin, app, rid, pid))
    results = await asyncio.gather(*runs)
    wall = time.perf_counter() - start
    stages = await watch
    cpu1, peak = _proc(pid)
    own1 = _proc(os.getpid())[0]
    load1 = _load()
    for device in devices:
        device.close()
    if set(results) != {"published"}:
        raise BenchError(f"round ended as {set(results)}")
    published, _ = decode_tensors((await admin.get("/v1/models/1", headers=auth)).content)
    await admin.aclose()
    expected = vectors[:, :-1].astype(np.float64).mean(axis=0)
    error = float(np.abs(published["w"] - expected).max())
    if error > 1e-5:
        raise BenchError(f"published mean is off by {error:.2e} from the mean in the clear")
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
        "devices_cpu_s": round(own1 - own0, 2),
        "bytes_sent_per_client": int(np.mean([d.sent for d in devices])),
        "requests_per_client": round(float(np.mean([d.requests for d in devices])), 2),
        "published_max_abs_error": error,
        "stages": stages,
        "loadavg_before": load0,
        "loadavg_after": load1,
    }


@contextmanager
def coordinator(tmp: str) -> Iterator[tuple[str, int]]:
    """A fresh coordinator process on a loopback port: (url, pid)."""
    port = _port()
    log = os.environ.get("BENCH_LOG", os.devnull)
    with open(log, "a") as stderr:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "edgeperso_federated._cli",
                "serve",
                "--port",
                str(port),
                "--database-url",
                f"sqlite:///{tmp}/bench-{port}.db",
                "--max-body-bytes",
                str(16 * 2**20),
                "--enrol-rate",
                "10000",
            ],
            env={**os.environ, "EDGEPERSO_ADMIN_TOKEN": ADMIN},
            stderr=stderr,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        with httpx.Client(timeout=1) as probe:
            while True:
                try:
                    probe.get(url + "/openapi.json")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise BenchError("the coordinator did not start; see BENCH_LOG") from None
                    time.sleep(0.1)
        yield url, server.pid
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--params", type=int, default=100_000)
    parser.add_argument(
        "--modes", nargs="+", choices=["secure", "plain"], default=["secure", "plain"]
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # one socket per simulated device
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for clients in args.clients:
            for mode in args.modes:
                with coordinator(tmp) as (url, pid):
                    row = asyncio.run(one_round(url, pid, clients, args.params, mode == "secure"))
                rows.append(row)
                print(json.dumps(row), flush=True)
    report = {
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "cpu": cpu_info(),
        "python": platform.python_version(),
        "concurrency": CONCURRENCY,
        "rounds": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report["cpu"]))


if __name__ == "__main__":
    main()
