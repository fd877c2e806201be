"""The coordinator's HTTP API (FastAPI). JSON for control messages, safetensors for tensors.

Device routes authenticate with `Authorization: Bearer <device_id>.<token>` from enrolment;
operator routes under /v1/admin with the admin token. The OpenAPI document at /openapi.json
is the contract a Kotlin or Swift client implements.
"""

import asyncio
import base64
import contextlib
import dataclasses
import hmac
import logging
import time
from collections.abc import AsyncIterator, Mapping
from http import HTTPStatus
from typing import Annotated, Any, Literal, get_type_hints

from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, create_model
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgeperso import BudgetExhaustedError, EdgePersoError, InvalidInputError, KeyUnavailableError
from edgeperso_federated._config import CoordinatorConfig, RoundConfig
from edgeperso_federated._errors import (
    AuthError,
    ForbiddenError,
    NotFoundError,
    RateLimitedError,
    RoundConflictError,
)
from edgeperso_federated._rounds import FINAL, Coordinator, Device

logger = logging.getLogger(__name__)

_BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
# Declared in the OpenAPI document (security schemes); checked by the dependencies below, which
# answer a missing or wrong credential with a typed 401/403 problem.
_DEVICE_TOKEN = HTTPBearer(
    scheme_name="device",
    bearerFormat="<device_id>.<token>",
    description="The credential from POST /v1/devices (enrolment).",
    auto_error=False,
)
_OPERATOR_TOKEN = HTTPBearer(
    scheme_name="operator",
    description="The coordinator's admin token (EDGEPERSO_ADMIN_TOKEN).",
    auto_error=False,
)
_Bearer = HTTPAuthorizationCredentials | None
_BINARY_BODY = {"requestBody": {"required": True, "content": _BINARY}}
_B64 = Field(max_length=1024, pattern=r"^[A-Za-z0-9+/]*={0,2}$")


class _Request(BaseModel):
    """Request bodies are read strictly: true is not 1 and "1" is not a number."""

    model_config = ConfigDict(strict=True)


class Problem(BaseModel):
    error: str
    detail: str


class EnrolRequest(_Request):
    app_id: str = Field(min_length=1, max_length=64)
    enrolment_key: str = Field(min_length=1, max_length=128)


class EnrolResponse(BaseModel):
    device_id: str
    token: str


class JoinRequest(_Request):
    c_pk: Annotated[str, _B64] | None = None  # X25519, base64; null in plain rounds
    s_pk: Annotated[str, _B64] | None = None


class JoinResponse(BaseModel):
    index: int


class RoundStatus(BaseModel):
    round_id: str
    stage: Literal[
        "join", "share_keys", "masked_input", "unmasking", "upload", "published", "aborted"
    ]
    stage_deadline: float
    published_version: int | None
    reason: str | None


class ParamOut(BaseModel):
    name: str
    shape: list[int]
    level: Literal["persona", "global"]
    trainable: bool


class Task(BaseModel):
    round_id: str
    model_version: int
    params: list[ParamOut]
    num_personas: int
    summary_dim: int
    clip_norm: float
    summary_clip: float
    weight_cap: float | None
    secure: bool
    fixed_point_scale: float
    stage_deadline: float


class Peer(BaseModel):
    index: int
    c_pk: str
    s_pk: str


class Neighbours(BaseModel):
    index: int
    threshold: int
    neighbours: list[Peer]


class SealedShare(_Request):
    to: int = Field(ge=1)
    sealed: Annotated[str, _B64]


class SharesRequest(_Request):
    shares: list[SealedShare] = Field(max_length=100_000)


class InboxShare(BaseModel):
    sender: int = Field(alias="from")
    sealed: str


class Inbox(BaseModel):
    shares: list[InboxShare]


class Survivors(BaseModel):
    survivors: list[int]


class RevealedShare(_Request):
    of: int = Field(ge=1)
    kind: Literal["b", "s"]
    share: Annotated[str, _B64]


class RevealRequest(_Request):
    shares: list[RevealedShare] = Field(max_length=100_000)


class AppRequest(_Request):
    app_id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    epsilon_budget: float | None = Field(default=None, gt=0)
    delta: float = Field(default=1e-6, gt=0, lt=1)


# The body of POST /v1/admin/rounds: RoundConfig's fields, read strictly; RoundConfig itself
# then checks how they fit together.
_ROUND_HINTS = get_type_hints(RoundConfig)
RoundRequest = create_model(  # type: ignore[call-overload]
    "RoundConfig",
    __base__=_Request,
    **{
        f.name: (_ROUND_HINTS[f.name], ... if f.default is dataclasses.MISSING else f.default)
        for f in dataclasses.fields(RoundConfig)
    },
)


class AppCreated(BaseModel):
    app_id: str
    enrolment_key: str


class RoundCreated(BaseModel):
    round_id: str
    projected_epsilon: float | None


class LedgerEntry(BaseModel):
    round_id: str
    noise_multiplier: float
    sampling_probability: float
    epsilon: float
    delta: float


_STATUS: list[tuple[type[Exception], int, str]] = [
    (NotFoundError, 404, "not_found"),
    (ForbiddenError, 403, "forbidden"),
    (AuthError, 401, "unauthenticated"),
    (KeyUnavailableError, 401, "unauthenticated"),
    (RoundConflictError, 409, "conflict"),
    (BudgetExhaustedError, 403, "budget_exhausted"),
    (RateLimitedError, 429, "rate_limited"),
    (InvalidInputError, 422, "invalid_input"),
]


async def _single_valued_query(request: Request) -> None:
    """No query parameter of this API takes a list: a repeated one is ambiguous, not the last."""
    names = [name for name, _ in request.query_params.multi_items()]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InvalidInputError(f"query parameter {repeated[0]!r} is given more than once")


def _problem_response(
    status: int, error: str, detail: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(Problem(error=error, detail=detail).model_dump(), status, headers)


def _validation_detail(exc: RequestValidationError) -> str:
    """Where and what, for each problem pydantic found: 'body.cohort_size: must be >= 2'."""
    problems = []
    for error in exc.errors()[:5]:
        where = ".".join(str(part) for part in error.get("loc", ()))
        problems.append(f"{where}: {error.get('msg', 'invalid')}")
    return "; ".join(problems) or "the request does not match the API schema"


def _b64(value: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except ValueError as exc:
        raise InvalidInputError("a field is not valid base64") from exc


def _enc(value: bytes) -> str:
    return base64.b64encode(value).decode()


class _Parked:
    """Long polls waiting on one round, and the status they all get when its stage changes."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.status: dict[str, Any] | None = None


class _TokenBuckets:
    """One token bucket per key (a device, a client address): `burst` requests at once, then
    `rate` per second."""

    _PRUNE_AT = 10_000  # keys; full buckets are then forgotten (a new one starts full)

    def __init__(self, rate: float, burst: int, who: str) -> None:
        self._rate, self._burst, self._who = rate, burst, who
        self._state: dict[str, tuple[float, float]] = {}  # key -> (tokens, when)
        self._prune_at = self._PRUNE_AT

    def take(self, key: str) -> None:
        now = time.monotonic()
        tokens, last = self._state.get(key, (float(self._burst), now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        if tokens < 1:
            wait = (1 - tokens) / self._rate
            raise RateLimitedError(
                f"too many requests from this {self._who} (at most {self._burst} at once, then "
                f"{self._rate:g}/s); retry after {wait:.2f} s, as the Retry-After header says",
                wait,
            )
        self._state[key] = (tokens - 1, now)
        if len(self._state) >= self._prune_at:
            self._prune(now)

    def _prune(self, now: float) -> None:
        refill = self._burst / self._rate
        self._state = {k: v for k, v in self._state.items() if now - v[1] < refill}
        self._prune_at = max(self._PRUNE_AT, 2 * len(self._state))


class _BodyLimit:
    """Refuses request bodies over the limit with 413, before they are read into memory."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await _too_large(send, self.limit)
            return
        received = 0

        async def counted() -> Any:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _TooLargeError
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLargeError:
            await _too_large(send, self.limit)


class _TooLargeError(Exception):
    pass


async def _too_large(send: Any, limit: int) -> None:
    body = Problem(error="too_large", detail=f"request body over {limit} bytes").model_dump_json()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})


def create_app(config: CoordinatorConfig, coordinator: Coordinator | None = None) -> FastAPI:
    """The ASGI app; run it with uvicorn (see `edgeperso-coordinator serve`)."""
    coord = coordinator or Coordinator(config)
    waiting: dict[str, _Parked] = {}
    device_limit = _TokenBuckets(config.device_rate_per_s, config.device_burst, "device")
    enrol_limit = _TokenBuckets(config.enrol_rate_per_s, config.enrol_burst, "address")

    def wake(round_id: str) -> None:
        parked = waiting.pop(round_id, None)
        if parked is not None:
            # One read for every device parked on the round (a stage change wakes them all).
            parked.status = coord.status(round_id, None)
            parked.event.set()

    coord.on_stage_change(wake)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async def deadlines() -> None:
            while True:
                try:
                    coord.tick()
                except Exception:  # e.g. the database restarting: the next tick tries again
                    logger.exception("checking stage deadlines failed; retrying next tick")
                await asyncio.sleep(config.tick_s)

        task = asyncio.create_task(deadlines())
        yield
        task.cancel()

    app = FastAPI(
        dependencies=[Depends(_single_valued_query)],
        title="EdgePerso coordinator",
        version="1",
        description=__doc__,
        lifespan=lifespan,
        responses={code: {"model": Problem} for code in (401, 403, 404, 409, 413, 422, 429)},
    )

    @app.exception_handler(EdgePersoError)
    async def _problem(_: Request, exc: Exception) -> JSONResponse:
        status, error = next(
            ((s, e) for cls, s, e in _STATUS if isinstance(exc, cls)), (500, "internal")
        )
        headers = {}
        if isinstance(exc, RateLimitedError):
            headers["Retry-After"] = f"{exc.retry_after_s:.2f}"
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return _problem_response(status, error, str(exc), headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _problem_response(422, "invalid_input", _validation_detail(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI could not parse the body (e.g. not UTF-8 JSON)
            return _problem_response(422, "invalid_input", "the request body is not valid JSON")
        error = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
        return _problem_response(exc.status_code, error, str(exc.detail), exc.headers)

    async def device(bearer: Annotated[_Bearer, Depends(_DEVICE_TOKEN)]) -> Device:
        if bearer is None or not bearer.credentials:
            raise AuthError("send Authorization: Bearer <device_id>.<token> (from enrolment)")
        found = coord.authenticate(bearer.credentials)
        device_limit.take(found.device_id)
        return found

    async def admin(bearer: Annotated[_Bearer, Depends(_OPERATOR_TOKEN)]) -> None:
        if bearer is None or not bearer.credentials:
            raise AuthError("send Authorization: Bearer <admin token> for operator routes")
        if not hmac.compare_digest(bearer.credentials.encode(), config.admin_token.encode()):
            raise ForbiddenError("operator routes need the admin token")

    Dev = Annotated[Device, Depends(device)]
    Admin = Depends(admin)

    # ---- devices -----------------------------------------------------------------------------

    @app.post("/v1/devices", response_model=EnrolResponse, status_code=201, tags=["device"])
    async def enrol(body: EnrolRequest, request: Request) -> EnrolResponse:
        enrol_limit.take(request.client.host if request.client else "?")
        device_id, token = coord.enrol(body.app_id, body.enrolment_key)
        return EnrolResponse(device_id=device_id, token=token)

    @app.get(
        "/v1/task",
        response_model=Task,
        tags=["device"],
        responses={204: {"description": "no open round"}},
    )
    async def task(dev: Dev) -> Any:
        found = coord.task(dev.app_id)
        return Response(status_code=204) if found is None else found

    @app.get(
        "/v1/models/{version}",
        tags=["device"],
        response_class=Response,
        responses={200: {"content": _BINARY, "description": "safetensors"}},
    )
    async def model(
        version: Annotated[str, Path(pattern=r"^(latest|[0-9]{1,9})$")], dev: Dev
    ) -> Response:
        if version != "latest" and not version.isdigit():
            raise InvalidInputError("model version must be a number or 'latest'")
        number = None if version == "latest" else int(version)
        return Response(coord.model(dev.app_id, number), media_type="application/octet-stream")

    @app.get("/v1/rounds/{round_id}", response_model=RoundStatus, tags=["device"])
    async def status(
        round_id: str,
        dev: Dev,
        seen: Annotated[str | None, Query(max_length=16)] = None,
        wait: Annotated[float, Query(ge=0, le=30)] = 0,
    ) -> dict[str, Any]:
        """Long poll: with `seen` (the stage the device last saw), answers when the stage
        differs from it or after `wait` seconds."""
        current = coord.status(round_id, dev.app_id)
        if wait > 0 and current["stage"] == seen and seen not in FINAL:
            parked = waiting.setdefault(round_id, _Parked())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(parked.event.wait(), wait)
            current = parked.status or coord.status(round_id, dev.app_id)
        return current

    @app.post("/v1/rounds/{round_id}/join", response_model=JoinResponse, tags=["device"])
    async def join(round_id: str, body: JoinRequest, dev: Dev) -> JoinResponse:
        c_pk = None if body.c_pk is None else _b64(body.c_pk)
        s_pk = None if body.s_pk is None else _b64(body.s_pk)
        return JoinResponse(index=coord.join(round_id, dev, c_pk, s_pk))

    @app.get("/v1/rounds/{round_id}/neighbours", response_model=Neighbours, tags=["device"])
    async def neighbours(round_id: str, dev: Dev) -> Neighbours:
        found = coord.neighbours(round_id, dev)
        peers = [
            Peer(index=p["index"], c_pk=_enc(p["c_pk"]), s_pk=_enc(p["s_pk"]))
            for p in found["neighbours"]
        ]
        return Neighbours(index=found["index"], threshold=found["threshold"], neighbours=peers)

    @app.post("/v1/rounds/{round_id}/shares", status_code=204, tags=["device"])
    async def submit_shares(round_id: str, body: SharesRequest, dev: Dev) -> Response:
        sealed: dict[int, bytes] = {}
        for share in body.shares:
            if share.to in sealed:
                raise InvalidInputError("one sealed share per neighbour")
            sealed[share.to] = _b64(share.sealed)
        coord.submit_shares(round_id, dev, sealed)
        return Response(status_code=204)

    @app.get("/v1/rounds/{round_id}/inbox", response_model=Inbox, tags=["device"])
    async def inbox(round_id: str, dev: Dev) -> Inbox:
        rows = coord.inbox(round_id, dev)
        return Inbox(
            shares=[InboxShare(**{"from": r["from"], "sealed": _enc(r["sealed"])}) for r in rows]
        )

    @app.put(
        "/v1/rounds/{round_id}/masked", status_code=204, tags=["device"], openapi_extra=_BINARY_BODY
    )
    async def masked(round_id: str, request: Request, dev: Dev) -> Response:
        """safetensors with one tensor "masked": U32[layout length]."""
        coord.submit_upload(round_id, dev, await request.body())
        return Response(status_code=204)

    @app.put(
        "/v1/rounds/{round_id}/update", status_code=204, tags=["device"], openapi_extra=_BINARY_BODY
    )
    async def update(round_id: str, request: Request, dev: Dev) -> Response:
        """Plain rounds only: safetensors with one tensor "update": F32[layout length]."""
        coord.submit_upload(round_id, dev, await request.body())
        return Response(status_code=204)

    @app.get("/v1/rounds/{round_id}/survivors", response_model=Survivors, tags=["device"])
    async def survivors(round_id: str, dev: Dev) -> Survivors:
        return Survivors(survivors=coord.survivors(round_id, dev))

    @app.post("/v1/rounds/{round_id}/reveal", status_code=204, tags=["device"])
    async def reveal(round_id: str, body: RevealRequest, dev: Dev) -> Response:
        coord.submit_reveal(round_id, dev, [(s.of, s.kind, _b64(s.share)) for s in body.shares])
        return Response(status_code=204)

    # ---- operator ----------------------------------------------------------------------------

    @app.post(
        "/v1/admin/apps",
        response_model=AppCreated,
        status_code=201,
        tags=["operator"],
        dependencies=[Admin],
    )
    async def create_app_route(body: AppRequest) -> AppCreated:
        key = coord.create_app(body.app_id, body.epsilon_budget, body.delta)
        return AppCreated(app_id=body.app_id, enrolment_key=key)

    @app.put(
        "/v1/admin/apps/{app_id}/models/{version}",
        status_code=204,
        tags=["operator"],
        dependencies=[Admin],
        openapi_extra=_BINARY_BODY,
    )
    async def put_model(
        app_id: str, version: Annotated[int, Path(ge=0, lt=2**31)], request: Request
    ) -> Response:
        """safetensors of global params, persona/<p>/<name>, centroids; layout in __metadata__."""
        coord.put_model(app_id, version, await request.body())
        return Response(status_code=204)

    @app.post(
        "/v1/admin/rounds",
        response_model=RoundCreated,
        status_code=201,
        tags=["operator"],
        dependencies=[Admin],
    )
    async def create_round(body: RoundRequest) -> RoundCreated:  # type: ignore[valid-type]
        requested = RoundConfig(**body.model_dump())  # type: ignore[attr-defined]
        return RoundCreated(**coord.create_round(requested))

    @app.get(
        "/v1/admin/apps/{app_id}/rounds/{round_id}",
        response_model=RoundStatus,
        tags=["operator"],
        dependencies=[Admin],
    )
    async def round_status(app_id: str, round_id: str) -> dict[str, Any]:
        return coord.status(round_id, app_id)

    @app.get(
        "/v1/admin/apps/{app_id}/privacy",
        response_model=list[LedgerEntry],
        tags=["operator"],
        dependencies=[Admin],
    )
    async def ledger(app_id: str) -> list[dict[str, Any]]:
        return coord.privacy_ledger(app_id)

    return _with_body_limit(app, config.max_body_bytes)


def _with_body_limit(app: FastAPI, limit: int) -> FastAPI:
    app.add_middleware(_BodyLimit, limit=limit)
    return app
