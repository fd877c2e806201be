"""Federated rounds, device side: opt in, contribute clipped masked deltas, get the new model.

    client = FederationClient(FederationConfig(url, app_id, key, opt_in=True), state)
    task = client.check_in()                      # None when no round is open
    params = task.params_for(task.persona_for(summary))
    ...train locally from params...
    outcome = client.contribute(task, before=params, after=trained, summary=summary,
                                num_examples=n)   # blocks until the round ends
    outcome.params                                # new global + persona parameters

Only persona- and global-level parameters are accepted; user-level parameters and raw data
never leave the device. The wire format and secure-aggregation arithmetic in this package's
private modules are shared with the coordinator (`edgeperso-federated`), which imports them.
"""

from edgeperso.federation._client import (
    CoordinatorProtocolError,
    CoordinatorUnavailableError,
    FederationClient,
    FederationConfig,
    RoundOutcome,
)
from edgeperso.federation._layout import FederatedParam, PersonaLayout, federated_params
from edgeperso.federation._secagg import SecAggParams, secagg_params
from edgeperso.federation._state import (
    DirectoryStateStore,
    MemoryStateStore,
    SealedStateStore,
    StateStore,
)
from edgeperso.federation._update import RoundTask

__all__ = [
    "CoordinatorProtocolError",
    "CoordinatorUnavailableError",
    "DirectoryStateStore",
    "FederatedParam",
    "FederationClient",
    "FederationConfig",
    "MemoryStateStore",
    "PersonaLayout",
    "RoundOutcome",
    "RoundTask",
    "SealedStateStore",
    "SecAggParams",
    "StateStore",
    "federated_params",
    "secagg_params",
]
