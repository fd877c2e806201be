"""Federated rounds on one machine: a coordinator, several device processes, the shared model.

Starts `edgeperso-coordinator serve` on a free loopback port (SQLite in a temporary
directory), sets up an app with the operator's client (`AdminClient`), and runs every device
as its own OS process with its own encrypted store and Personalizer on the real
all-MiniLM-L6-v2 bundle. In each round a device refits the shared head on its own labelled
texts (`Personalizer.shared_update`), contributes the clipped delta under secure aggregation
(with DP noise when `--noise-multiplier` is given; `FederationClient.contribute`), installs the published global and persona
parameters (`install_shared`) and measures the shared model on texts it held out.

    python examples/federated_round.py                                    # generated users
    python examples/federated_round.py --studemo studemo/   # StudEmo annotators
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import multiprocessing
import os
import queue
import random
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from _bundle import ensure_bundle
from edgeperso_federated import AdminClient, RoundConfig, initial_model
from rich.console import Console
from rich.table import Table

from edgeperso import Example, Personalizer, RawKey, SessionOptions, Store
from edgeperso.federation import (
    FederationClient,
    FederationConfig,
    PersonaLayout,
    SealedStateStore,
    federated_params,
    secagg_params,
)

APP = "walkthrough"
DELTA = 1e-6  # of the app's (epsilon, delta) user-level guarantee
# Two personas. The operator knows its domain, not its users: the initial centroids are the
# bundle's embeddings of one public sentence per persona; each round moves a centroid to the
# mean summary of the devices that chose it.
SEEDS = {
    "generated": (
        "notes about my job: meetings, reports, clients and deadlines at the office",
        "notes about my free time: hobbies, sport, music and weekends",
    ),
    "studemo": (
        "a grateful review of a doctor who helped me, kind staff, I recommend the clinic",
        "a complaint about a rude doctor, a long wait and a badly done treatment",
    ),
}

# The generated data: short notes, each about a subject of one topic and a piece of news of
# some urgency; users of two kinds write mostly about one topic and call a note urgent ("yes")
# from a different level on.
SUBJECTS = {
    "work": (
        "the quarterly report",
        "my manager's review",
        "the client call",
        "the server migration",
        "the budget spreadsheet",
        "the team offsite",
    ),
    "leisure": (
        "the hiking trip",
        "my guitar lesson",
        "the book club",
        "the vegetable garden",
        "the pottery class",
        "the football match",
    ),
}
NEWS = (  # (news, urgency 0..4)
    ("is due tomorrow and I am far behind", 4),
    ("was moved two days earlier", 3),
    ("still needs a few hours this week", 2),
    ("went more or less as planned", 1),
    ("was relaxing, nothing left to do", 0),
)
WHEN = ("on monday", "this morning", "tonight", "last week", "after lunch", "on friday", "again")
KINDS = {"worrier": ("work", 1), "relaxed": ("leisure", 4)}  # topic, urgency from which "yes"
LABEL_NOISE = 0.1  # people are not consistent: this share of labels is flipped


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    kind: str  # generated: worrier or relaxed; StudEmo: empty
    train: list[tuple[str, bool]]  # (text, label is "yes")
    test: list[tuple[str, bool]]


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
    user: User
    bundle: str
    store: str
    url: str
    enrolment_key: str


def generated_users(count: int, n_train: int, n_test: int, seed: int) -> list[User]:
    rng = random.Random(seed)
    users = []
    for i in range(count):
        kind = ("worrier", "relaxed")[i % 2]
        topic, urgent_from = KINDS[kind]
        other = next(t for t in SUBJECTS if t != topic)
        notes = []
        for _ in range(n_train + n_test):
            subject = rng.choice(SUBJECTS[topic if rng.random() < 0.8 else other])
            news, urgency = rng.choice(NEWS)
            inconsistent = rng.random() < LABEL_NOISE
            notes.append(
                (f"{subject} {news} {rng.choice(WHEN)}", (urgency >= urgent_from) != inconsistent)
            )
        users.append(User(f"user-{i}", kind, notes[:n_train], notes[n_train:]))
    return users


def studemo_users(root: Path, count: int, n_train: int, n_test: int, seed: int) -> list[User]:
    """The `count` annotators with the most annotations; label: anger > 0."""
    with open(root / "text_data.csv", newline="") as file:
        texts = {row["text_id"]: row["text"] for row in csv.DictReader(file)}
    by_annotator: dict[str, list[tuple[str, bool]]] = {}
    with open(root / "annotation_data.csv", newline="") as file:
        for row in csv.DictReader(file):
            label = float(row["anger"]) > 0
            by_annotator.setdefault(row["annotator_id"], []).append((texts[row["text_id"]], label))
    busiest = sorted(by_annotator, key=lambda a: (-len(by_annotator[a]), int(a)))[:count]
    users = []
    for annotator in busiest:
        rows = by_annotator[annotator]
        random.Random(seed).shuffle(rows)
        test = rows[n_train : n_train + n_test]
        users.append(User(f"annotator {annotator}", "", rows[:n_train], test))
    return users


# ---- one device (its own process) ---------------------------------------------------------


def macro_f1(truth: Sequence[str], predicted: Sequence[str]) -> float:
    """Macro-F1 over the labels present in truth or prediction."""
    scores = []
    for label in sorted(set(truth) | set(predicted)):
        tp = sum(t == label == p for t, p in zip(truth, predicted, strict=True))
        wrong = sum((t == label) != (p == label) for t, p in zip(truth, predicted, strict=True))
        scores.append(2 * tp / (2 * tp + wrong) if tp else 0.0)
    return float(np.mean(scores))


def device_main(spec: DeviceSpec, inbox: Any, outbox: Any) -> None:
    try:
        _device(spec, inbox, outbox)
    except BaseException:
        outbox.put(("error", spec.user.name, traceback.format_exc()))


def _device(spec: DeviceSpec, inbox: Any, outbox: Any) -> None:
    user = spec.user
    # A real app keeps the store key in the OS keystore (KeyringKey); here it lives as long as
    # the device process.
    store = Store.open(spec.store, RawKey(os.urandom(32)))
    model = Personalizer.open(spec.bundle, store, session=SessionOptions(intra_op_threads=1))
    no, yes = model.manifest.labels[0], model.manifest.labels[-1]
    model.add_examples(user.name, [Example(t, label=yes if y else no) for t, y in user.train])
    truth = [yes if y else no for _, y in user.test]

    def shared_f1() -> float:
        # A user without a personal adapter is served the shared (global + persona) model.
        predictions = model.predict(user.name, [t for t, _ in user.test])
        return macro_f1(truth, [str(p.label) for p in predictions])

    outbox.put(("ready", user.name, {"before": shared_f1()}))
    config = FederationConfig(spec.url, APP, spec.enrolment_key, opt_in=True)
    rounds = 0
    with FederationClient(config, SealedStateStore(store)) as client:
        while inbox.get() == "round":
            rounds += 1
            task = client.check_in()
            if task is None:
                raise RuntimeError("the operator announced a round, but none is open")
            update = model.shared_update(user.name, [p.name for p in task.layout.params])
            delta = [(update.after[n] - update.before[n]).ravel() for n in update.after]
            result: dict[str, Any] = {
                "persona": task.persona_for(update.summary),
                "update_norm": float(np.linalg.norm(np.concatenate(delta))),  # before clipping
            }
            if rounds == 1:  # for comparison: this device's own refit alone (unclipped)
                model.install_shared(update.after)
                result["alone"] = shared_f1()
                model.install_shared(update.before)
            outcome = client.contribute(
                task,
                before=update.before,
                after=update.after,
                summary=update.summary,
                num_examples=update.num_examples,
            )
            if outcome.params is not None:
                model.install_shared(outcome.params)
            result |= {"status": outcome.status, "version": outcome.model_version}
            outbox.put(("round", user.name, result | {"after": shared_f1()}))
    store.close()


# ---- the coordinator and the operator -------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def coordinator(root: Path) -> Iterator[tuple[str, str]]:
    """`edgeperso-coordinator serve` on a free loopback port: (URL, admin token)."""
    command = shutil.which("edgeperso-coordinator", path=str(Path(sys.executable).parent))
    command = command or shutil.which("edgeperso-coordinator")
    if command is None:
        raise SystemExit("edgeperso-coordinator not found: pip install -e ./federated")
    token = secrets.token_urlsafe(32)
    port = free_port()
    with open(root / "coordinator.log", "wb") as log:
        process = subprocess.Popen(
            [
                command,
                "serve",
                "--database-url",
                f"sqlite:///{root / 'coordinator.db'}",
                "--port",
                str(port),
            ],
            env={**os.environ, "EDGEPERSO_ADMIN_TOKEN": token},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not _healthy(url):
            if process.poll() is not None or time.monotonic() > deadline:
                log_text = (root / "coordinator.log").read_text(errors="replace")
                raise SystemExit(f"the coordinator did not start:\n{log_text[-2000:]}")
            time.sleep(0.1)
        yield url, token
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/openapi.json", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def centroids(operator: Personalizer, seeds: Sequence[str]) -> np.ndarray:
    """[personas, hidden]: the unit-norm embedding of each persona's seed sentence, the same
    kind of vector as a device's summary (the unit-norm mean of its texts' embeddings)."""
    rows = operator.embed("operator", list(seeds))
    unit: np.ndarray = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return unit.astype(np.float32)


def set_up_app(
    admin: AdminClient, bundle: Path, root: Path, data: str, budget: float | None
) -> str:
    """Register the app and upload model version 0; returns the enrolment key."""
    key = admin.create_app(APP, epsilon_budget=budget, delta=DELTA)
    with Store.open(root / "operator.db", RawKey(os.urandom(32))) as store:
        operator = Personalizer.open(bundle, store)
        manifest = operator.manifest
        layout = PersonaLayout(
            federated_params(manifest), num_personas=2, summary_dim=manifest.hidden_size
        )
        model = initial_model(layout, operator.shared_params(), centroids(operator, SEEDS[data]))
    admin.put_model(APP, 0, layout, model)
    return key


# ---- the walk-through ---------------------------------------------------------------------


class Devices:
    """The device processes, a queue to each and one back from all of them."""

    def __init__(self, specs: Sequence[DeviceSpec]) -> None:
        spawn = multiprocessing.get_context("spawn")
        self._outbox = spawn.Queue()
        self._inboxes = [spawn.Queue() for _ in specs]
        self._processes = [
            spawn.Process(target=device_main, args=(spec, inbox, self._outbox))
            for spec, inbox in zip(specs, self._inboxes, strict=True)
        ]
        for process in self._processes:
            process.start()

    def tell(self, message: str) -> None:
        for inbox in self._inboxes:
            inbox.put(message)

    def collect(self, kind: str, timeout_s: float) -> dict[str, dict[str, Any]]:
        """One message of `kind` from every device, by device name."""
        got: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(got) < len(self._processes):
            try:
                what, name, payload = self._outbox.get(
                    timeout=max(0.1, deadline - time.monotonic())
                )
            except queue.Empty:
                raise SystemExit(f"timed out waiting for the devices ({kind})") from None
            if what == "error":
                raise SystemExit(f"device {name} failed:\n{payload}")
            got[name] = payload
        return got

    def stop(self) -> None:
        self.tell("stop")
        for process in self._processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def one_round(
    admin: AdminClient, devices: Devices, config: RoundConfig, number: int
) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Open a round and let every device take part: (the round's summary, per-device results)."""
    started = time.perf_counter()
    opened = admin.create_round(config)
    devices.tell("round")
    state = admin.wait_for_round(APP, opened.round_id, timeout_s=900)
    results = devices.collect("round", timeout_s=300)
    ledger = admin.privacy_ledger(APP)
    secagg = secagg_params(config.cohort_size, config.target_dropout)
    summary = {
        "round": number,
        "stage": state.stage,
        "reason": state.reason,
        "version": state.published_version,
        "devices": config.cohort_size,
        "survivors": sum(r["status"] == "published" for r in results.values()),
        "neighbours": secagg.neighbours,
        "threshold": secagg.threshold,
        "epsilon": ledger[-1].epsilon if ledger else None,
        "seconds": time.perf_counter() - started,
    }
    return summary, results


def walk_through(args: argparse.Namespace, users: list[User], bundle: Path) -> dict[str, Any]:
    console = Console()
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    with (
        contextlib.nullcontext(str(args.keep))
        if args.keep
        else tempfile.TemporaryDirectory(prefix="edgeperso-walkthrough-") as tmp,
        coordinator(Path(tmp)) as (url, token),
        AdminClient(url, token) as admin,
    ):
        root = Path(tmp)
        console.print(f"[bold]Coordinator[/] {url}, SQLite in {root}")
        data = "studemo" if args.studemo else "generated"
        budget = args.epsilon_budget if args.noise_multiplier > 0 else None  # None: no DP
        key = set_up_app(admin, bundle, root, data, budget)
        specs = [
            DeviceSpec(u, str(bundle), str(root / f"device-{i}.db"), url, key)
            for i, u in enumerate(users)
        ]
        console.print(
            f"[bold]Devices[/] {len(users)} processes, each with its own encrypted store; "
            f"rounds: secure aggregation, clip norm {args.clip_norm:g}, noise multiplier "
            f"{args.noise_multiplier:g}, sampling probability 1, delta {DELTA:g}"
        )
        devices = Devices(specs)
        try:
            ready = devices.collect("ready", timeout_s=900)
            report: dict[str, Any] = {
                "devices": {name: {**r, "rounds": []} for name, r in ready.items()},
                "rounds": [],
            }
            version = 0
            for number in range(1, args.rounds + 1):
                config = RoundConfig(
                    APP,
                    version,
                    cohort_size=len(users),
                    min_survivors=len(users) - 1,
                    join_timeout_s=600,
                    stage_timeout_s=120,
                    clip_norm=args.clip_norm,
                    noise_multiplier=args.noise_multiplier,
                    sampling_probability=1.0,  # every device of this population takes part
                )
                summary, results = one_round(admin, devices, config, number)
                report["rounds"].append(summary)
                for name, result in results.items():
                    report["devices"][name]["rounds"].append(result)
                console.print(f"round {number}: {summary['stage']}")
                if summary["version"] is None:
                    break
                version = summary["version"]
        finally:
            devices.stop()
    return report


def show(console: Console, report: dict[str, Any], users: list[User]) -> None:
    rounds = report["rounds"]
    table = Table(title="Macro-F1 of the shared model on each device's held-out texts")
    kinds = any(u.kind for u in users)
    for column in ("device", *(["kind"] if kinds else []), "yes (train)", "persona"):
        table.add_column(column)
    table.add_column("update norm", justify="right")
    after = [f"after round {r['round']}" for r in rounds]
    for column in ("before", "own data only", *after, "change"):
        table.add_column(column, justify="right")
    rows = []
    for user in users:
        device = report["devices"][user.name]
        scores = [device["before"], device["rounds"][0]["alone"]]
        scores += [r["after"] for r in device["rounds"]]
        rows.append(scores)
        yes = sum(y for _, y in user.train) / len(user.train)
        personas = " ".join(str(r["persona"]) for r in device["rounds"])
        norms = " ".join(f"{r['update_norm']:.3g}" for r in device["rounds"])
        cells = [f"{s:.3f}" for s in scores] + [f"{scores[-1] - scores[0]:+.3f}"]
        kind = [user.kind] if kinds else []
        table.add_row(user.name, *kind, f"{yes:.0%}", personas, norms, *cells)
    means = np.mean(rows, axis=0)
    cells = [f"{m:.3f}" for m in means] + [f"{means[-1] - means[0]:+.3f}"]
    table.add_row("mean", *[""] * (4 if kinds else 3), *cells, style="bold")
    console.print(table)
    for r in rounds:
        outcome = f"model v{r['version']}" if r["version"] is not None else r["reason"]
        epsilon = "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}"
        console.print(
            f"round {r['round']}: {r['stage']} ({outcome}); survivors {r['survivors']}/"
            f"{r['devices']}; SecAgg: masks with {r['neighbours']} others, threshold "
            f"{r['threshold']}; epsilon {epsilon} (delta {DELTA:g}); {r['seconds']:.1f} s"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studemo", type=Path, help="StudEmo folder: annotators as devices")
    parser.add_argument(
        "--bundle",
        type=Path,
        help="a classification bundle; its first and last labels stand for no and yes "
        "(default: export all-MiniLM-L6-v2 with labels no,yes into --workdir once)",
    )
    parser.add_argument("--workdir", type=Path, default=Path("demo-data"), help="bundle cache")
    parser.add_argument("--devices", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--train", type=int, help="labelled texts per device (default: StudEmo 80, generated 16)"
    )
    parser.add_argument("--test", type=int, default=60, help="held-out texts per device")
    parser.add_argument("--clip-norm", type=float, default=1.0)
    # No DP noise by default: with six devices, noise that buys a meaningful epsilon swamps
    # what they send (docs/federated.md shows a run with --noise-multiplier 0.3).
    parser.add_argument("--noise-multiplier", type=float, default=0.0)
    parser.add_argument("--epsilon-budget", type=float, default=100.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument(
        "--keep",
        type=Path,
        help="an empty or new folder that keeps the coordinator's database and log and the "
        "devices' encrypted stores (default: a temporary folder, removed at the end)",
    )
    args = parser.parse_args(argv)
    if args.devices < 3 or args.rounds < 1:
        parser.error("--devices must be >= 3 and --rounds >= 1")
    if (args.train is not None and args.train < 4) or args.test < 1:
        parser.error("--train must be >= 4 (what train() needs) and --test >= 1")
    if args.studemo and not (args.studemo / "text_data.csv").is_file():
        parser.error(f"--studemo {args.studemo} holds no text_data.csv: name the StudEmo folder")
    if args.json and not args.json.parent.is_dir():
        parser.error(f"--json: the folder {args.json.parent} does not exist")
    if args.keep and (args.keep.is_file() or (args.keep.is_dir() and any(args.keep.iterdir()))):
        parser.error(f"--keep: {args.keep} is not an empty folder")
    # One thread per device process, as on a phone; the devices share this machine's cores.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    console = Console()
    if args.studemo:
        users = studemo_users(
            args.studemo,
            args.devices,
            80 if args.train is None else args.train,
            args.test,
            args.seed,
        )
    else:
        users = generated_users(
            args.devices, 16 if args.train is None else args.train, args.test, args.seed
        )
    bundle = args.bundle
    if bundle is None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        bundle = ensure_bundle(args.workdir / "federated-bundle", ("no", "yes"), console)
    report = walk_through(args, users, bundle)
    show(console, report, users)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if all(r["stage"] == "published" for r in report["rounds"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
