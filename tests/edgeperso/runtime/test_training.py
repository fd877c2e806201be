"""train(): the loss goes down, the result is consistent with what is stored, a killed
train() resumes from its checkpoint, and the per-user lock keeps trainers apart."""

from __future__ import annotations

import dataclasses
import json
import os
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from edgeperso import CancelledError, InvalidInputError, LockedError
from edgeperso.runtime import Personalizer, TrainConfig, TrainProgress, TrainResult
from edgeperso.runtime._params import from_bytes
from edgeperso.store import Example, Feedback, RawKey, Store
from tests.edgeperso.runtime.conftest import MARKETS, PETS, topic_examples

CHILD = Path(__file__).with_name("_child.py")
CHECKPOINT = "train-checkpoint"
ADAPTER = "adapter"


def scored_examples(n_per_topic: int) -> list[Example]:
    """Regression examples: pets score 2, markets score -1."""
    return [
        Example(ex.text, label=2.0 if ex.label == "a" else -1.0, timestamp=ex.timestamp)
        for ex in topic_examples(n_per_topic)
    ]


def assert_consistent(
    result: TrainResult, model: Personalizer, store: Store, user: str, *, adapter: bool = True
) -> None:
    """What train() reports agrees with what it stored and with what predict() serves."""
    regression = model.manifest.task == "regression"
    assert result.metric == ("mae" if regression else "macro_f1")
    beats = (
        result.personal_score < result.global_score
        if regression
        else result.personal_score > result.global_score
    )
    assert (result.kept == "personal") == beats
    assert (ADAPTER in store.blobs(user)) == (result.kept == "personal")
    assert (result.adapter_bytes > 0) == (result.kept == "personal")
    assert CHECKPOINT not in store.blobs(user)
    assert model.predict(user, ["anything at all"])[0].personalized == (result.kept == "personal")
    assert (result.stage == "global") == (result.kept == "global")
    if adapter:
        assert 1 <= result.holdout < result.examples
        assert result.steps > 0
    if not regression:
        assert 0 <= result.global_score <= 1
        assert 0 <= result.personal_score <= 1


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_training_loss_goes_down_over_the_steps(
    tiny_bundles: dict[str, Path], store: Store, task: str
) -> None:
    model = Personalizer.open(tiny_bundles[task], store)
    model.add_examples(
        "alice", topic_examples(12) if task == "classification" else scored_examples(12)
    )
    progress: list[TrainProgress] = []

    result = model.train(
        "alice",
        TrainConfig(adapter=True, epochs=15, learning_rate=0.1),
        on_progress=progress.append,
    )

    assert result.stopped == "completed"
    assert result.resumed_from_step == 0
    assert result.steps >= 15 * 3  # 24 examples, 4 held out, micro-batches of 8
    assert [p.step for p in progress] == list(range(1, result.steps + 1))
    assert {p.total_steps for p in progress} == {result.steps}
    assert [p.epoch for p in progress] == [s // 3 for s in range(1, result.steps + 1)]
    losses = np.array([p.loss for p in progress])
    assert np.isfinite(losses).all()
    assert losses[-6:].mean() < 0.85 * losses[:6].mean()
    assert_consistent(result, model, store, "alice")


def test_one_class_examples_train_and_the_result_is_consistent(
    classifier: Personalizer, store: Store
) -> None:
    texts = [f"{t} {i}" for i, t in enumerate(PETS + MARKETS)]
    classifier.add_examples("alice", [Example(t, label="c") for t in texts])

    result = classifier.train("alice", TrainConfig(adapter=True, epochs=4, learning_rate=0.1))

    assert result.stopped == "completed"
    assert result.kept in ("personal", "global")
    assert_consistent(result, classifier, store, "alice")


def test_regression_training_reports_mae_and_predicts_scores(
    regressor: Personalizer, store: Store
) -> None:
    regressor.add_examples("alice", scored_examples(8))

    result = regressor.train("alice", TrainConfig(adapter=True, epochs=6, learning_rate=0.1))

    assert_consistent(result, regressor, store, "alice")
    (prediction,) = regressor.predict("alice", [PETS[0]])
    assert prediction.label is None
    assert prediction.probabilities is None
    assert isinstance(prediction.score, float)
    assert np.isfinite(prediction.score)


@pytest.mark.parametrize("n", [0, 1, 3])
def test_train_with_fewer_than_four_labelled_examples_is_refused(
    classifier: Personalizer, store: Store, n: int
) -> None:
    if n:
        classifier.add_examples("alice", topic_examples(2)[:n])
    # Unlabelled examples are history, not training data: they do not count.
    classifier.add_examples("alice", [Example(f"{t} unlabelled") for t in PETS])
    before = store.examples("alice"), store.blobs("alice")

    with pytest.raises(InvalidInputError, match="at least 4"):
        classifier.train("alice", TrainConfig(adapter=True, epochs=1))

    assert (store.examples("alice"), store.blobs("alice")) == before


def test_train_with_four_labelled_examples_is_enough(
    classifier: Personalizer, store: Store
) -> None:
    classifier.add_examples("alice", topic_examples(2))
    result = classifier.train("alice", TrainConfig(adapter=True, epochs=1))
    assert result.examples == 4
    assert_consistent(result, classifier, store, "alice")


def test_texts_longer_than_max_length_are_truncated_and_reported(
    classifier: Personalizer,
) -> None:
    # "word" is one token; [CLS] and [SEP] take two of the 64.
    fits, too_long = " ".join(["word"] * 62), " ".join(["word"] * 63)
    predictions = classifier.predict("alice", [fits, too_long, "short"])
    assert [p.truncated for p in predictions] == [False, True, False]

    long_examples = [Example(f"{too_long} {PETS[i]}", label="a") for i in range(3)]
    classifier.add_examples("alice", topic_examples(3) + long_examples)
    result = classifier.train("alice", TrainConfig(adapter=True, epochs=1))
    assert result.truncated_texts == 3


def test_max_steps_and_cancel_stop_training_early_and_say_why(classifier: Personalizer) -> None:
    classifier.add_examples("alice", topic_examples(12))

    by_steps = classifier.train("alice", TrainConfig(adapter=True, epochs=5, max_steps=4))
    steps = 0

    def count(progress: TrainProgress) -> None:
        nonlocal steps
        steps = progress.step

    cancelled = classifier.train(
        "alice", TrainConfig(adapter=True, epochs=5), on_progress=count, cancel=lambda: steps >= 2
    )

    assert (by_steps.stopped, by_steps.steps) == ("max_steps", 4)
    assert (cancelled.stopped, cancelled.steps) == ("cancelled", 2)


def test_a_train_cancelled_before_anything_is_fitted_raises_and_changes_nothing(
    classifier: Personalizer, store: Store
) -> None:
    classifier.add_examples("alice", topic_examples(12))
    assert classifier.train("alice").kept == "personal"
    adapter = store.get_blob("alice", "adapter")
    examples_seen = 0

    def cancel_in_the_feature_pass() -> bool:
        nonlocal examples_seen
        examples_seen += 1
        return examples_seen > 3

    with pytest.raises(CancelledError, match="before anything was stored"):
        classifier.train("alice", TrainConfig(adapter=True), cancel=cancel_in_the_feature_pass)

    assert examples_seen == 4  # asked once per example: it stopped at the fourth
    assert store.get_blob("alice", "adapter") == adapter
    assert store.blobs("alice").keys() == {"adapter"}  # no checkpoint either

    asked = 0

    def cancel_after_the_feature_pass() -> bool:
        nonlocal asked
        asked += 1
        return asked > 24  # once per example (24), then after the head and retrieval stage

    with pytest.raises(CancelledError, match="before anything was stored"):
        classifier.train("alice", cancel=cancel_after_the_feature_pass)
    assert asked == 25
    assert store.get_blob("alice", "adapter") == adapter


def test_a_cancelled_train_goes_on_from_its_checkpoint_under_another_time_budget(
    classifier: Personalizer, store: Store
) -> None:
    classifier.add_examples("alice", topic_examples(12))
    classifier.add_examples("bob", topic_examples(12))
    config = TrainConfig(adapter=True, epochs=6, max_seconds=None)
    uninterrupted = classifier.train("bob", config)  # the same data: its step count
    steps = 0

    def count(progress: TrainProgress) -> None:
        nonlocal steps
        steps = progress.step

    cancelled = classifier.train("alice", config, on_progress=count, cancel=lambda: steps >= 5)
    assert (cancelled.stopped, cancelled.steps) == ("cancelled", 5)
    assert CHECKPOINT in store.blobs("alice")  # kept for the next call
    assert (ADAPTER in store.blobs("alice")) == (cancelled.kept == "personal")  # served now

    resumed = classifier.train("alice", dataclasses.replace(config, max_seconds=600.0))
    assert resumed.resumed_from_step == 5 and resumed.stopped == "completed"
    assert resumed.steps == uninterrupted.steps
    assert_consistent(resumed, classifier, store, "alice")  # the checkpoint is gone


# -- a second process -------------------------------------------------------------------------


@contextmanager
def child(key: RawKey, *args: object) -> Iterator[subprocess.Popen[str]]:
    env = os.environ | {"EDGEPERSO_TEST_KEY": key.key.hex()}
    command = [sys.executable, str(CHILD), *map(str, args)]
    proc = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None and not pipe.closed:
                pipe.close()


def wait_for_line(proc: subprocess.Popen[str], expected: str, timeout: float = 120.0) -> None:
    """Block until the child prints `expected` (no sleeping: select on its stdout)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0 and selector.select(left):
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"the child exited ({proc.wait()}) before {expected!r}")
            if line.strip() == expected:
                return
    raise AssertionError(f"the child did not say {expected!r} within {timeout} s")


def test_train_killed_after_a_checkpoint_resumes_from_it(
    tiny_bundles: dict[str, Path], classifier: Personalizer, store: Store, key: RawKey
) -> None:
    classifier.add_examples("alice", topic_examples(12))
    classifier.add_examples("bob", topic_examples(12))
    config = TrainConfig(adapter=True, epochs=12, learning_rate=0.1, max_seconds=None)
    bundle = tiny_bundles["classification"]
    uninterrupted = classifier.train("bob", config)  # the same data: its step count
    assert uninterrupted.resumed_from_step == 0

    with child(
        key, "train", store.path, "alice", bundle, json.dumps(dataclasses.asdict(config))
    ) as proc:
        wait_for_line(proc, "checkpointed")
        # The checkpoint is in the file, as a second opener of the store sees it.
        with Store.open(store.path, key) as observer:
            saved = observer.get_blob("alice", CHECKPOINT)
        assert saved is not None
        checkpointed_step = json.loads(bytes(from_bytes(saved)["meta"]))["step"]
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL

    result = classifier.train("alice", config)  # the kernel released the dead trainer's lock

    assert 0 < result.resumed_from_step == checkpointed_step < uninterrupted.steps
    assert result.stopped == "completed"
    assert result.steps == uninterrupted.steps
    assert_consistent(result, classifier, store, "alice")


def test_a_checkpoint_made_with_other_settings_is_not_resumed(
    tiny_bundles: dict[str, Path], classifier: Personalizer, store: Store, key: RawKey
) -> None:
    classifier.add_examples("alice", topic_examples(12))
    config = TrainConfig(adapter=True, epochs=12, max_seconds=None)
    bundle = tiny_bundles["classification"]

    with child(
        key, "train", store.path, "alice", bundle, json.dumps(dataclasses.asdict(config))
    ) as proc:
        wait_for_line(proc, "checkpointed")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)

    result = classifier.train("alice", dataclasses.replace(config, seed=1))
    assert result.resumed_from_step == 0
    assert result.stopped == "completed"


def test_train_while_another_process_holds_the_user_lock_raises_locked_and_changes_nothing(
    classifier: Personalizer, store: Store, key: RawKey
) -> None:
    classifier.add_examples("alice", topic_examples(6))
    classifier.add_examples("bob", topic_examples(6))
    texts = [PETS[0], MARKETS[0]]
    served = classifier.score("alice", texts)
    before = store.examples("alice"), store.blobs("alice"), store.embeddings("alice").keys()

    with child(key, "lock", store.path, "alice") as proc:
        wait_for_line(proc, "locked")
        with pytest.raises(LockedError):
            classifier.train("alice", TrainConfig(adapter=True, epochs=1))
        after = store.examples("alice"), store.blobs("alice"), store.embeddings("alice").keys()
        assert after == before
        # Serving goes on meanwhile, and other users train.
        np.testing.assert_array_equal(classifier.score("alice", texts), served)
        assert classifier.train("bob", TrainConfig(adapter=True, epochs=1)).steps > 0
        assert proc.stdin is not None
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0

    assert classifier.train("alice", TrainConfig(adapter=True, epochs=1)).steps > 0


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_the_head_stage_alone_personalizes_a_user_who_disagrees_with_the_shared_model(
    tiny_bundles: dict[str, Path], store: Store, task: str
) -> None:
    model = Personalizer.open(tiny_bundles[task], store)
    if task == "classification":
        examples = topic_examples(12, pets="b", markets="a")
    else:
        examples = [dataclasses.replace(ex, label=-float(ex.label)) for ex in scored_examples(12)]
    model.add_examples("alice", examples)
    before = model.score("alice", [PETS[0], MARKETS[0]])

    result = model.train("alice", TrainConfig(adapter=False))

    assert result.kept == "personal" and result.stage == "head", result.reason
    assert result.steps == 0 and result.holdout == 0
    assert result.head_l2 in TrainConfig().head_l2
    assert_consistent(result, model, store, "alice", adapter=False)
    after = model.score("alice", [PETS[0], MARKETS[0]])
    if task == "classification":  # pets are now "b" (index 1), markets "a" (index 0)
        assert after[0].argmax() == 1 and after[1].argmax() == 0
    else:  # pets scored -2, markets +1
        assert after[0] < after[1]
        assert abs(after[0] + 2) + abs(after[1] - 1) < abs(before[0] + 2) + abs(before[1] - 1)


def test_a_user_who_agrees_with_the_shared_model_keeps_it(
    classifier: Personalizer, store: Store
) -> None:
    # Labels are what the shared model itself predicts for her (with her history attended
    # over, hence set by corrections once the texts are in): nothing for her head to fix.
    texts = [f"{t} {i}" for i, t in enumerate(PETS + MARKETS + PETS)]
    ids = classifier.add_examples("alice", [Example(t, label="a") for t in texts])
    predicted = classifier.predict("alice", texts)
    classifier.add_feedback(
        "alice",
        [Feedback("correction", value=p.label, example_id=i) for i, p in zip(ids, predicted)],
    )

    result = classifier.train("alice", TrainConfig(adapter=False))

    assert result.kept == "global" and result.stage == "global"
    assert result.global_score == 1.0 and result.head_l2 is None
    assert not classifier.predict("alice", texts)[0].personalized


# A head so strongly pulled toward the shared one that it cannot win: retrieval must.
RETRIEVAL_ONLY = TrainConfig(head_l2=(1e9,), knn_k=(1,), knn_weight=(0.9,))


def test_the_retrieval_mix_personalizes_from_the_users_own_examples(
    classifier: Personalizer, store: Store
) -> None:
    classifier.add_examples("alice", topic_examples(12, pets="b", markets="a"))

    result = classifier.train("alice", RETRIEVAL_ONLY)

    assert result.kept == "personal" and result.stage == "knn", result.reason
    assert result.knn == (1, 0.9) and result.head_l2 is None
    assert_consistent(result, classifier, store, "alice", adapter=False)
    # Near-duplicates of her examples take her label, with at least the retrieval's weight.
    probs = classifier.score("alice", [f"{PETS[0]} 0", f"{MARKETS[0]} 0"])
    assert probs[0, 1] >= 0.9 and probs[1, 0] >= 0.9
    stored = from_bytes(store.get_blob("alice", ADAPTER) or b"")
    assert stored["knn.keys"].shape == (24, classifier.manifest.hidden_size)
    np.testing.assert_allclose(np.linalg.norm(stored["knn.keys"], axis=1), 1.0, atol=1e-5)


def test_retrieval_can_be_turned_off(classifier: Personalizer, store: Store) -> None:
    classifier.add_examples("alice", topic_examples(12, pets="b", markets="a"))
    config = dataclasses.replace(RETRIEVAL_ONLY, knn_k=())

    result = classifier.train("alice", config)

    assert result.kept == "global" and result.knn is None, result.reason
    assert "adapter" not in store.blobs("alice")


def test_retrieval_is_not_offered_for_regression(regressor: Personalizer) -> None:
    examples = [dataclasses.replace(ex, label=-float(ex.label)) for ex in scored_examples(12)]
    regressor.add_examples("alice", examples)

    result = regressor.train("alice", RETRIEVAL_ONLY)

    assert result.stage != "knn" and result.knn is None
