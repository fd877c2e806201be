"""The ServerApp: secure rounds through Flower's SecAgg+ workflow, plain ones through a strategy."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context
from flwr.server import LegacyContext, ServerConfig
from flwr.server.workflow import DefaultWorkflow
from flwr.serverapp import Grid, ServerApp

from edgeperso_federated.flower._records import model_record
from edgeperso_federated.flower._rounds import FlowerRounds, PublishedRound
from edgeperso_federated.flower._strategy import PlainStrategy, SecAggStrategy, secaggplus_workflow


def run_rounds(
    grid: Grid, context: Context, rounds: FlowerRounds, num_rounds: int
) -> list[PublishedRound]:
    """Run `num_rounds` rounds inside a ServerApp; returns the ones that were published.

    A round the privacy budget cannot pay for raises BudgetExhaustedError before any message
    is sent; a round with too few survivors publishes nothing and the next one starts.
    """
    first = len(rounds.published)
    if rounds.config.secure:
        legacy = LegacyContext(
            context=context,
            config=ServerConfig(num_rounds=num_rounds),
            strategy=SecAggStrategy(rounds),
        )
        DefaultWorkflow(fit_workflow=secaggplus_workflow(rounds.config))(grid, legacy)
    else:
        PlainStrategy(rounds).start(
            grid,
            initial_arrays=model_record(rounds.model),
            num_rounds=num_rounds,
            timeout=rounds.config.stage_timeout_s,
        )
    return rounds.published[first:]


def server_app(make_rounds: Callable[[Context], FlowerRounds], num_rounds: int) -> ServerApp:
    """A ServerApp that builds its `FlowerRounds` from the run's Context and runs them."""
    app = ServerApp()
    # Without the optional Flower extra, mypy sees an untyped decorator.

    @app.main()  # type: ignore[untyped-decorator, unused-ignore]
    def main(grid: Grid, context: Context) -> None:
        run_rounds(grid, context, make_rounds(context), num_rounds)

    return app
