"""What a user teaches the model stays sealed: no plaintext text or adapter weight reaches
the disk, and no log record or error message carries user text or labels."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from edgeperso import InvalidInputError
from edgeperso.runtime import Personalizer, TrainConfig
from edgeperso.runtime._params import from_bytes
from edgeperso.store import Example, RawKey, Store
from tests.edgeperso.runtime.conftest import topic_examples

MARKER = "zqxv-private-7f3a9c"


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots for p in sorted(root.rglob("*")) if p.is_file()]


def test_texts_and_trained_weights_never_reach_the_disk_in_plaintext(
    tiny_bundles: dict[str, Path], tmp_path: Path, key: RawKey
) -> None:
    home = tmp_path / "profile"
    home.mkdir()
    bundle = tiny_bundles["classification"]
    with Store.open(home / "profile.db", key) as store:
        model = Personalizer.open(bundle, store)
        examples = [
            Example(f"{ex.text} {MARKER}", label=ex.label, timestamp=ex.timestamp)
            for ex in topic_examples(12)
        ]
        model.add_examples("alice", examples)
        result = model.train("alice", TrainConfig(adapter=True, epochs=20, learning_rate=0.2))
        assert result.kept == "personal"
        adapter = store.get_blob("alice", "adapter")
        assert adapter is not None
        weights = from_bytes(adapter)
        secrets = {"marker": MARKER.encode()}
        for name, value in weights.items():
            head = value.reshape(-1)[:2]  # 8 bytes, if no zero among them: a distinctive needle
            if np.count_nonzero(head) == len(head):
                secrets[name] = head.tobytes()
        # Whichever stage won, the user's head and bias are trained (zeros would be found
        # everywhere, so they would not be a test).
        assert {"user.bias", "user.head.w"} <= set(secrets)
        # While open: the WAL and shared-memory files hold the latest pages.
        open_files = files_under(home)
        assert {"profile.db", "profile.db-wal"} <= {p.name for p in open_files}
        for path in open_files + files_under(bundle):
            data = path.read_bytes()
            for what, needle in secrets.items():
                assert needle not in data, f"{what} in plaintext in {path.name}"
    for path in files_under(home):  # and after close, once the WAL is checkpointed
        data = path.read_bytes()
        for what, needle in secrets.items():
            assert needle not in data, f"{what} in plaintext in {path.name}"


def test_no_log_record_carries_user_text_or_labels(
    classifier: Personalizer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    examples = [
        Example(f"{ex.text} {MARKER}", label=ex.label, metadata={"note": MARKER})
        for ex in topic_examples(6)
    ]
    classifier.add_examples("alice", examples)
    classifier.train("alice", TrainConfig(adapter=True, epochs=2))
    classifier.train(
        "alice", TrainConfig(adapter=True, epochs=2, seed=1)
    )  # a discarded checkpoint, logged
    classifier.predict("alice", [f"what about {MARKER}"])
    classifier.similar("alice", f"and {MARKER}")

    for record in caplog.records:
        assert MARKER not in record.getMessage()
        assert MARKER not in (record.exc_text or "")


def test_an_unknown_label_is_refused_without_echoing_it(classifier: Personalizer) -> None:
    with pytest.raises(InvalidInputError) as refused:
        classifier.add_examples("alice", [Example("text", label=MARKER)])
    assert MARKER not in str(refused.value)
    assert "labels" in str(refused.value)  # it still says what is accepted
