"""What a store holds outlives one train() call, one Personalizer and one bundle.

forget() while the user trains, two Personalizers on one store file, an app update that
ships another bundle, examples written through the Store API, an interrupted add_examples.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from edgeperso import CancelledError, InvalidInputError, LockedError
from edgeperso.federation import SealedStateStore
from edgeperso.runtime import Personalizer, TrainConfig, TrainProgress
from edgeperso.runtime._params import to_bytes
from edgeperso.runtime._personalizer import EMBEDDINGS_OF, SHARED_USER
from edgeperso.store import Example, RawKey, Store
from edgeperso.store._codec import FEDERATION_ACCOUNT
from tests.edgeperso.runtime.conftest import topic_examples

PROBES = ["the cat sat on the mat", "stock prices fell sharply today"]


@pytest.fixture(scope="module")
def reexported(tiny_bundles: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The classification bundle exported again: same shapes, another graph (as after an app
    update that re-exports the same model), so another bundle identity."""
    root = tmp_path_factory.mktemp("reexported") / "bundle"
    shutil.copytree(tiny_bundles["classification"], root)
    graph = onnx.load(root / "infer.onnx")
    graph.doc_string = "exported again"
    onnx.save(graph, root / "infer.onnx")
    data = (root / "infer.onnx").read_bytes()
    manifest = json.loads((root / "manifest.json").read_text())
    for entry in manifest["files"]:
        if entry["path"] == "infer.onnx":
            entry["sha256"], entry["size"] = hashlib.sha256(data).hexdigest(), len(data)
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


def trained(model: Personalizer, user: str = "alice") -> None:
    # Swapped labels, so the user's parameters must differ from the shared model to win.
    model.add_examples(user, topic_examples(12, pets="b", markets="a"))
    result = model.train(user, TrainConfig(adapter=True, epochs=10))
    assert result.kept == "personal", result.reason


# ---- forget() and a running train() -------------------------------------------------------


def test_forget_during_train_cancels_it_and_nothing_of_the_user_comes_back(
    classifier: Personalizer, store: Store
) -> None:
    classifier.add_examples("alice", topic_examples(12, pets="b", markets="a"))
    started = threading.Event()
    outcome: list[object] = []

    def on_progress(progress: TrainProgress) -> None:
        started.set()

    def train() -> None:
        try:
            config = TrainConfig(adapter=True, epochs=200, max_seconds=None)
            outcome.append(classifier.train("alice", config, on_progress=on_progress))
        except CancelledError as exc:
            outcome.append(exc)

    trainer = threading.Thread(target=train)
    trainer.start()
    assert started.wait(60), "training never reached the adapter stage"

    assert classifier.forget("alice") is True
    trainer.join(60)

    assert not trainer.is_alive()
    (result,) = outcome
    assert isinstance(result, CancelledError), result  # not a result for a forgotten user
    assert store.users() == []  # the trainer wrote nothing after the shred
    assert classifier.predict("alice", PROBES[:1])[0].personalized is False
    assert list((store.path.parent / f"{store.path.name}.locks").iterdir()) == []


def test_training_a_user_with_no_data_leaves_no_lock_file(
    classifier: Personalizer, store: Store
) -> None:
    """A background trainer that runs right after a forget(), or for an id that never had
    data: the error, and no file saying that this user trained here."""
    with pytest.raises(InvalidInputError):
        classifier.train("nobody")
    assert list((store.path.parent / f"{store.path.name}.locks").iterdir()) == []


def test_a_lock_file_left_by_a_killed_forget_is_removed_at_the_next_open(
    classifier: Personalizer, store: Store, key: RawKey
) -> None:
    classifier.add_examples("alice", topic_examples(3))
    classifier.add_examples("bob", topic_examples(3))
    locks = store.path.parent / f"{store.path.name}.locks"

    def lock_file(user: str) -> str:
        before = set(os.listdir(locks)) if locks.exists() else set()
        store.lock_user(user).release()
        (name,) = set(os.listdir(locks)) - before
        return name

    names = {user: lock_file(user) for user in ("alice", "bob", "carol")}
    held = store.lock_user("carol")  # carol's trainer is running, before her data is stored
    store.forget_user("alice")  # the shred committed; the process died before the file went
    try:
        Store.open(store.path, key).close()
        # alice's is gone; bob's (a user with data) and carol's (held) stay
        assert set(os.listdir(locks)) == {names["bob"], names["carol"]}
    finally:
        held.release()


def test_forget_while_missing_embeddings_are_filled_in_leaves_nothing_behind(
    classifier: Personalizer, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """similar() embeds examples that have no embedding, without the user's lock; a forget()
    that shreds the user meanwhile must not see them written back."""
    store.add_examples("alice", [Example(t, label="a") for t in PROBES])
    embed = classifier._run_base

    def embed_then_forget(texts: list[str], outputs: list[str]) -> list[np.ndarray]:
        out = embed(texts, outputs)
        if len(texts) == len(PROBES):  # the fill-in, not the query
            assert classifier.forget("alice") is True
        return out

    monkeypatch.setattr(classifier, "_run_base", embed_then_forget)
    classifier.similar("alice", "a cat", k=1)

    assert store.users() == []


def test_forget_waits_for_a_trainer_it_cannot_cancel_then_refuses_and_deletes_nothing(
    classifier: Personalizer, store: Store
) -> None:
    classifier.add_examples("alice", topic_examples(4))
    # The lock held as a trainer in another process holds it.
    with store.lock_user("alice"), pytest.raises(LockedError, match="nothing was deleted"):
        classifier.forget("alice", wait_s=0.2)
    assert len(store.examples("alice")) == 8
    assert classifier.forget("alice", wait_s=0) is True
    with pytest.raises(InvalidInputError, match="wait_s"):
        classifier.forget("alice", wait_s=float("nan"))


# ---- data written through the Store API ---------------------------------------------------


def test_a_stored_label_the_bundle_does_not_have_stops_training_with_the_example_id(
    classifier: Personalizer, store: Store
) -> None:
    classifier.add_examples("alice", topic_examples(4))
    (bad,) = store.add_examples("alice", [Example("an odd one", label="zzz-secret")])

    with pytest.raises(InvalidInputError, match=f"stored example {bad}") as raised:
        classifier.train("alice")
    with pytest.raises(InvalidInputError, match=f"stored example {bad}"):
        classifier.shared_update("alice", ["global.head.b"])

    assert "zzz-secret" not in str(raised.value)  # a label is user data
    assert len(store.examples("alice")) == 9
    assert store.blobs("alice") == {}


def test_examples_without_embeddings_are_embedded_when_next_needed(
    classifier: Personalizer, store: Store
) -> None:
    """As after an add_examples interrupted between its two writes."""
    store.add_examples("alice", [Example("the cat sat on the mat", label="a")])
    assert store.embeddings("alice") == {}

    ((found, score),) = classifier.similar("alice", "the cat sat on the mat", k=1)

    assert found.text == "the cat sat on the mat" and score > 0.99
    assert len(store.embeddings("alice")) == 1


def test_a_correction_for_an_example_the_user_does_not_have_is_refused(
    classifier: Personalizer,
) -> None:
    from edgeperso import Feedback

    (own,) = classifier.add_examples("alice", [Example("the cat sat", label="a")])
    (other,) = classifier.add_examples("bob", [Example("the dog ran", label="a")])
    for example_id in (other, own + 100, -5):
        with pytest.raises(InvalidInputError, match="not one of this user's examples"):
            classifier.add_feedback(
                "alice", [Feedback("correction", value="b", example_id=example_id)]
            )
    classifier.add_feedback("alice", [Feedback("correction", value="b", example_id=own)])
    assert len(classifier.store.feedback("alice")) == 1


def test_installed_shared_parameters_of_another_shape_are_not_used(
    tiny_bundles: dict[str, Path], store: Store
) -> None:
    """As a store written before blobs were stamped, under a bundle with other labels."""
    store.put_blob(SHARED_USER, "shared", to_bytes({"global.head.b": np.ones(5, np.float32)}))
    model = Personalizer.open(tiny_bundles["classification"], store)

    assert model.shared_params()["global.head.b"].shape == (3,)
    assert len(model.predict("zed", PROBES)) == 2


def test_the_app_users_leave_out_the_reserved_ids(classifier: Personalizer) -> None:
    classifier.add_examples("alice", topic_examples(2))
    classifier.install_shared({"global.head.b": np.zeros(3, np.float32)})
    SealedStateStore(classifier.store).put("client", b"state")
    assert {SHARED_USER, FEDERATION_ACCOUNT} <= set(classifier.store.users())
    assert classifier.users() == ["alice"]
    for user in classifier.users():  # "forget everyone"
        classifier.forget(user)
    assert classifier.users() == []


@pytest.mark.parametrize("user", [SHARED_USER, FEDERATION_ACCOUNT])
def test_the_sdk_accounts_are_not_user_ids(classifier: Personalizer, user: str) -> None:
    for call in (
        lambda: classifier.add_examples(user, [Example("x y", label="a")]),
        lambda: classifier.predict(user, PROBES),
        lambda: classifier.forget(user),
        lambda: classifier.train(user),
    ):
        with pytest.raises(InvalidInputError, match=f"{user}' is reserved"):
            call()


# ---- two Personalizers on one store file ---------------------------------------------------


def test_shared_parameters_installed_by_one_personalizer_reach_the_other(
    tiny_bundles: dict[str, Path], store: Store, key: RawKey
) -> None:
    bundle = tiny_bundles["classification"]
    app = Personalizer.open(bundle, store)
    with Store.open(store.path, key) as second:
        tool = Personalizer.open(bundle, second)  # e.g. `edgeperso train` beside the app
        tool.predict("zed", PROBES)  # caches the bundle's own shared parameters
        bias = np.array([4.0, -4.0, 0.0], np.float32)

        app.install_shared({"global.head.b": bias})

        np.testing.assert_array_equal(tool.shared_params()["global.head.b"], bias)
        assert [p.label for p in tool.predict("zed", PROBES)] == ["a", "a"]
        # The other's install merges into what is stored, not into its stale copy.
        w = np.zeros_like(tool.shared_params()["global.head.w"])
        tool.install_shared({"global.head.w": w})
    reopened = Personalizer.open(bundle, store).shared_params()
    np.testing.assert_array_equal(reopened["global.head.b"], bias)
    np.testing.assert_array_equal(reopened["global.head.w"], w)


def test_a_serving_state_composed_before_an_install_is_not_served_after_it(
    tiny_bundles: dict[str, Path], store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forced interleaving of two threads: a predict() that read the old shared
    parameters stores its user's serving state only after another thread installed new ones.
    That stale entry must not be served to the calls that follow."""
    model = Personalizer.open(tiny_bundles["classification"], store)
    model.add_examples("alice", topic_examples(3))
    reached, resume = threading.Event(), threading.Event()
    user_version = store.user_version

    def paused_user_version(user: str) -> bytes | None:
        # in _serving, the user's token is read right after the shared parameters
        if user == "alice" and threading.current_thread().name == "early":
            reached.set()
            assert resume.wait(30)
        return user_version(user)

    monkeypatch.setattr(store, "user_version", paused_user_version)
    early = threading.Thread(target=model.predict, args=("alice", PROBES), name="early")
    early.start()
    assert reached.wait(30)
    bias = np.array([-8.0, 8.0, 0.0], np.float32)
    model.install_shared({"global.head.b": bias})
    resume.set()
    early.join(30)
    assert not early.is_alive()

    served = model.predict("alice", PROBES)

    expected = Personalizer.open(tiny_bundles["classification"], store).predict("alice", PROBES)
    assert [p.label for p in served] == [p.label for p in expected] == ["b", "b"]
    assert [p.probabilities for p in served] == [p.probabilities for p in expected]


def test_two_installs_at_once_on_one_store_file_keep_each_others_parameters(
    tiny_bundles: dict[str, Path], store: Store, key: RawKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One handle's install is held inside its write transaction, after it has read what is
    stored; the other handle's install meanwhile must wait for it, not merge into a copy
    read before it and overwrite it."""
    bundle = tiny_bundles["classification"]
    first = Personalizer.open(bundle, store)
    inside, resume = threading.Event(), threading.Event()
    update_blob = store.update_blob

    def held_update_blob(user: str, name: str, update: Any, **options: Any) -> int:
        def held(installed: bytes | None) -> bytes:
            inside.set()
            assert resume.wait(30)
            return bytes(update(installed))

        return update_blob(user, name, held, **options)

    monkeypatch.setattr(store, "update_blob", held_update_blob)
    bias = np.array([4.0, -4.0, 0.0], np.float32)
    persona = np.array([0.5, 0.0, -0.5], np.float32)
    with Store.open(store.path, key) as other_handle:
        second = Personalizer.open(bundle, other_handle)
        one = threading.Thread(target=first.install_shared, args=({"global.head.b": bias},))
        one.start()
        assert inside.wait(30)
        two = threading.Thread(target=second.install_shared, args=({"persona.bias": persona},))
        two.start()
        two.join(0.5)
        assert two.is_alive()  # waiting for the first install's transaction
        resume.set()
        one.join(30)
        two.join(30)
        assert not one.is_alive() and not two.is_alive()
    stored = Personalizer.open(bundle, store).shared_params()
    np.testing.assert_array_equal(stored["global.head.b"], bias)
    np.testing.assert_array_equal(stored["persona.bias"], persona)


def test_an_install_by_another_handle_during_training_changes_nothing_of_that_training(
    tiny_bundles: dict[str, Path], tmp_path: Path, key: RawKey
) -> None:
    """Every step and held-out score of one train() uses the shared parameters it started
    with; parameters installed meanwhile (a federated round finishing in the app while a
    trainer runs) apply from the next call."""
    bundle = tiny_bundles["classification"]
    config = TrainConfig(adapter=True, epochs=3, max_seconds=None, seed=3)
    losses: dict[bool, list[float]] = {}
    results = {}
    for install_midway in (False, True):
        path = tmp_path / f"{install_midway}.db"
        with Store.open(path, key) as store, Store.open(path, key) as app_handle:
            trainer = Personalizer.open(bundle, store)
            trainer.add_examples("alice", topic_examples(12, pets="b", markets="a"))
            app = Personalizer.open(bundle, app_handle)
            seen = losses.setdefault(install_midway, [])

            def on_progress(
                progress: TrainProgress,
                install: bool = install_midway,
                app: Personalizer = app,
                seen: list[float] = seen,
            ) -> None:
                seen.append(progress.loss)
                if install and progress.step == 1:
                    bias = np.array([9.0, -9.0, 0.0], np.float32)
                    app.install_shared({"global.head.b": bias, "persona.bias": bias})

            results[install_midway] = trainer.train("alice", config, on_progress=on_progress)
            assert bool(trainer.shared_params()["global.head.b"][0] == 9.0) is install_midway
    assert len(losses[True]) > 10
    assert losses[True] == losses[False]  # the same steps on the same parameters
    plain, interrupted = results[False], results[True]
    assert (plain.kept, plain.stage, plain.steps) == (
        interrupted.kept,
        interrupted.stage,
        interrupted.steps,
    )
    assert (plain.global_score, plain.personal_score) == (
        interrupted.global_score,
        interrupted.personal_score,
    )


# ---- an app update that ships another bundle -------------------------------------------------


def test_under_another_bundle_stored_parameters_are_not_used_and_training_starts_over(
    tiny_bundles: dict[str, Path], reexported: Path, store: Store
) -> None:
    before = Personalizer.open(tiny_bundles["classification"], store)
    trained(before)
    before.install_shared({"global.head.b": np.array([4.0, -4.0, 0.0], np.float32)})

    after = Personalizer.open(reexported, store)

    assert after.bundle_identity != before.bundle_identity
    assert all(not p.personalized for p in after.predict("alice", PROBES))
    bundle_own = Personalizer.open(reexported, store)._shared_defaults["global.head.b"]
    np.testing.assert_array_equal(after.shared_params()["global.head.b"], bundle_own)
    with pytest.raises(InvalidInputError, match="no accepted adapter"):
        after.export_adapter("alice", RawKey(os.urandom(32)))
    # History embeddings are made again by the new bundle's encoder, and training works.
    after.similar("alice", PROBES[0])
    assert store.get_state("alice", EMBEDDINGS_OF) == after.bundle_identity
    assert after.train("alice", TrainConfig(adapter=True, epochs=10)).kept == "personal"
    assert all(p.personalized for p in after.predict("alice", PROBES))


def test_under_a_bundle_with_other_shapes_a_stored_adapter_is_not_fed_to_the_graph(
    tiny_bundles: dict[str, Path], store: Store
) -> None:
    trained(Personalizer.open(tiny_bundles["classification"], store))
    regressor = Personalizer.open(tiny_bundles["regression"], store)

    (score,) = regressor.score("alice", PROBES[:1])

    assert np.isfinite(score)
    with pytest.raises(InvalidInputError, match="stored example"):
        regressor.train("alice")  # class labels, for a regression bundle
