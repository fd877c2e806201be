"""Crash test for the encrypted store: SIGKILL a writer at random moments, many times.

A forked child performs random writes (adds, updates, deletes, blobs, state), data-key and
KEK rotations and user shreds, announcing each operation before it starts ("intent") and
after it returns ("ack") over a pipe. The parent kills it with SIGKILL after a random number
of acks plus a random delay, then opens the store and checks that every acknowledged commit
is present and that the one operation in flight either fully happened or did not happen.

    python scripts/store_crash.py --kills 1000 --seed 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import select
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeperso import WrongKeyError
from edgeperso.store import Example, RawKey, Store

USERS = ("u0", "u1", "u2")
KEYS = (RawKey(b"\x01" * 32), RawKey(b"\x02" * 32))
Model = dict[str, dict[str, Any]]


def empty() -> dict[str, Any]:
    return {"examples": {}, "blob": [], "blob_sha": None, "state": {}}


def observe(store: Store) -> Model:
    out: Model = {}
    for user in USERS:
        view = empty()
        view["examples"] = {e.id: e.text for e in store.examples(user)}
        view["blob"] = store.blobs(user).get("adapter", [])
        blob = store.get_blob(user, "adapter")
        view["blob_sha"] = None if blob is None else hashlib.sha256(blob).hexdigest()
        view["state"] = store.state(user)
        out[user] = view
    return out


def apply(model: Model, event: dict[str, Any]) -> Model:
    """The model after an acknowledged event (`ids` / `version` come from the ack)."""
    new = json.loads(json.dumps(model))
    for view in new.values():  # JSON turned int keys into str; restore them
        view["examples"] = {int(k): v for k, v in view["examples"].items()}
    op, user = event["op"], event.get("user")
    if op == "add":
        for rid, text in zip(event["ids"], event["texts"], strict=True):
            new[user]["examples"][rid] = text
    elif op == "update":
        new[user]["examples"][event["id"]] = event["text"]
    elif op == "delete":
        for rid in event["ids"]:
            new[user]["examples"].pop(rid, None)
    elif op == "blob":
        new[user]["blob"] = ([*new[user]["blob"], event["version"]])[-2:]
        new[user]["blob_sha"] = event["sha"]
    elif op == "state":
        new[user]["state"]["round"] = event["value"]
    elif op == "forget":
        new[user] = empty()
    return new


def matches_in_flight(before: Model, after: Model, intent: dict[str, Any]) -> bool:
    """Whether `after` is `before` with the in-flight operation fully applied."""
    event = dict(intent)
    if intent["op"] == "add":
        user = intent["user"]
        event["ids"] = sorted(set(after[user]["examples"]) - set(before[user]["examples"]))
        if len(event["ids"]) != len(intent["texts"]):
            return False
    if intent["op"] == "blob":
        versions = after[intent["user"]]["blob"]
        event["version"] = versions[-1] if versions else -1
    return apply(before, event) == after


def child(path: Path, key_index: int, seed: int, out: int) -> None:
    rng = random.Random(seed)
    store = Store.open(path, KEYS[key_index])
    ids = {u: [e.id for e in store.examples(u)] for u in USERS}
    blob_count = {u: 0 for u in USERS}
    n = 0
    while True:
        n += 1
        user = rng.choice(USERS)
        op = rng.choices(
            ["add", "update", "delete", "blob", "state", "rotate_user", "kek", "forget"],
            weights=[30, 10, 8, 8, 10, 4, 3, 3],
        )[0]
        event: dict[str, Any] = {"op": op, "user": user}
        if op == "add":
            event["texts"] = [f"m-{seed}-{n}-{i}" for i in range(rng.randint(1, 3))]
        elif op in ("update", "delete"):
            if not ids[user]:
                continue
            event["id"] = rng.choice(ids[user])
            event["ids"] = [event["id"]]
            event["text"] = f"upd-{seed}-{n}"
        elif op == "blob":
            data = rng.randbytes(rng.randint(1, 16_000))
            event["sha"] = hashlib.sha256(data).hexdigest()
        elif op == "state":
            event["value"] = n
        elif op == "rotate_user" and not ids[user] and not blob_count[user]:
            continue
        elif op == "kek":
            key_index = 1 - key_index
            event["to"] = key_index
        os.write(out, (json.dumps({"intent": event}) + "\n").encode())
        if op == "add":
            event["ids"] = store.add_examples(user, [Example(t) for t in event["texts"]])
            ids[user] += event["ids"]
        elif op == "update":
            store.update_examples(user, [Example(event["text"], id=event["id"])])
        elif op == "delete":
            store.delete_examples(user, event["ids"])
            ids[user].remove(event["id"])
        elif op == "blob":
            event["version"] = store.put_blob(user, "adapter", data, keep=2)
            blob_count[user] += 1
        elif op == "state":
            store.set_state(user, "round", event["value"])
        elif op == "rotate_user":
            store.rotate_user_key(user)
        elif op == "kek":
            store.rotate_kek(KEYS[key_index])
        elif op == "forget":
            store.forget_user(user)
            ids[user], blob_count[user] = [], 0
        os.write(out, (json.dumps({"ack": event}) + "\n").encode())


def open_any(path: Path, key_index: int, in_flight: dict[str, Any] | None) -> tuple[Store, int]:
    try:
        return Store.open(path, KEYS[key_index]), key_index
    except WrongKeyError:
        if not in_flight or in_flight["op"] != "kek":
            raise
        return Store.open(path, KEYS[1 - key_index]), 1 - key_index


def run(workdir: Path, kills: int, seed: int, max_acks: int = 8) -> dict[str, Any]:
    """Kill a writer `kills` times; raise AssertionError on the first lost or torn commit."""
    rng = random.Random(seed)
    path = workdir / "crash.db"
    key_index = 0
    Store.open(path, KEYS[key_index]).close()
    model: Model = {u: empty() for u in USERS}
    acked_total = in_flight_applied = 0
    started = time.monotonic()
    for kill in range(kills):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: never returns
            os.close(read_fd)
            code = 0
            try:
                child(path, key_index, seed * 100_003 + kill, write_fd)
            except BaseException as exc:
                os.write(write_fd, (json.dumps({"error": repr(exc)}) + "\n").encode())
                code = 1
            os._exit(code)
        os.close(write_fd)
        want, seen, buffer = rng.randint(0, max_acks), 0, b""
        while seen < want:
            ready, _, _ = select.select([read_fd], [], [], 5.0)
            chunk = os.read(read_fd, 65536) if ready else b""
            if not chunk:
                break
            buffer += chunk
            seen = buffer.count(b'"ack"')
        if rng.random() < 0.7:  # land the kill at a random point inside the next operation
            select.select([], [], [], rng.random() * 0.01)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        while chunk := os.read(read_fd, 65536):
            buffer += chunk
        os.close(read_fd)
        in_flight = None
        for line in buffer.decode().splitlines():
            message = json.loads(line)
            if "error" in message:
                raise AssertionError(f"writer failed: {message['error']}")
            if "intent" in message:
                in_flight = message["intent"]
            else:
                model = apply(model, message["ack"])
                if message["ack"]["op"] == "kek":
                    key_index = message["ack"]["to"]
                in_flight = None
                acked_total += 1
        store, key_index = open_any(path, key_index, in_flight)
        try:
            store.integrity_check()
            observed = observe(store)
        finally:
            store.close()
        if observed != model:
            if in_flight is None or not matches_in_flight(model, observed, in_flight):
                raise AssertionError(f"after kill {kill}: state lost or torn (op {in_flight})")
            in_flight_applied += 1
        model = observed
    return {
        "kills": kills,
        "acknowledged_ops": acked_total,
        "in_flight_ops_found_committed": in_flight_applied,
        "seconds": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.kills < 1:
        parser.error("--kills must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        result = run(Path(tmp), args.kills, args.seed)
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
