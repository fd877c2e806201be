"""The store's own seal/open wrappers against known answers, and their binding properties."""

from __future__ import annotations

from pathlib import Path

import cryptography_vectors
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeperso import TamperedError, WrongKeyError
from edgeperso.store import _crypto
from edgeperso.store._codec import ad

VECTORS = Path(cryptography_vectors.__file__).parent / "ciphers" / "AES" / "GCM"


def _nist_gcm(name: str) -> list[dict[str, str]]:
    """256-bit-key, 96-bit-IV, 128-bit-tag cases from a NIST CAVP .rsp file."""
    cases, current, section = [], {}, {}
    for raw in (VECTORS / name).read_text().splitlines():
        line = raw.strip()
        if line.startswith("[") and "=" in line:
            k, v = line.strip("[]").split("=")
            section[k.strip()] = v.strip()
        elif line.startswith("Count"):
            current = {"fail": ""}
            cases.append(current)
        elif line == "FAIL":
            current["fail"] = "1"
        elif "=" in line and current is not None:
            k, v = line.split("=", 1)
            current[k.strip()] = v.strip()
            current["ivlen"], current["taglen"] = (
                section.get("IVlen", ""),
                section.get("Taglen", ""),
            )
    return [c for c in cases if c.get("ivlen") == "96" and c.get("taglen") == "128"]


def _sealed(case: dict[str, str]) -> bytes:
    return b"\x01" + bytes.fromhex(case["IV"]) + bytes.fromhex(case["CT"] + case["Tag"])


def test_open_accepts_and_rejects_nist_gcm_decrypt_vectors() -> None:
    cases = _nist_gcm("gcmDecrypt256.rsp")
    assert len(cases) > 100
    assert any(c["fail"] for c in cases)
    for case in cases:
        key = _crypto.SealingKey(bytes.fromhex(case["Key"]))
        if case["fail"]:
            with pytest.raises(TamperedError):
                key.open(_sealed(case), bytes.fromhex(case["AAD"]))
        else:
            assert key.open(_sealed(case), bytes.fromhex(case["AAD"])) == bytes.fromhex(case["PT"])


def test_open_recovers_nist_gcm_encrypt_vectors() -> None:
    cases = _nist_gcm("gcmEncryptExtIV256.rsp")
    assert len(cases) > 100
    for case in cases:
        key = _crypto.SealingKey(bytes.fromhex(case["Key"]))
        assert key.open(_sealed(case), bytes.fromhex(case["AAD"])) == bytes.fromhex(case["PT"])


def test_seal_then_open_with_other_associated_data_fails() -> None:
    key = _crypto.SealingKey(_crypto.random_key())
    sealed = key.seal(b"secret", ad("examples", b"u1", b"\0" * 8, "body"))
    for other in (
        ad("feedback", b"u1", b"\0" * 8, "body"),
        ad("examples", b"u2", b"\0" * 8, "body"),
        ad("examples", b"u1", b"\0" * 7 + b"\1", "body"),
        ad("examples", b"u1", b"\0" * 8, "meta"),
    ):
        with pytest.raises(TamperedError):
            key.open(sealed, other)


def test_associated_data_parts_cannot_be_shifted() -> None:
    assert ad("ab", b"c", b"", "x") != ad("a", b"bc", b"", "x")


@settings(max_examples=50, deadline=None)
@given(plaintext=st.binary(max_size=256), aad=st.binary(max_size=64))
def test_seal_round_trips_and_nonces_never_repeat(plaintext: bytes, aad: bytes) -> None:
    key = _crypto.SealingKey(b"\x05" * 32)
    sealed = [key.seal(plaintext, aad) for _ in range(64)]
    assert len({s[1:13] for s in sealed}) == 64
    assert all(key.open(s, aad) == plaintext for s in sealed)
    assert len(sealed[0]) == len(plaintext) + _crypto.SEAL_OVERHEAD


@settings(max_examples=50, deadline=None)
@given(position=st.integers(0, 60), bit=st.integers(0, 7))
def test_any_bit_flip_in_a_sealed_value_is_detected(position: int, bit: int) -> None:
    key = _crypto.SealingKey(b"\x05" * 32)
    sealed = bytearray(key.seal(b"x" * 32, b"ad"))
    sealed[position % len(sealed)] ^= 1 << bit
    with pytest.raises(TamperedError):
        key.open(bytes(sealed), b"ad")


def test_unwrap_with_the_wrong_kek_is_a_wrong_key_error() -> None:
    wrapped = _crypto.wrap_key(b"\x01" * 32, b"\x02" * 32, b"slot")
    assert _crypto.unwrap_key(b"\x01" * 32, wrapped, b"slot") == b"\x02" * 32
    with pytest.raises(WrongKeyError):
        _crypto.unwrap_key(b"\x03" * 32, wrapped, b"slot")
    with pytest.raises(WrongKeyError):
        _crypto.unwrap_key(b"\x01" * 32, wrapped, b"other slot")


def test_only_the_crypto_module_of_the_store_imports_hazmat() -> None:
    package = Path(_crypto.__file__).parent
    importers = {p.name for p in package.rglob("*.py") if "cryptography.hazmat" in p.read_text()}
    assert importers == {"_crypto.py"}
