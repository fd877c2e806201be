"""The federation client's state (secret keys, the pending update) is sealed at rest."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgeperso import InvalidInputError, RawKey, Store
from edgeperso.federation import SealedStateStore


def test_state_round_trips_survives_reopen_and_is_not_on_disk_in_plaintext(
    tmp_path: Path,
) -> None:
    key = RawKey(os.urandom(32))
    secret = b"x25519-private-key-material-" + os.urandom(16)
    with Store.open(tmp_path / "s.db", key=key) as store:
        state = SealedStateStore(store)
        state.put("federation.round", secret)
        assert state.get("federation.round") == secret
    with Store.open(tmp_path / "s.db", key=key) as store:
        state = SealedStateStore(store)
        assert state.get("federation.round") == secret
        state.delete("federation.round")
        assert state.get("federation.round") is None
    on_disk = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert secret not in on_disk
    assert b"x25519-private-key-material" not in on_disk


def test_state_keys_are_validated(tmp_path: Path) -> None:
    with (
        Store.open(tmp_path / "s.db", key=RawKey(os.urandom(32))) as store,
        pytest.raises(InvalidInputError, match="state key"),
    ):
        SealedStateStore(store).put("../escape", b"x")
