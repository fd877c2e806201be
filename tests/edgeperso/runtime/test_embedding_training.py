"""On-device training of an embedding bundle: the user's groups, a supervised contrastive loss
in the bundle's train graph, and the guard that keeps the shared model unless held-out
retrieval improves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from edgeperso import Bundle, InvalidInputError, UnsupportedError
from edgeperso.runtime import Personalizer, TrainConfig, TrainProgress
from edgeperso.runtime._params import infer_feeds
from edgeperso.store import Example, Store
from tests.edgeperso.runtime.conftest import MARKETS, PETS, topic_examples
from tests.edgeperso.runtime.test_inputs import snapshot
from tests.edgeperso.runtime.test_train_graph import (
    ABS_TOL,
    EPS,
    REL_TOL,
    loss_of,
    param_feeds,
    session,
)


def colour_examples() -> list[Example]:
    """Every sentence three times, ending in "red", "blue" and "green", grouped by colour.

    The shared model embeds by sentence, so a held-out text's nearest neighbour is its own
    sentence in another colour: grouping by colour is something only the user's adapter
    can learn."""
    out = []
    for sentence in (*PETS, *MARKETS):
        for colour in ("red", "blue", "green"):
            out.append(Example(f"{sentence} {colour}", label=colour, timestamp=float(len(out))))
    return out


def same_group_nearest(vectors: np.ndarray, groups: np.ndarray) -> float:
    """Share of rows whose most cosine-similar other row is of the same group."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return float((groups[similarity.argmax(1)] == groups).mean())


def test_training_learns_the_users_grouping_and_serves_it_to_that_user_only(
    embedder: Personalizer, store: Store
) -> None:
    embedder.add_examples("alice", colour_examples())
    probe = ["the cat sat on the mat red", "the cat sat on the mat blue"]
    before = embedder.embed("alice", probe)
    progress: list[TrainProgress] = []

    config = TrainConfig(epochs=20, learning_rate=3e-2, holdout_fraction=0.3)
    result = embedder.train("alice", config, on_progress=progress.append)

    assert result.metric == "retrieval_macro_f1"
    assert result.stage == "adapter" and result.kept == "personal"
    assert result.personal_score > result.global_score
    assert result.holdout >= 2 and result.steps >= 100
    losses = np.array([p.loss for p in progress])
    assert np.isfinite(losses).all()
    assert losses[-10:].mean() < 0.85 * losses[:10].mean()
    after = embedder.embed("alice", probe)
    assert not np.allclose(after, before, atol=1e-4)
    np.testing.assert_allclose(embedder.embed("bob", probe), before, atol=1e-6)
    # Over all her texts, a text's nearest other text now shares its colour more often.
    examples = colour_examples()
    texts, colours = [e.text for e in examples], np.array([e.label for e in examples])
    assert same_group_nearest(embedder.embed("alice", texts), colours) > same_group_nearest(
        embedder.embed("bob", texts), colours
    )


def test_a_grouping_the_shared_model_already_retrieves_keeps_the_shared_model(
    embedder: Personalizer, store: Store
) -> None:
    embedder.add_examples("alice", topic_examples(12, pets="pets", markets="markets"))

    result = embedder.train("alice", TrainConfig(epochs=3))

    assert result.kept == "global" and result.stage == "global"
    assert result.global_score == result.personal_score
    assert store.get_blob("alice", "adapter") is None


def test_a_shared_update_from_an_embedding_bundle_is_unsupported(
    embedder: Personalizer, store: Store
) -> None:
    embedder.add_examples("alice", colour_examples())
    with pytest.raises(UnsupportedError, match="no shared head"):
        embedder.shared_update("alice", list(embedder.shared_params()))


@pytest.mark.parametrize(
    ("groups", "message"),
    [
        (["a"] * 6, "1 group"),
        (["a", "a", "b", "b", "c", "c"], "the largest of 2"),
    ],
)
def test_too_few_groups_or_members_are_refused_and_the_store_is_left_intact(
    embedder: Personalizer, store: Store, groups: list[str], message: str
) -> None:
    embedder.add_examples("alice", [Example(f"{PETS[i]}", label=g) for i, g in enumerate(groups)])
    before = snapshot(store, "alice")
    with pytest.raises(InvalidInputError, match=message):
        embedder.train("alice", TrainConfig(epochs=1))
    assert snapshot(store, "alice") == before


@pytest.mark.parametrize("label", [7, "", "   ", 1.5])
def test_a_group_must_be_a_non_empty_string(
    embedder: Personalizer, store: Store, label: object
) -> None:
    with pytest.raises(InvalidInputError, match="names the example's group"):
        embedder.add_examples("alice", [Example("hello", label=label)])  # type: ignore[arg-type]
    assert store.examples("alice") == []


Feeds = tuple[ort.InferenceSession, dict[str, np.ndarray]]


@pytest.fixture(scope="module")
def contrastive(
    tiny_bundles: dict[str, Path],
) -> tuple[ort.InferenceSession, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One micro-batch for the embedding train graph: six real texts in three groups (every
    anchor has a positive), two padding rows, random non-zero user LoRA, a Ditto term; and
    the inference graph's embeddings of the six texts under the same parameters."""
    bundle = Bundle.load(tiny_bundles["embedding"])
    manifest = bundle.manifest
    assert manifest.train.loss == "supervised_contrastive"
    spec = manifest.train.graphs[0]
    infer = session(bundle.path_of("infer.onnx"))
    train = session(bundle.path_of(spec.file))
    tokenizer = Tokenizer.from_file(str(bundle.path_of(manifest.tokenizer)))
    d, b, length = manifest.hidden_size, spec.batch_size, spec.seq_len
    prefix = np.zeros((b, length, d), np.float32)
    mask = np.zeros((b, length), np.int64)
    texts = [np.array([tokenizer.encode(t).ids], np.int64) for t in [*PETS[:3], *MARKETS[:3]]]
    for row, ids in enumerate(texts):
        (out,) = infer.run(["prefix"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        prefix[row, : ids.shape[1]] = out[0]
        mask[row, : ids.shape[1]] = 1
    group = np.array([0, 1, 2, 0, 1, 2, -1, -2])  # rows 6, 7: padding
    positives = (group[:, None] == group[None, :]) & ~np.eye(b, dtype=bool)
    weights = (group >= 0).astype(np.float32)
    feeds: dict[str, np.ndarray] = {
        "prefix": prefix,
        "attention_mask": mask,
        "history": np.zeros((1, d), np.float32),
        "history_mask": np.zeros(1, np.float32),
        "targets": positives.astype(np.float32),
        "weights": weights / weights.sum(),
        "prox_weight": np.array(0.1, np.float32),
    }
    feeds |= param_feeds(bundle, np.random.default_rng(0))
    slots = infer_feeds(manifest, {p.name: feeds[p.name] for p in manifest.params})
    no_history = {"history": feeds["history"], "history_mask": feeds["history_mask"]}
    embedded = np.stack(
        [
            infer.run(
                ["output"],
                slots | no_history | {"input_ids": ids, "attention_mask": np.ones_like(ids)},
            )[0][0]
            for ids in texts
        ]
    )
    inputs = {i.name for i in train.get_inputs()}
    return train, {k: v for k, v in feeds.items() if k in inputs}, embedded


@pytest.fixture(scope="module")
def contrastive_feeds(
    contrastive: tuple[ort.InferenceSession, dict[str, np.ndarray], np.ndarray],
) -> Feeds:
    return contrastive[0], contrastive[1]


@pytest.mark.parametrize("name", ["user.lora.l1.value.B", "user.lora.l1.query.A"])
def test_contrastive_gradient_matches_finite_differences_of_its_loss(
    contrastive_feeds: Feeds, name: str
) -> None:
    """As test_train_graph's check, at the gradient's four largest entries: at temperature
    0.05 the loss curves 20x more sharply than cross-entropy, so a small entry's central
    difference carries a truncation error comparable to the entry itself."""
    train, feeds = contrastive_feeds
    (grad,) = train.run([f"grad.{name}"], feeds)
    assert np.abs(grad).max() > 1e-3, "a vanishing gradient would make this check vacuous"
    for flat in np.argsort(-np.abs(grad), axis=None)[:4]:
        index = np.unravel_index(flat, grad.shape)
        moved = dict(feeds)
        moved[name] = feeds[name].copy()
        moved[name][index] += EPS
        up = loss_of(train, moved)
        moved[name][index] -= 2 * EPS
        numeric = (up - loss_of(train, moved)) / (2 * EPS)
        analytic = float(grad[index])
        tolerance = REL_TOL * max(abs(analytic), abs(numeric)) + ABS_TOL
        assert abs(numeric - analytic) <= tolerance, (name, index, numeric, analytic)


def test_contrastive_loss_is_the_supervised_contrastive_formula_and_ignores_padding(
    contrastive: tuple[ort.InferenceSession, dict[str, np.ndarray], np.ndarray],
) -> None:
    """Recomputed in numpy from the inference graph's embeddings of the same texts under the
    same user LoRA: per anchor, minus the mean log-probability of its positives in a softmax
    over the other real rows of cosine / 0.05, weighted. The int8 inference graph and the
    train graph's dequantized weights differ by activation rounding, hence 5%; a mean
    reduction, a missing temperature or padding in the softmax are off by far more."""
    train, feeds, embedded = contrastive
    without_prox = {**feeds, "prox_weight": np.array(0.0, np.float32)}
    loss = loss_of(train, without_prox)

    z = embedded / np.linalg.norm(embedded, axis=1, keepdims=True)
    logits = z @ z.T / 0.05
    np.fill_diagonal(logits, -np.inf)  # an anchor is not its own candidate
    top = logits.max(1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(1, keepdims=True))
    positives = feeds["targets"][:6, :6]
    per_anchor = -(np.where(positives > 0, logp, 0.0)).sum(1) / positives.sum(1)
    expected = float((per_anchor * feeds["weights"][:6]).sum())
    assert loss == pytest.approx(expected, rel=0.05)

    noisy = dict(without_prox)
    noisy["prefix"] = feeds["prefix"].copy()
    noisy["prefix"][6:] = np.random.default_rng(1).normal(size=noisy["prefix"][6:].shape)
    assert loss_of(train, noisy) == pytest.approx(loss, rel=1e-5)
