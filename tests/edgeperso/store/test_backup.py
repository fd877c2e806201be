"""Encrypted backups restore exactly, open with their own key, and refuse damage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeperso import InvalidInputError, TamperedError, WrongKeyError
from edgeperso.store import Example, PassphraseKey, RawKey, Store


@pytest.fixture
def backup(tmp_path: Path, store: Store, fast_passphrase: PassphraseKey) -> Path:
    (rid,) = store.add_examples("alice", [Example("hello", "greet", 1.0)])
    store.put_embeddings("alice", {rid: np.ones(3)})
    store.put_blob("alice", "adapter", b"\x00" * (3 << 20))  # spans several backup chunks
    store.set_state("bob", "round", 2)
    target = tmp_path / "backup.bin"
    store.export_backup(target, fast_passphrase)
    return target


def test_backup_restores_everything_with_only_its_own_key(
    tmp_path: Path, backup: Path, fast_passphrase: PassphraseKey
) -> None:
    with Store.import_backup(backup, tmp_path / "restored.db", fast_passphrase) as restored:
        assert restored.users() == ["alice", "bob"]
        assert [e.text for e in restored.examples("alice")] == ["hello"]
        assert restored.get_blob("alice", "adapter") == b"\x00" * (3 << 20)
        assert restored.get_state("bob", "round") == 2
        restored.rotate_kek(RawKey(b"\x09" * 32))  # e.g. into the new device's keystore


def test_backup_with_wrong_key_is_refused(tmp_path: Path, backup: Path, key: RawKey) -> None:
    with pytest.raises(WrongKeyError):
        Store.import_backup(backup, tmp_path / "r.db", PassphraseKey("nope"))
    with pytest.raises(WrongKeyError):
        Store.import_backup(backup, tmp_path / "r.db", key)
    assert not (tmp_path / "r.db").exists()


@pytest.mark.parametrize("damage", ["flip_chunk", "truncate", "append", "drop_last"])
def test_damaged_backup_is_refused(
    tmp_path: Path, backup: Path, fast_passphrase: PassphraseKey, damage: str
) -> None:
    data = bytearray(backup.read_bytes())
    if damage == "flip_chunk":
        data[len(data) // 2] ^= 1
    elif damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "append":
        data += b"\0" * 10
    else:
        data = data[: len(data) - 1000]
    backup.write_bytes(bytes(data))
    with pytest.raises(TamperedError):
        Store.import_backup(backup, tmp_path / "r.db", fast_passphrase)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith((".r.db", "r.db"))] == []


def test_backup_and_import_never_overwrite(
    tmp_path: Path, backup: Path, store: Store, store_path: Path, fast_passphrase: PassphraseKey
) -> None:
    with pytest.raises(InvalidInputError):
        store.export_backup(backup, fast_passphrase)
    with pytest.raises(InvalidInputError):
        Store.import_backup(backup, store_path, fast_passphrase)
