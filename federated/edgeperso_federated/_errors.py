"""Coordinator-side refinements of the edgeperso error tree, each with its HTTP status.

EdgePersoError
├── InvalidInputError        422  malformed request, wrong shape/dtype, NaN/Inf
│   └── NotFoundError        404  no such round, model or app (for this device's app)
├── KeyUnavailableError
│   └── AuthError            401  missing or wrong credential
│       └── ForbiddenError   403  valid credential, not allowed (other app, admin route)
├── RoundConflictError       409  late, replayed, or not in this round/stage
├── BudgetExhaustedError     403  the app's privacy budget would be exceeded
└── RateLimitedError         429  too many requests; retry after Retry-After seconds
"""

from __future__ import annotations

from edgeperso import EdgePersoError, InvalidInputError, KeyUnavailableError


class NotFoundError(InvalidInputError):
    """The round, model or app does not exist (or is not visible to this caller)."""


class AuthError(KeyUnavailableError):
    """The request carried no valid credential; enrol again or fix the token."""


class ForbiddenError(AuthError):
    """The credential is valid but does not allow this request."""


class RoundConflictError(EdgePersoError):
    """The round has moved past this stage, or this device already submitted something else."""


class RateLimitedError(EdgePersoError):
    """Too many requests from one device or address."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
