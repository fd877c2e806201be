"""Inputs found by fuzzing the store's API: each is a typed error, and nothing is written."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeperso import InvalidInputError
from edgeperso.federation import DirectoryStateStore, SealedStateStore
from edgeperso.store import Example, Feedback, PassphraseKey, RawKey, Store, StoreConfig


@pytest.mark.parametrize(
    "call",
    [
        lambda s, d: s.export_backup(str(d / "b.bk\0x"), RawKey(bytes(32))),
        lambda s, d: Store.open(str(d / "new.db\0x"), RawKey(bytes(32))),
        lambda s, d: Store.import_backup(str(d / "x\0y"), d / "restored.db", RawKey(bytes(32))),
        lambda s, d: Store.open("", RawKey(bytes(32))),
    ],
    ids=["export-backup", "open", "import-backup", "empty"],
)
def test_a_path_with_a_nul_byte_is_refused_and_no_file_appears(
    store: Store, tmp_path: Path, call: Callable[[Store, Path], object]
) -> None:
    """SQLite cuts a name at the NUL: a backup to "b.bk\\0x" was written whole to "b.bk",
    and outlived the shredding of the users in it."""
    store.add_examples("alice", [Example("a private note")])
    before = set(os.listdir(tmp_path))
    with pytest.raises(InvalidInputError, match=r"NUL|non-empty"):
        call(store, tmp_path)
    assert set(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("version", [1.0, np.int64(1), True, 0, -1, "1"])
def test_a_blob_version_that_is_not_a_positive_int_is_bad_input_not_tampering(
    store: Store, version: object
) -> None:
    store.put_blob("alice", "adapter", b"weights")
    for call in (store.get_blob, store.delete_blob):
        with pytest.raises(InvalidInputError, match="version must be a positive int"):
            call("alice", "adapter", version)  # type: ignore[operator]
    assert store.get_blob("alice", "adapter") == b"weights"
    store.integrity_check()


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.delete_examples("alice", None),
        lambda s: s.delete_examples("alice", 5),
        lambda s: s.delete_feedback("alice", "12"),
        lambda s: s.put_blob("alice", "bad\ud800name", b"x"),
        lambda s: s.set_state("alice", "key\udfff", 1),
        lambda s: s.set_state("alice", "k", 10**5000),
        lambda s: s.put_embeddings("alice", {1: [[1.0, 2.0], [3.0]]}),
        lambda s: s.add_examples("alice", [Example("x", label=10**400)]),
        lambda s: s.add_examples("alice", [Example("x", timestamp=10**400)]),
        lambda s: s.add_feedback("alice", [Feedback("rating", value=-(10**400))]),
    ],
    ids=[
        "delete-none",
        "delete-int",
        "delete-str",
        "blob-name-surrogate",
        "state-key-surrogate",
        "state-huge-int",
        "ragged-embedding",
        "label-huge-int",
        "timestamp-huge-int",
        "feedback-huge-int",
    ],
)
def test_fuzzed_arguments_are_typed_errors_and_change_nothing(
    store: Store, call: Callable[[Store], object]
) -> None:
    (kept,) = store.add_examples("alice", [Example("kept", label="a")])
    with pytest.raises(InvalidInputError):
        call(store)
    assert [e.id for e in store.examples("alice")] == [kept]
    store.integrity_check()


def test_a_non_contiguous_memoryview_is_stored_as_its_bytes(store: Store) -> None:
    view = memoryview(np.arange(12, dtype=np.uint8).reshape(3, 4)[:, ::2])
    store.put_blob("alice", "strided", view)
    assert store.get_blob("alice", "strided") == view.tobytes()


@pytest.mark.parametrize(
    "make",
    [
        lambda: PassphraseKey("pass\ud800word", memory_kib=1024, iterations=1, lanes=1),
        lambda: StoreConfig(create="no"),  # type: ignore[arg-type]
        lambda: StoreConfig(busy_timeout_s=True),
    ],
    ids=["passphrase-surrogate", "create-str", "timeout-bool"],
)
def test_bad_key_and_config_values_are_refused_at_construction(make: Callable[[], Any]) -> None:
    with pytest.raises(InvalidInputError):
        make()


def test_federation_state_keys_and_values_are_checked(store: Store, tmp_path: Path) -> None:
    folder = DirectoryStateStore(tmp_path / "state")
    for state in (folder, SealedStateStore(store)):
        for key in ("..", ".", "k\n", "", "UPPER", 5):
            with pytest.raises(InvalidInputError, match="state key"):
                state.put(key, b"x")  # type: ignore[arg-type]
        with pytest.raises(InvalidInputError, match="bytes"):
            state.put("round", 5)  # type: ignore[arg-type]
        state.put("federation.round", b"ok")
        assert state.get("federation.round") == b"ok"
    assert os.listdir(tmp_path / "state") == ["federation.round"]
