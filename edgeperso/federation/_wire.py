"""Tensors on the wire: the safetensors format, written and read with numpy alone.

Layout (https://huggingface.co/docs/safetensors): 8-byte little-endian header length N, then
N bytes of UTF-8 JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, optional
"__metadata__": {str: str}}, then the raw little-endian tensor bytes, packed in header order.
Any safetensors library in Kotlin, Swift or Rust reads and writes it; nothing is ever
unpickled. The decoder is strict: it rejects anything a well-behaved writer would not emit.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from edgeperso._errors import InvalidInputError

_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "I64": np.dtype("<i8"),
    "U8": np.dtype("u1"),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
MAX_HEADER_BYTES = 1 << 20


def encode_tensors(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> bytes:
    """Serialise named arrays (F32, F64, U32, I32, I64, U8) to safetensors bytes."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks: list[bytes] = []
    offset = 0
    for name, array in tensors.items():
        if name == "__metadata__" or not name:
            raise InvalidInputError(f"tensor name {name!r} is reserved or empty")
        data = np.ascontiguousarray(array)
        key = _NAMES.get(data.dtype.newbyteorder("<"))
        if key is None:
            raise InvalidInputError(f"tensor {name!r} has unsupported dtype {data.dtype}")
        raw = data.astype(_DTYPES[key], copy=False).tobytes()
        header[name] = {
            "dtype": key,
            "shape": list(data.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        chunks.append(raw)
        offset += len(raw)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # keeps tensor data 8-byte aligned, as the spec advises
    return struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks)


def decode_tensors(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse safetensors bytes into (tensors, metadata); InvalidInputError on any defect."""
    if len(data) < 8:
        raise InvalidInputError("tensor payload is shorter than its 8-byte header length")
    (length,) = struct.unpack("<Q", data[:8])
    if length > MAX_HEADER_BYTES or 8 + length > len(data):
        raise InvalidInputError("tensor payload header length is out of bounds")
    try:
        header = json.loads(data[8 : 8 + length].decode(), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInputError(f"tensor payload header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise InvalidInputError("tensor payload header must be a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise InvalidInputError("tensor payload __metadata__ must map strings to strings")
    body = memoryview(data)[8 + length :]
    tensors: dict[str, np.ndarray] = {}
    end_of_previous = 0
    for name, entry in sorted(header.items(), key=lambda item: _begin(item[0], item[1])):
        dtype, shape, begin, end = _entry(name, entry)
        count = math.prod(shape)  # Python integers: a huge shape cannot wrap around to 0
        if begin != end_of_previous or end - begin != count * dtype.itemsize or end > len(body):
            raise InvalidInputError(f"tensor {name!r} has inconsistent data offsets")
        tensors[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape).copy()
        end_of_previous = end
    if end_of_previous != len(body):
        raise InvalidInputError("tensor payload has trailing bytes no tensor accounts for")
    return tensors, dict(metadata)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(keys) != len(set(keys)):
        raise InvalidInputError("tensor payload header repeats a name")
    return dict(pairs)


def _begin(name: str, entry: Any) -> int:
    try:
        return int(entry["data_offsets"][0])
    except (TypeError, KeyError, IndexError, ValueError) as exc:
        raise InvalidInputError(f"tensor {name!r} has no valid data_offsets") from exc


def _entry(name: str, entry: Any) -> tuple[np.dtype[Any], tuple[int, ...], int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise InvalidInputError(f"tensor {name!r} entry must have dtype, shape, data_offsets")
    dtype = _DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise InvalidInputError(f"tensor {name!r} has unsupported dtype {entry['dtype']!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not (isinstance(shape, list) and all(_natural(d) for d in shape) and len(shape) <= 8):
        raise InvalidInputError(f"tensor {name!r} has an invalid shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_natural(o) for o in offsets)):
        raise InvalidInputError(f"tensor {name!r} has invalid data_offsets")
    return dtype, tuple(shape), offsets[0], offsets[1]


def _natural(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**40


def expect_tensors(
    tensors: Mapping[str, np.ndarray], expected: Mapping[str, tuple[str, tuple[int, ...]]]
) -> None:
    """Check names, dtypes (safetensors names) and shapes; NaN/Inf in floating tensors."""
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise InvalidInputError(
            f"tensor names differ from the expected ones: missing {missing}, unexpected {extra}"
        )
    for name, (dtype, shape) in expected.items():
        array = tensors[name]
        if array.dtype != _DTYPES[dtype] or array.shape != tuple(shape):
            raise InvalidInputError(
                f"tensor {name!r} is {_NAMES.get(array.dtype, array.dtype)}{list(array.shape)}, "
                f"expected {dtype}{list(shape)}"
            )
        if array.dtype.kind == "f" and not np.all(np.isfinite(array)):
            raise InvalidInputError(f"tensor {name!r} contains NaN or infinite values")
