"""Several processes write at once and lose nothing; locks are reported, never waited out."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from edgeperso import LockedError
from edgeperso.store import Example, RawKey, Store, StoreConfig
from tests.edgeperso.store.conftest import ROOT

KEY_HEX = (b"\x07" * 32).hex()


def _spawn(code: str) -> subprocess.Popen[str]:
    prelude = (
        "from edgeperso.store import Example, RawKey, Store, StoreConfig\n"
        f"KEY = RawKey(bytes.fromhex({KEY_HEX!r}))\n"
    )
    return subprocess.Popen(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_concurrent_writers_lose_nothing(store_path: Path, key: RawKey) -> None:
    Store.open(store_path, key).close()
    writers = [
        _spawn(
            f"""
            with Store.open({str(store_path)!r}, KEY, StoreConfig(busy_timeout_s=30)) as s:
                for i in range(60):
                    s.add_examples("alice", [Example("w{w}-" + str(i))])
                    s.set_state("alice", "w{w}", i)
            """
        )
        for w in range(2)
    ]
    with Store.open(store_path, key, StoreConfig(busy_timeout_s=30)) as store:
        for i in range(60):
            store.add_examples("alice", [Example(f"app-{i}")])
    assert [w.wait(timeout=60) for w in writers] == [0, 0]
    with Store.open(store_path, key) as store:
        texts = {e.text for e in store.examples("alice")}
        assert texts == {f"{w}-{i}" for w in ("w0", "w1", "app") for i in range(60)}
        assert store.state("alice") == {"w0": 59, "w1": 59}
        store.integrity_check()


def test_opening_while_other_processes_write_is_never_taken_for_a_rollback(
    store_path: Path, key: RawKey
) -> None:
    # Opening compares the store's write counter with the rollback record, which writers
    # advance just after they commit: read in the wrong order, a commit landing between the
    # two reads looked like an older copy of the file (RollbackError) on a live store.
    Store.open(store_path, key).close()
    code = f"""
        with Store.open({str(store_path)!r}, KEY, StoreConfig(busy_timeout_s=30)) as s:
            for i in range(150):
                s.add_examples("alice", [Example(str(i))])
        """
    writers = [_spawn(code) for _ in range(2)]
    opened = 0
    while any(w.poll() is None for w in writers) or opened < 20:
        Store.open(store_path, key, StoreConfig(busy_timeout_s=30)).close()
        opened += 1
    assert [w.wait(timeout=60) for w in writers] == [0, 0]
    with Store.open(store_path, key) as store:
        assert len(store.examples("alice")) == 300


def test_an_open_waits_for_a_counter_write_in_progress_and_an_empty_counter_is_no_record(
    store_path: Path, key: RawKey
) -> None:
    """A process that opens a new store creates its rollback counter file and fills it under
    an exclusive lock; another process opening the store at that moment read the empty file
    as a damaged counter (RollbackError on a legitimate store)."""
    Store.open(store_path, key).close()
    counter = Path(f"{store_path}.counter")
    fd = os.open(counter, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a writer between creating the file and writing it
        opened: list[object] = []
        opening = threading.Thread(target=lambda: opened.append(Store.open(store_path, key)))
        opening.start()
        opening.join(0.5)
        assert opening.is_alive()  # waits for the writer instead of reading half a record
    finally:
        os.close(fd)  # releases the lock
    opening.join(30)
    assert len(opened) == 1
    opened[0].close()  # type: ignore[attr-defined]
    counter.write_bytes(b"")  # a writer killed before its first write: nothing recorded
    with Store.open(store_path, key) as store:
        store.add_examples("alice", [Example("hi")])
    assert len(counter.read_bytes()) > 0


def test_a_held_write_transaction_is_a_locked_error(store_path: Path, key: RawKey) -> None:
    with Store.open(store_path, key) as store:
        store.add_examples("alice", [Example("before")])
    holder = _spawn(
        f"""
        import sqlite3, sys
        conn = sqlite3.connect({str(store_path)!r}, isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        print("holding", flush=True)
        sys.stdin.readline()
        conn.execute("ROLLBACK")
        """
    )
    assert holder.stdout is not None
    assert holder.stdin is not None
    assert holder.stdout.readline().strip() == "holding"
    with Store.open(store_path, key, StoreConfig(busy_timeout_s=0.2)) as store:
        with pytest.raises(LockedError):
            store.add_examples("alice", [Example("blocked")])
        assert [e.text for e in store.examples("alice")] == ["before"]  # readers still read
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.wait(timeout=30) == 0
        store.add_examples("alice", [Example("after")])
        assert [e.text for e in store.examples("alice")] == ["before", "after"]


def test_user_lock_is_exclusive_across_processes(store: Store, store_path: Path) -> None:
    holder = _spawn(
        f"""
        import sys
        with Store.open({str(store_path)!r}, KEY) as s, s.lock_user("alice"):
            print("locked", flush=True)
            sys.stdin.readline()
        """
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(LockedError):
        store.lock_user("alice")
    with store.lock_user("bob"):  # other users are not affected
        pass
    holder.kill()  # a killed holder never leaves a stale lock
    holder.wait(timeout=30)
    with store.lock_user("alice") as lock:
        assert lock.held
        with pytest.raises(LockedError):
            store.lock_user("alice")  # also exclusive within one process
    assert not lock.held
