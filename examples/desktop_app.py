"""A desktop notes app that learns how *this* user sorts their notes, on their machine.

Alice files notes as "todo", "idea" or "journal" her own way. The app keeps her notes
encrypted on disk, trains a small adapter for her on this device (no torch here: the bundle's
graphs run on onnxruntime), and sorts her next notes the way she would. Run by `make demo`:

    python examples/desktop_app.py [--workdir demo-data]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _bundle import ensure_bundle
from rich.console import Console
from rich.table import Table

from edgeperso import Example, PassphraseKey, Personalizer, Store, TrainConfig

LABELS = ("todo", "idea", "journal")
ALICE = [
    ("buy oat milk and coffee filters", "todo"),
    ("call the dentist before friday", "todo"),
    ("renew the car insurance", "todo"),
    ("send the slides to Marco", "todo"),
    ("fix the squeaky bedroom door", "todo"),
    ("pay the electricity bill", "todo"),
    ("book train tickets for the conference", "todo"),
    ("return the library books", "todo"),
    ("an app that reminds you to water plants by their species", "idea"),
    ("short story: a lighthouse keeper who collects lost letters", "idea"),
    ("what if meetings had a visible cost counter", "idea"),
    ("board game about migrating birds", "idea"),
    ("podcast interviewing retired engineers", "idea"),
    ("a cookbook organised by leftover ingredient", "idea"),
    ("bike lanes painted with glow-in-the-dark paint", "idea"),
    ("a map of the quietest benches in the city", "idea"),
    ("felt tired all day, the rain didn't help", "journal"),
    ("long walk with Sam, we talked about moving abroad", "journal"),
    ("proud of how calmly I handled the argument today", "journal"),
    ("couldn't sleep, kept thinking about the interview", "journal"),
    ("grandma's birthday, she told the story about the war again", "journal"),
    ("first swim of the year, freezing and wonderful", "journal"),
    ("I miss the old flat sometimes", "journal"),
    ("quiet sunday, read half a novel", "journal"),
]
NEW_NOTES = [
    "pick up the parcel at the post office",
    "a museum of everyday sounds",
    "the concert tonight made me cry a little",
    "schedule the boiler service",
]
MARKER = "lighthouse keeper who collects lost letters"


def show(console: Console, title: str, model: Personalizer, user: str) -> None:
    table = Table(title=title)
    table.add_column("note")
    table.add_column("filed as")
    table.add_column("confidence", justify="right")
    for note, p in zip(NEW_NOTES, model.predict(user, NEW_NOTES), strict=True):
        assert p.label is not None and p.probabilities is not None
        table.add_row(note, p.label, f"{p.probabilities[p.label]:.2f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("demo-data"))
    args = parser.parse_args()
    console = Console()
    args.workdir.mkdir(parents=True, exist_ok=True)
    bundle = ensure_bundle(args.workdir / "notes-bundle", LABELS, console)

    # A real app takes the key from the OS keystore (KeyringKey); this demo runs on machines
    # without one, so it derives the key from a passphrase (Argon2id).
    db = args.workdir / "notes.db"
    for leftover in args.workdir.glob("notes.db*"):
        if leftover.is_file():
            leftover.unlink()
    passphrase = os.environ.get("EDGEPERSO_DEMO_PASSPHRASE", "correct horse battery staple")
    store = Store.open(db, key=PassphraseKey(passphrase))
    model = Personalizer.open(bundle, store)

    console.print(f"\n[bold]Device:[/] Alice files {len(ALICE)} notes (stored encrypted).")
    model.add_examples("alice", [Example(text, label=label) for text, label in ALICE])
    show(console, "Before: the shared model sorts Alice's new notes", model, "alice")

    start = time.perf_counter()
    result = model.train("alice", TrainConfig(max_seconds=60))
    console.print(
        f"\n[bold]Trained on this device[/] in {time.perf_counter() - start:.1f} s, "
        f"stage {result.stage!r} ({result.steps} adapter steps): held-out macro-F1 "
        f"{result.global_score:.2f} (shared) -> "
        f"{result.personal_score:.2f} (Alice's); kept: {result.kept} ({result.reason}); "
        f"adapter {result.adapter_bytes / 1024:.0f} KiB, sealed in the store."
    )
    show(console, "After: sorted the way Alice sorts", model, "alice")

    console.print("\n[bold]Retrieval[/] over Alice's own notes for 'an idea for a story':")
    for example, sim in model.similar("alice", "an idea for a story", k=3):
        console.print(f"  {sim:.2f}  {example.text}  [{example.label}]")

    store.close()
    raw = b"".join(p.read_bytes() for p in args.workdir.glob("notes.db*") if p.is_file())
    console.print(
        f"\n[bold]On disk:[/] {len(raw)} bytes in {db.name}*; Alice's note text in plaintext: "
        f"{'FOUND' if MARKER.encode() in raw else 'not found'}."
    )
    store = Store.open(db, key=PassphraseKey(passphrase))
    Personalizer.open(bundle, store).forget("alice")
    console.print(f"[bold]Forgotten:[/] Alice's data key is destroyed; users left: {store.users()}")
    store.close()


if __name__ == "__main__":
    main()
