"""Coordinator for EdgePerso federated rounds (server side).

    config = CoordinatorConfig(admin_token=..., database_url="sqlite:///coordinator.db")
    app = create_app(config)          # ASGI; `edgeperso-coordinator serve` runs it under uvicorn

Rounds: `RoundConfig` (POST /v1/admin/rounds). Protocol and threat model: docs/federated.md.
"""

from edgeperso_federated._app import create_app
from edgeperso_federated._config import CoordinatorConfig, RoundConfig
from edgeperso_federated._rounds import Coordinator

__all__ = ["Coordinator", "CoordinatorConfig", "RoundConfig", "create_app"]
