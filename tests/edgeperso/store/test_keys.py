"""Key providers: keystore fails closed, wrong secrets change nothing, KEK rotation re-wraps."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edgeperso import InvalidInputError, KeyUnavailableError, UnsupportedError, WrongKeyError
from edgeperso.store import (
    Example,
    KeyringCounter,
    KeyringKey,
    PassphraseKey,
    RawKey,
    Store,
    StoreConfig,
)
from tests.edgeperso.store.conftest import ROOT, FileKeyring


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_keystore_provider_fails_closed_without_a_keystore(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        from edgeperso import KeyUnavailableError
        from edgeperso.store import KeyringKey, Store
        try:
            Store.open({str(tmp_path / "s.db")!r}, KeyringKey("app", "default"))
        except KeyUnavailableError as exc:
            print("refused:", exc)
        """
    )
    env = {**os.environ, "PYTHON_KEYRING_BACKEND": "keyring.backends.null.Keyring"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert "refused: no usable OS keystore" in result.stdout
    assert sorted(os.listdir(tmp_path)) == []  # no store, no key file, nothing


def test_keystore_provider_round_trips(store_path: Path, file_keyring: FileKeyring) -> None:
    key = KeyringKey("com.example.app", "default")
    with Store.open(store_path, key) as store:
        store.add_examples("alice", [Example("hi")])
    assert len(file_keyring._load()) == 1
    with Store.open(store_path, key) as store:
        assert [e.text for e in store.examples("alice")] == ["hi"]
    with pytest.raises(WrongKeyError):
        Store.open(store_path, KeyringKey("com.example.app", "other"))


def test_deleted_keystore_entry_is_key_unavailable(
    store_path: Path, file_keyring: FileKeyring
) -> None:
    key = KeyringKey("app", "p")
    Store.open(store_path, key).close()
    file_keyring.path.write_text("{}")
    with pytest.raises(KeyUnavailableError):
        Store.open(store_path, key)


def test_wrong_passphrase_is_refused_and_changes_nothing(
    store_path: Path, fast_passphrase: PassphraseKey
) -> None:
    with Store.open(store_path, fast_passphrase) as store:
        store.add_examples("alice", [Example("hi")])
    before = _digest(store_path), _digest(Path(f"{store_path}.counter"))
    wrong = PassphraseKey("incorrect horse", memory_kib=1024, iterations=1, lanes=1)
    with pytest.raises(WrongKeyError):
        Store.open(store_path, wrong)
    with pytest.raises(WrongKeyError):
        Store.open(store_path, RawKey(b"\0" * 32))
    assert (_digest(store_path), _digest(Path(f"{store_path}.counter"))) == before
    with Store.open(store_path, fast_passphrase) as store:
        assert [e.text for e in store.examples("alice")] == ["hi"]


def test_passphrase_parameters_come_from_the_header(store_path: Path) -> None:
    Store.open(store_path, PassphraseKey("pw", memory_kib=2048, iterations=2, lanes=2)).close()
    # Opening with other cost settings still derives the same key from the stored ones.
    Store.open(store_path, PassphraseKey("pw", memory_kib=1024, iterations=1, lanes=1)).close()


def test_rotate_kek_rewraps_and_the_old_key_stops_working(
    store_path: Path, key: RawKey, fast_passphrase: PassphraseKey, file_keyring: FileKeyring
) -> None:
    with Store.open(store_path, key) as store:
        store.add_examples("alice", [Example("hi")])
        store.rotate_kek(fast_passphrase)
    with pytest.raises(WrongKeyError):
        Store.open(store_path, key)
    keystore = KeyringKey("app", "p")
    with Store.open(store_path, fast_passphrase) as store:
        store.rotate_kek(keystore)
        store.rotate_kek(keystore)  # keystore to keystore: the old entry is deleted
    assert len(file_keyring._load()) == 1
    with Store.open(store_path, keystore) as store:
        assert [e.text for e in store.examples("alice")] == ["hi"]


def test_a_store_open_elsewhere_stops_after_a_rotate_kek_and_loses_nothing(
    store_path: Path, key: RawKey, fast_passphrase: PassphraseKey
) -> None:
    """Two handles on one file (an app's UI and its background trainer): after one rotates
    the KEK, the other's old KEK must neither fail as tampering nor wrap a new user's data
    key, which nobody could open afterwards."""
    with Store.open(store_path, key) as ui, Store.open(store_path, key) as trainer:
        ui.add_examples("alice", [Example("hi")])
        assert [e.text for e in trainer.examples("alice")] == ["hi"]
        ui.rotate_kek(fast_passphrase)
        for call in (
            lambda: trainer.examples("alice"),
            lambda: trainer.add_examples("carol", [Example("new user")]),
            lambda: trainer.add_examples("alice", [Example("more")]),
            trainer.users,
        ):
            with pytest.raises(WrongKeyError, match="open the store again"):
                call()
        ui.add_examples("bob", [Example("after")])  # the rotating handle goes on
    with Store.open(store_path, fast_passphrase) as store:
        assert store.users() == ["alice", "bob"]
        assert [e.text for e in store.examples("alice")] == ["hi"]
        store.integrity_check()


def test_rollback_counter_can_live_in_the_keystore(
    store_path: Path, key: RawKey, file_keyring: FileKeyring
) -> None:
    config = StoreConfig(rollback_counter=KeyringCounter("app", "p"))
    with Store.open(store_path, key, config) as store:
        store.add_examples("alice", [Example("v1")])
    old = store_path.read_bytes()
    with Store.open(store_path, key, config) as store:
        store.add_examples("alice", [Example("v2")])
    store_path.write_bytes(old)
    from edgeperso import RollbackError

    with pytest.raises(RollbackError):
        Store.open(store_path, key, config)
    assert not Path(f"{store_path}.counter").exists()


def test_key_providers_validate_their_input() -> None:
    with pytest.raises(InvalidInputError):
        RawKey(b"short")
    with pytest.raises(InvalidInputError):
        PassphraseKey("")
    with pytest.raises(InvalidInputError):
        PassphraseKey("pw", memory_kib=1 << 30)
    with pytest.raises(InvalidInputError):
        KeyringKey("", "p")
    assert "secret" not in repr(PassphraseKey("secret"))
    assert "xx" not in repr(RawKey(b"x" * 32))


def test_schema_newer_than_supported_is_refused(store_path: Path, key: RawKey) -> None:
    import sqlite3

    Store.open(store_path, key).close()
    conn = sqlite3.connect(store_path)
    conn.execute("PRAGMA user_version = 2")
    conn.close()
    with pytest.raises(UnsupportedError):
        Store.open(store_path, key)
