"""What a user teaches the model stays sealed: no plaintext text, adapter weight or key
reaches the disk, and no log record or error message carries user text, labels or keys."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edgeperso import InvalidInputError
from edgeperso.runtime import Personalizer, TrainConfig
from edgeperso.runtime._params import from_bytes
from edgeperso.runtime._personalizer import BUNDLE_KEY
from edgeperso.store import Example, RawKey, Store, _crypto
from tests.edgeperso.runtime.conftest import topic_examples

MARKER = "zqxv-private-7f3a9c"


def files_under(*roots: Path) -> list[Path]:
    return [p for root in roots for p in sorted(root.rglob("*")) if p.is_file()]


def _record_keys(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every key the store wraps, unwraps or derives, as it is in memory."""
    seen: list[bytes] = []

    def recording(function: Callable[..., bytes], result: int | None) -> Callable[..., bytes]:
        def wrapper(*args: bytes) -> bytes:
            out = function(*args)
            seen.append(out if result is None else args[result])
            return out

        return wrapper

    monkeypatch.setattr(_crypto, "wrap_key", recording(_crypto.wrap_key, 1))  # the key wrapped
    monkeypatch.setattr(_crypto, "unwrap_key", recording(_crypto.unwrap_key, None))
    monkeypatch.setattr(_crypto, "subkey", recording(_crypto.subkey, None))
    return seen


def test_texts_weights_and_keys_never_reach_the_disk_in_plaintext(
    tiny_bundles: dict[str, Path],
    tmp_path: Path,
    key: RawKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = _record_keys(monkeypatch)
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
        del weights[BUNDLE_KEY]  # the bundle's graph hashes: in its manifest, not user data
        # The key-encryption key, the store secret, its subkeys and every user data key.
        assert len(set(keys)) >= 3
        secrets = {"marker": MARKER.encode(), "kek": key.key}
        secrets |= {f"key {i}": k for i, k in enumerate(keys)}
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


def test_no_log_record_carries_user_text_labels_or_keys(
    classifier: Personalizer,
    key: RawKey,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    keys = _record_keys(monkeypatch)  # alice's data key, made when her first example is stored
    examples = [
        Example(f"{ex.text} {MARKER}", label=ex.label, metadata={"note": MARKER})
        for ex in topic_examples(6)
    ]
    classifier.add_examples("alice", examples)
    steps: list[int] = []
    # Cancelled after two adapter steps: its checkpoint stays for the next call to resume ...
    classifier.train(
        "alice",
        TrainConfig(adapter=True, epochs=4),
        on_progress=lambda p: steps.append(p.step),
        cancel=lambda: len(steps) >= 2,
    )
    # ... which has other settings, so it discards the checkpoint, and logs that.
    classifier.train("alice", TrainConfig(adapter=True, epochs=2, seed=1))
    classifier.predict("alice", [f"what about {MARKER}"])
    classifier.similar("alice", f"and {MARKER}")

    messages = [r.getMessage() for r in caplog.records if r.name.startswith("edgeperso")]
    assert any("discarding a checkpoint" in m for m in messages)  # the scan below has lines
    assert keys
    secrets = [MARKER, *(k.hex() for k in [key.key, *keys]), *(repr(k) for k in [key.key, *keys])]
    for record in caplog.records:
        text = record.getMessage() + (record.exc_text or "")
        assert not [s for s in secrets if s in text]


def test_an_unknown_label_is_refused_without_echoing_it(classifier: Personalizer) -> None:
    with pytest.raises(InvalidInputError) as refused:
        classifier.add_examples("alice", [Example("text", label=MARKER)])
    assert MARKER not in str(refused.value)
    assert "labels" in str(refused.value)  # it still says what is accepted


ORT_TELEMETRY = Path(".cache", "Microsoft", "DeveloperTools", ".onnxruntime")
# onnxruntime records nothing where one of these says it runs in CI (names from its library):
# the children run without them, as an app on a user's machine would.
CI_MARKERS = {
    "CI",
    "TF_BUILD",
    "GITHUB_ACTIONS",
    "GITLAB_CI",
    "CIRCLECI",
    "TRAVIS",
    "JENKINS_URL",
    "CODEBUILD_BUILD_ID",
    "BUILDKITE",
    "TEAMCITY_VERSION",
    "APPVEYOR",
    "BITBUCKET_BUILD_NUMBER",
}
USE_THE_RUNTIME = """
import sys
from edgeperso import Personalizer, RawKey, Store
with Store.open(sys.argv[2], RawKey(bytes(32))) as store:
    print(Personalizer.open(sys.argv[1], store).predict("alice", ["a text"])[0].label)
"""


def _run_with_home(home: Path, bundle: Path, **env: str) -> list[Path]:
    """Open a Personalizer and predict in a fresh interpreter whose HOME is `home`; the
    files onnxruntime's telemetry left there (a device id, an event queue)."""
    home.mkdir()
    child_env = {
        k: v for k, v in os.environ.items() if k != "ORT_DISABLE_TELEMETRY" and k not in CI_MARKERS
    }
    child_env |= {"HOME": str(home), **env}
    subprocess.run(
        [sys.executable, "-c", USE_THE_RUNTIME, str(bundle), str(home / "profile.db")],
        env=child_env,
        check=True,
        capture_output=True,
    )
    return files_under(home / ORT_TELEMETRY)  # none when the folder was never made


def test_onnxruntime_telemetry_is_off_unless_the_app_turns_it_on(
    tiny_bundles: dict[str, Path], tmp_path: Path
) -> None:
    """onnxruntime's Linux and macOS wheels keep a device id and queue usage events for
    upload by default; edgeperso starts onnxruntime with them off. An app that sets
    ORT_DISABLE_TELEMETRY itself keeps its choice, which is also the control: with it at 0
    the same run leaves telemetry files, so the first assertion can fail."""
    bundle = tiny_bundles["classification"]
    assert _run_with_home(tmp_path / "default", bundle) == []
    recorded = _run_with_home(tmp_path / "opted-in", bundle, ORT_DISABLE_TELEMETRY="0")
    if not recorded:
        pytest.skip("this onnxruntime build records no telemetry: nothing to turn off")
    assert {p.name for p in recorded} >= {"deviceid"}
