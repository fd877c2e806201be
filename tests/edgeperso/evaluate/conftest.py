"""A tiny no/yes bundle (exported once per session) and a small generated annotation set.

Six users label the same kind of texts by their own rules, so a shared head cannot fit all
of them: two call every question "yes", two say "yes" to pets, two to markets.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.conftest import FAST, make_tiny_model

PETS = (
    "the cat sat on the mat",
    "a kitten purrs softly by the fire",
    "my dog barks at the mailman",
    "the puppy chases its tail",
    "cats love to chase mice",
)
MARKETS = (
    "stock prices fell sharply today",
    "the market rallied after the report",
    "bond yields rose again this week",
    "investors sold their shares",
    "the central bank raised interest rates",
)
RULES = {
    "ann": lambda topic, question: question,
    "bob": lambda topic, question: question,
    "cid": lambda topic, question: topic == "pets",
    "dee": lambda topic, question: topic == "pets",
    "eve": lambda topic, question: topic == "markets",
    "fay": lambda topic, question: topic == "markets",
}
TEXTS_PER_USER = 30


def annotation_rows() -> list[dict[str, str]]:
    """6 users x 30 rows: user, text, label (no/yes), score (a number), time."""
    rows = []
    for u, (user, rule) in enumerate(RULES.items()):
        for i in range(TEXTS_PER_USER):
            topic = "pets" if (i + u) % 2 == 0 else "markets"
            base = (PETS if topic == "pets" else MARKETS)[i % 5]
            question = i % 3 == 0
            text = f"is it true that {base} {i}?" if question else f"{base} {i}"
            yes = rule(topic, question)
            rows.append(
                {
                    "user": user,
                    "text": text,
                    "label": "yes" if yes else "no",
                    "score": str(2 if yes else -1),
                    "time": str(1000 * u + i),
                }
            )
    return rows


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="session")
def noyes_bundle(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    pytest.importorskip("torch", reason="exporting needs the export toolchain (make test)")
    from edgeperso_export import ExportConfig, export_bundle

    root = tmp_path_factory.mktemp("eval-bundle")
    model = make_tiny_model(root, "bert", minilm_dir)
    config = ExportConfig(task="classification", labels=("no", "yes"), max_length=64, **FAST)
    export_bundle(model, root / "bundle", config)
    return root / "bundle"


@pytest.fixture
def annotations_csv(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "annotations.csv", annotation_rows())
