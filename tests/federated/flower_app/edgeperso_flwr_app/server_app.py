"""The server: `server_app(...)` for one round, writing what it publishes to the run's out-dir.

The run config names the scenario and the folder; each published model lands there as
`<scenario>.npz` (written then renamed, so a reader never sees half a file).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from edgeperso_federated.flower import FlowerRounds, PublishedRound, server_app
from flwr.app import Context

from edgeperso_flwr_app.task import LAYOUT, initial_model, round_config


def make_rounds(context: Context) -> FlowerRounds:
    scenario = str(context.run_config["scenario"])
    out_dir = Path(str(context.run_config["out-dir"]))

    def save(published: PublishedRound) -> None:
        tmp = out_dir / f".{scenario}.npz"
        with open(tmp, "wb") as f:
            np.savez(
                f,
                survivors=published.survivors,
                model_version=published.model_version,
                **{f"model/{k}": v for k, v in published.model.items()},
            )
        os.replace(tmp, out_dir / f"{scenario}.npz")

    return FlowerRounds(initial_model(), LAYOUT, round_config(scenario), on_publish=save)


app = server_app(make_rounds, num_rounds=1)
