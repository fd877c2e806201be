"""Secure-aggregation arithmetic shared by devices and the coordinator.

Bonawitz et al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine Learning")
with the neighbourhood graph of Bell et al. 2020 ("Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", SecAgg+):

- updates are fixed-point encoded into the ring Z_2^32 (uint32 arithmetic wraps for free);
- device u uploads y_u = x_u + PRG(b_u) + sum_{v in N(u), u<v} PRG(s_uv) - sum_{v<u} PRG(s_uv);
- b_u (self-mask seed) and u's mask private key are Shamir-shared among N(u) with threshold t;
- the coordinator removes self masks of survivors and pairwise masks of dropped devices from
  t revealed shares each, and learns only sum_u x_u.

N(u) is every other device (the original protocol) or k neighbours on a Harary graph whose
vertices are randomly relabelled from a public round seed (SecAgg+); see `secagg_params`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from edgeperso._errors import InvalidInputError

# A Mersenne prime above 2^256: every 32-byte secret is a field element.
SHAMIR_PRIME = 2**521 - 1
SHARE_BYTES = 66
RING_BITS = 32
_RING_HALF = 2 ** (RING_BITS - 1)


# ---- Shamir secret sharing over GF(2^521 - 1) ----------------------------------------------


def shamir_split(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, bytes]:
    """Shares of `secret` at the non-zero points `xs`; any `threshold` of them recover it."""
    if not 1 <= threshold <= len(xs):
        raise InvalidInputError(f"threshold {threshold} must be in 1..{len(xs)} (shares)")
    if len(set(xs)) != len(xs) or any(x <= 0 for x in xs):
        raise InvalidInputError("share points must be distinct positive integers")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [
        int.from_bytes(os.urandom(SHARE_BYTES), "big") % SHAMIR_PRIME for _ in range(threshold - 1)
    ]
    shares: dict[int, bytes] = {}
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % SHAMIR_PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def shamir_combine(shares: Mapping[int, bytes], threshold: int, secret_bytes: int = 32) -> bytes:
    """The secret from at least `threshold` shares (Lagrange interpolation at 0)."""
    if len(shares) < threshold:
        raise InvalidInputError(
            f"{len(shares)} shares cannot recover a {threshold}-threshold secret"
        )
    points = sorted(shares.items())[:threshold]
    xs = [x for x, _ in points]
    secret = 0
    for i, (xi, yb) in enumerate(points):
        numerator, denominator = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                numerator = numerator * (-xj) % SHAMIR_PRIME
                denominator = denominator * (xi - xj) % SHAMIR_PRIME
        lagrange = numerator * pow(denominator, -1, SHAMIR_PRIME) % SHAMIR_PRIME
        secret = (secret + int.from_bytes(yb, "big") * lagrange) % SHAMIR_PRIME
    if secret >= 2 ** (8 * secret_bytes):
        raise InvalidInputError("shares are inconsistent: they do not encode a secret")
    return secret.to_bytes(secret_bytes, "big")


# ---- fixed-point encoding into Z_2^32 ------------------------------------------------------


def fixed_point_scale(max_contributors: int, bound: float) -> float:
    """The largest power-of-two scale at which `max_contributors` values in [-bound, bound]
    sum without wrapping around the signed range of Z_2^32."""
    if max_contributors < 1 or not bound > 0:
        raise InvalidInputError("fixed-point scale needs >= 1 contributor and a positive bound")
    exponent = math.floor(math.log2((_RING_HALF - 1) / (max_contributors * bound)))
    if exponent < 0:
        raise InvalidInputError(
            f"{max_contributors} contributors x bound {bound} overflow a 32-bit ring; "
            "lower the clip norm or the cohort size"
        )
    return float(2**exponent)


def encode_fixed_point(values: np.ndarray, scale: float) -> np.ndarray:
    """float -> uint32 (two's complement of round(values * scale))."""
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported below
        scaled: np.ndarray = np.multiply(np.asarray(values), scale, dtype=np.float64)
    if not np.all(np.isfinite(scaled)):
        if not np.all(np.isfinite(values)):
            raise InvalidInputError(
                "cannot encode NaN or infinite values; check the local training"
            )
        raise InvalidInputError("a value exceeds the ring's range; clip before encoding")
    np.rint(scaled, out=scaled)
    if scaled.size and (scaled.min() <= -_RING_HALF or scaled.max() >= _RING_HALF):
        raise InvalidInputError("a value exceeds the ring's range; clip before encoding")
    encoded: np.ndarray = scaled.astype(np.int32).view(np.uint32)
    return encoded


def decode_fixed_point(ring_sum: np.ndarray, scale: float) -> np.ndarray:
    """uint32 sum -> float64, reading the ring as signed 32-bit integers."""
    return np.asarray(ring_sum, dtype=np.uint32).view(np.int32).astype(np.float64) / scale


# ---- the neighbourhood graph and its parameters --------------------------------------------


@dataclasses.dataclass(frozen=True)
class SecAggParams:
    """Neighbourhood size k (every other device when k >= n - 1) and Shamir threshold t."""

    neighbours: int
    threshold: int

    def __post_init__(self) -> None:
        if not 1 <= self.threshold <= self.neighbours:
            raise InvalidInputError(
                f"secure-aggregation threshold {self.threshold} must be in 1..{self.neighbours}"
            )


def secagg_params(
    cohort: int,
    dropout_rate: float,
    *,
    corrupt_rate: float = 0.0,
    security_bits: int = 40,
    reliability_bits: int = 20,
) -> SecAggParams:
    """Choose k and t for `cohort` devices of which `dropout_rate` may drop and
    `corrupt_rate` may collude with the coordinator (after Bell et al. 2020, Theorem 3.6).

    Privacy: the Harary graph H(n, k) (k even, k/2 ring neighbours each side) stays connected
    after removing any set of vertices that contains no k/2 ring-consecutive vertices. With a
    random labelling each vertex is removed (dropped or corrupt) independently with
    probability at most d = dropout_rate + corrupt_rate, so n * d^(k/2) <= 2^-security_bits
    keeps the honest survivors' masks joined, and the coordinator learns only their total.
    Threshold: t > k (1 + corrupt_rate) / 2, so the coordinator and corrupt neighbours can
    never hold t shares of both a device's self-mask seed and its mask key.
    Reliability: n * P[Binomial(k, dropout_rate) > k - t] <= 2^-reliability_bits, so a round
    aborts for lack of shares at most once in 2^reliability_bits rounds at that dropout rate.
    """
    if cohort < 2:
        raise InvalidInputError("secure aggregation needs at least 2 devices")
    if not (0 <= dropout_rate < 0.5 and 0 <= corrupt_rate < 0.5):
        raise InvalidInputError("dropout_rate and corrupt_rate must be in [0, 0.5)")
    removed = dropout_rate + corrupt_rate
    for k in range(2, cohort, 2):
        t = math.floor(k * (1 + corrupt_rate) / 2) + 1
        if t > k:
            continue
        private = removed == 0 or cohort * removed ** (k / 2) <= 2.0**-security_bits
        if (
            private
            and cohort * _binomial_tail(k, dropout_rate, k - t + 1) <= 2.0**-reliability_bits
        ):
            return SecAggParams(neighbours=k, threshold=t)
    # Complete graph: Bonawitz et al.'s original protocol.
    k = cohort - 1
    return SecAggParams(neighbours=k, threshold=min(k, math.floor(k * (1 + corrupt_rate) / 2) + 1))


def _binomial_tail(n: int, p: float, at_least: int) -> float:
    """P[Binomial(n, p) >= at_least]."""
    return sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(at_least, n + 1))


def neighbours_of(index: int, cohort: int, k: int, graph_seed: int) -> list[int]:
    """Indices (1-based) adjacent to `index` in the randomly relabelled Harary graph H(n, k)."""
    if not 1 <= index <= cohort:
        raise InvalidInputError(f"device index {index} is outside 1..{cohort}")
    if k >= cohort - 1:
        return [v for v in range(1, cohort + 1) if v != index]
    order, positions = _ring(cohort, graph_seed)
    position = positions[index]
    half = k // 2
    around = [order[(position + d) % cohort] for d in range(-half, half + 1) if d != 0]
    return sorted(around)


def ring_order(cohort: int, graph_seed: int) -> list[int]:
    """The public random relabelling: ring position -> device index."""
    permutation = np.random.default_rng(graph_seed).permutation(cohort) + 1
    return [int(v) for v in permutation]


@functools.lru_cache(maxsize=16)
def _ring(cohort: int, graph_seed: int) -> tuple[tuple[int, ...], dict[int, int]]:
    """(ring position -> index, index -> ring position); the coordinator asks once per device."""
    order = tuple(ring_order(cohort, graph_seed))
    return order, {v: p for p, v in enumerate(order)}


# ---- masks ---------------------------------------------------------------------------------


def add_masks(masked: np.ndarray, masks: Iterable[tuple[int, np.ndarray]]) -> None:
    """masked += sign * mask in Z_2^32, in place, for each (sign, mask) in turn (so `masks`
    may yield views of one reused buffer)."""
    for sign, mask in masks:
        if sign > 0:
            np.add(masked, mask, out=masked)
        else:
            np.subtract(masked, mask, out=masked)


def pair_sign(mine: int, theirs: int) -> int:
    """+1 if the lower index adds the shared mask, -1 for the higher one."""
    return 1 if mine < theirs else -1
