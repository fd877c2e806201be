"""Secure-aggregation arithmetic and the device state machine, without a network."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeperso import IntegrityError, InvalidInputError, TamperedError
from edgeperso.federation import secagg_params
from edgeperso.federation._crypto import (
    MaskExpander,
    agree,
    agree_many,
    check_public_key,
    prg_uint32,
)
from edgeperso.federation._protocol import SecAggClient, unmask_sum
from edgeperso.federation._secagg import (
    add_masks,
    decode_fixed_point,
    encode_fixed_point,
    fixed_point_scale,
    neighbours_of,
    shamir_combine,
    shamir_split,
)


@given(st.binary(min_size=32, max_size=32), st.integers(2, 12), st.data())
@settings(max_examples=40, deadline=None)
def test_any_threshold_many_shamir_shares_recover_the_secret(
    secret: bytes, n: int, data: st.DataObject
) -> None:
    t = data.draw(st.integers(1, n))
    shares = shamir_split(secret, list(range(1, n + 1)), t)
    chosen = data.draw(
        st.lists(st.sampled_from(sorted(shares)), min_size=t, max_size=n, unique=True)
    )
    assert shamir_combine({x: shares[x] for x in chosen}, t) == secret


def test_fewer_than_threshold_shares_are_refused() -> None:
    shares = shamir_split(bytes(32), [1, 2, 3], 3)
    with pytest.raises(InvalidInputError):
        shamir_combine({1: shares[1], 2: shares[2]}, 3)


@given(st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=50), st.integers(1, 1000))
def test_fixed_point_sums_of_bounded_values_decode_within_rounding(
    values: list[float], n: int
) -> None:
    scale = fixed_point_scale(n, 1.0)
    x = np.array(values)
    total = np.zeros(len(values), np.uint32)
    for _ in range(min(n, 20)):
        total += encode_fixed_point(x, scale)
    np.testing.assert_allclose(
        decode_fixed_point(total, scale), min(n, 20) * x, atol=min(n, 20) / scale
    )


def test_nan_cannot_be_encoded() -> None:
    with pytest.raises(InvalidInputError):
        encode_fixed_point(np.array([np.nan]), 1024.0)


@pytest.mark.parametrize(
    ("cohort", "dropout"), [(100, 0.05), (100, 0.10), (1000, 0.05), (1000, 0.10)]
)
def test_secagg_plus_neighbourhoods_are_logarithmic_with_a_majority_threshold(
    cohort: int, dropout: float
) -> None:
    params = secagg_params(cohort, dropout)
    assert params.neighbours < cohort - 1  # a sparse graph, not everyone with everyone
    assert params.neighbours <= 6 * np.log2(cohort)
    assert params.threshold > params.neighbours / 2
    # Flower's example (3 shares, threshold 2) fails when 2 ring neighbours drop; ours tolerates
    # k - t simultaneous drops among any device's neighbours.
    assert params.neighbours - params.threshold >= 8


def test_neighbour_relation_is_symmetric_and_regular() -> None:
    n, k, seed = 60, 10, 7
    graph = {u: set(neighbours_of(u, n, k, seed)) for u in range(1, n + 1)}
    assert all(len(v) == k for v in graph.values())
    assert all(u in graph[v] for u, vs in graph.items() for v in vs)


def _run_round(cohort: int, dropout: float, drop_stage: str, length: int = 257):
    """Every device runs the real state machine; the coordinator's part is inlined here."""
    rng = np.random.default_rng(cohort)
    params = secagg_params(cohort, dropout)
    rid, seed = "round-x", 99
    scale = fixed_point_scale(cohort, 1.0)
    inputs = {u: rng.uniform(-1, 1, length) for u in range(1, cohort + 1)}
    devices = {u: SecAggClient.start(rid) for u in inputs}
    dropped = set(rng.choice(sorted(inputs), size=round(dropout * cohort), replace=False).tolist())
    keys = {u: (d.c_pk, d.s_pk) for u, d in devices.items()}
    sealed: dict[int, dict[int, bytes]] = {}
    u2 = set(inputs) - (dropped if drop_stage == "share_keys" else set())
    for u in u2:
        around = neighbours_of(u, cohort, params.neighbours, seed)
        out = devices[u].share_keys(u, {v: keys[v] for v in around}, params.threshold)
        for v, c in out.items():
            sealed.setdefault(v, {})[u] = c
    u3 = u2 - dropped
    masked = {}
    for u in u3:
        state = SecAggClient.from_bytes(devices[u].to_bytes())  # survives an app restart
        masked[u] = state.masked_input(encode_fixed_point(inputs[u], scale), sealed.get(u, {}))
        devices[u] = state
    b_shares: dict[int, dict[int, bytes]] = {u: {} for u in u3}
    s_shares: dict[int, dict[int, bytes]] = {}
    for v in u3:
        for owner, kind, share in devices[v].reveal(sorted(u3)):
            (b_shares if kind == "b" else s_shares).setdefault(owner, {})[v] = share
    masked_with = {u: [v for v in sealed_to(sealed, u) if v in u3] for u in u2 - u3}
    total = np.zeros(length, np.uint32)
    for y in masked.values():
        total += y
    ring = unmask_sum(
        rid,
        total,
        [shamir_combine(b_shares[u], params.threshold) for u in u3],
        {u: shamir_combine(s_shares[u], params.threshold) for u in masked_with if masked_with[u]},
        {u: keys[u][1] for u in inputs},
        {u: vs for u, vs in masked_with.items() if vs},
    )
    expected = sum(inputs[u] for u in u3)
    return decode_fixed_point(ring, scale), expected, scale, len(u3)


def sealed_to(sealed: dict[int, dict[int, bytes]], sender: int) -> list[int]:
    return [v for v, inbox in sealed.items() if sender in inbox]


@pytest.mark.parametrize("dropout", [0.05, 0.10])
@pytest.mark.parametrize("drop_stage", ["share_keys", "masked_input"])
def test_dropouts_leave_the_exact_sum_of_survivors(dropout: float, drop_stage: str) -> None:
    decoded, expected, scale, survivors = _run_round(100, dropout, drop_stage)
    np.testing.assert_allclose(decoded, expected, atol=survivors / scale)


def test_a_masked_upload_shows_nothing_of_the_input() -> None:
    """What leaves the device in a secure round: its encoded input plus masks that are
    uniform over the ring, different per device, and only cancel in the coordinator's sum."""
    a, b = SecAggClient.start("r"), SecAggClient.start("r")
    to_b = a.share_keys(1, {2: (b.c_pk, b.s_pk)}, 1)
    to_a = b.share_keys(2, {1: (a.c_pk, a.s_pk)}, 1)
    scale = fixed_point_scale(2, 1.0)
    encoded = encode_fixed_point(np.full(4096, 0.25), scale)  # the same input on both
    masked_a = a.masked_input(encoded, {2: to_a[1]})
    masked_b = b.masked_input(encoded, {1: to_b[2]})
    masks = [(m - encoded).astype(np.float64) / 2.0**32 for m in (masked_a, masked_b)]
    for mask in masks:
        assert np.mean(mask == 0) < 0.01
        assert abs(mask.mean() - 0.5) < 0.02 and abs(mask.std() - 12**-0.5) < 0.02  # uniform
    assert np.mean(masked_a == masked_b) < 0.01
    # The pairwise masks cancel in the sum; each device's own mask stays until unmasked.
    assert np.mean(masked_a + masked_b == encoded + encoded) < 0.01


def test_a_tampered_share_is_detected() -> None:
    a, b = SecAggClient.start("r"), SecAggClient.start("r")
    sealed = a.share_keys(1, {2: (b.c_pk, b.s_pk)}, 1)
    b.share_keys(2, {1: (a.c_pk, a.s_pk)}, 1)
    corrupted = bytes([sealed[2][0] ^ 1]) + sealed[2][1:]
    with pytest.raises(TamperedError):
        b.masked_input(np.zeros(4, np.uint32), {1: corrupted})


def test_a_device_refuses_duplicate_neighbour_keys() -> None:
    a, b = SecAggClient.start("r"), SecAggClient.start("r")
    with pytest.raises(IntegrityError):
        a.share_keys(1, {2: (b.c_pk, b.s_pk), 3: (b.c_pk, b.s_pk)}, 2)


@given(st.binary(min_size=32, max_size=32), st.integers(0, 300))
@settings(max_examples=30, deadline=None)
def test_the_mask_prg_is_the_aes_ctr_keystream_from_counter_zero(seed: bytes, length: int) -> None:
    """Block i of the keystream is AES-256(seed, i), read as little-endian uint32."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    blocks = b"".join(i.to_bytes(16, "big") for i in range(length // 4 + 1))
    encryptor = Cipher(algorithms.AES(seed), modes.ECB()).encryptor()
    expected = np.frombuffer(encryptor.update(blocks), dtype="<u4")[:length]
    np.testing.assert_array_equal(prg_uint32(seed, length), expected)


def test_a_reused_mask_buffer_gives_each_seed_its_own_mask() -> None:
    seeds = [bytes([i]) * 32 for i in range(3)]
    expander = MaskExpander(1001)
    masks = [expander.expand(s).copy() for s in [*seeds, seeds[0]]]
    np.testing.assert_array_equal(masks[0], masks[3])
    np.testing.assert_array_equal(masks[1], prg_uint32(seeds[1], 1001))
    assert not np.array_equal(masks[0], masks[1])


def test_masks_add_and_subtract_in_the_ring() -> None:
    x = np.array([0, 1, 2**32 - 1], np.uint32)
    mask = np.array([2**32 - 1, 2**31, 5], np.uint32)
    add_masks(x, [(1, mask), (1, mask), (-1, mask)])
    np.testing.assert_array_equal(x, np.array([2**32 - 1, 2**31 + 1, 4], np.uint32))


@given(
    st.lists(st.floats(-2.0, 2.0, allow_nan=False, width=32), max_size=40),
    st.sampled_from([np.float32, np.float64]),
    st.integers(0, 30),
)
def test_fixed_point_encoding_is_twos_complement_of_the_rounded_scaled_value(
    values: list[float], dtype: type, exponent: int
) -> None:
    x, scale = np.array(values, dtype=dtype), float(2**exponent)
    reference = np.rint(x.astype(np.float64) * scale)
    if np.any(np.abs(reference) >= 2**31):
        with pytest.raises(InvalidInputError, match="range"):
            encode_fixed_point(x, scale)
        return
    encoded = encode_fixed_point(x, scale)
    assert encoded.dtype == np.uint32
    np.testing.assert_array_equal(encoded, reference.astype(np.int64).astype(np.uint32))


def test_infinite_values_and_overflowing_scales_are_told_apart() -> None:
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        encode_fixed_point(np.array([np.inf]), 2.0)
    with pytest.raises(InvalidInputError, match="range"):
        encode_fixed_point(np.array([1e300]), 1e300)


def test_keys_agreed_with_many_peers_match_one_by_one_agreement() -> None:
    me = SecAggClient.start("r")
    peers = {v: SecAggClient.start("r").s_pk for v in range(1, 6)}
    together = agree_many(me.s_sk, peers, b"info")
    assert together == {v: agree(me.s_sk, pk, b"info") for v, pk in peers.items()}
    assert len(set(together.values())) == len(peers)


_P25519 = 2**255 - 19
# Every encoding of a low-order point of Curve25519 or its twist (u mod 2^255, then mod p).
_LOW_ORDER = [
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
    _P25519 - 1,
    _P25519,
    _P25519 + 1,
    2**255,  # the top bit is ignored: 0 again
]


@pytest.mark.parametrize("u", _LOW_ORDER)
def test_low_order_public_keys_are_refused_and_real_ones_accepted(u: int) -> None:
    with pytest.raises(InvalidInputError, match="low-order"):
        check_public_key(u.to_bytes(32, "little"), "c_pk")
    check_public_key(SecAggClient.start("r").c_pk)
    with pytest.raises(InvalidInputError, match="32-byte"):
        check_public_key(bytes(31))
