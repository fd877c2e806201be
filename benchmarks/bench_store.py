"""Encrypted store vs plain SQLite (same schema and pragmas), open time per key provider,
and shred time vs user size. Writes benchmarks/out/store.json and prints a markdown table.

    python benchmarks/bench_store.py
"""

from __future__ import annotations

import json
import platform
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keyring
import keyring.backend

from edgeperso.store import Example, KeyProvider, KeyringKey, PassphraseKey, RawKey, Store
from edgeperso.store._store import _connect

OUT = Path(__file__).parent / "out" / "store.json"
KEY = RawKey(b"\x07" * 32)
TEXT = "a short personal note about my day, roughly tweet sized " * 2  # ~110 chars
N_SMALL, BATCH, N_SINGLE, N_BLOBS = 5000, 100, 200, 20
BLOB = bytes(1 << 20)


class _FileKeyring(keyring.backend.KeyringBackend):
    priority = 1

    def __init__(self, path: Path) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.path = path

    def _load(self) -> dict[str, str]:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def get_password(self, service: str, username: str) -> str | None:
        return self._load().get(f"{service}\0{username}")

    def set_password(self, service: str, username: str, password: str) -> None:
        entries = self._load()
        entries[f"{service}\0{username}"] = password
        self.path.write_text(json.dumps(entries))

    def delete_password(self, service: str, username: str) -> None:
        entries = self._load()
        entries.pop(f"{service}\0{username}", None)
        self.path.write_text(json.dumps(entries))


def cpu() -> dict[str, Any]:
    info: dict[str, Any] = {"machine": platform.machine()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and "model" not in info:
            info["model"] = value.strip()
        if key.strip() == "flags" and "flags" not in info:
            wanted = {"aes", "pclmulqdq", "avx", "avx2", "avx512f", "sha_ni", "vaes", "vpclmulqdq"}
            info["flags"] = sorted(wanted & set(value.split()))
    info["cores"] = text.count("processor\t:")
    return info


def timed(fn: Callable[[], object], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def plain_db(path: Path) -> sqlite3.Connection:
    conn = _connect(path, 5.0)  # the store's own pragmas: WAL, synchronous=FULL, secure_delete
    conn.executescript(
        "CREATE TABLE examples (id INTEGER PRIMARY KEY AUTOINCREMENT, uid BLOB NOT NULL,"
        " body BLOB NOT NULL); CREATE INDEX examples_uid ON examples (uid, id);"
        "CREATE TABLE blobs (uid BLOB, name BLOB, version INTEGER, body BLOB,"
        " PRIMARY KEY (uid, name, version));"
    )
    return conn


def small_records(tmp: Path) -> dict[str, float]:
    examples = [Example(f"{TEXT} {i}", label=i % 3, timestamp=1.7e9 + i) for i in range(N_SMALL)]
    bodies = [json.dumps(e.to_json()).encode() for e in examples]
    uid = b"u" * 32
    results: dict[str, float] = {}

    def plain_batched() -> None:
        path = tmp / f"plain-{time.perf_counter_ns()}.db"
        conn = plain_db(path)
        for start in range(0, N_SMALL, BATCH):
            conn.execute("BEGIN IMMEDIATE")
            # Serialise inside the timed loop, as the store must.
            conn.executemany(
                "INSERT INTO examples (uid, body) VALUES (?, ?)",
                [(uid, json.dumps(e.to_json()).encode()) for e in examples[start : start + BATCH]],
            )
            conn.execute("COMMIT")
        conn.close()

    def store_batched() -> None:
        with Store.open(tmp / f"enc-{time.perf_counter_ns()}.db", KEY) as store:
            for start in range(0, N_SMALL, BATCH):
                store.add_examples("alice", examples[start : start + BATCH])

    def plain_single() -> None:
        conn = plain_db(tmp / f"plain1-{time.perf_counter_ns()}.db")
        for e in examples[:N_SINGLE]:
            conn.execute("BEGIN IMMEDIATE")
            body = json.dumps(e.to_json()).encode()
            conn.execute("INSERT INTO examples (uid, body) VALUES (?, ?)", (uid, body))
            conn.execute("COMMIT")
        conn.close()

    def store_single() -> None:
        with Store.open(tmp / f"enc1-{time.perf_counter_ns()}.db", KEY) as store:
            for e in examples[:N_SINGLE]:
                store.add_examples("alice", [e])

    results["write_batched_plain_rec_s"] = N_SMALL / timed(plain_batched)
    results["write_batched_store_rec_s"] = N_SMALL / timed(store_batched)
    results["write_single_plain_rec_s"] = N_SINGLE / timed(plain_single)
    results["write_single_store_rec_s"] = N_SINGLE / timed(store_single)

    plain_path, enc_path = tmp / "plain-read.db", tmp / "enc-read.db"
    conn = plain_db(plain_path)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO examples (uid, body) VALUES (?, ?)", [(uid, b) for b in bodies])
    conn.execute("COMMIT")
    with Store.open(enc_path, KEY) as store:
        store.add_examples("alice", examples)

    def plain_read() -> None:
        rows = conn.execute("SELECT id, body FROM examples WHERE uid = ? ORDER BY id", (uid,))
        out = []
        for rid, body in rows:
            obj = json.loads(body)
            out.append(Example(obj["text"], obj["label"], obj["ts"], obj["meta"], rid))
        assert len(out) == N_SMALL

    store = Store.open(enc_path, KEY)
    results["read_plain_rec_s"] = N_SMALL / timed(plain_read)
    results["read_store_rec_s"] = N_SMALL / timed(lambda: store.examples("alice"))
    store.close()
    conn.close()
    return results


def blobs(tmp: Path) -> dict[str, float]:
    conn = plain_db(tmp / "plain-blob.db")
    uid = b"u" * 32
    results: dict[str, float] = {}
    version = 0

    def plain_put() -> None:
        nonlocal version
        for _ in range(N_BLOBS):
            version += 1
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO blobs VALUES (?, ?, ?, ?)", (uid, b"adapter", version, BLOB))
            conn.execute("COMMIT")

    store = Store.open(tmp / "enc-blob.db", KEY)
    results["blob_put_plain_MB_s"] = N_BLOBS / timed(plain_put)
    results["blob_put_store_MB_s"] = N_BLOBS / timed(
        lambda: [store.put_blob("alice", "adapter", BLOB) for _ in range(N_BLOBS)]
    )

    def plain_get() -> None:
        for v in range(1, N_BLOBS + 1):
            conn.execute("SELECT body FROM blobs WHERE version = ?", (v,)).fetchone()

    results["blob_get_plain_MB_s"] = N_BLOBS / timed(plain_get)
    results["blob_get_store_MB_s"] = N_BLOBS / timed(
        lambda: [store.get_blob("alice", "adapter", v) for v in range(1, N_BLOBS + 1)]
    )
    store.close()
    conn.close()
    return results


def open_times(tmp: Path) -> dict[str, float]:
    keyring.set_keyring(_FileKeyring(tmp / "keyring.json"))
    providers = {
        "raw": KEY,
        "passphrase_argon2id_64MiB_t3_p4": PassphraseKey("correct horse battery staple"),
        "keyring_file_backend": KeyringKey("bench", "default"),
    }
    out = {}
    for name, provider in providers.items():
        path = tmp / f"open-{name}.db"
        with Store.open(path, provider) as store:
            store.add_examples("alice", [Example("x")] * 100)

        def open_and_close(p: Path = path, k: KeyProvider = provider) -> None:
            Store.open(p, k).close()

        out[f"open_{name}_ms"] = 1000 * timed(open_and_close, 5)
    return out


def shred_times(tmp: Path) -> dict[str, float]:
    out = {}
    for size in (100, 1000, 10000):
        path = tmp / f"shred-{size}.db"
        with Store.open(path, KEY) as store:
            store.add_examples("keep", [Example(TEXT)] * 1000)
            for added in range(0, size, 1000):
                store.add_examples("doomed", [Example(TEXT)] * min(1000, size - added))
            start = time.perf_counter()
            store.forget_user("doomed")
            out[f"shred_{size}_examples_ms"] = 1000 * (time.perf_counter() - start)
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        results: dict[str, Any] = {"cpu": cpu(), "sqlite": sqlite3.sqlite_version}
        results.update(small_records(tmp))
        results.update(blobs(tmp))
        results.update(open_times(tmp))
        results.update(shred_times(tmp))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    r = results
    print(
        f"CPU: {r['cpu'].get('model')} ({r['cpu'].get('cores')} cores), flags "
        f"{', '.join(r['cpu'].get('flags', []))}; SQLite {r['sqlite']}\n"
    )
    print("| measure | plain SQLite | encrypted store | store / plain |")
    print("|---|---|---|---|")
    for label, key, unit in (
        (f"write, {BATCH} records/transaction", "write_batched", "rec/s"),
        ("write, 1 record/transaction", "write_single", "rec/s"),
        ("read all of a user's records", "read", "rec/s"),
        ("put 1 MiB blob", "blob_put", "MB/s"),
        ("get 1 MiB blob", "blob_get", "MB/s"),
    ):
        suffix = "rec_s" if unit == "rec/s" else "MB_s"
        plain, enc = r[f"{key}_plain_{suffix}"], r[f"{key}_store_{suffix}"]
        print(f"| {label} | {plain:,.0f} {unit} | {enc:,.0f} {unit} | {enc / plain:.2f}x |")
    print("\n| measure | time |\n|---|---|")
    for k, v in r.items():
        if k.startswith(("open_", "shred_")):
            print(f"| {k} | {v:,.1f} ms |")


if __name__ == "__main__":
    main()
