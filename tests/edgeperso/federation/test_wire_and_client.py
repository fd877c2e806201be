"""The wire format, the device's contribution, and the client's opt-in."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import load, save

from edgeperso import InvalidInputError, KeyUnavailableError, UnsupportedError
from edgeperso.federation import (
    FederatedParam,
    FederationClient,
    FederationConfig,
    MemoryStateStore,
    PersonaLayout,
    RoundTask,
)
from edgeperso.federation._update import build_contribution
from edgeperso.federation._wire import decode_tensors, encode_tensors, expect_tensors

_dtypes = st.sampled_from([np.float32, np.float64, np.uint32, np.int32, np.int64, np.uint8])
_arrays = _dtypes.flatmap(
    lambda d: hnp.arrays(d, hnp.array_shapes(min_dims=0, max_dims=3, max_side=4))
)
_names = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=8
).filter(lambda s: s != "__metadata__")


@given(st.dictionaries(_names, _arrays, max_size=4))
@settings(max_examples=60, deadline=None)
def test_tensors_round_trip_and_are_read_by_the_safetensors_library(
    tensors: dict[str, np.ndarray],
) -> None:
    encoded = encode_tensors(tensors, {"k": "v"})
    decoded, meta = decode_tensors(encoded)
    assert meta == {"k": "v"}
    for name, array in tensors.items():
        np.testing.assert_array_equal(decoded[name], array)
        assert decoded[name].dtype == array.dtype
    theirs = load(encoded)
    assert set(theirs) == set(tensors)
    if tensors:
        mine, _ = decode_tensors(save({k: np.ascontiguousarray(v) for k, v in tensors.items()}))
        assert set(mine) == set(tensors)


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_the_decoder_fails_on_garbage_only_with_a_typed_error(data: bytes) -> None:
    with contextlib.suppress(InvalidInputError):
        decode_tensors(data)


@given(st.binary(min_size=1, max_size=64), st.integers(0, 200))
@settings(max_examples=200)
def test_a_corrupted_payload_decodes_as_declared_or_fails_typed(
    noise: bytes, position: int
) -> None:
    good = bytearray(encode_tensors({"masked": np.arange(8, dtype=np.uint32)}))
    position %= len(good)
    good[position : position + len(noise)] = noise
    try:
        tensors, _ = decode_tensors(bytes(good))
        expect_tensors(tensors, {"masked": ("U32", (8,))})
    except InvalidInputError:
        pass


def test_a_truncated_payload_or_a_header_past_the_end_is_refused() -> None:
    good = encode_tensors({"masked": np.arange(8, dtype=np.uint32)})
    for bad in (good[:-1], good[:8], (len(good) * 2).to_bytes(8, "little") + good[8:]):
        with pytest.raises(InvalidInputError):
            decode_tensors(bad)


def test_wrong_dtype_shape_and_nan_are_named_in_the_error() -> None:
    with pytest.raises(InvalidInputError, match="expected U32"):
        expect_tensors({"masked": np.zeros(8, np.float32)}, {"masked": ("U32", (8,))})
    with pytest.raises(InvalidInputError, match="expected F32"):
        expect_tensors({"u": np.zeros(7, np.float32)}, {"u": ("F32", (8,))})
    with pytest.raises(InvalidInputError, match="NaN"):
        expect_tensors({"u": np.full(8, np.nan, np.float32)}, {"u": ("F32", (8,))})


@pytest.mark.parametrize("shape", [[2**32, 2**32], [2**20, 2**20, 2**24]])
def test_a_shape_whose_element_count_wraps_64_bits_is_refused_not_reshaped(
    shape: list[int],
) -> None:
    """2^64 elements wrap to 0 in int64, which would match empty data offsets."""
    header = json.dumps({"x": {"dtype": "U32", "shape": shape, "data_offsets": [0, 0]}}).encode()
    header += b" " * (-len(header) % 8)
    with pytest.raises(InvalidInputError, match="inconsistent data offsets"):
        decode_tensors(struct.pack("<Q", len(header)) + header)
    assert FederatedParam("x", tuple(shape), "global").size == 2**64


LAYOUT = PersonaLayout(
    (
        FederatedParam("bias", (3,), "global"),
        FederatedParam("lora_a", (4, 2), "global", trainable=False),
        FederatedParam("lora_b", (2, 3), "persona"),
    ),
    num_personas=2,
    summary_dim=2,
)


def _task(model: dict[str, Any] | None = None, **overrides: object) -> RoundTask:
    model = model or {
        "bias": np.zeros(3, np.float32),
        "lora_a": np.ones((4, 2), np.float32),
        "persona/0/lora_b": np.zeros((2, 3), np.float32),
        "persona/1/lora_b": np.zeros((2, 3), np.float32),
        "centroids": np.array([[1, 0], [0, 1]], np.float32),
    }
    data = {
        "round_id": "r",
        "model_version": 0,
        **LAYOUT.to_json(),
        "clip_norm": 1.0,
        "summary_clip": 1.0,
        "weight_cap": None,
        "secure": True,
        "fixed_point_scale": 2.0**20,
        **overrides,
    }
    return RoundTask.from_json(data, model)


def test_a_contribution_is_clipped_and_lands_only_in_the_devices_persona_block() -> None:
    task = _task()
    before = task.params_for(1)
    after = {**before, "bias": before["bias"] + 10, "lora_b": before["lora_b"] + 10}
    vector, persona = build_contribution(task, before, after, np.array([0.1, 0.9]), 5)
    assert persona == 1
    global_part, persona_part, summaries, weights = LAYOUT.unpack(vector)
    assert np.linalg.norm(np.concatenate([global_part, persona_part[1]])) == pytest.approx(1.0)
    assert not persona_part[0].any() and not summaries[0].any()
    np.testing.assert_array_equal(weights, [0, 1])


def test_user_level_parameters_cannot_be_sent() -> None:
    task = _task()
    before = {**task.params_for(0), "user_lora_b": np.zeros(3)}
    with pytest.raises(InvalidInputError, match="user-level parameters never leave the device"):
        build_contribution(task, before, before, np.zeros(2), 1)


def test_a_changed_frozen_lora_a_is_refused() -> None:
    task = _task()
    before = task.params_for(0)
    after = {**before, "lora_a": before["lora_a"] * 2}
    with pytest.raises(InvalidInputError, match="frozen"):
        build_contribution(task, before, after, np.zeros(2), 1)


def test_examples_weight_the_contribution_up_to_the_cap() -> None:
    task = _task(weight_cap=10.0)
    before = task.params_for(0)
    vector, _ = build_contribution(task, before, before, np.array([1.0, 0.0]), 5)
    assert LAYOUT.unpack(vector)[3][0] == pytest.approx(0.5)


def test_nothing_is_sent_without_opt_in() -> None:
    requests: list[httpx.Request] = []
    transport = httpx.MockTransport(lambda r: requests.append(r) or httpx.Response(500))
    config = FederationConfig("http://127.0.0.1:9", "app", "key")  # opt_in defaults to False
    with FederationClient(config, MemoryStateStore(), transport=transport) as client:
        with pytest.raises(UnsupportedError, match="opt_in"):
            client.check_in()
        assert client.resume() is None
    assert requests == []


def test_a_device_the_coordinator_no_longer_knows_enrols_again_when_the_app_asks() -> None:
    """The coordinator's database was replaced: the saved credential is unknown there."""
    tokens, known = iter(["old", "new"]), {"Bearer d.new"}

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/devices":
            return httpx.Response(201, json={"device_id": "d", "token": next(tokens)})
        if request.headers["Authorization"] in known:
            return httpx.Response(204)
        problem = {"error": "unauthenticated", "detail": "unknown device credential; enrol again"}
        return httpx.Response(401, json=problem)

    config = FederationConfig("https://coordinator", "app", "key", opt_in=True)
    transport = httpx.MockTransport(answer)
    with FederationClient(config, MemoryStateStore(), transport=transport) as client:
        with pytest.raises(KeyUnavailableError, match=r"FederationClient\.enrol\(\)"):
            client.check_in()
        client.enrol()
        assert client.check_in() is None  # no round open, and the new credential is accepted


def test_a_missing_or_unreadable_ca_bundle_is_named_in_a_typed_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate")
    for path in (tmp_path / "missing.pem", garbage):
        config = FederationConfig("https://c", "app", "key", opt_in=True, verify_tls=str(path))
        with pytest.raises(InvalidInputError, match=path.name):
            FederationClient(config, MemoryStateStore())


def test_a_layout_or_model_of_the_wrong_kind_is_a_typed_error() -> None:
    with pytest.raises(InvalidInputError, match="invalid parameter layout"):
        PersonaLayout.from_json({**LAYOUT.to_json(), "num_personas": float("inf")})
    with pytest.raises(InvalidInputError, match="numpy arrays"):
        _task({"bias": [0.0, 0.0, 0.0], "centroids": [[1.0, 0.0], [0.0, 1.0]]})
