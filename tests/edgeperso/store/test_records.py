"""Records round-trip exactly, get stable ids, and bad input is refused before any write."""

from __future__ import annotations

import contextlib
import logging
import math
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgeperso import InvalidInputError
from edgeperso.store import Example, Feedback, RawKey, Store, StoreConfig

json_scalars = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
labels = (
    st.none()
    | st.text(max_size=10)
    | st.integers(-1000, 1000)
    | st.floats(allow_nan=False, allow_infinity=False)
)
examples_st = st.builds(
    Example,
    text=st.text(max_size=200),
    label=labels,
    timestamp=st.floats(0, 4e9),
    metadata=st.dictionaries(st.text(max_size=8), json_values, max_size=3),
)


def test_examples_round_trip_with_stable_ids(store: Store) -> None:
    ids = store.add_examples("alice", [Example("héllo ✓", "pos", 1.5, {"src": "chat"})])
    more = store.add_examples("alice", [Example("b", 0.25, 2.0), Example("c")])
    assert more == [ids[0] + 1, ids[0] + 2]
    got = store.examples("alice")
    assert [e.id for e in got] == ids + more
    assert got[0] == Example("héllo ✓", "pos", 1.5, {"src": "chat"}, id=ids[0])


def test_ids_are_never_reused_after_delete(store: Store) -> None:
    ids = store.add_examples("alice", [Example("a"), Example("b")])
    assert store.delete_examples("alice", [ids[1]]) == 1
    assert store.add_examples("alice", [Example("c")]) == [ids[1] + 1]


def test_users_are_isolated(store: Store) -> None:
    store.add_examples("alice", [Example("a")])
    store.add_examples("bob", [Example("b")])
    assert [e.text for e in store.examples("alice")] == ["a"]
    assert store.examples("carol") == []
    assert store.users() == ["alice", "bob"]


def test_update_replaces_in_place(store: Store) -> None:
    (rid,) = store.add_examples("alice", [Example("old")])
    store.update_examples("alice", [Example("new", "x", 3.0, id=rid)])
    assert store.examples("alice") == [Example("new", "x", 3.0, id=rid)]
    with pytest.raises(InvalidInputError):
        store.update_examples("alice", [Example("nope", id=rid + 100)])
    with pytest.raises(InvalidInputError):
        store.update_examples("bob", [Example("other user", id=rid)])


def test_feedback_round_trips(store: Store) -> None:
    (eid,) = store.add_examples("alice", [Example("a")])
    (fid,) = store.add_feedback("alice", [Feedback("rating", 4.5, 10.0, eid, {"ui": "stars"})])
    assert store.feedback("alice") == [Feedback("rating", 4.5, 10.0, eid, {"ui": "stars"}, fid)]
    assert store.delete_feedback("alice", [fid]) == 1
    assert store.feedback("alice") == []


def test_embeddings_are_float32_and_follow_their_example(store: Store) -> None:
    a, b = store.add_examples("alice", [Example("a"), Example("b")])
    store.put_embeddings("alice", {a: np.ones((2, 3)), b: np.arange(4, dtype=np.float32)})
    got = store.embeddings("alice")
    assert got[a].dtype == np.float32
    assert got[a].shape == (2, 3)
    np.testing.assert_array_equal(got[b], np.arange(4, dtype=np.float32))
    store.delete_examples("alice", [a])
    assert list(store.embeddings("alice")) == [b]
    assert store.delete_embeddings("alice") == 1


def test_blobs_are_versioned(store: Store) -> None:
    assert store.get_blob("alice", "adapter") is None
    v1 = store.put_blob("alice", "adapter", b"one")
    v2 = store.put_blob("alice", "adapter", b"two")
    assert (v1, v2) == (1, 2)
    assert store.get_blob("alice", "adapter") == b"two"
    assert store.get_blob("alice", "adapter", version=1) == b"one"
    v3 = store.put_blob("alice", "adapter", b"three", keep=2)
    assert store.blobs("alice") == {"adapter": [2, 3]}
    assert store.get_blob("alice", "adapter", version=1) is None
    assert store.delete_blob("alice", "adapter", v3) == 1
    assert store.get_blob("alice", "adapter") == b"two"


def test_update_blob_stores_a_function_of_the_newest_version(store: Store) -> None:
    seen: list[bytes | None] = []

    def append(newest: bytes | None) -> bytes:
        seen.append(newest)
        return (newest or b"") + b"+"

    assert store.update_blob("alice", "log", append) == 1
    assert store.update_blob("alice", "log", append, keep=1) == 2
    assert seen == [None, b"+"]
    assert store.get_blob("alice", "log") == b"++" and store.blobs("alice") == {"log": [2]}


@pytest.mark.parametrize(
    "update",
    [lambda newest: "text", lambda newest: None, lambda newest: 1 / 0],
    ids=["str", "none", "raises"],
)
def test_a_failing_update_blob_writes_nothing(store: Store, update: object) -> None:
    store.put_blob("alice", "log", b"kept")
    with pytest.raises((InvalidInputError, ZeroDivisionError)):
        store.update_blob("alice", "log", update)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="update must be a function"):
        store.update_blob("alice", "log", b"not callable")  # type: ignore[arg-type]
    assert store.blobs("alice") == {"log": [1]} and store.get_blob("alice", "log") == b"kept"


def test_state_holds_json_values(store: Store) -> None:
    store.set_state("alice", "round", {"id": 3, "eps": 0.5})
    store.set_state("alice", "round", {"id": 4, "eps": 0.75})
    assert store.get_state("alice", "round") == {"id": 4, "eps": 0.75}
    assert store.get_state("alice", "missing", 0) == 0
    assert store.delete_state("alice", "round")
    assert store.state("alice") == {}


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.add_examples("", [Example("a")]),
        lambda s: s.add_examples(None, [Example("a")]),
        lambda s: s.add_examples("u", ["not an example"]),
        lambda s: s.add_examples("u", "text"),
        lambda s: s.put_blob("u", "", b"x"),
        lambda s: s.put_blob("u", "adapter", "str"),
        lambda s: s.put_embeddings("u", {1: np.array([math.nan])}),
        lambda s: s.put_embeddings("u", {0: np.ones(2)}),
        lambda s: s.put_embeddings("u", {1: np.array(["a"])}),
        lambda s: s.set_state("u", "k", math.inf),
        lambda s: s.set_state("u", "k", {1: "non-str key"}),
        lambda s: s.delete_examples("u", [True]),
    ],
)
def test_bad_input_is_refused_and_nothing_is_written(store: Store, call: object) -> None:
    with pytest.raises(InvalidInputError):
        call(store)  # type: ignore[operator]
    assert store.users() == []


@pytest.mark.parametrize(
    "make",
    [
        lambda: Example(b"bytes"),  # type: ignore[arg-type]
        lambda: Example("a", label=math.nan),
        lambda: Example("a", label=True),
        lambda: Example("a", timestamp=math.inf),
        lambda: Example("a", metadata={"x": object()}),
        lambda: Feedback(""),
        lambda: Feedback("e", value=math.nan),
    ],
)
def test_invalid_records_cannot_be_built(make: object) -> None:
    with pytest.raises(InvalidInputError):
        make()  # type: ignore[operator]


def test_config_is_validated() -> None:
    with pytest.raises(InvalidInputError):
        StoreConfig(max_key_uses=1)
    with pytest.raises(InvalidInputError):
        StoreConfig(busy_timeout_s=-1)


def test_data_key_rotates_before_its_use_limit(
    store_path: Path, key: RawKey, caplog: pytest.LogCaptureFixture
) -> None:
    def wrapped_key() -> bytes:
        with contextlib.closing(sqlite3.connect(store_path)) as db:
            (value,) = db.execute("SELECT wrapped_key FROM users").fetchone()
        return bytes(value)

    caplog.set_level(logging.INFO, logger="edgeperso")
    with Store.open(store_path, key, StoreConfig(max_key_uses=64)) as store:
        store.add_examples("alice", [Example("t"), Example("u")])
        first = wrapped_key()
        for i in range(40):
            store.add_examples("alice", [Example(f"t{i}"), Example(f"u{i}")])
        assert wrapped_key() != first  # a new data key, wrapped anew
        assert any("reached its use limit" in r.getMessage() for r in caplog.records)
        assert [e.text for e in store.examples("alice")][:2] == ["t", "u"]
        assert len(store.examples("alice")) == 82  # re-sealed under the new key, all readable
        store.integrity_check()


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(batch=st.lists(examples_st, min_size=1, max_size=5))
def test_any_examples_round_trip(store: Store, batch: list[Example]) -> None:
    store.forget_user("p")
    ids = store.add_examples("p", batch)
    assert store.examples("p") == [
        Example(e.text, e.label, e.timestamp, e.metadata, i)
        for e, i in zip(batch, ids, strict=True)
    ]


@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    arrays=st.lists(
        st.lists(
            st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=0, max_size=6
        ),
        min_size=1,
        max_size=4,
    ),
    blob=st.binary(max_size=2000),
    value=json_values,
)
def test_any_embeddings_blobs_and_state_round_trip(
    store: Store, arrays: list[list[float]], blob: bytes, value: object
) -> None:
    vectors = {i + 1: np.array(a, dtype=np.float32) for i, a in enumerate(arrays)}
    store.put_embeddings("p", vectors)
    got = store.embeddings("p")
    for i, vector in vectors.items():
        np.testing.assert_array_equal(got[i], vector)
    version = store.put_blob("p", "b", blob)
    assert store.get_blob("p", "b", version) == blob
    store.set_state("p", "k", value)  # type: ignore[arg-type]
    assert store.get_state("p", "k") == value


def test_user_version_changes_with_every_write_of_that_user_only(store: Store) -> None:
    assert store.user_version("alice") is None
    store.add_examples("alice", [Example("one")])
    first = store.user_version("alice")
    assert first is not None and store.user_version("alice") == first  # reads change nothing
    store.add_examples("bob", [Example("two")])
    assert store.user_version("alice") == first
    store.put_blob("alice", "adapter", b"x")
    assert store.user_version("alice") not in (None, first)
    store.forget_user("alice")
    assert store.user_version("alice") is None


def test_embeddings_of_examples_that_no_longer_exist_are_not_written_back(store: Store) -> None:
    """put_embeddings(only_examples=True): what a reader embedded from examples that a
    delete or a forget removed meanwhile is dropped, and a forgotten user is not recreated."""
    a, b = store.add_examples("alice", [Example("one"), Example("two")])
    store.delete_examples("alice", [b])
    vectors = {a: np.ones(3, np.float32), b: np.ones(3, np.float32)}

    assert store.put_embeddings("alice", vectors, only_examples=True) == 1
    assert set(store.embeddings("alice")) == {a}

    store.forget_user("alice")
    assert store.put_embeddings("alice", vectors, only_examples=True) == 0
    assert store.set_state("alice", "k", 1, create=False) is False
    assert store.users() == []
