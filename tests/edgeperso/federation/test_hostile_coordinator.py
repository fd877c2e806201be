"""The device against a coordinator that is broken or hostile: typed errors, bounded reads,
nothing revealed or installed that the protocol does not allow.

The coordinator here is an in-process fake (an httpx transport) because its answers are the
thing under test; the device side is the real FederationClient and SecAggClient.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from edgeperso import IntegrityError, InvalidInputError, KeyUnavailableError, UnsupportedError
from edgeperso.federation import (
    CoordinatorProtocolError,
    CoordinatorUnavailableError,
    FederatedParam,
    FederationClient,
    FederationConfig,
    MemoryStateStore,
    PersonaLayout,
)
from edgeperso.federation._protocol import SecAggClient
from edgeperso.federation._wire import encode_tensors

LAYOUT = PersonaLayout(
    (FederatedParam("bias", (3,), "global"), FederatedParam("lora_b", (2, 3), "persona")),
    num_personas=2,
    summary_dim=2,
)
RID = "r1"
URL = "https://coordinator.example"
Answer = httpx.Response | Callable[[httpx.Request], httpx.Response]


def model(**changes: np.ndarray) -> dict[str, np.ndarray]:
    tensors = {
        "bias": np.zeros(3, np.float32),
        "persona/0/lora_b": np.zeros((2, 3), np.float32),
        "persona/1/lora_b": np.zeros((2, 3), np.float32),
        "centroids": np.array([[1, 0], [0, 1]], np.float32),
    }
    return tensors | changes


def task_json(**changes: object) -> dict[str, Any]:
    return {
        "round_id": RID,
        "model_version": 0,
        **LAYOUT.to_json(),
        "clip_norm": 1.0,
        "summary_clip": 1.0,
        "weight_cap": None,
        "secure": True,
        "fixed_point_scale": 2.0**20,
        **changes,
    }


class Coordinator:
    """Answers by "METHOD /path" (the round prefix cut off); records what the device sent."""

    def __init__(self) -> None:
        self.answers: dict[str, Answer] = {
            "POST /v1/devices": httpx.Response(201, json={"device_id": "d1", "token": "t1"}),
            "GET /v1/task": httpx.Response(200, json=task_json()),
            "GET /v1/models/0": httpx.Response(200, content=encode_tensors(model())),
        }
        self.sent: list[tuple[str, bytes]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path.removeprefix(f"/v1/rounds/{RID}") or "/status"
        route = f"{request.method} {path}"
        self.sent.append((route, request.read()))
        answer = self.answers.get(route, httpx.Response(404, json={"detail": "no such route"}))
        return answer(request) if callable(answer) else answer

    def client(self, state: MemoryStateStore | None = None, **config: Any) -> FederationClient:
        settings = {"opt_in": True, "retries": 0, "backoff_s": 0.01, **config}
        return FederationClient(
            FederationConfig(URL, "app", "key", **settings),
            state or MemoryStateStore(),
            transport=httpx.MockTransport(self),
        )


@pytest.fixture
def coordinator() -> Coordinator:
    return Coordinator()


def b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


# ---- answers that are not the protocol's shape ---------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        httpx.Response(200, content=b"<html>not json</html>"),
        httpx.Response(200, content=b""),
        httpx.Response(200, json=[1, 2]),
        httpx.Response(200, json={"round_id": RID}),
        httpx.Response(200, json=task_json(model_version="abc")),
        httpx.Response(200, json=task_json(model_version=None)),
        httpx.Response(200, json=task_json(clip_norm=-1.0)),
        httpx.Response(200, json=task_json(clip_norm="nan")),
        httpx.Response(200, json=task_json(summary_clip=0)),
        httpx.Response(200, json=task_json(weight_cap=0)),
        httpx.Response(200, json=task_json(fixed_point_scale=0)),
        httpx.Response(200, json=task_json(secure="yes")),
        httpx.Response(200, json=task_json(num_personas=10**12)),
    ],
    ids=[
        "html",
        "empty",
        "list",
        "fields-missing",
        "version-text",
        "version-null",
        "negative-clip",
        "nan-clip",
        "zero-summary-clip",
        "zero-weight-cap",
        "zero-scale",
        "secure-text",
        "huge-persona-count",
    ],
)
def test_a_malformed_task_is_a_typed_error(
    coordinator: Coordinator, answer: httpx.Response
) -> None:
    coordinator.answers["GET /v1/task"] = answer
    with coordinator.client() as client, pytest.raises(CoordinatorProtocolError):
        client.check_in()


@pytest.mark.parametrize(
    "tensors",
    [
        model(bias=np.array([0, np.nan, 0], np.float32)),
        model(bias=np.zeros(7, np.float32)),
        model(bias=np.zeros(3, np.float64)),
        {k: v for k, v in model().items() if k != "persona/1/lora_b"},
        {k: v for k, v in model().items() if k != "centroids"},
        model(extra=np.zeros(1, np.float32)),
    ],
    ids=["nan", "wrong-shape", "float64", "persona-missing", "centroids-missing", "extra"],
)
def test_a_model_that_does_not_fit_the_tasks_layout_is_refused(
    coordinator: Coordinator, tensors: dict[str, np.ndarray]
) -> None:
    coordinator.answers["GET /v1/models/0"] = httpx.Response(200, content=encode_tensors(tensors))
    with coordinator.client() as client, pytest.raises(CoordinatorProtocolError, match="tensor"):
        client.check_in()


def test_the_newest_model_is_checked_against_the_layout_it_carries(
    coordinator: Coordinator,
) -> None:
    meta = {"layout": json.dumps(LAYOUT.to_json()), "version": "3"}
    good = encode_tensors(model(), meta)
    coordinator.answers["GET /v1/models/latest"] = httpx.Response(200, content=good)
    with coordinator.client() as client:
        version, params = client.latest(np.array([0.0, 1.0]))
        assert version == 3 and set(params) == {"bias", "lora_b"}
        for broken in (
            encode_tensors(model(bias=np.full(3, np.inf, np.float32)), meta),
            encode_tensors({k: v for k, v in model().items() if k != "persona/0/lora_b"}, meta),
            encode_tensors(model(), {**meta, "version": "x"}),
            encode_tensors(model(), {"version": "3"}),
        ):
            coordinator.answers["GET /v1/models/latest"] = httpx.Response(200, content=broken)
            with pytest.raises(CoordinatorProtocolError):
                client.latest(np.array([0.0, 1.0]))


@pytest.mark.parametrize(
    "enrolled",
    [{}, [1, 2], {"device_id": "d", "token": "tök"}, {"device_id": "d", "token": "a\nX: 1"}],
    ids=["empty", "list", "non-ascii", "header-injection"],
)
def test_a_bad_enrolment_answer_is_not_saved(coordinator: Coordinator, enrolled: object) -> None:
    coordinator.answers["POST /v1/devices"] = httpx.Response(201, json=enrolled)
    state = MemoryStateStore()
    with coordinator.client(state) as client:
        with pytest.raises(CoordinatorProtocolError, match="enrolment"):
            client.check_in()
        assert state.get("federation.credential") is None
        # the coordinator is fixed: the next call enrols and goes on
        coordinator.answers["POST /v1/devices"] = httpx.Response(
            201, json={"device_id": "d1", "token": "t1"}
        )
        assert client.check_in() is not None


def test_a_damaged_saved_credential_points_to_enrol(coordinator: Coordinator) -> None:
    state = MemoryStateStore()
    state.put("federation.credential", b'{"device_id": "d1"}')
    with coordinator.client(state) as client:
        with pytest.raises(KeyUnavailableError, match=r"enrol\(\)"):
            client.check_in()
        client.enrol()
        assert client.check_in() is not None


@pytest.mark.parametrize(
    "status",
    [{"stage": "bogus"}, {}, [1], {"stage": "published", "published_version": None}],
    ids=["unknown-stage", "no-stage", "list", "no-version"],
)
def test_a_malformed_round_status_is_a_typed_error_and_the_round_stays_saved(
    coordinator: Coordinator, status: object
) -> None:
    uploaded: list[bool] = []

    def round_status(request: httpx.Request) -> httpx.Response:
        if isinstance(status, dict) and status.get("stage") == "published" and not uploaded:
            return httpx.Response(200, json={"stage": "upload"})
        return httpx.Response(200, json=status)

    def update(request: httpx.Request) -> httpx.Response:
        uploaded.append(True)
        return httpx.Response(204)

    coordinator.answers["GET /v1/task"] = httpx.Response(200, json=task_json(secure=False))
    coordinator.answers["POST /join"] = httpx.Response(200, json={"index": 1})
    coordinator.answers["GET /status"] = round_status
    coordinator.answers["PUT /update"] = update
    state = MemoryStateStore()
    with (
        coordinator.client(state, allow_plain_rounds=True) as client,
        pytest.raises(CoordinatorProtocolError),
    ):
        contribute(client)
    assert state.get("federation.round") is not None


def test_an_error_detail_is_cut_short(coordinator: Coordinator) -> None:
    coordinator.answers["GET /v1/task"] = httpx.Response(404, json={"detail": "x" * 5_000_000})
    with coordinator.client() as client, pytest.raises(InvalidInputError) as raised:
        client.check_in()
    assert len(str(raised.value)) < 400


# ---- what the device reads, and for how long ------------------------------------------------


def test_an_answer_larger_than_max_response_bytes_is_refused(coordinator: Coordinator) -> None:
    huge = b"\0" * (2 << 20)
    coordinator.answers["GET /v1/models/0"] = httpx.Response(200, content=huge)
    with (
        coordinator.client(max_response_bytes=1 << 20) as client,
        pytest.raises(CoordinatorProtocolError, match="max_response_bytes"),
    ):
        client.check_in()

    class Endless(httpx.SyncByteStream):  # no Content-Length: the limit holds while reading
        def __iter__(self) -> Iterator[bytes]:
            while True:
                yield b"\0" * 65536

    coordinator.answers["GET /v1/models/0"] = httpx.Response(200, stream=Endless())
    with (
        coordinator.client(max_response_bytes=1 << 20) as client,
        pytest.raises(CoordinatorProtocolError, match="max_response_bytes"),
    ):
        client.check_in()


def test_an_answer_that_does_not_match_its_content_encoding_is_a_typed_error(
    coordinator: Coordinator,
) -> None:
    coordinator.answers["GET /v1/task"] = lambda request: httpx.Response(
        200, stream=httpx.ByteStream(b"not gzip at all"), headers={"Content-Encoding": "gzip"}
    )
    with coordinator.client() as client, pytest.raises(CoordinatorProtocolError, match="decode"):
        client.check_in()


def test_a_large_answer_arriving_steadily_is_not_cut_by_the_request_time_limit(
    coordinator: Coordinator,
) -> None:
    """About 1.5 s of a model at 200 KiB/s against a 0.5 s limit: past the limit, each 32 KiB
    received buys another second."""
    body = encode_tensors(model(extra=np.zeros(75_000, np.float32)))

    class Steady(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            for i in range(0, len(body), 20_480):
                time.sleep(0.1)
                yield body[i : i + 20_480]

    coordinator.answers["GET /v1/models/0"] = lambda request: httpx.Response(200, stream=Steady())
    with (
        coordinator.client(request_timeout_s=0.5) as client,
        pytest.raises(CoordinatorProtocolError, match="extra"),  # arrived whole, then checked
    ):
        client.check_in()


def test_a_trickled_answer_counts_against_the_request_time_limit(
    coordinator: Coordinator,
) -> None:
    class Trickle(httpx.SyncByteStream):
        def __iter__(self) -> Iterator[bytes]:
            body = json.dumps(task_json()).encode()
            for i in range(len(body)):
                time.sleep(0.05)
                yield body[i : i + 1]

    coordinator.answers["GET /v1/task"] = httpx.Response(200, stream=Trickle())
    started = time.monotonic()
    with (
        coordinator.client(request_timeout_s=0.5) as client,
        pytest.raises(CoordinatorUnavailableError, match="ReadTimeout"),
    ):
        client.check_in()
    assert time.monotonic() - started < 5  # the whole body would take about 20 s


def test_a_retry_after_beyond_max_backoff_ends_the_call_instead_of_sleeping(
    coordinator: Coordinator,
) -> None:
    coordinator.answers["GET /v1/task"] = httpx.Response(503, headers={"Retry-After": "86400"})
    started = time.monotonic()
    with (
        coordinator.client(retries=3) as client,
        pytest.raises(CoordinatorUnavailableError, match="come back in 86400 s"),
    ):
        client.check_in()
    assert time.monotonic() - started < 5
    assert len(coordinator.sent) == 2  # enrolment, then one try


def test_a_retry_is_never_sooner_than_the_coordinator_asked(coordinator: Coordinator) -> None:
    times: list[float] = []

    def busy(request: httpx.Request) -> httpx.Response:
        times.append(time.monotonic())
        return httpx.Response(429, headers={"Retry-After": "0.4"})

    coordinator.answers["GET /v1/task"] = busy
    with (
        coordinator.client(retries=2, backoff_s=0.01, max_backoff_s=1.0) as client,
        pytest.raises(CoordinatorUnavailableError),
    ):
        client.check_in()
    assert len(times) == 3 and min(np.diff(times)) >= 0.4


def test_retries_stop_at_the_rounds_timeout(coordinator: Coordinator) -> None:
    coordinator.answers["POST /join"] = httpx.Response(503)
    started = time.monotonic()
    with (
        coordinator.client(retries=8, backoff_s=0.5, max_backoff_s=5.0) as client,
        pytest.raises(CoordinatorUnavailableError, match="resume"),
    ):
        task = client.check_in()
        assert task is not None
        update = task.params_for(0)
        client.contribute(
            task, before=update, after=update, summary=np.zeros(2), num_examples=1, timeout_s=0.2
        )
    assert time.monotonic() - started < 2  # 8 retries with back-off would take over a minute
    assert sum(route == "POST /join" for route, _ in coordinator.sent) == 1


def test_a_long_poll_gets_its_wait_on_top_of_the_request_timeout(
    coordinator: Coordinator,
) -> None:
    """The coordinator holds a status request for up to its `wait` (20 s at most); a device
    with a short request timeout must not take that hold for a failure."""
    limits: list[float] = []

    def held(request: httpx.Request) -> httpx.Response:
        limits.append(request.extensions["timeout"]["read"])
        return httpx.Response(200, json={"stage": "aborted"})

    coordinator.answers["GET /v1/task"] = httpx.Response(200, json=task_json(secure=False))
    coordinator.answers["POST /join"] = httpx.Response(200, json={"index": 1})
    coordinator.answers["GET /status"] = held
    with coordinator.client(request_timeout_s=5, allow_plain_rounds=True) as client:
        task = client.check_in()
        assert task is not None
        update = task.params_for(0)
        outcome = client.contribute(
            task, before=update, after=update, summary=np.zeros(2), num_examples=1, timeout_s=60
        )
    assert outcome.status == "aborted"
    assert limits[0] == pytest.approx(5 + 20.0, abs=0.1)  # the long poll for "upload"


# ---- plain rounds and plain http ------------------------------------------------------------


def test_a_plain_round_is_refused_unless_the_app_allows_it(coordinator: Coordinator) -> None:
    coordinator.answers["GET /v1/task"] = httpx.Response(200, json=task_json(secure=False))
    with coordinator.client() as client:
        task = client.check_in()
        assert task is not None and not task.secure
        sent = len(coordinator.sent)
        update = task.params_for(0)
        with pytest.raises(UnsupportedError, match="allow_plain_rounds"):
            client.contribute(
                task, before=update, after=update, summary=np.zeros(2), num_examples=1
            )
    assert len(coordinator.sent) == sent  # nothing went out


def test_a_saved_plain_round_is_not_resumed_once_the_app_no_longer_allows_it(
    coordinator: Coordinator,
) -> None:
    """A round joined while plain rounds were allowed (or by an older version, which always
    took part), resumed by an app that no longer allows them."""
    coordinator.answers["GET /v1/task"] = httpx.Response(200, json=task_json(secure=False))
    coordinator.answers["POST /join"] = httpx.Response(503)
    state = MemoryStateStore()
    with (
        coordinator.client(state, allow_plain_rounds=True) as client,
        pytest.raises(CoordinatorUnavailableError),
    ):
        contribute(client)
    coordinator.answers["POST /join"] = httpx.Response(200, json={"index": 1})
    sent = len(coordinator.sent)
    with coordinator.client(state) as client, pytest.raises(UnsupportedError, match="allow_plain"):
        client.resume()
    assert not any(route in ("POST /join", "PUT /update") for route, _ in coordinator.sent[sent:])
    assert state.get("federation.round") is not None  # kept: the app may allow it again


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://127.0.0.1:8000", True),
        ("http://[::1]:8000", True),
        ("http://localhost:8000", True),
        ("https://coordinator.example", True),
        ("http://coordinator.example", False),
        ("http://10.0.0.5:8000", False),
        ("ftp://coordinator.example", False),
        ("https://[::1", False),
        ("https://", False),
    ],
)
def test_plain_http_is_for_loopback_unless_the_app_says_otherwise(url: str, allowed: bool) -> None:
    if allowed:
        FederationConfig(url, "app", "key")
        return
    with pytest.raises(InvalidInputError):
        FederationConfig(url, "app", "key")
    if url.startswith("http://"):
        FederationConfig(url, "app", "key", allow_insecure_http=True)


@pytest.mark.parametrize(
    "changes",
    [
        {"request_timeout_s": 0},
        {"request_timeout_s": float("nan")},
        {"retries": -1},
        {"retries": 1.5},
        {"max_response_bytes": 10},
        {"opt_in": "yes"},
        {"app_id": ""},
    ],
)
def test_bad_settings_are_refused(changes: dict[str, object]) -> None:
    settings: dict[str, Any] = {"coordinator_url": URL, "app_id": "app", "enrolment_key": "k"}
    with pytest.raises(InvalidInputError):
        FederationConfig(**(settings | changes))


# ---- secure aggregation ---------------------------------------------------------------------


class SecureRound:
    """Two real peers (SecAggClient) behind the fake coordinator; the device is index 1."""

    def __init__(self, coordinator: Coordinator, threshold: int = 2) -> None:
        self.coordinator = coordinator
        self.threshold = threshold
        self.peers = {i: SecAggClient.start(RID) for i in (2, 3)}
        self.device_keys: tuple[bytes, bytes] | None = None
        self.stage = "join"
        self.survivors = [1, 2, 3]
        self.reveals: list[list[dict[str, Any]]] = []
        self.reveal_answer = httpx.Response(204)
        coordinator.answers.update(
            {
                "POST /join": self.join,
                "GET /status": lambda r: httpx.Response(200, json={"stage": self.stage}),
                "GET /neighbours": lambda r: httpx.Response(200, json=self.neighbours()),
                "POST /shares": self.advance("masked_input"),
                "GET /inbox": lambda r: httpx.Response(200, json=self.inbox()),
                "PUT /masked": self.advance("unmasking"),
                "GET /survivors": lambda r: httpx.Response(200, json={"survivors": self.survivors}),
                "POST /reveal": self.reveal,
            }
        )

    def join(self, request: httpx.Request) -> httpx.Response:
        keys = json.loads(request.read())
        self.device_keys = (base64.b64decode(keys["c_pk"]), base64.b64decode(keys["s_pk"]))
        self.stage = "share_keys"
        return httpx.Response(200, json={"index": 1})

    def advance(self, stage: str) -> Callable[[httpx.Request], httpx.Response]:
        def answer(request: httpx.Request) -> httpx.Response:
            self.stage = stage
            return httpx.Response(204)

        return answer

    def neighbours(self) -> dict[str, Any]:
        listed = [
            {"index": i, "c_pk": b64(p.c_pk), "s_pk": b64(p.s_pk)} for i, p in self.peers.items()
        ]
        return {"index": 1, "threshold": self.threshold, "neighbours": listed}

    def inbox(self) -> dict[str, Any]:
        assert self.device_keys is not None
        shares = []
        for i, peer in self.peers.items():
            others = {j: (p.c_pk, p.s_pk) for j, p in self.peers.items() if j != i}
            sealed = peer.share_keys(i, {1: self.device_keys, **others}, self.threshold)
            shares.append({"from": i, "sealed": b64(sealed[1])})
        return {"shares": shares}

    def reveal(self, request: httpx.Request) -> httpx.Response:
        self.reveals.append(json.loads(request.read())["shares"])
        if self.reveal_answer.status_code < 400:
            self.stage = "aborted"
        return self.reveal_answer


def contribute(client: FederationClient) -> Any:
    task = client.check_in()
    assert task is not None
    update = task.params_for(0)
    return client.contribute(
        task, before=update, after=update, summary=np.array([1.0, 0.0]), num_examples=1
    )


def test_a_resumed_device_reveals_the_same_shares_whatever_survivors_it_is_sent(
    coordinator: Coordinator,
) -> None:
    """The first reveal reaches the coordinator, which answers 503 and then says peer 2
    dropped: answering that would hand over peer 2's mask key beside its self-mask seed."""
    secure = SecureRound(coordinator)
    secure.reveal_answer = httpx.Response(503)
    state = MemoryStateStore()
    with coordinator.client(state) as client, pytest.raises(CoordinatorUnavailableError):
        contribute(client)
    secure.survivors = [1, 3]
    secure.reveal_answer = httpx.Response(204)
    with coordinator.client(state) as client:
        assert client.resume() is not None
    assert len(secure.reveals) == 2
    assert secure.reveals[0] == secure.reveals[1]
    assert {(s["of"], s["kind"]) for s in secure.reveals[0]} == {(2, "b"), (3, "b")}


def test_a_device_whose_neighbours_dropped_leaves_the_round_without_revealing(
    coordinator: Coordinator,
) -> None:
    secure = SecureRound(coordinator)
    secure.survivors = [1]  # both neighbours dropped after sending their shares

    def status(request: httpx.Request) -> httpx.Response:
        asked = any(route == "GET /survivors" for route, _ in coordinator.sent)
        # once the device has seen the survivors, the coordinator's deadline ends the round
        return httpx.Response(200, json={"stage": "aborted" if asked else secure.stage})

    coordinator.answers["GET /status"] = status
    state = MemoryStateStore()
    with coordinator.client(state) as client:
        outcome = contribute(client)
    assert outcome.status == "aborted" and outcome.params is None
    assert secure.reveals == []
    assert state.get("federation.round") is None


def test_secagg_refuses_a_second_survivors_list_and_too_few_survivors() -> None:
    device = SecAggClient.start(RID)
    peers = {i: SecAggClient.start(RID) for i in (2, 3, 4)}
    device.share_keys(1, {i: (p.c_pk, p.s_pk) for i, p in peers.items()}, 2)
    device.held = {i: (bytes(32), bytes(32)) for i in peers}  # as if every share arrived
    with pytest.raises(InvalidInputError, match="fewer than the threshold"):
        device.reveal([1, 2])
    first = device.reveal([1, 2, 3])
    assert SecAggClient.from_bytes(device.to_bytes()).reveal([1, 2, 3]) == first
    with pytest.raises(IntegrityError, match="another survivors list"):
        SecAggClient.from_bytes(device.to_bytes()).reveal([1, 2, 4])


@pytest.mark.parametrize(
    ("threshold", "message"),
    [(1, "not a majority"), (3, "cannot hold")],
)
def test_secagg_refuses_a_threshold_that_is_not_a_majority_of_the_neighbours(
    threshold: int, message: str
) -> None:
    peers = {i: SecAggClient.start(RID) for i in (2, 3)}
    with pytest.raises(InvalidInputError, match=message):
        SecAggClient.start(RID).share_keys(
            1, {i: (p.c_pk, p.s_pk) for i, p in peers.items()}, threshold
        )


@pytest.mark.parametrize("field", ["c_pk", "s_pk"])
def test_a_low_order_neighbour_key_is_refused_before_any_share_is_sent(
    coordinator: Coordinator, field: str
) -> None:
    secure = SecureRound(coordinator)
    listed = secure.neighbours()
    listed["neighbours"][0][field] = b64(bytes(32))  # the all-zero point
    coordinator.answers["GET /neighbours"] = httpx.Response(200, json=listed)
    with coordinator.client() as client, pytest.raises(CoordinatorProtocolError, match="low"):
        contribute(client)
    assert not any(route == "POST /shares" for route, _ in coordinator.sent)


@pytest.mark.parametrize(
    "listed",
    [
        {"index": 1, "threshold": 2},
        {"index": 1, "threshold": 2, "neighbours": None},
        {"index": "x", "threshold": 2, "neighbours": []},
        {"index": 1, "threshold": True, "neighbours": []},
    ],
    ids=["missing", "null", "index-text", "threshold-bool"],
)
def test_a_malformed_neighbour_list_is_a_typed_error(
    coordinator: Coordinator, listed: dict[str, Any]
) -> None:
    SecureRound(coordinator)
    coordinator.answers["GET /neighbours"] = httpx.Response(200, json=listed)
    with coordinator.client() as client, pytest.raises(CoordinatorProtocolError):
        contribute(client)
