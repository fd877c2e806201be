"""`edgeperso train`: one user of an existing encrypted store, trained from the command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgeperso._cli import main
from edgeperso.runtime import Personalizer
from edgeperso.store import PassphraseKey, RawKey, Store
from tests.edgeperso.runtime.conftest import topic_examples

PASSPHRASE = "correct horse battery staple"
# `edgeperso train` that writes one line to stderr at its first adapter step, so that a test
# signals it mid-training rather than after a guessed sleep. Training itself is unchanged.
REPORTS_ITS_FIRST_STEP = """
import sys
from edgeperso._cli import main
from edgeperso.runtime import Personalizer

train = Personalizer.train

def reporting(self, user, config=None, *, on_progress=None, cancel=None):
    def progress(p):
        if p.step == 1:
            print("adapter step 1", file=sys.stderr, flush=True)
        if on_progress is not None:
            on_progress(p)
    return train(self, user, config, on_progress=progress, cancel=cancel)

Personalizer.train = reporting
sys.exit(main())
"""
CHEAP = {"memory_kib": 1024, "iterations": 1, "lanes": 1}  # test-only Argon2id cost


@pytest.fixture
def profile(tmp_path: Path, tiny_bundles: dict[str, Path]) -> Path:
    """A passphrase store where the app has stored alice's examples and nothing else."""
    path = tmp_path / "profile.db"
    with Store.open(path, PassphraseKey(PASSPHRASE, **CHEAP)) as store:
        # Swapped labels, as the runtime tests use: the shared model cannot already be right.
        Personalizer.open(tiny_bundles["classification"], store).add_examples(
            "alice", topic_examples(12, pets="b", markets="a")
        )
    return path


def run(profile: Path, bundle: Path, *extra: str) -> int:
    return main(["train", str(profile), str(bundle), "alice", "-q", *extra])


def test_train_trains_the_user_and_the_app_then_serves_the_result(
    profile: Path,
    tiny_bundles: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("EP_PASS", PASSPHRASE)
    bundle = tiny_bundles["classification"]
    assert run(profile, bundle, "--passphrase-env", "EP_PASS", "--max-seconds", "30") == 0
    out = capsys.readouterr().out
    assert out.startswith("user alice: kept personal") and "24 examples" in out, out
    with Store.open(profile, PassphraseKey(PASSPHRASE, **CHEAP)) as store:
        model = Personalizer.open(bundle, store)
        # the app serves what the command trained: alice's labels, not the shared model's
        texts = [e.text for e in topic_examples(3)]
        assert [p.label for p in model.predict("alice", texts)] == ["b", "a"] * 3
        assert [p.label for p in model.predict("nobody", texts)] != ["b", "a"] * 3


@pytest.mark.parametrize(
    ("env", "extra", "message"),
    [
        ({}, ["--passphrase-env", "EP_PASS"], "$EP_PASS is not set or empty"),
        ({"EP_PASS": "wrong"}, ["--passphrase-env", "EP_PASS"], "does not open this store"),
        ({"EP_KEY": "zz"}, ["--key-env", "EP_KEY"], "must hold 64 hex digits"),
        ({"EP_KEY": os.urandom(32).hex()}, ["--key-env", "EP_KEY"], "from a 'passphrase' provider"),
    ],
)
def test_a_missing_or_wrong_secret_exits_2_and_leaves_the_store_as_it_was(
    profile: Path,
    tiny_bundles: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    env: dict[str, str],
    extra: list[str],
    message: str,
) -> None:
    monkeypatch.delenv("EP_PASS", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    before = profile.read_bytes()
    assert run(profile, tiny_bundles["classification"], *extra) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeperso train: error: ") and message in err
    assert profile.read_bytes() == before


def test_no_store_at_the_path_is_an_error_and_none_is_created(
    tmp_path: Path,
    tiny_bundles: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("EP_KEY", RawKey(os.urandom(32)).key.hex())
    missing = tmp_path / "nobody.db"
    assert run(missing, tiny_bundles["classification"], "--key-env", "EP_KEY") == 2
    assert "no store exists at this path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_secret_on_the_command_line_is_not_an_option(tiny_bundles: dict[str, Path]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["train", "x.db", str(tiny_bundles["classification"]), "alice", "--key", "00"])
    assert exited.value.code == 2


def test_ctrl_c_stops_training_at_the_next_step_and_the_next_run_goes_on(
    profile: Path,
    tiny_bundles: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A real SIGINT to a real process, once its adapter stage has taken a step and has far
    more to go."""
    command = [
        sys.executable,
        "-c",
        REPORTS_ITS_FIRST_STEP,
        "train",
        str(profile),
        str(tiny_bundles["classification"]),
        "alice",
        "--passphrase-env",
        "EP_PASS",
        "--adapter",
        "--epochs",
        "100000",
        "--max-seconds",
        "300",
        "-q",
    ]
    env = {**os.environ, "EP_PASS": PASSPHRASE}
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stderr is not None
        seen: list[str] = []  # warnings may come first; "" is the end of the stream
        while not seen or seen[-1] not in ("adapter step 1\n", ""):
            seen.append(proc.stderr.readline())  # blocks until a line or the child's exit
        assert seen[-1] == "adapter step 1\n", "".join(seen)
        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert time.monotonic() - started < 15  # the next step, a held-out score, a checkpoint
    assert ", cancelled" in out and "user alice: kept " in out
    # the next run goes on from the checkpoint, here under a shorter time budget
    monkeypatch.setenv("EP_PASS", PASSPHRASE)
    assert main([*command[3:-3], "--max-seconds", "2", "-q"]) == 0
    assert "max_seconds; resumed from step " in capsys.readouterr().out


def test_ctrl_c_in_the_feature_pass_exits_130_and_stores_nothing(
    tmp_path: Path, tiny_bundles: dict[str, Path]
) -> None:
    """A real SIGINT as `edgeperso train` starts its pass of the shared model over the
    user's examples (the lock file appears when training starts; the pass over 2,000
    examples takes seconds here): exit 130, and the store holds what it held before."""
    path = tmp_path / "profile.db"
    bundle = tiny_bundles["classification"]
    with Store.open(path, PassphraseKey(PASSPHRASE, **CHEAP)) as store:
        Personalizer.open(bundle, store).add_examples("alice", topic_examples(1000))
    before = path.read_bytes()
    command = [
        sys.executable,
        "-c",
        "import sys; from edgeperso._cli import main; sys.exit(main())",
        "train",
        str(path),
        str(bundle),
        "alice",
        "--passphrase-env",
        "EP_PASS",
        "-q",
    ]
    env = {**os.environ, "EP_PASS": PASSPHRASE}
    locks = path.with_name(path.name + ".locks")
    with subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) as proc:
        deadline = time.monotonic() + 60
        while not (locks.is_dir() and any(locks.iterdir())):
            assert proc.poll() is None and time.monotonic() < deadline, "training never started"
            time.sleep(0.005)
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "cancelled before anything was stored" in out
    assert path.read_bytes() == before
