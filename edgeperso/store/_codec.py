"""Record types and their byte encodings (format version 1; never pickle).

* Example, Feedback, state values, user manifests: canonical UTF-8 JSON
  (sorted keys, no NaN/Infinity) of an object with a ``"v": 1`` field.
* Embedding vectors: ``b"EPA1" || ndim (u8) || dims (u32 LE each) || float32 LE data``.
* Blobs: the caller's bytes, unchanged.

Associated data for a sealed value: ``b"edgeperso.store/1"`` then each of table, user
pseudonym, record id and field as an 8-byte big-endian length and the bytes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, TypeAlias

import numpy as np

from edgeperso._errors import InvalidInputError, TamperedError

__all__ = [
    "FEDERATION_ACCOUNT",
    "FORMAT_VERSION",
    "Example",
    "Feedback",
    "JSONValue",
    "ad",
    "check_json",
    "check_user",
    "decode_array",
    "decode_json",
    "encode_array",
    "encode_json",
    "example_from_json",
    "feedback_from_json",
]

FORMAT_VERSION = 1
_AD_PREFIX = b"edgeperso.store/1"
_ARRAY_MAGIC = b"EPA1"
_MAX_DIMS = 8

JSONValue: TypeAlias = bool | int | float | str | list["JSONValue"] | dict[str, "JSONValue"] | None
Label: TypeAlias = str | int | float | None


def ad(table: str, user: bytes, record: bytes, fieldname: str) -> bytes:
    t, f = table.encode(), fieldname.encode()
    return b"".join(
        (
            _AD_PREFIX,
            len(t).to_bytes(8, "big"),
            t,
            len(user).to_bytes(8, "big"),
            user,
            len(record).to_bytes(8, "big"),
            record,
            len(f).to_bytes(8, "big"),
            f,
        )
    )


def check_unicode(text: str, where: str) -> None:
    """A str that UTF-8 can store: no lone surrogates (which `json.loads` of "\\ud800", or
    bytes decoded with errors="surrogateescape", can produce)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(
            f"{where} holds a lone surrogate, which is not valid Unicode; decode its source "
            "with errors='replace'"
        ) from None


# The federation client's sealed state lives under this account of the store, beside the
# app's users (the runtime leaves it out of Personalizer.users() and refuses it as a user).
FEDERATION_ACCOUNT = "__edgeperso_federation__"


def check_user(user: object) -> str:
    if not isinstance(user, str) or not user or len(user) > 1024:
        raise InvalidInputError("user must be a non-empty str of at most 1024 characters")
    check_unicode(user, "user")
    return user


def check_json(value: object, where: str, depth: int = 0) -> None:
    """Reject what would not round-trip through canonical JSON (NaN, non-str keys, objects)."""
    if depth > 32:
        raise InvalidInputError(f"{where} is nested deeper than 32 levels")
    if isinstance(value, str):
        check_unicode(value, where)
        return
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if value.bit_length() > 13_000:  # ~3,900 digits: Python will not write more as text
            raise InvalidInputError(f"{where} holds an int too large to store")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInputError(f"{where} contains a non-finite float")
        return
    if isinstance(value, list | tuple):
        for item in value:
            check_json(item, where, depth + 1)
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidInputError(f"{where} has a non-str key")
            check_unicode(key, where)
            check_json(item, where, depth + 1)
        return
    raise InvalidInputError(f"{where} holds a {type(value).__name__}; only JSON values allowed")


def _finite(number: int | float) -> bool:
    """math.isfinite, False for an int too large for a float (rather than OverflowError)."""
    try:
        return math.isfinite(number)
    except OverflowError:
        return False


def _check_time(timestamp: object, where: str) -> None:
    if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
        raise InvalidInputError(f"{where}.timestamp must be seconds since the epoch (a number)")
    if not _finite(timestamp):
        raise InvalidInputError(f"{where}.timestamp must be finite (and fit a float)")


def _check_label(label: object, where: str) -> None:
    if isinstance(label, str):
        check_unicode(label, where)
        return
    if label is None:
        return
    if isinstance(label, bool) or not isinstance(label, int | float):
        raise InvalidInputError(f"{where} must be a str, a number, or None")
    if not _finite(label):
        raise InvalidInputError(f"{where} must be finite (got NaN, infinity or a huge int)")


def _frozen_metadata(metadata: object, where: str) -> Mapping[str, JSONValue]:
    if not isinstance(metadata, Mapping):
        raise InvalidInputError(f"{where}.metadata must be a mapping of str to JSON values")
    check_json(metadata, f"{where}.metadata")
    return MappingProxyType(dict(metadata))


@dataclass(frozen=True)
class Example:
    """A training example. `id` is assigned by the store; leave it None when adding."""

    text: str
    label: Label = None  # class label (str) or score (finite number)
    timestamp: float = 0.0  # seconds since the Unix epoch
    metadata: Mapping[str, JSONValue] = field(default_factory=dict)
    id: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise InvalidInputError("Example.text must be a str")
        check_unicode(self.text, "Example.text")
        _check_label(self.label, "Example.label")
        _check_time(self.timestamp, "Example")
        object.__setattr__(self, "metadata", _frozen_metadata(self.metadata, "Example"))

    def to_json(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "text": self.text,
            "label": self.label,
            "ts": self.timestamp,
            "meta": dict(self.metadata),
        }


@dataclass(frozen=True)
class Feedback:
    """A feedback event (thumbs up, correction, rating), optionally about an example."""

    event: str
    value: Label = None
    timestamp: float = 0.0
    example_id: int | None = None
    metadata: Mapping[str, JSONValue] = field(default_factory=dict)
    id: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.event, str) or not self.event:
            raise InvalidInputError("Feedback.event must be a non-empty str")
        check_unicode(self.event, "Feedback.event")
        _check_label(self.value, "Feedback.value")
        _check_time(self.timestamp, "Feedback")
        if self.example_id is not None and (
            isinstance(self.example_id, bool) or not isinstance(self.example_id, int)
        ):
            raise InvalidInputError("Feedback.example_id must be an int or None")
        object.__setattr__(self, "metadata", _frozen_metadata(self.metadata, "Feedback"))

    def to_json(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "event": self.event,
            "value": self.value,
            "ts": self.timestamp,
            "example": self.example_id,
            "meta": dict(self.metadata),
        }


def encode_json(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def decode_json(data: bytes) -> Any:
    """Decode authenticated JSON; a failure here means a bug or a forged key, not noise."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise TamperedError("an authenticated record is not valid JSON") from None
    if not isinstance(obj, dict) or obj.get("v") != FORMAT_VERSION:
        raise TamperedError("an authenticated record has an unknown format version")
    return obj


def example_from_json(obj: Mapping[str, Any], record_id: int) -> Example:
    try:
        return Example(obj["text"], obj["label"], obj["ts"], obj["meta"], record_id)
    except (KeyError, InvalidInputError):
        raise TamperedError("an authenticated example record is malformed") from None


def feedback_from_json(obj: Mapping[str, Any], record_id: int) -> Feedback:
    try:
        return Feedback(
            obj["event"], obj["value"], obj["ts"], obj["example"], obj["meta"], record_id
        )
    except (KeyError, InvalidInputError):
        raise TamperedError("an authenticated feedback record is malformed") from None


def encode_array(vector: object) -> bytes:
    try:
        arr = np.asarray(vector)
    except (ValueError, TypeError):  # ragged nested lists, mixed objects
        arr = np.empty(0, object)
    if arr.dtype.kind not in "fiu" or arr.ndim > _MAX_DIMS or max(arr.shape, default=0) >= 2**32:
        raise InvalidInputError(
            f"an embedding must be a real numeric array of at most {_MAX_DIMS} dims"
        )
    arr32 = np.ascontiguousarray(arr, dtype="<f4")
    if not np.isfinite(arr32).all():
        raise InvalidInputError("an embedding contains NaN or infinity (after float32 cast)")
    header = _ARRAY_MAGIC + struct.pack(f"<B{arr32.ndim}I", arr32.ndim, *arr32.shape)
    return header + arr32.tobytes()


def decode_array(data: bytes) -> np.ndarray:
    if data[:4] != _ARRAY_MAGIC or len(data) < 5:
        raise TamperedError("an authenticated embedding has an unknown format")
    ndim = data[4]
    end = 5 + 4 * ndim
    if ndim > _MAX_DIMS or len(data) < end:
        raise TamperedError("an authenticated embedding has a malformed header")
    shape = struct.unpack(f"<{ndim}I", data[5:end])
    if len(data) - end != 4 * math.prod(shape):
        raise TamperedError("an authenticated embedding has the wrong length for its shape")
    return np.frombuffer(data, dtype="<f4", offset=end).reshape(shape).copy()
