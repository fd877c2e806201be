"""Coordinator for EdgePerso federated rounds (server side), and the operator's client.

    config = CoordinatorConfig(admin_token=..., database_url="sqlite:///coordinator.db")
    app = create_app(config)          # ASGI; `edgeperso-coordinator serve` runs it under uvicorn

    with AdminClient("http://127.0.0.1:8080", admin_token) as admin:
        key = admin.create_app("notes", epsilon_budget=8.0)
        admin.put_model("notes", 0, layout, initial_model(layout, params, centroids))
        opened = admin.create_round(RoundConfig("notes", 0, cohort_size=5, min_survivors=3))

Rounds: `RoundConfig` (POST /v1/admin/rounds). Protocol and threat model: docs/federated.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from edgeperso_federated._config import CoordinatorConfig, RoundConfig
from edgeperso_federated._errors import (
    AuthError,
    ForbiddenError,
    NotFoundError,
    RateLimitedError,
    RoundConflictError,
)
from edgeperso_federated._lazy import lazy_exports

if TYPE_CHECKING:
    from edgeperso_federated._admin import (
        AdminClient,
        LedgerEntry,
        OpenedRound,
        RoundState,
        initial_model,
        load_model,
        save_model,
    )
    from edgeperso_federated._app import create_app
    from edgeperso_federated._rounds import Coordinator

# The coordinator's modules bring SQLAlchemy, FastAPI, httpx and dp-accounting (~1-2 s to
# import). A Flower ClientApp process imports this package for the device side only, once
# per message Flower hands it, so those load on first use of their names (PEP 562).
_LAZY = {
    "AdminClient": "_admin",
    "LedgerEntry": "_admin",
    "OpenedRound": "_admin",
    "RoundState": "_admin",
    "initial_model": "_admin",
    "load_model": "_admin",
    "save_model": "_admin",
    "create_app": "_app",
    "Coordinator": "_rounds",
}

__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "AdminClient",
    "AuthError",
    "Coordinator",
    "CoordinatorConfig",
    "ForbiddenError",
    "LedgerEntry",
    "NotFoundError",
    "OpenedRound",
    "RateLimitedError",
    "RoundConfig",
    "RoundConflictError",
    "RoundState",
    "create_app",
    "initial_model",
    "load_model",
    "save_model",
]
