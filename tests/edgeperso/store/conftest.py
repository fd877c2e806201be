"""Shared fixtures: a real file-backed keystore, fast keys, and loaders for the scripts."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import keyring
import keyring.backend
import keyring.errors
import pytest

from edgeperso.store import PassphraseKey, RawKey, Store

ROOT = Path(__file__).resolve().parents[3]


class FileKeyring(keyring.backend.KeyringBackend):
    """A real keyring backend that keeps its entries in a JSON file (tests only)."""

    priority = 1  # type: ignore[assignment]

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def _load(self) -> dict[str, str]:
        return json.loads(self.path.read_text()) if self.path.exists() else {}

    def get_password(self, service: str, username: str) -> str | None:
        return self._load().get(f"{service}\0{username}")

    def set_password(self, service: str, username: str, password: str) -> None:
        entries = self._load()
        entries[f"{service}\0{username}"] = password
        self.path.write_text(json.dumps(entries))

    def delete_password(self, service: str, username: str) -> None:
        entries = self._load()
        if entries.pop(f"{service}\0{username}", None) is None:
            raise keyring.errors.PasswordDeleteError("no such entry")
        self.path.write_text(json.dumps(entries))


@pytest.fixture
def file_keyring(tmp_path: Path) -> Iterator[FileKeyring]:
    previous = keyring.get_keyring()
    backend = FileKeyring(tmp_path / "keyring.json")
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


@pytest.fixture
def key() -> RawKey:
    return RawKey(b"\x07" * 32)


@pytest.fixture
def fast_passphrase() -> PassphraseKey:
    # Minimal Argon2id cost: these tests check behaviour, not brute-force resistance.
    return PassphraseKey("correct horse battery staple", memory_kib=1024, iterations=1, lanes=1)


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "profile.db"


@pytest.fixture
def store(store_path: Path, key: RawKey) -> Iterator[Store]:
    with Store.open(store_path, key) as opened:
        yield opened


def load_script(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
