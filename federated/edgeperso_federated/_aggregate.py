"""From a round's contributions to the next model version.

Secure rounds: the coordinator sums masked uploads, strips masks with the revealed shares and
decodes the fixed-point ring sum; it never sees an individual update. Plain rounds: individual
float32 updates are norm-bounded and averaged, or combined with a coordinate-wise trimmed mean
against poisoned updates (persona membership is then visible; use secure rounds for privacy).
DP-FedAvg noise N(0, (z * sensitivity)^2) is added to the sum before anything is published.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping

import numpy as np

from edgeperso.federation._layout import PersonaLayout, persona_key
from edgeperso.federation._protocol import unmask_sum
from edgeperso.federation._secagg import decode_fixed_point, shamir_combine
from edgeperso.federation._update import CENTROIDS
from edgeperso_federated._config import RoundConfig


@dataclasses.dataclass(frozen=True)
class Means:
    """Per-block means; a row of NaN marks a persona left unchanged (too little weight)."""

    global_mean: np.ndarray | None  # [G]
    persona_means: np.ndarray  # [n, P]
    centroid_means: np.ndarray  # [n, S]
    weights: np.ndarray  # [n] total weight (noisy under DP) per persona


def secure_sum(
    round_id: str,
    masked: Iterable[np.ndarray],  # uint32 [L] per survivor
    b_shares: Mapping[int, Mapping[int, bytes]],  # survivor -> {holder: share of b}
    s_shares: Mapping[int, Mapping[int, bytes]],  # dropped -> {holder: share of s_sk}
    mask_keys: Mapping[int, bytes],
    masked_with: Mapping[int, list[int]],
    threshold: int,
    length: int,
    scale: float,
) -> np.ndarray:  # [L] float64
    total = np.zeros(length, dtype=np.uint32)
    for vector in masked:
        total += vector
    seeds = [shamir_combine(shares, threshold) for shares in b_shares.values()]
    dropped = {u: shamir_combine(shares, threshold) for u, shares in s_shares.items()}
    ring_sum = unmask_sum(round_id, total, seeds, dropped, mask_keys, masked_with)
    return decode_fixed_point(ring_sum, scale)


def fixed_point_error(contributors: int, scale: float) -> float:
    """The most a decoded fixed-point sum of `contributors` values can be off: each value is
    rounded to the nearest multiple of 1/scale."""
    return contributors * 0.5 / scale


def add_noise(
    total: np.ndarray, config: RoundConfig, rng: np.random.Generator | None = None
) -> np.ndarray:
    """`total` plus N(0, (z * sensitivity)^2) per coordinate.

    The noise comes from the operating system's CSPRNG (`secure_normal`). A seeded `rng` is
    for reproducing a simulation in tests only: anyone who knows its seed can subtract the
    noise, and with it the guarantee.
    """
    if config.noise_multiplier == 0:
        return total
    std = config.noise_multiplier * config.sensitivity
    noise: np.ndarray = (
        secure_normal(total.shape, std) if rng is None else rng.normal(0.0, std, total.shape)
    )
    noisy: np.ndarray = total + noise
    return noisy


def secure_normal(shape: tuple[int, ...], std: float) -> np.ndarray:
    """float64 draws of N(0, std^2) from os.urandom, hardened against floating-point attacks.

    numpy's generators are not cryptographic: their state can be recovered from outputs, and
    noise that can be predicted can be subtracted. There is no CSPRNG-backed numpy
    BitGenerator, so this is written out: 53-bit uniforms from os.urandom, Box-Muller, and
    (as Opacus's secure mode does, after Holohan & Braghin, "Secure Random Sampling in
    Differential Privacy", 2021) the sum of four draws at std/2 each: one floating-point draw
    leaves gaps in the set of outputs it can produce, which tell an observer something about
    the value it was added to (Mironov, CCS 2012); the sum fills them in.
    """
    count = math.prod(shape)
    out = np.empty(count)
    for start in range(0, count, _NOISE_CHUNK):  # bounded memory for any model size
        n = min(_NOISE_CHUNK, count - start)
        # 4 normals per value; Box-Muller turns one pair of uniforms into two normals
        bits = np.frombuffer(os.urandom(32 * n), dtype=np.uint64).reshape(2, 2 * n)
        uniform = (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53  # [0, 1)
        radius = np.sqrt(-2.0 * np.log1p(-uniform[0]))  # 1 - u in (0, 1]: log never sees 0
        angle = 2.0 * math.pi * uniform[1]
        draws = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])
        out[start : start + n] = draws.reshape(4, n).sum(axis=0) * (std / 2.0)
    return out.reshape(shape)


_NOISE_CHUNK = 1 << 18  # values per os.urandom call in secure_normal (8 MiB of random bits)


def means_of_sum(
    total: np.ndarray, layout: PersonaLayout, config: RoundConfig, weight_error: float = 0.0
) -> Means:
    """Per-block means of a summed contribution vector.

    A persona whose summed weight is below `min_persona_weight` keeps its parameters.
    `weight_error` is the most the encoding of a secure sum can have moved a summed weight
    down: without it, a persona exactly at the floor (one device of weight 1, the default
    floor) would be updated or not at random, depending on how its weight was rounded.
    """
    global_sum, persona_sums, summary_sums, weights = layout.unpack(total)
    floor = config.min_persona_weight - weight_error
    all_weight = float(weights.sum())
    global_mean = global_sum / all_weight if all_weight >= floor else None
    ok = (weights >= floor)[:, None]
    safe = np.where(weights >= floor, weights, 1.0)[:, None]
    return Means(
        global_mean,
        np.where(ok, persona_sums / safe, np.nan),
        np.where(ok, summary_sums / safe, np.nan),
        weights,
    )


def bound_norm(vector: np.ndarray, layout: PersonaLayout, config: RoundConfig) -> np.ndarray:
    """Server-side norm bound of a plain upload: re-clip its deltas to clip_norm x weight."""
    _, persona_part, _, weights = layout.unpack(vector)
    active = int(np.argmax(weights))
    weight = float(weights[active])
    deltas = np.concatenate([vector[: layout.global_size], persona_part[active]])
    norm = float(np.linalg.norm(deltas))
    limit = config.clip_norm * weight
    if norm <= limit:
        return vector
    out = vector.copy()
    out[: layout.global_size] *= limit / norm
    start = layout.global_size + active * layout.block_size
    out[start : start + layout.persona_size] *= limit / norm
    return out


def trimmed_means(
    vectors: np.ndarray, layout: PersonaLayout, config: RoundConfig
) -> Means:  # vectors: [n, L] norm-bounded plain uploads
    n_personas = layout.num_personas
    blocks = vectors[:, layout.global_size :].reshape(len(vectors), n_personas, layout.block_size)
    weights = blocks[:, :, -1]  # [n, personas]
    active = np.argmax(weights, axis=1)
    unit = 1.0 / weights[np.arange(len(vectors)), active]  # undo each device's weighting
    global_mean = _trim_mean(vectors[:, : layout.global_size] * unit[:, None], config.trim_fraction)
    persona_means = np.full((n_personas, layout.persona_size), np.nan)
    centroid_means = np.full((n_personas, layout.summary_dim), np.nan)
    counts = np.zeros(n_personas)
    for p in range(n_personas):
        members = np.flatnonzero(active == p)
        counts[p] = len(members)
        if len(members) < config.min_persona_weight or len(members) == 0:
            continue
        block = blocks[members, p, :] * unit[members, None]
        persona_means[p] = _trim_mean(block[:, : layout.persona_size], config.trim_fraction)
        centroid_means[p] = block[:, layout.persona_size : -1].mean(axis=0)
    return Means(global_mean, persona_means, centroid_means, counts)


def _trim_mean(values: np.ndarray, fraction: float) -> np.ndarray:
    """Coordinate-wise mean after dropping floor(fraction * n) lowest and highest values."""
    cut = int(fraction * len(values))
    ordered = np.sort(values, axis=0)
    trimmed: np.ndarray = ordered[cut : len(values) - cut].mean(axis=0)
    return trimmed


def next_model(
    model: Mapping[str, np.ndarray], layout: PersonaLayout, means: Means, config: RoundConfig
) -> dict[str, np.ndarray]:
    """The published parameters: old + server_lr x mean delta, centroids = member means."""
    out = {name: np.array(value, copy=True) for name, value in model.items()}
    lr = config.server_lr
    if means.global_mean is not None:
        for name, delta in layout.split(layout.global_params, means.global_mean).items():
            out[name] = (out[name] + lr * delta).astype(np.float32)
    for p in range(layout.num_personas):
        if np.isnan(means.persona_means[p]).any():
            continue
        for name, delta in layout.split(layout.persona_params, means.persona_means[p]).items():
            key = persona_key(p, name)
            out[key] = (out[key] + lr * delta).astype(np.float32)
        if layout.summary_dim:
            out[CENTROIDS][p] = means.centroid_means[p].astype(np.float32)
    return out
