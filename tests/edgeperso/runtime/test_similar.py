"""similar(): retrieval over the user's own history, best first, never another user's."""

from __future__ import annotations

import numpy as np

from edgeperso.runtime import Personalizer
from edgeperso.store import Example
from tests.edgeperso.runtime.conftest import MARKETS, PETS

QUERY = "the cat sat on the mat all afternoon"


def test_similar_returns_the_users_own_closest_examples_best_first(
    classifier: Personalizer,
) -> None:
    alice = [*PETS, *MARKETS, "the cat sat on the mat all day"]
    classifier.add_examples("alice", [Example(t, label="a") for t in alice])
    # Bob holds the query itself: the closest text in the store, but not Alice's.
    classifier.add_examples("bob", [Example(QUERY, label="b"), Example("the cat sat", label="b")])

    found = classifier.similar("alice", QUERY, k=4)

    assert len(found) == 4
    texts = [ex.text for ex, _ in found]
    assert set(texts) <= set(alice)
    assert texts[0] == "the cat sat on the mat all day"
    scores = [s for _, s in found]
    assert scores == sorted(scores, reverse=True)
    # The scores are the cosine of the base model's text features, computed independently.
    features = classifier.embed("nobody", [QUERY, *alice])
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    cosine = unit[1:] @ unit[0]
    best = [alice[i] for i in np.argsort(-cosine)[:4]]
    assert texts == best
    np.testing.assert_allclose(scores, np.sort(cosine)[::-1][:4], rtol=1e-4, atol=1e-5)
    ids = {ex.id for ex in classifier.store.examples("alice")}
    assert {ex.id for ex, _ in found} <= ids


def test_similar_returns_at_most_what_the_user_has_and_nothing_for_a_new_user(
    classifier: Personalizer,
) -> None:
    classifier.add_examples("alice", [Example(PETS[0]), Example(MARKETS[0])])
    classifier.add_examples("bob", [Example(PETS[1])])

    assert len(classifier.similar("alice", QUERY, k=10)) == 2
    assert classifier.similar("carol", QUERY) == []


def test_similar_skips_deleted_examples(classifier: Personalizer) -> None:
    ids = classifier.add_examples("alice", [Example(QUERY), Example(MARKETS[0])])
    classifier.store.delete_examples("alice", ids[:1])

    found = classifier.similar("alice", QUERY)

    assert [ex.text for ex, _ in found] == [MARKETS[0]]
