"""Key-encryption-key (KEK) providers: OS keystore, passphrase, or a raw key from the host.

A provider makes a fresh KEK when a store (or backup) is created and returns the public
parameters needed to get the same KEK again; the store keeps those parameters in its header.
No provider ever writes key material anywhere but the OS keystore.
"""

from __future__ import annotations

import base64
import logging
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import keyring
import keyring.errors

from edgeperso._errors import InvalidInputError, KeyUnavailableError, WrongKeyError
from edgeperso.store import _crypto

__all__ = ["KeyProvider", "KeyringKey", "PassphraseKey", "RawKey", "retire"]

logger = logging.getLogger(__name__)

# Bounds on KDF parameters read back from a header, so a damaged header cannot make
# opening allocate gigabytes or spin for hours before failing.
_MAX_MEMORY_KIB = 1 << 20
_MAX_ITERATIONS = 64
_MAX_LANES = 64


class KeyProvider(ABC):
    """Where the key-encryption key comes from. Subclasses: KeyringKey, PassphraseKey, RawKey."""

    @abstractmethod
    def new_kek(self) -> tuple[bytes, dict[str, Any]]:
        """Make a KEK for a new store; return it with the parameters to store in the header."""

    @abstractmethod
    def kek(self, params: Mapping[str, Any]) -> bytes:
        """Get the KEK described by header parameters written by `new_kek`."""


def _expect_kind(params: Mapping[str, Any], kind: str) -> None:
    stored = params.get("kind")
    if stored != kind:
        raise WrongKeyError(
            f"this store's key comes from a {stored!r} provider, not {kind!r}; "
            "open it with the provider it was created or last rotated with"
        )


@dataclass(frozen=True)
class RawKey(KeyProvider):
    """A 32-byte key the host app manages itself (for example from its own secure enclave)."""

    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or len(self.key) != _crypto.KEY_BYTES:
            raise InvalidInputError("RawKey needs exactly 32 bytes")

    def new_kek(self) -> tuple[bytes, dict[str, Any]]:
        return self.key, {"kind": "raw"}

    def kek(self, params: Mapping[str, Any]) -> bytes:
        _expect_kind(params, "raw")
        return self.key


@dataclass(frozen=True)
class PassphraseKey(KeyProvider):
    """A KEK stretched from a passphrase with Argon2id (scrypt where Argon2id is missing).

    The cost parameters apply when a store is created or re-keyed; opening uses the ones
    recorded in the header. The defaults (64 MiB, 3 passes, 4 lanes) took
    440 ms to open a store on a loaded 2-core AMD EPYC (docs/store.md); lower them only for
    tests.
    """

    passphrase: str = field(repr=False)
    memory_kib: int = 64 * 1024
    iterations: int = 3
    lanes: int = 4

    def __post_init__(self) -> None:
        if not isinstance(self.passphrase, str) or not self.passphrase:
            raise InvalidInputError("PassphraseKey needs a non-empty str passphrase")
        if any("\ud800" <= c <= "\udfff" for c in self.passphrase):
            raise InvalidInputError(
                "the passphrase holds a lone surrogate, which no keyboard types"
            )
        _check_cost(self.memory_kib, self.iterations, self.lanes)

    def _secret(self) -> bytes:
        # NFC so the same passphrase typed on two keyboards gives the same bytes.
        return unicodedata.normalize("NFC", self.passphrase).encode("utf-8")

    def new_kek(self) -> tuple[bytes, dict[str, Any]]:
        salt = _crypto.random_bytes(16)
        params: dict[str, Any] = {"kind": "passphrase", "salt": salt.hex()}
        if _crypto.argon2id_available():
            params.update(
                kdf="argon2id",
                memory_kib=self.memory_kib,
                iterations=self.iterations,
                lanes=self.lanes,
            )
        else:
            logger.info("Argon2id unavailable in this OpenSSL; using scrypt")
            params.update(kdf="scrypt", n=_scrypt_n(self.memory_kib), r=8, p=1)
        return self.kek(params), params

    def kek(self, params: Mapping[str, Any]) -> bytes:
        _expect_kind(params, "passphrase")
        try:
            salt = bytes.fromhex(params["salt"])
            if params["kdf"] == "argon2id":
                memory, iterations, lanes = (
                    int(params["memory_kib"]),
                    int(params["iterations"]),
                    int(params["lanes"]),
                )
                _check_cost(memory, iterations, lanes)
                return _crypto.derive_argon2id(
                    self._secret(), salt, memory_kib=memory, iterations=iterations, lanes=lanes
                )
            if params["kdf"] == "scrypt":
                n, r, p = int(params["n"]), int(params["r"]), int(params["p"])
                if n > _scrypt_n(_MAX_MEMORY_KIB) or not 1 <= r <= 16 or not 1 <= p <= 16:
                    raise ValueError("scrypt cost out of range")
                return _crypto.derive_scrypt(self._secret(), salt, n=n, r=r, p=p)
        except (KeyError, TypeError, ValueError, InvalidInputError):
            pass
        raise WrongKeyError(
            "the passphrase parameters in the header are unreadable; the header is damaged"
        )


def _check_cost(memory_kib: int, iterations: int, lanes: int) -> None:
    for name, value in (("memory_kib", memory_kib), ("iterations", iterations), ("lanes", lanes)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidInputError(f"passphrase cost {name} must be an int")
    ok = (
        8 * lanes <= memory_kib <= _MAX_MEMORY_KIB
        and 1 <= iterations <= _MAX_ITERATIONS
        and 1 <= lanes <= _MAX_LANES
    )
    if not ok:
        raise InvalidInputError(
            f"passphrase cost out of range: memory_kib in [8*lanes, {_MAX_MEMORY_KIB}], "
            f"iterations in [1, {_MAX_ITERATIONS}], lanes in [1, {_MAX_LANES}]"
        )


def _scrypt_n(memory_kib: int) -> int:
    # scrypt uses 128 * r * n bytes; pick the power of two that fits the same memory budget.
    n = 2
    while 128 * 8 * n * 2 <= memory_kib * 1024:
        n *= 2
    return n


@dataclass(frozen=True)
class KeyringKey(KeyProvider):
    """A random KEK kept in the OS keystore (Keychain, Credential Locker, Secret Service).

    Fails closed with KeyUnavailableError when no usable keystore exists: the KEK is never
    written anywhere else. Each KEK gets its own entry ``<profile>:kek:<id>`` so a rotation
    can add the new entry before the store switches to it.
    """

    service: str
    profile: str

    def __post_init__(self) -> None:
        for name in ("service", "profile"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise InvalidInputError(f"KeyringKey.{name} must be a non-empty str")

    def new_kek(self) -> tuple[bytes, dict[str, Any]]:
        _require_keystore()
        kek = _crypto.random_key()
        kek_id = _crypto.random_bytes(8).hex()
        entry = _entry(self.profile, kek_id)
        value = base64.b64encode(kek).decode("ascii")
        try:
            keyring.set_password(self.service, entry, value)
            stored = keyring.get_password(self.service, entry)
        except keyring.errors.KeyringError as exc:
            raise KeyUnavailableError(
                f"the OS keystore refused to store the key ({type(exc).__name__}); "
                "unlock it or open the store with a PassphraseKey"
            ) from None
        if stored != value:
            raise KeyUnavailableError(
                "the OS keystore did not keep the key; use a working keystore or a PassphraseKey"
            )
        return kek, {
            "kind": "keyring",
            "service": self.service,
            "profile": self.profile,
            "kek_id": kek_id,
        }

    def kek(self, params: Mapping[str, Any]) -> bytes:
        _expect_kind(params, "keyring")
        _require_keystore()
        if params.get("service") != self.service or params.get("profile") != self.profile:
            raise WrongKeyError(
                "this store's key is under another keystore service or profile; "
                "open it with the KeyringKey it was created with"
            )
        try:
            value = keyring.get_password(self.service, _entry(self.profile, str(params["kek_id"])))
        except keyring.errors.KeyringError as exc:
            raise KeyUnavailableError(
                f"the OS keystore could not be read ({type(exc).__name__}); unlock it and retry"
            ) from None
        if value is None:
            raise KeyUnavailableError(
                "the OS keystore has no key for this store (deleted, or a different device "
                "account); restore the store from a backup made with a PassphraseKey"
            )
        try:
            kek = base64.b64decode(value, validate=True)
        except ValueError:
            kek = b""
        if len(kek) != _crypto.KEY_BYTES:
            raise WrongKeyError("the keystore entry for this store is not a 32-byte key")
        return kek


def retire(params: Mapping[str, Any]) -> None:
    """Destroy what a provider holds for a KEK the store no longer uses (keystore entries)."""
    if params.get("kind") != "keyring":
        return
    try:
        keyring.delete_password(
            str(params["service"]), _entry(str(params["profile"]), str(params["kek_id"]))
        )
    except keyring.errors.PasswordDeleteError:
        pass  # already gone: the goal state
    except keyring.errors.KeyringError:
        logger.warning("could not delete a retired key from the OS keystore; will retry on open")
        raise


def _entry(profile: str, kek_id: str) -> str:
    return f"{profile}:kek:{kek_id}"


def _require_keystore() -> None:
    from keyring.backends import fail, null

    backend = keyring.get_keyring()
    if isinstance(backend, fail.Keyring | null.Keyring):
        raise KeyUnavailableError(
            f"no usable OS keystore ({type(backend).__module__}); the store never keeps keys "
            "in plaintext, so open it with a PassphraseKey or a RawKey instead"
        )
