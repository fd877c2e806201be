"""The device's federation client: enrol, check in, contribute, get the new model.

Nothing is sent unless the app sets `FederationConfig(opt_in=True)`. Every request carries the
device credential; transient failures (connection errors, 429, 5xx) are retried with
exponential back-off; progress through a round is saved to the `StateStore` before each upload,
so an app that restarts mid-round calls `resume()` and continues where it stopped.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import random
import ssl
import time
from collections.abc import Mapping
from typing import Any, Literal

import httpx
import numpy as np

from edgeperso._errors import (
    EdgePersoError,
    InvalidInputError,
    KeyUnavailableError,
    UnsupportedError,
)
from edgeperso.federation._layout import PersonaLayout
from edgeperso.federation._protocol import SecAggClient
from edgeperso.federation._secagg import encode_fixed_point
from edgeperso.federation._state import StateStore
from edgeperso.federation._update import (
    CENTROIDS,
    RoundTask,
    build_contribution,
    model_params,
    nearest_persona,
)
from edgeperso.federation._wire import decode_tensors, encode_tensors

logger = logging.getLogger(__name__)

_CREDENTIAL = "federation.credential"
_ROUND = "federation.round"
STAGES = ("join", "share_keys", "masked_input", "unmasking", "upload", "published", "aborted")
_FINAL = ("published", "aborted")


class CoordinatorUnavailableError(EdgePersoError):
    """The coordinator could not be reached or kept failing; try again later."""


class _StageClosedError(Exception):
    """The coordinator moved past the stage this device was in (it dropped out)."""


@dataclasses.dataclass(frozen=True)
class FederationConfig:
    coordinator_url: str
    app_id: str
    enrolment_key: str
    opt_in: bool = False  # the app's explicit, user-approved opt-in; nothing is sent without it
    request_timeout_s: float = 30.0
    retries: int = 6
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    verify_tls: bool | str = True  # False only for loopback tests; a path pins a CA bundle

    def __post_init__(self) -> None:
        if not self.coordinator_url.startswith(("http://", "https://")):
            raise InvalidInputError("coordinator_url must be an http:// or https:// URL")
        if self.retries < 0 or self.backoff_s <= 0 or self.max_backoff_s < self.backoff_s:
            raise InvalidInputError("retries must be >= 0 and 0 < backoff_s <= max_backoff_s")


@dataclasses.dataclass(frozen=True)
class RoundOutcome:
    """How a round ended for this device; `params` are the new global/persona parameters."""

    status: Literal["published", "aborted", "missed"]
    round_id: str
    model_version: int
    persona: int
    params: Mapping[str, np.ndarray] | None


class FederationClient:
    def __init__(
        self,
        config: FederationConfig,
        state: StateStore,
        *,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._config = config
        self._state = state
        self._http = httpx.Client(
            base_url=config.coordinator_url,
            timeout=config.request_timeout_s,
            verify=tls_verify(config.verify_tls),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> FederationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- public API ------------------------------------------------------------------------

    def check_in(self) -> RoundTask | None:
        """The round open for joining and the model it trains from, or None."""
        response = self._request("GET", "/v1/task")
        if response.status_code == 204:
            return None
        task_json = response.json()
        model = self._model(int(task_json["model_version"]))
        return RoundTask.from_json(task_json, model)

    def contribute(
        self,
        task: RoundTask,
        *,
        before: Mapping[str, np.ndarray],
        after: Mapping[str, np.ndarray],
        summary: np.ndarray,
        num_examples: int,
        timeout_s: float = 600.0,
    ) -> RoundOutcome:
        """Join `task`'s round with this device's update and block until the round ends."""
        vector, persona = build_contribution(task, before, after, summary, num_examples)
        record: dict[str, Any] = {
            "task": _task_json(task),
            "model_version": task.model_version,
            "persona": persona,
            "summary": [float(x) for x in np.asarray(summary).ravel()],
            "sent": [],
        }
        if task.secure:
            record["secagg"] = SecAggClient.start(task.round_id).to_bytes().decode()
            payload = encode_fixed_point(vector, task.fixed_point_scale)
        else:
            payload = vector.astype(np.float32)
        self._save(record, payload)
        return self._run(record, payload, task, timeout_s)

    def resume(self, timeout_s: float = 600.0) -> RoundOutcome | None:
        """Continue a round this device joined before the app stopped; None if there is none."""
        saved = self._state.get(_ROUND)
        if saved is None:
            return None
        tensors, meta = decode_tensors(saved)
        record = json.loads(meta["record"])
        task = RoundTask.from_json(record["task"], self._model(int(record["model_version"])))
        return self._run(record, tensors["payload"], task, timeout_s)

    def enrol(self) -> None:
        """Enrol this device again with `FederationConfig.enrolment_key`, replacing its saved
        credential. Call it when a request raised KeyUnavailableError because the coordinator
        no longer knows the device (its database was replaced, or the app registered again);
        a round the device had joined is then missed."""
        self._state.delete(_CREDENTIAL)
        self._credential()

    def latest(self, summary: np.ndarray) -> tuple[int, dict[str, np.ndarray]]:
        """(version, parameters for the persona nearest `summary`) of the newest model."""
        model, meta = decode_tensors(self._request("GET", "/v1/models/latest").content)
        layout = PersonaLayout.from_metadata(meta, "the coordinator's model")
        persona = nearest_persona(model[CENTROIDS], np.asarray(summary, np.float64))
        return int(meta["version"]), model_params(layout, model, persona)

    # ---- the round ---------------------------------------------------------------------------

    def _run(
        self, record: dict[str, Any], payload: np.ndarray, task: RoundTask, timeout_s: float
    ) -> RoundOutcome:
        deadline = time.monotonic() + timeout_s
        rid = task.round_id
        base = f"/v1/rounds/{rid}"
        secagg = SecAggClient.from_bytes(record["secagg"].encode()) if task.secure else None
        try:
            if "join" not in record["sent"]:
                keys: dict[str, str | None] = {"c_pk": None, "s_pk": None}
                if secagg is not None:
                    keys = {"c_pk": _b64(secagg.c_pk), "s_pk": _b64(secagg.s_pk)}
                self._request("POST", f"{base}/join", json=keys)
                self._sent(record, payload, "join")
            if secagg is None:
                self._wait(rid, "upload", deadline)
                if "upload" not in record["sent"]:
                    body = encode_tensors({"update": payload})
                    self._request("PUT", f"{base}/update", content=body, octet=True)
                    self._sent(record, payload, "upload")
            else:
                self._secure_stages(record, payload, secagg, base, deadline)
            final = self._wait(rid, "published", deadline)
        except _StageClosedError:
            final = "missed"
        self._state.delete(_ROUND)
        persona = int(record["persona"])
        if final != "published":
            stage = str(self._status(rid)["stage"])
            status: Literal["aborted", "missed"] = "aborted" if stage == "aborted" else "missed"
            logger.info("round %s ended for this device: %s", rid, status)
            return RoundOutcome(status, rid, task.model_version, persona, None)
        version = int(self._status(rid)["published_version"])
        model = self._model(version)
        persona = nearest_persona(model[CENTROIDS], np.asarray(record["summary"], np.float64))
        params = model_params(task.layout, model, persona)
        return RoundOutcome("published", rid, version, persona, params)

    def _secure_stages(
        self,
        record: dict[str, Any],
        payload: np.ndarray,
        secagg: SecAggClient,
        base: str,
        deadline: float,
    ) -> None:
        rid = secagg.round_id
        if "shares" not in record["sent"]:
            self._wait(rid, "share_keys", deadline)
            if "sealed" not in record:
                nb = self._request("GET", f"{base}/neighbours").json()
                peers = {
                    int(n["index"]): (_unb64(n["c_pk"]), _unb64(n["s_pk"]))
                    for n in nb["neighbours"]
                }
                sealed = secagg.share_keys(int(nb["index"]), peers, int(nb["threshold"]))
                record["secagg"] = secagg.to_bytes().decode()
                record["sealed"] = [{"to": v, "sealed": _b64(c)} for v, c in sealed.items()]
                self._save(record, payload)
            self._request("POST", f"{base}/shares", json={"shares": record["sealed"]})
            self._sent(record, payload, "shares")
        if "masked" not in record["sent"]:
            self._wait(rid, "masked_input", deadline)
            inbox = self._request("GET", f"{base}/inbox").json()["shares"]
            masked = secagg.masked_input(
                payload, {int(s["from"]): _unb64(s["sealed"]) for s in inbox}
            )
            record["secagg"] = secagg.to_bytes().decode()
            self._save(record, payload)
            self._request(
                "PUT", f"{base}/masked", content=encode_tensors({"masked": masked}), octet=True
            )
            self._sent(record, payload, "masked")
        if "reveal" not in record["sent"]:
            self._wait(rid, "unmasking", deadline)
            survivors = self._request("GET", f"{base}/survivors").json()["survivors"]
            shares = [
                {"of": v, "kind": kind, "share": _b64(share)}
                for v, kind, share in secagg.reveal([int(s) for s in survivors])
            ]
            self._request("POST", f"{base}/reveal", json={"shares": shares})
            self._sent(record, payload, "reveal")

    def _wait(self, round_id: str, stage: str, deadline: float) -> str:
        """Long-poll until the round reaches `stage`; _StageClosedError if it ended or went past."""
        target = STAGES.index(stage)
        seen: str | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CoordinatorUnavailableError(
                    f"round {round_id} did not reach {stage} in time; call resume() later"
                )
            seen = self._status(round_id, wait=min(20.0, remaining), seen=seen)["stage"]
            if seen == stage:
                return seen
            if seen in _FINAL or STAGES.index(str(seen)) > target:
                raise _StageClosedError

    def _status(self, round_id: str, wait: float = 0, seen: str | None = None) -> dict[str, Any]:
        params = {"wait": f"{wait:.1f}"} if seen is None else {"wait": f"{wait:.1f}", "seen": seen}
        response = self._request("GET", f"/v1/rounds/{round_id}", params=params)
        result: dict[str, Any] = response.json()
        return result

    def _model(self, version: int) -> dict[str, np.ndarray]:
        model, _ = decode_tensors(self._request("GET", f"/v1/models/{version}").content)
        return model

    # ---- persistence and transport -----------------------------------------------------------

    def _save(self, record: dict[str, Any], payload: np.ndarray) -> None:
        self._state.put(
            _ROUND, encode_tensors({"payload": payload}, {"record": json.dumps(record)})
        )

    def _sent(self, record: dict[str, Any], payload: np.ndarray, step: str) -> None:
        record["sent"].append(step)
        self._save(record, payload)

    def _credential(self) -> str:
        saved = self._state.get(_CREDENTIAL)
        if saved is None:
            body = {"app_id": self._config.app_id, "enrolment_key": self._config.enrolment_key}
            response = self._send("POST", "/v1/devices", json=body)
            saved = json.dumps(response.json()).encode()
            self._state.put(_CREDENTIAL, saved)
        credential = json.loads(saved)
        return f"{credential['device_id']}.{credential['token']}"

    def _request(
        self, method: str, path: str, *, octet: bool = False, **kwargs: Any
    ) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self._credential()}"}
        if octet:
            headers["Content-Type"] = "application/octet-stream"
        return self._send(method, path, headers=headers, **kwargs)

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if not self._config.opt_in:
            raise UnsupportedError(
                "federation is off for this app: nothing is sent until the app sets "
                "FederationConfig(opt_in=True) with the user's consent"
            )
        delay = self._config.backoff_s
        for attempt in range(self._config.retries + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                problem = f"{type(exc).__name__}"
            else:
                if response.status_code < 400:
                    return response
                if response.status_code not in (429, 500, 502, 503, 504):
                    _raise_for(response)
                problem = f"HTTP {response.status_code}"
                retry_after = response.headers.get("Retry-After", "")
                if retry_after.replace(".", "", 1).isdigit():
                    delay = max(delay, float(retry_after))
            if attempt == self._config.retries:
                break
            logger.debug("coordinator request failed (%s); retrying in %.2fs", problem, delay)
            time.sleep(delay * (0.5 + random.random()))  # jitter spreads out retry storms
            delay = min(self._config.max_backoff_s, delay * 2)
        raise CoordinatorUnavailableError(
            f"the coordinator kept failing ({problem}) after {self._config.retries} retries; "
            "call resume() later"
        )


def _raise_for(response: httpx.Response) -> None:
    try:
        detail = str(response.json().get("detail", response.text))
    except ValueError:
        detail = response.text[:200]
    status = response.status_code
    if status == 409:
        raise _StageClosedError
    if status in (401, 403):
        raise KeyUnavailableError(
            f"the coordinator refused this device (HTTP {status}): {detail}; if it no longer "
            "knows the device, FederationClient.enrol() enrols it again with "
            "FederationConfig.enrolment_key"
        )
    raise InvalidInputError(f"the coordinator rejected the request (HTTP {status}): {detail}")


def tls_verify(verify_tls: bool | str) -> bool | ssl.SSLContext:
    """httpx's `verify` for a `verify_tls` option: a path is a PEM CA bundle to trust instead
    of the system's (a coordinator behind a private CA)."""
    if not isinstance(verify_tls, str):
        return verify_tls
    try:
        return ssl.create_default_context(cafile=verify_tls)
    except OSError as exc:  # ssl.SSLError included: a file without a PEM certificate
        raise InvalidInputError(
            f"verify_tls: cannot load the CA bundle {verify_tls!r} ({exc}); give the path of "
            "a PEM file holding the certificate of the CA that signed the coordinator's"
        ) from exc


def _task_json(task: RoundTask) -> dict[str, Any]:
    return {
        "round_id": task.round_id,
        "model_version": task.model_version,
        **task.layout.to_json(),
        "clip_norm": task.clip_norm,
        "summary_clip": task.summary_clip,
        "weight_cap": task.weight_cap,
        "secure": task.secure,
        "fixed_point_scale": task.fixed_point_scale,
    }


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _unb64(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise InvalidInputError("the coordinator sent malformed base64") from exc
