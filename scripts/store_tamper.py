"""Tamper test for the encrypted store: every byte flipped, truncations, swaps, replay.

The property, for every mutation of a small store file: opening it, reading every
collection of every user and running integrity_check either raises one of the store's
integrity errors (IntegrityError, KeyUnavailableError for a damaged key header,
UnsupportedError for a damaged version field), or returns exactly the original data.
Any other outcome (different data, a missing record, a raw sqlite3 or Python exception)
is a violation.

    python scripts/store_tamper.py            # every byte, XOR 0x01 and XOR 0xFF
    python scripts/store_tamper.py --sample 300
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeperso import (
    EdgePersoError,
    IntegrityError,
    KeyUnavailableError,
    RollbackError,
    UnsupportedError,
)
from edgeperso.store import Example, Feedback, RawKey, Store

KEY = RawKey(bytes(range(32)))
ALLOWED = (IntegrityError, KeyUnavailableError, UnsupportedError)


def build(directory: Path) -> Path:
    """A small store with two users and every kind of record, fully checkpointed."""
    path = directory / "small.db"
    with Store.open(path, KEY) as store:
        for user in ("alice", "bob"):
            ids = store.add_examples(
                user,
                [Example(f"{user} text {i}", label=i % 2, timestamp=1e9 + i) for i in range(3)],
            )
            store.add_feedback(user, [Feedback("thumbs_up", 1.0, 1e9, ids[0])])
            store.put_embeddings(user, {ids[0]: np.arange(8, dtype=np.float32)})
            store.put_blob(user, "adapter", bytes(range(256)) * 2)
            store.set_state(user, "round", 7)
    return path


def read_all(path: Path) -> dict[str, Any]:
    with Store.open(path, KEY) as store:
        out: dict[str, Any] = {}
        for user in store.users():
            out[user] = {
                "examples": store.examples(user),
                "feedback": store.feedback(user),
                "embeddings": {k: v.tolist() for k, v in store.embeddings(user).items()},
                "blobs": {n: store.get_blob(user, n) for n in store.blobs(user)},
                "state": store.state(user),
            }
        store.integrity_check()
        return out


def outcome(path: Path, expected: dict[str, Any]) -> str:
    """'same', 'error:<Class>', or 'VIOLATION:<what>'."""
    try:
        got = read_all(path)
    except ALLOWED as exc:
        return f"error:{type(exc).__name__}"
    except EdgePersoError as exc:
        return f"VIOLATION:unexpected {type(exc).__name__}: {exc}"
    except Exception as exc:
        return f"VIOLATION:raw {type(exc).__name__}: {exc}"
    return "same" if got == expected else "VIOLATION:different data returned"


class Bench:
    """A scratch copy of the store (with its rollback counter) to mutate and read back."""

    def __init__(self, original: Path, scratch: Path) -> None:
        self.original = original
        self.data = original.read_bytes()
        self.counter = Path(f"{original}.counter").read_bytes()
        self.scratch = scratch
        self.expected = read_all(original)

    def check(self, data: bytes) -> str:
        for leftover in ("", "-wal", "-shm"):
            Path(f"{self.scratch}{leftover}").unlink(missing_ok=True)
        self.scratch.write_bytes(data)
        Path(f"{self.scratch}.counter").write_bytes(self.counter)
        return outcome(self.scratch, self.expected)

    def check_sql(self, statements: list[str]) -> str:
        """Apply raw SQL edits (as an attacker with the file would) and read back."""
        shutil.copyfile(self.original, self.scratch)
        conn = sqlite3.connect(self.scratch)
        with conn:
            for statement in statements:
                conn.execute(statement)
        conn.close()
        mutated = self.scratch.read_bytes()
        return self.check(mutated)


def flips(bench: Bench, offsets: list[int], masks: tuple[int, ...]) -> collections.Counter[str]:
    tally: collections.Counter[str] = collections.Counter()
    for mask in masks:
        for offset in offsets:
            data = bytearray(bench.data)
            data[offset] ^= mask
            result = bench.check(bytes(data))
            tally[result] += 1
            if result.startswith("VIOLATION"):
                raise AssertionError(f"byte {offset} ^ {mask:#x}: {result}")
    return tally


def truncations(bench: Bench) -> collections.Counter[str]:
    tally: collections.Counter[str] = collections.Counter()
    size = len(bench.data)
    for length in sorted({0, 1, 100, 4095, 4096, 4097, size // 2, size - 4096, size - 1}):
        if 0 <= length < size:
            result = bench.check(bench.data[:length])
            tally[result] += 1
            if result.startswith("VIOLATION") or result == "same":
                raise AssertionError(f"truncated to {length}: {result}")
    return tally


def swaps(bench: Bench) -> dict[str, str]:
    """Move ciphertexts between rows, users and tables; delete and duplicate rows."""
    conn = sqlite3.connect(bench.original)
    a_uid, b_uid = (r[0] for r in conn.execute("SELECT uid FROM users ORDER BY uid"))
    conn.close()
    a, b = f"x'{a_uid.hex()}'", f"x'{b_uid.hex()}'"
    min_a = f"(SELECT min(id) FROM examples WHERE uid = {a})"
    max_a = f"(SELECT max(id) FROM examples WHERE uid = {a})"
    min_b = f"(SELECT min(id) FROM examples WHERE uid = {b})"
    body_of = "(SELECT body FROM examples WHERE id = {})"
    cases = {
        "swap bodies between two rows of one user": [
            f"CREATE TEMP TABLE t AS SELECT {body_of.format(min_a)} AS x, "
            f"{body_of.format(max_a)} AS y",
            f"UPDATE examples SET body = (SELECT y FROM t) WHERE id = {min_a}",
            f"UPDATE examples SET body = (SELECT x FROM t) WHERE id = {max_a}",
        ],
        "copy a body to another user's row": [
            f"UPDATE examples SET body = {body_of.format(min_a)} WHERE id = {min_b}",
        ],
        "move a row to another user": [f"UPDATE examples SET uid = {b} WHERE id = {min_a}"],
        "swap the users' manifests": [
            "CREATE TEMP TABLE m AS SELECT uid, manifest FROM users",
            f"UPDATE users SET manifest = (SELECT manifest FROM m WHERE uid = {b}) WHERE uid = {a}",
        ],
        "swap the users' wrapped keys": [
            "CREATE TEMP TABLE w AS SELECT uid, wrapped_key FROM users",
            f"UPDATE users SET wrapped_key = (SELECT wrapped_key FROM w WHERE uid = {b}) "
            f"WHERE uid = {a}",
        ],
        "move a feedback body into examples": [
            f"UPDATE examples SET body = (SELECT body FROM feedback WHERE uid = {a}) "
            f"WHERE id = {min_a}",
        ],
        "delete one example row": [f"DELETE FROM examples WHERE id = {max_a}"],
        "delete a user's manifest row": [f"DELETE FROM users WHERE uid = {a}"],
        "duplicate a row under a new id": [
            f"INSERT INTO examples (id, uid, body) SELECT 999, uid, body FROM examples "
            f"WHERE id = {min_a}",
        ],
        "delete the newest blob row": [f"DELETE FROM blobs WHERE uid = {a}"],
        "raise the schema version": ["PRAGMA user_version = 99"],
    }
    results = {}
    for name, statements in cases.items():
        result = bench.check_sql(statements)
        results[name] = result
        if not result.startswith("error:"):
            raise AssertionError(f"{name}: {result}")
    return results


def replay(directory: Path) -> dict[str, str]:
    """Replace the store with an older valid copy of itself: RollbackError."""
    path = directory / "replay.db"
    with Store.open(path, KEY) as store:
        store.add_examples("alice", [Example("v1")])
    old = path.read_bytes()
    with Store.open(path, KEY) as store:
        store.add_examples("alice", [Example("v2")])
    path.write_bytes(old)
    try:
        read_all(path)
    except RollbackError as exc:
        return {"replace the file with an older copy": f"error:{type(exc).__name__}"}
    raise AssertionError("an older copy of the store opened without RollbackError")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sample", type=int, default=0, help="flip this many random bytes")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.sample < 0:
        parser.error("--sample must be >= 0 (0: every byte)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        bench = Bench(build(directory), directory / "scratch.db")
        offsets = list(range(len(bench.data)))
        if args.sample:
            # more than the file holds: every byte, as with 0
            offsets = random.Random(args.seed).sample(offsets, min(args.sample, len(offsets)))
        report = {
            "file_bytes": len(bench.data),
            "flips": dict(flips(bench, offsets, (0x01, 0xFF))),
            "truncations": dict(truncations(bench)),
            "swaps": swaps(bench),
            "replay": replay(directory),
        }
    report["seconds"] = round(time.monotonic() - started, 1)
    json.dump(report, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
