"""Fixtures of the runtime tests: tiny bundles exported once per session, fresh stores.

A tiny random 2-layer BERT exports in about a minute and trains in milliseconds per
step, so every behaviour that does not need a real model is tested on it. The real MiniLM
bundles (`bundles`, from tests/conftest.py) are only used where a real model matters.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeperso.runtime import Personalizer
from edgeperso.store import Example, RawKey, Store
from tests.conftest import FAST, make_tiny_model

LABELS = ("a", "b", "c")

# Two topics with distinct vocabulary: a task that a user's adapter can learn on the tiny model.
PETS = (
    "the cat sat on the mat",
    "a kitten purrs softly by the fire",
    "my dog barks at the mailman",
    "the puppy chases its tail",
    "cats love to chase mice",
    "the hamster runs in its wheel",
)
MARKETS = (
    "stock prices fell sharply today",
    "the market rallied after the report",
    "bond yields rose again this week",
    "investors sold their shares",
    "the central bank raised interest rates",
    "quarterly earnings beat forecasts",
)


def topic_examples(n_per_topic: int, pets: str = "a", markets: str = "b") -> list[Example]:
    """`n_per_topic` examples of each topic, labelled `pets` and `markets`, interleaved."""
    out = []
    for i in range(n_per_topic):
        out.append(Example(f"{PETS[i % len(PETS)]} {i}", label=pets, timestamp=2.0 * i))
        out.append(
            Example(f"{MARKETS[i % len(MARKETS)]} {i}", label=markets, timestamp=2.0 * i + 1)
        )
    return out


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> dict[str, Path]:
    """A tiny random BERT exported for classification (3 labels), regression and embedding."""
    pytest.importorskip("torch", reason="exporting needs the export toolchain (make test)")
    from edgeperso_export import ExportConfig, export_bundle

    root = tmp_path_factory.mktemp("tiny-bundles")
    model = make_tiny_model(root, "bert", minilm_dir)
    configs = {
        "classification": ExportConfig(task="classification", labels=LABELS, max_length=64, **FAST),
        "regression": ExportConfig(task="regression", max_length=64, **FAST),
        "embedding": ExportConfig(task="embedding", max_length=64, **FAST),
    }
    out = {}
    for task, config in configs.items():
        out[task] = root / task
        export_bundle(model, out[task], config)
    return out


@pytest.fixture
def key() -> RawKey:
    return RawKey(os.urandom(32))


@pytest.fixture
def store(tmp_path: Path, key: RawKey) -> Iterator[Store]:
    with Store.open(tmp_path / "profile.db", key) as opened:
        yield opened


@pytest.fixture
def classifier(tiny_bundles: dict[str, Path], store: Store) -> Personalizer:
    return Personalizer.open(tiny_bundles["classification"], store)


@pytest.fixture
def regressor(tiny_bundles: dict[str, Path], store: Store) -> Personalizer:
    return Personalizer.open(tiny_bundles["regression"], store)


@pytest.fixture
def embedder(tiny_bundles: dict[str, Path], store: Store) -> Personalizer:
    return Personalizer.open(tiny_bundles["embedding"], store)
