"""A full disk is a StorageError and keeps every earlier commit (real tmpfs, no mocks)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.edgeperso.store.conftest import ROOT

CHILD = textwrap.dedent(
    """
    import os, sys
    from edgeperso import StorageError
    from edgeperso.store import Example, RawKey, Store
    path = os.path.join(sys.argv[1], "full.db")
    key = RawKey(b"\\x07" * 32)
    store = Store.open(path, key)
    acked = []
    try:
        for i in range(100_000):
            store.add_examples("alice", [Example(os.urandom(2000).hex())])
            acked.append(i)
    except StorageError as exc:
        print("full after", len(acked), "-", exc)
    store.close()
    # Reopen from the full disk and read everything back.
    with Store.open(path, key) as again:
        assert len(again.examples("alice")) == len(acked), "lost a commit"
        again.integrity_check()
    print("intact")
    """
)


def test_disk_full_is_a_storage_error_and_loses_nothing(tmp_path: Path) -> None:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        pytest.skip("needs Linux unshare(1) to mount a private tiny tmpfs")
    mount = tmp_path / "tiny"
    mount.mkdir()
    script = (
        f'mount -t tmpfs -o size=600k tmpfs "{mount}" && exec "{sys.executable}" -c "$0" "{mount}"'
    )
    result = subprocess.run(
        ["unshare", "--mount", "sh", "-c", script, CHILD],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if "mount" in result.stderr and result.returncode != 0 and "full after" not in result.stdout:
        pytest.skip(f"cannot mount a private tmpfs here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "full after" in result.stdout
    assert "intact" in result.stdout
