"""On the real MiniLM bundle: a user's own labelling, learnt on device, generalises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgeperso.runtime import Personalizer, TrainConfig
from edgeperso.store import Example, Store

# A labelling that only this user holds: food is "pos", commuting is "neg". The shared head is
# untrained, so the shared model cannot know it; the two topics are easy to tell apart.
FOOD = (
    "this pasta with fresh basil is delicious",
    "we baked bread and ate it warm",
    "the sushi place downtown serves great tuna",
    "my grandmother's soup recipe is the best",
    "a bowl of ripe strawberries for breakfast",
    "grilled vegetables with olive oil and garlic",
    "chocolate cake for my birthday dinner",
    "spicy noodles from the street market",
    "homemade pizza with mozzarella and tomatoes",
    "a cup of hot cocoa and cinnamon rolls",
    "roast chicken with potatoes on sunday",
    "fresh salad with feta and olives",
)
COMMUTE = (
    "the train was delayed again this morning",
    "stuck in traffic on the highway for an hour",
    "the bus driver skipped my stop",
    "parking downtown costs a fortune",
    "the subway was packed and hot",
    "my bike tire went flat on the way to work",
    "road works closed the bridge lane",
    "missed the ferry by two minutes",
    "the tram broke down between stations",
    "rush hour traffic jams every single day",
    "the airport shuttle never showed up",
    "a detour added twenty minutes to my drive",
)
HELD_OUT = [
    ("pancakes with maple syrup and berries", "pos"),
    ("a warm croissant and coffee at the bakery", "pos"),
    ("lentil curry with rice and naan", "pos"),
    ("the commuter train was cancelled", "neg"),
    ("gridlock on the ring road after an accident", "neg"),
    ("waiting forty minutes for a late bus", "neg"),
]


def accuracy(model: Personalizer, user: str) -> float:
    predictions = model.predict(user, [text for text, _ in HELD_OUT])
    hits = [p.label == label for p, (_, label) in zip(predictions, HELD_OUT)]
    return sum(hits) / len(hits)


@pytest.mark.slow
def test_training_improves_held_out_accuracy_on_a_separable_personal_task(
    bundles: dict[str, Path], store: Store
) -> None:
    model = Personalizer.open(bundles["classification"], store)
    examples = [Example(t, label="pos") for t in FOOD] + [Example(t, label="neg") for t in COMMUTE]
    model.add_examples("alice", examples)
    before = accuracy(model, "alice")
    bystander = model.score("bob", [text for text, _ in HELD_OUT])

    # The default learning rate, as an app would train.
    result = model.train("alice", TrainConfig(adapter=True, epochs=15, max_seconds=120))

    assert result.stopped == "completed"
    assert result.kept == "personal"
    assert result.personal_score > result.global_score
    after = accuracy(model, "alice")
    assert after >= 5 / 6
    assert after > before
    # Nobody else is affected: another user still gets what they got before.
    np.testing.assert_array_equal(model.score("bob", [text for text, _ in HELD_OUT]), bystander)
