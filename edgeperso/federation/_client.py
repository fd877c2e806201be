"""The device's federation client: enrol, check in, contribute, get the new model.

Nothing is sent unless the app sets `FederationConfig(opt_in=True)`. Every request carries the
device credential; transient failures (connection errors, 429, 5xx) are retried with
exponential back-off; progress through a round is saved to the `StateStore` before each upload,
so an app that restarts mid-round calls `resume()` and continues where it stopped.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import ipaddress
import json
import logging
import math
import random
import re
import ssl
import time
from collections.abc import Iterator, Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import numpy as np

from edgeperso._errors import (
    EdgePersoError,
    InvalidInputError,
    KeyUnavailableError,
    UnsupportedError,
)
from edgeperso.federation._layout import PersonaLayout
from edgeperso.federation._protocol import SecAggClient, TooFewSurvivorsError
from edgeperso.federation._secagg import encode_fixed_point
from edgeperso.federation._state import StateStore
from edgeperso.federation._update import (
    CENTROIDS,
    RoundTask,
    build_contribution,
    check_model,
    model_params,
    nearest_persona,
)
from edgeperso.federation._wire import decode_tensors, encode_tensors

logger = logging.getLogger(__name__)

_CREDENTIAL = "federation.credential"
_MIN_RATE = 32 << 10  # bytes/s: a slower answer past request_timeout_s is given up
_ROUND = "federation.round"
STAGES = ("join", "share_keys", "masked_input", "unmasking", "upload", "published", "aborted")
_FINAL = ("published", "aborted")


class CoordinatorUnavailableError(EdgePersoError):
    """The coordinator could not be reached or kept failing; try again later."""


class CoordinatorProtocolError(EdgePersoError):
    """The coordinator sent a response this device cannot use: not the protocol's shape, too
    large, or a model that does not fit its layout. Nothing was installed or revealed because
    of it, and a round's saved state is kept for `resume()`."""


class _StageClosedError(Exception):
    """The coordinator moved past the stage this device was in (it dropped out)."""


@dataclasses.dataclass(frozen=True)
class FederationConfig:
    coordinator_url: str
    app_id: str
    enrolment_key: str
    opt_in: bool = False  # the app's explicit, user-approved opt-in; nothing is sent without it
    request_timeout_s: float = 30.0  # per request; a long poll gets its wait on top
    retries: int = 6
    backoff_s: float = 0.2
    max_backoff_s: float = 5.0  # a Retry-After longer than this ends the call instead
    verify_tls: bool | str = True  # False only for loopback tests; a path pins a CA bundle
    # Plain rounds upload the device's update (and its user summary) unmasked: off unless the
    # app accepts that, e.g. for trimmed-mean rounds that need individual updates.
    allow_plain_rounds: bool = False
    # http:// sends the device token in clear: allowed to loopback hosts only, unless this is set.
    allow_insecure_http: bool = False
    max_response_bytes: int = 64 << 20  # a larger answer is refused (CoordinatorProtocolError)

    def __post_init__(self) -> None:
        for name in ("coordinator_url", "app_id", "enrolment_key"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise InvalidInputError(f"{name} must be a non-empty str")
        try:
            parts = urlsplit(self.coordinator_url)
            hostname = parts.hostname
        except ValueError:  # e.g. an unclosed "[" of an IPv6 address
            raise InvalidInputError("coordinator_url is not a valid URL") from None
        if parts.scheme not in ("http", "https") or not hostname:
            raise InvalidInputError("coordinator_url must be an http:// or https:// URL")
        if parts.scheme == "http" and not (self.allow_insecure_http or _is_loopback(hostname)):
            raise InvalidInputError(
                "coordinator_url is plain http:// to another host: the device token would "
                "travel in clear; use https://, or set allow_insecure_http=True on a network "
                "you trust"
            )
        for name in ("opt_in", "allow_plain_rounds", "allow_insecure_http"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInputError(f"{name} must be True or False")
        numbers = (self.request_timeout_s, self.backoff_s, self.max_backoff_s)
        if not all(
            isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
            for x in numbers
        ):
            raise InvalidInputError("request_timeout_s, backoff_s and max_backoff_s: numbers")
        if self.request_timeout_s <= 0:
            raise InvalidInputError("request_timeout_s must be > 0")
        if (
            not isinstance(self.retries, int)
            or isinstance(self.retries, bool)
            or self.retries < 0
            or self.backoff_s <= 0
            or self.max_backoff_s < self.backoff_s
        ):
            raise InvalidInputError("retries must be >= 0 and 0 < backoff_s <= max_backoff_s")
        if (
            not isinstance(self.max_response_bytes, int)
            or isinstance(self.max_response_bytes, bool)
            or self.max_response_bytes < 1 << 16
        ):
            raise InvalidInputError("max_response_bytes must be an int >= 65536")


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
        self._bearer: str | None = None  # the saved credential, read once (enrol() resets it)
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
        task_json = response.json("task")
        with _from_coordinator("task"):
            version = _version(task_json["model_version"])
        return self._task(task_json, self._model(version))

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
        """Join `task`'s round with this device's update and block until the round ends.

        A plain round (`task.secure` False) uploads the update unmasked; it is refused
        unless `FederationConfig(allow_plain_rounds=True)`, before anything is sent."""
        if not isinstance(task, RoundTask):
            raise InvalidInputError("task must be the RoundTask that check_in() returned")
        self._check_secure(task)
        if not isinstance(timeout_s, int | float) or not timeout_s > 0:
            raise InvalidInputError("timeout_s must be a number > 0")
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
        task = self._task(record["task"], self._model(int(record["model_version"])))
        self._check_secure(task)  # a round saved before the app withdrew its allowance
        return self._run(record, tensors["payload"], task, timeout_s)

    def _check_secure(self, task: RoundTask) -> None:
        if not task.secure and not self._config.allow_plain_rounds:
            raise UnsupportedError(
                f"round {task.round_id} is not secure: this device's update would reach the "
                "coordinator unmasked. Set FederationConfig(allow_plain_rounds=True) to take "
                "part in plain rounds"
            )

    def enrol(self) -> None:
        """Enrol this device again with `FederationConfig.enrolment_key`, replacing its saved
        credential. Call it when a request raised KeyUnavailableError because the coordinator
        no longer knows the device (its database was replaced, or the app registered again);
        a round the device had joined is then missed."""
        self._state.delete(_CREDENTIAL)
        self._bearer = None
        self._credential()

    def latest(self, summary: np.ndarray) -> tuple[int, dict[str, np.ndarray]]:
        """(version, parameters for the persona nearest `summary`) of the newest model."""
        content = self._request("GET", "/v1/models/latest").content
        with _from_coordinator("newest model"):
            model, meta = decode_tensors(content)
            layout = PersonaLayout.from_metadata(meta, "the coordinator's model")
            check_model(layout, model)
            version = _version(meta.get("version"))
        persona = nearest_persona(model[CENTROIDS], np.asarray(summary, np.float64))
        return version, model_params(layout, model, persona)

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
                self._request("POST", f"{base}/join", json=keys, deadline=deadline)
                self._sent(record, payload, "join")
            if secagg is None:
                self._wait(rid, "upload", deadline)
                if "upload" not in record["sent"]:
                    body = encode_tensors({"update": payload})
                    self._request(
                        "PUT", f"{base}/update", content=body, octet=True, deadline=deadline
                    )
                    self._sent(record, payload, "upload")
            else:
                self._secure_stages(record, payload, secagg, base, deadline)
            final = self._wait(rid, "published", deadline)
        except _StageClosedError:
            final = "missed"
        # The round's record stays saved until its outcome is in hand: a failure below leaves
        # resume() able to fetch it again.
        persona = int(record["persona"])
        if final != "published":
            stage = self._status(rid)["stage"]
            status: Literal["aborted", "missed"] = "aborted" if stage == "aborted" else "missed"
            logger.info("round %s ended for this device: %s", rid, status)
            self._state.delete(_ROUND)
            return RoundOutcome(status, rid, task.model_version, persona, None)
        with _from_coordinator("round status"):
            version = _version(self._status(rid).get("published_version"))
        model = self._model(version)
        with _from_coordinator(f"model version {version}"):
            check_model(task.layout, model)
        persona = nearest_persona(model[CENTROIDS], np.asarray(record["summary"], np.float64))
        params = model_params(task.layout, model, persona)
        self._state.delete(_ROUND)
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
                nb = self._request("GET", f"{base}/neighbours", deadline=deadline).json(
                    "neighbour list"
                )
                with _from_coordinator("neighbour list"):
                    peers = {
                        _index(n["index"]): (_unb64(n["c_pk"]), _unb64(n["s_pk"]))
                        for n in nb["neighbours"]
                    }
                    if len(peers) != len(nb["neighbours"]):
                        raise InvalidInputError("a neighbour is listed twice")
                    index, threshold = _index(nb["index"]), _index(nb["threshold"])
                    sealed = secagg.share_keys(index, peers, threshold)
                record["secagg"] = secagg.to_bytes().decode()
                record["sealed"] = [{"to": v, "sealed": _b64(c)} for v, c in sealed.items()]
                self._save(record, payload)
            self._request(
                "POST", f"{base}/shares", json={"shares": record["sealed"]}, deadline=deadline
            )
            self._sent(record, payload, "shares")
        if "masked" not in record["sent"]:
            self._wait(rid, "masked_input", deadline)
            inbox = self._request("GET", f"{base}/inbox", deadline=deadline).json("inbox")
            with _from_coordinator("inbox"):
                received = {_index(s["from"]): _unb64(s["sealed"]) for s in inbox["shares"]}
                masked = secagg.masked_input(payload, received)
            record["secagg"] = secagg.to_bytes().decode()
            self._save(record, payload)
            self._request(
                "PUT",
                f"{base}/masked",
                content=encode_tensors({"masked": masked}),
                octet=True,
                deadline=deadline,
            )
            self._sent(record, payload, "masked")
        if "reveal" not in record["sent"]:
            self._wait(rid, "unmasking", deadline)
            if "revealed" not in record:
                listed = self._request("GET", f"{base}/survivors", deadline=deadline).json(
                    "survivors list"
                )
                with _from_coordinator("survivors list"):
                    survivors = [_index(v) for v in listed["survivors"]]
                with _from_coordinator("survivors list"):
                    try:
                        revealed = secagg.reveal(survivors)
                    except TooFewSurvivorsError as exc:  # it leaves a round that cannot end
                        logger.info("round %s: %s", rid, exc)
                        raise _StageClosedError from None
                # Saved before it is sent: a resumed device sends these same shares again,
                # never the other kind for a neighbour (secagg also refuses a second list).
                record["revealed"] = [
                    {"of": v, "kind": kind, "share": _b64(share)} for v, kind, share in revealed
                ]
                record["secagg"] = secagg.to_bytes().decode()
                self._save(record, payload)
            self._request(
                "POST", f"{base}/reveal", json={"shares": record["revealed"]}, deadline=deadline
            )
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
            seen = self._status(round_id, wait=min(20.0, remaining), seen=seen, deadline=deadline)[
                "stage"
            ]
            if seen == stage:
                return seen
            if seen in _FINAL or STAGES.index(seen) > target:
                raise _StageClosedError

    def _status(
        self,
        round_id: str,
        wait: float = 0,
        seen: str | None = None,
        deadline: float | None = None,
    ) -> dict[str, Any]:
        """The round's status; a long poll when `wait` > 0: the coordinator holds the request
        up to `wait` seconds, so the request's time limit is that plus request_timeout_s."""
        params = {"wait": f"{wait:.1f}"} if seen is None else {"wait": f"{wait:.1f}", "seen": seen}
        response = self._request(
            "GET",
            f"/v1/rounds/{round_id}",
            params=params,
            timeout=wait + self._config.request_timeout_s,
            deadline=deadline,
        )
        status = response.json("round status")
        if status.get("stage") not in STAGES:
            raise CoordinatorProtocolError(
                f"the coordinator's round status names no known stage: {_clip(status.get('stage'))}"
            )
        return status

    def _model(self, version: int) -> dict[str, np.ndarray]:
        content = self._request("GET", f"/v1/models/{version}").content
        with _from_coordinator(f"model version {version}"):
            model, _ = decode_tensors(content)
        return model

    def _task(self, task_json: Mapping[str, Any], model: Mapping[str, np.ndarray]) -> RoundTask:
        with _from_coordinator("task"):
            return RoundTask.from_json(task_json, model)

    # ---- persistence and transport -----------------------------------------------------------

    def _save(self, record: dict[str, Any], payload: np.ndarray) -> None:
        self._state.put(
            _ROUND, encode_tensors({"payload": payload}, {"record": json.dumps(record)})
        )

    def _sent(self, record: dict[str, Any], payload: np.ndarray, step: str) -> None:
        record["sent"].append(step)
        self._save(record, payload)

    def _credential(self) -> str:
        if self._bearer is not None:  # not a state read (a decryption) per request
            return self._bearer
        saved = self._state.get(_CREDENTIAL)
        if saved is None:
            body = {"app_id": self._config.app_id, "enrolment_key": self._config.enrolment_key}
            enrolled = self._send("POST", "/v1/devices", json=body).json("enrolment")
            if _bearer(enrolled) is None:
                raise CoordinatorProtocolError(
                    "the coordinator's enrolment answer holds no usable device_id and token; "
                    "nothing was saved"
                )
            saved = json.dumps(
                {"device_id": enrolled["device_id"], "token": enrolled["token"]}
            ).encode()
            self._state.put(_CREDENTIAL, saved)
        try:
            credential = json.loads(saved)
        except ValueError:
            credential = None
        bearer = _bearer(credential)
        if bearer is None:  # saved by an older version, or damaged
            raise KeyUnavailableError(
                "this device's saved federation credential is unreadable; "
                "FederationClient.enrol() enrols it again"
            )
        self._bearer = bearer
        return bearer

    def _request(self, method: str, path: str, *, octet: bool = False, **kwargs: Any) -> _Reply:
        headers = {"Authorization": f"Bearer {self._credential()}"}
        if octet:
            headers["Content-Type"] = "application/octet-stream"
        return self._send(method, path, headers=headers, **kwargs)

    def _send(
        self,
        method: str,
        path: str,
        *,
        timeout: float | None = None,
        deadline: float | None = None,
        **kwargs: Any,
    ) -> _Reply:
        """One request, retried on connection errors, 429 and 5xx with jittered back-off,
        within `deadline` (time.monotonic) when one is given."""
        if not self._config.opt_in:
            raise UnsupportedError(
                "federation is off for this app: nothing is sent until the app sets "
                "FederationConfig(opt_in=True) with the user's consent"
            )
        limit = self._config.request_timeout_s if timeout is None else timeout
        delay = self._config.backoff_s
        for attempt in range(self._config.retries + 1):
            wait = delay * (0.5 + random.random())  # jitter spreads out retry storms
            try:
                reply = self._read(method, path, limit, **kwargs)
            except httpx.DecodingError:
                raise CoordinatorProtocolError(
                    "the coordinator's answer does not decode as its Content-Encoding says"
                ) from None
            except httpx.TransportError as exc:
                _raise_if_certificate(exc)
                problem = f"{type(exc).__name__}"
            else:
                if reply.status_code < 400:
                    return reply
                if reply.status_code not in (429, 500, 502, 503, 504):
                    _raise_for(reply)
                problem = f"HTTP {reply.status_code}"
                retry_after = reply.headers.get("Retry-After", "")
                if retry_after.replace(".", "", 1).isdigit():
                    if float(retry_after) > self._config.max_backoff_s:
                        raise CoordinatorUnavailableError(
                            f"the coordinator asked this device to come back in "
                            f"{float(retry_after):g} s ({problem}), later than max_backoff_s; "
                            "call resume() later"
                        )
                    wait = max(wait, float(retry_after))  # never sooner than it asked
            if attempt == self._config.retries:
                break
            if deadline is not None and time.monotonic() + wait > deadline:
                break
            logger.debug("coordinator request failed (%s); retrying in %.2fs", problem, wait)
            time.sleep(wait)
            delay = min(self._config.max_backoff_s, delay * 2)
        raise CoordinatorUnavailableError(
            f"the coordinator kept failing ({problem}) after {attempt} retries; call resume() later"
        )

    def _read(self, method: str, path: str, limit: float, **kwargs: Any) -> _Reply:
        """The whole answer, within max_response_bytes and within `limit` seconds plus one
        second per _MIN_RATE bytes received: httpx's own timeouts bound each read, not the
        request, so a server trickling bytes could hold the device as long as it liked, while
        a large model on a slow link still arrives."""
        ends = time.monotonic() + limit
        most = self._config.max_response_bytes
        with self._http.stream(method, path, timeout=limit, **kwargs) as response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > most:
                raise _too_large(most)
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > most:
                    raise _too_large(most)
                if time.monotonic() > ends + size / _MIN_RATE:
                    raise httpx.ReadTimeout(f"the answer came slower than {_MIN_RATE} bytes/s")
                chunks.append(chunk)
            return _Reply(response.status_code, response.headers, b"".join(chunks))


@dataclasses.dataclass(frozen=True)
class _Reply:
    """An answer read whole (and bounded) by `_read`."""

    status_code: int
    headers: httpx.Headers
    content: bytes

    def json(self, what: str) -> dict[str, Any]:
        """The body as a JSON object; CoordinatorProtocolError naming `what` otherwise."""
        try:
            body = json.loads(self.content)
        except ValueError:  # UnicodeDecodeError included
            raise CoordinatorProtocolError(f"the coordinator's {what} is not JSON") from None
        if not isinstance(body, dict):
            raise CoordinatorProtocolError(f"the coordinator's {what} is not a JSON object")
        return body


def _too_large(most: int) -> CoordinatorProtocolError:
    return CoordinatorProtocolError(
        f"the coordinator's answer is larger than max_response_bytes ({most}); refused unread. "
        "Raise FederationConfig.max_response_bytes if its models really are this large"
    )


@contextlib.contextmanager
def _from_coordinator(what: str) -> Iterator[None]:
    """Turns what parsing a coordinator's answer can raise into CoordinatorProtocolError."""
    try:
        yield
    except (InvalidInputError, KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
        raise CoordinatorProtocolError(
            f"the coordinator sent an unusable {what}: {_clip(e)}"
        ) from None


def _version(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str) or not str(value).isdigit():
        raise InvalidInputError(f"a model version must be an int >= 0, got {_clip(value)}")
    return int(value)


def _index(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInputError(f"expected an int >= 0, got {_clip(value)}")
    return value


_CREDENTIAL_PART = re.compile(r"[A-Za-z0-9_-]{1,256}")


def _bearer(credential: object) -> str | None:
    """`device_id.token` from an enrolment answer, or None unless both are plain tokens (an
    HTTP header must not carry anything else)."""
    if not isinstance(credential, dict):
        return None
    device_id, token = credential.get("device_id"), credential.get("token")
    if not all(isinstance(v, str) and _CREDENTIAL_PART.fullmatch(v) for v in (device_id, token)):
        return None
    return f"{device_id}.{token}"


def _clip(value: object, most: int = 200) -> str:
    text = repr(value) if not isinstance(value, BaseException) else str(value)
    return text if len(text) <= most else text[:most] + "…"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _raise_if_certificate(exc: httpx.TransportError) -> None:
    """A coordinator whose certificate does not verify is not retried: it is not an outage."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise CoordinatorUnavailableError(
                f"the coordinator's TLS certificate did not verify ({cause.verify_message}); "
                "if a private CA signed it, pass its PEM file as FederationConfig(verify_tls=...)"
            ) from None
        cause = cause.__cause__ or cause.__context__


def _raise_for(response: _Reply) -> None:
    try:
        body = json.loads(response.content)
        detail = _clip(body.get("detail") if isinstance(body, dict) else body)
    except ValueError:
        detail = _clip(response.content[:200].decode("utf-8", "replace"))
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
