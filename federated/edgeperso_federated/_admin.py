"""The operator's client of the coordinator: apps, model versions, rounds, the privacy ledger.

    with AdminClient("https://coordinator.example", token) as admin:
        key = admin.create_app("notes", epsilon_budget=8.0)       # devices enrol with `key`
        admin.put_model("notes", 0, layout, initial_model(layout, params, centroids))
        opened = admin.create_round(RoundConfig("notes", 0, cohort_size=50, min_survivors=40))
        state = admin.wait_for_round("notes", opened.round_id, timeout_s=900)
        admin.privacy_ledger("notes")[-1].epsilon                 # cumulative, after the round

A response with an error status raises the coordinator's problem as the matching error of
`edgeperso_federated._errors` (or `edgeperso.BudgetExhaustedError`, `InvalidInputError`);
an unreachable coordinator, a 5xx or a round that does not close in time raises
`edgeperso.federation.CoordinatorUnavailableError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from edgeperso import BudgetExhaustedError, EdgePersoError, InvalidInputError
from edgeperso.federation import CoordinatorUnavailableError, PersonaLayout
from edgeperso.federation._client import tls_verify
from edgeperso.federation._layout import persona_key
from edgeperso.federation._update import CENTROIDS
from edgeperso.federation._wire import decode_tensors, encode_tensors, expect_tensors
from edgeperso_federated._config import RoundConfig
from edgeperso_federated._errors import (
    AuthError,
    ForbiddenError,
    NotFoundError,
    RateLimitedError,
    RoundConflictError,
)
from edgeperso_federated._rounds import FINAL


@dataclasses.dataclass(frozen=True)
class OpenedRound:
    round_id: str
    projected_epsilon: float | None  # the app's epsilon once this round publishes; None: no DP


@dataclasses.dataclass(frozen=True)
class RoundState:
    round_id: str
    stage: str  # join, share_keys, masked_input, unmasking, upload, published, aborted
    stage_deadline: float  # Unix time at which the stage closes if devices are missing
    published_version: int | None
    reason: str | None  # why the round aborted

    @property
    def closed(self) -> bool:
        return self.stage in FINAL


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    """One published round of an app with DP: epsilon is cumulative over the app's rounds."""

    round_id: str
    noise_multiplier: float
    sampling_probability: float
    epsilon: float
    delta: float


def initial_model(
    layout: PersonaLayout,
    params: Mapping[str, np.ndarray],
    centroids: np.ndarray,  # [num_personas, summary_dim]
) -> dict[str, np.ndarray]:
    """A first model version in the wire names: every persona starts from `params`."""
    model: dict[str, np.ndarray] = {}
    for p in layout.params:
        if p.name not in params:
            raise InvalidInputError(f"params lacks the layout's parameter {p.name!r}")
        value = np.asarray(params[p.name], np.float32)
        if p.level == "global":
            model[p.name] = value
        for k in range(layout.num_personas if p.level == "persona" else 0):
            model[persona_key(k, p.name)] = value.copy()
    model[CENTROIDS] = np.asarray(centroids, np.float32)
    expect_tensors(model, layout.model_tensors())
    return model


def save_model(
    path: str | os.PathLike[str], layout: PersonaLayout, tensors: Mapping[str, np.ndarray]
) -> None:
    """Write a model version to a file for `edgeperso-coordinator put-model`: safetensors with
    the layout in its metadata, as PUT /v1/admin/apps/{app}/models/{version} takes it."""
    expect_tensors(tensors, layout.model_tensors())
    Path(path).write_bytes(_model_payload(layout, tensors))


def load_model(path: str | os.PathLike[str]) -> tuple[PersonaLayout, dict[str, np.ndarray]]:
    """The layout and tensors of a model file that `save_model` wrote."""
    try:
        tensors, meta = decode_tensors(Path(path).read_bytes())
    except OSError as exc:
        raise InvalidInputError(f"cannot read the model file {str(path)!r} ({exc})") from exc
    layout = PersonaLayout.from_metadata(meta, repr(str(path)))
    expect_tensors(tensors, layout.model_tensors())
    return layout, tensors


def _model_payload(layout: PersonaLayout, tensors: Mapping[str, np.ndarray]) -> bytes:
    return encode_tensors(tensors, {"layout": json.dumps(layout.to_json())})


class AdminClient:
    """The operator API of one coordinator, authenticated with its admin token."""

    def __init__(
        self,
        url: str,
        admin_token: str,
        *,
        verify_tls: bool | str = True,  # a path pins a CA bundle (a private CA)
        timeout_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise InvalidInputError("url must be an http:// or https:// URL")
        if not admin_token or not admin_token.isprintable():
            raise InvalidInputError(
                "admin_token is empty or not printable: pass the coordinator's admin token"
            )
        self._http = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {admin_token}"},
            timeout=timeout_s,
            verify=tls_verify(verify_tls),
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create_app(
        self, app_id: str, *, epsilon_budget: float | None = None, delta: float = 1e-6
    ) -> str:
        """Register an app; returns its enrolment key, which the coordinator shows only once.
        With `epsilon_budget`, every round needs DP noise and the ledger records epsilon."""
        body = {"app_id": app_id, "epsilon_budget": epsilon_budget, "delta": delta}
        return str(self._request("POST", "/v1/admin/apps", json=body)["enrolment_key"])

    def put_model(
        self, app_id: str, version: int, layout: PersonaLayout, tensors: Mapping[str, np.ndarray]
    ) -> None:
        """Upload model `version` (global names, persona/<p>/<name>, centroids; see
        `initial_model`). Versions are immutable: an existing one is a RoundConflictError."""
        expect_tensors(tensors, layout.model_tensors())
        self._request(
            "PUT",
            f"/v1/admin/apps/{app_id}/models/{version}",
            content=_model_payload(layout, tensors),
            headers={"Content-Type": "application/octet-stream"},
        )

    def create_round(self, config: RoundConfig) -> OpenedRound:
        """Open a round; devices that check in get it until `cohort_size` of them joined."""
        opened = self._request("POST", "/v1/admin/rounds", json=config.to_json())
        return OpenedRound(str(opened["round_id"]), opened["projected_epsilon"])

    def round_status(self, app_id: str, round_id: str) -> RoundState:
        found = self._request("GET", f"/v1/admin/apps/{app_id}/rounds/{round_id}")
        return RoundState(
            round_id=str(found["round_id"]),
            stage=str(found["stage"]),
            stage_deadline=float(found["stage_deadline"]),
            published_version=found["published_version"],
            reason=found["reason"],
        )

    def wait_for_round(
        self, app_id: str, round_id: str, *, timeout_s: float = 600.0, poll_s: float = 0.5
    ) -> RoundState:
        """Poll until the round is published or aborted (both returned, not raised)."""
        deadline = time.monotonic() + timeout_s
        while True:
            state = self.round_status(app_id, round_id)
            if state.closed:
                return state
            if time.monotonic() + poll_s > deadline:
                raise CoordinatorUnavailableError(
                    f"round {round_id} is still in stage {state.stage!r} after {timeout_s:g} s; "
                    "wait again, or let its stage deadline abort it"
                )
            time.sleep(poll_s)

    def privacy_ledger(self, app_id: str) -> list[LedgerEntry]:
        """The app's published DP rounds, oldest first."""
        rows = self._request("GET", f"/v1/admin/apps/{app_id}/privacy")
        return [LedgerEntry(**row) for row in rows]

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise CoordinatorUnavailableError(
                f"the coordinator at {self._http.base_url} cannot be reached ({type(exc).__name__})"
            ) from exc
        if response.status_code >= 400:
            raise _error_of(response)
        return response.json() if response.content else None


def _error_of(response: httpx.Response) -> EdgePersoError:
    """The coordinator's problem ({"error", "detail"}) as the error class it was raised as."""
    status = response.status_code
    try:
        problem = response.json()
        error, detail = str(problem["error"]), str(problem["detail"])
    except (ValueError, TypeError, KeyError):
        error, detail = "", response.text[:200]
    message = f"the coordinator refused the request (HTTP {status}): {detail}"
    if status == 429:
        retry_after = response.headers.get("Retry-After", "1")
        return RateLimitedError(message, float(retry_after) if _number(retry_after) else 1.0)
    if status == 403 and error == "budget_exhausted":
        return BudgetExhaustedError(message)
    kinds: dict[int, type[EdgePersoError]] = {
        401: AuthError,
        403: ForbiddenError,
        404: NotFoundError,
        409: RoundConflictError,
    }
    if status >= 500:
        return CoordinatorUnavailableError(message)
    return kinds.get(status, InvalidInputError)(message)


def _number(value: str) -> bool:
    return value.replace(".", "", 1).isdigit()
