"""User-level DP accounting with Google's dp-accounting (Rényi DP of the sampled Gaussian).

Each published round with noise multiplier z and device sampling probability q is one
PoissonSampledDpEvent(q, GaussianDpEvent(z)); the ledger composes them per app. Sampling is
an assumption the operator states through q (cohort / eligible population): devices that
self-select are not Poisson-sampled, and q = 1 is the conservative choice.
"""

from __future__ import annotations

from collections.abc import Iterable

import dp_accounting
from dp_accounting import rdp

from edgeperso import InvalidInputError


def epsilon(rounds: Iterable[tuple[float, float]], delta: float) -> float:
    """Cumulative epsilon at `delta` after rounds given as (noise_multiplier, q)."""
    accountant = rdp.RdpAccountant()
    try:
        for noise_multiplier, q in rounds:
            accountant.compose(
                dp_accounting.PoissonSampledDpEvent(
                    q, dp_accounting.GaussianDpEvent(noise_multiplier)
                )
            )
        return float(accountant.get_epsilon(delta))
    except (ArithmeticError, ValueError) as exc:
        raise InvalidInputError(
            f"the privacy accountant cannot account for these rounds ({exc}); use a noise "
            "multiplier and sampling probability in the usual ranges"
        ) from exc
