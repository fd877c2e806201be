"""Tampering, truncation, swaps and replays are errors, never wrong data; nothing leaks."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from edgeperso import RollbackError, TamperedError
from edgeperso.store import Example, PassphraseKey, RawKey, Store
from tests.edgeperso.store.conftest import load_script

tamper = load_script("store_tamper")


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> object:
    directory = tmp_path_factory.mktemp("tamper")
    return tamper.Bench(tamper.build(directory), directory / "scratch.db")


def test_flipped_bytes_are_detected_or_harmless(bench: object) -> None:
    """A sample of the file's bytes (every one in scripts/store_tamper.py), two masks each."""
    data = bench.data  # type: ignore[attr-defined]
    offsets = random.Random(0).sample(range(len(data)), 250)
    tally = tamper.flips(bench, offsets, (0x01, 0xFF))
    assert tally["same"] > 0
    assert tally["error:TamperedError"] > 0


def test_truncated_files_are_detected(bench: object) -> None:
    assert set(tamper.truncations(bench)) <= {"error:TamperedError"}


def test_swapped_moved_and_deleted_rows_are_detected(bench: object) -> None:
    results = tamper.swaps(bench)
    assert all(r.startswith("error:") for r in results.values())


def test_replacing_the_file_with_an_older_copy_is_a_rollback(tmp_path: Path) -> None:
    assert tamper.replay(tmp_path) == {"replace the file with an older copy": "error:RollbackError"}


def test_deleting_the_store_while_its_counter_remains_is_a_rollback(
    store_path: Path, key: RawKey
) -> None:
    Store.open(store_path, key).close()
    store_path.unlink()
    with pytest.raises(RollbackError):
        Store.open(store_path, key)


def test_a_file_that_is_not_a_store_is_tampered(store_path: Path, key: RawKey) -> None:
    store_path.write_bytes(b"not a database at all" * 100)
    with pytest.raises(TamperedError):
        Store.open(store_path, key)
    other = store_path.with_name("other.db")
    sqlite3.connect(other).execute("CREATE TABLE t (x)").connection.close()
    with pytest.raises(TamperedError):
        Store.open(other, key)


def _scan(directory: Path, needle: bytes, skip: str = "") -> list[str]:
    return [
        p.name
        for p in directory.iterdir()
        if p.is_file() and p.name != skip and needle in p.read_bytes()
    ]


def test_no_plaintext_or_shredded_key_remains_on_disk(tmp_path: Path, key: RawKey) -> None:
    path = tmp_path / "audit.db"
    store = Store.open(path, key)
    for user in ("alice-MARKER-user", "bob-MARKER-user"):
        store.add_examples(
            user, [Example(f"text-MARKER-{i}", f"label-MARKER-{i}") for i in range(20)]
        )
        store.put_blob(user, "adapter-MARKER-name", b"BLOB-MARKER" * 100)
        store.set_state(user, "state-MARKER-key", "state-MARKER-value")
    backup_key = PassphraseKey("pw", memory_kib=1024, iterations=1, lanes=1)
    store.export_backup(tmp_path / "backup.bin", backup_key)
    assert Path(f"{path}-wal").exists()  # the scan below covers a live WAL
    assert _scan(tmp_path, b"MARKER") == []

    conn = sqlite3.connect(path)
    (doomed,) = conn.execute(
        "SELECT wrapped_key FROM users WHERE uid = ?", (store._pseudonym("alice-MARKER-user"),)
    ).fetchone()
    conn.close()
    assert store.forget_user("alice-MARKER-user")
    assert store.users() == ["bob-MARKER-user"]
    # The backup was made before the shred and keeps the key, as a backup must.
    assert _scan(tmp_path, bytes(doomed), skip="backup.bin") == []
    store.close()
    assert _scan(tmp_path, b"MARKER") == []
    assert _scan(tmp_path, bytes(doomed), skip="backup.bin") == []


def test_a_shredded_user_is_gone_and_the_store_stays_consistent(
    store_path: Path, key: RawKey
) -> None:
    with Store.open(store_path, key) as store:
        store.add_examples("alice", [Example("secret")])
        store.forget_user("alice")
        assert store.examples("alice") == []
        assert store.users() == []
        store.integrity_check()
