"""SIGKILL during writes, rotations and shreds never loses an acknowledged commit."""

from __future__ import annotations

from pathlib import Path

from tests.edgeperso.store.conftest import load_script

crash = load_script("store_crash")


def test_every_acknowledged_commit_survives_sigkill(tmp_path: Path) -> None:
    """The fast subset of scripts/store_crash.py (which runs >= 1,000 kills)."""
    result = crash.run(tmp_path, kills=20, seed=7)
    assert result["kills"] == 20
    assert result["acknowledged_ops"] > 20
