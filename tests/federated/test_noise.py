"""DP noise: drawn from the OS CSPRNG with the right distribution, never from numpy's state."""

from __future__ import annotations

import numpy as np
import pytest
from edgeperso_federated import RoundConfig, _aggregate

N = 1_000_000


def test_secure_normal_is_a_standard_normal_scaled_by_std() -> None:
    z = _aggregate.secure_normal((N,), 1.0)
    assert z.dtype == np.float64 and z.shape == (N,)
    # Each bound is about 5 standard errors at N = 1e6.
    assert abs(z.mean()) < 0.005
    assert abs(z.std() - 1.0) < 0.004
    assert abs(np.mean(np.abs(z) < 1.0) - 0.682689) < 0.0024
    assert abs(np.mean(np.abs(z) < 2.0) - 0.954500) < 0.0011
    assert abs(np.mean(np.abs(z) < 3.0) - 0.997300) < 0.0003
    assert abs(np.mean(z**4) - 3.0) < 0.06  # kurtosis of a normal
    scaled = _aggregate.secure_normal((250, 40), 7.5)
    assert scaled.shape == (250, 40)
    assert abs(scaled.std() - 7.5) < 7.5 * 0.05


@pytest.mark.parametrize("count", [0, 1, 3, _aggregate._NOISE_CHUNK + 3])
def test_secure_normal_of_small_and_odd_sizes(count: int) -> None:
    z = _aggregate.secure_normal((count,), 2.0)
    assert z.shape == (count,) and np.all(np.isfinite(z))
    if count > _aggregate._NOISE_CHUNK:  # the last, short chunk is filled too
        assert abs(z[-1000:].std() - 2.0) < 0.3 and abs(z.std() - 2.0) < 0.02


def test_noise_does_not_follow_numpys_seed() -> None:
    np.random.seed(0)
    first = _aggregate.secure_normal((64,), 1.0)
    np.random.seed(0)
    second = _aggregate.secure_normal((64,), 1.0)
    assert not np.array_equal(first, second)


def test_the_noise_comes_from_os_urandom(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every random bit is the OS CSPRNG's: with os.urandom made constant, so is the noise."""
    monkeypatch.setattr(_aggregate.os, "urandom", lambda n: bytes(range(7, 7 + 64)) * (n // 64))
    first = _aggregate.secure_normal((64,), 1.0)
    assert np.array_equal(first, _aggregate.secure_normal((64,), 1.0))
    assert np.all(np.isfinite(first)) and np.unique(first).size > 1


def test_add_noise_without_a_generator_has_std_z_times_sensitivity() -> None:
    config = RoundConfig("app", 0, cohort_size=2, min_survivors=2, noise_multiplier=0.5)
    total = np.full(200_000, 3.0)
    noisy = _aggregate.add_noise(total, config)
    assert np.array_equal(total, np.full(200_000, 3.0))  # the input is not changed in place
    expected = 0.5 * config.sensitivity
    assert abs((noisy - 3.0).std() / expected - 1.0) < 0.01
    assert abs((noisy - 3.0).mean()) < 5 * expected / np.sqrt(total.size)


def test_add_noise_is_the_identity_without_dp() -> None:
    config = RoundConfig("app", 0, cohort_size=2, min_survivors=2)
    total = np.arange(5.0)
    assert _aggregate.add_noise(total, config) is total


def test_a_seeded_generator_reproduces_a_simulations_noise() -> None:
    config = RoundConfig("app", 0, cohort_size=2, min_survivors=2, noise_multiplier=1.0)
    a = _aggregate.add_noise(np.zeros(8), config, np.random.default_rng(5))
    b = _aggregate.add_noise(np.zeros(8), config, np.random.default_rng(5))
    assert np.array_equal(a, b)
