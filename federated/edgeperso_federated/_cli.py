"""`edgeperso-coordinator`: serve the API, print its OpenAPI document, or act as the operator
(create-app, put-model, create-round, status) against a running coordinator."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys

from edgeperso import EdgePersoError
from edgeperso_federated._admin import AdminClient, load_model
from edgeperso_federated._app import create_app
from edgeperso_federated._config import CoordinatorConfig, RoundConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgeperso-coordinator")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the coordinator (uvicorn)")
    serve.add_argument(
        "--database-url",
        default="sqlite:///edgeperso-coordinator.db",
        help="sqlite:///path.db (default) or postgresql://user@host/db",
    )
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--ssl-certfile", help="PEM certificate: serve HTTPS")
    serve.add_argument("--ssl-keyfile", help="PEM private key of --ssl-certfile")
    serve.add_argument("--max-body-bytes", type=int, default=64 * 1024 * 1024)
    serve.add_argument("--tick-s", type=float, default=0.2)
    defaults = CoordinatorConfig(admin_token="x" * 16)
    serve.add_argument(
        "--enrol-rate",
        type=float,
        default=defaults.enrol_rate_per_s,
        help="enrolments/s per client address (token bucket)",
    )
    serve.add_argument("--enrol-burst", type=int, default=defaults.enrol_burst)
    serve.add_argument(
        "--device-rate",
        type=float,
        default=defaults.device_rate_per_s,
        help="requests/s per device, long polls included (token bucket)",
    )
    serve.add_argument("--device-burst", type=int, default=defaults.device_burst)
    commands.add_parser("openapi", help="print the OpenAPI document (JSON)")
    _operator_commands(commands)
    args = parser.parse_args(argv)

    # The admin token is a secret: from the environment, never from argv (visible in ps).
    token = os.environ.get("EDGEPERSO_ADMIN_TOKEN", "")
    if args.command == "openapi":
        app = create_app(CoordinatorConfig(admin_token="x" * 16, database_url="sqlite://"))
        json.dump(app.openapi(), sys.stdout, indent=2)
        return 0
    if len(token) < 16:
        parser.error("set EDGEPERSO_ADMIN_TOKEN (at least 16 characters) for the operator API")
    if args.command != "serve":
        return _operator(args, token, parser)
    import resource

    import uvicorn

    # Each waiting device holds a connection (long poll): allow as many as the OS permits.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = CoordinatorConfig(
        admin_token=token,
        database_url=args.database_url,
        max_body_bytes=args.max_body_bytes,
        device_rate_per_s=args.device_rate,
        device_burst=args.device_burst,
        enrol_rate_per_s=args.enrol_rate,
        enrol_burst=args.enrol_burst,
        tick_s=args.tick_s,
    )
    uvicorn.run(
        create_app(config),
        host=args.host,
        port=args.port,
        ssl_certfile=args.ssl_certfile,
        ssl_keyfile=args.ssl_keyfile,
        log_level="warning",
        access_log=False,
    )
    return 0


def _operator_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--url", default="http://127.0.0.1:8080", help="the coordinator")
    where.add_argument("--ca-file", help="PEM CA bundle that signed an HTTPS coordinator's cert")
    app = commands.add_parser(
        "create-app", parents=[where], help="register an app; prints its enrolment key"
    )
    app.add_argument("app_id")
    app.add_argument("--epsilon-budget", type=float, help="user-level DP budget (default: none)")
    app.add_argument("--delta", type=float, default=1e-6)
    model = commands.add_parser(
        "put-model", parents=[where], help="upload a model version from a save_model file"
    )
    model.add_argument("app_id")
    model.add_argument("version", type=int, help="0 for the app's first model")
    model.add_argument("file", help="written by edgeperso_federated.save_model (safetensors)")
    opened = commands.add_parser(
        "create-round", parents=[where], help="open a round; prints its id (JSON)"
    )
    opened.add_argument(
        "config",
        help='RoundConfig as JSON: \'{"app_id": "notes", "model_version": 0, "cohort_size": 50, '
        '"min_survivors": 40, "noise_multiplier": 1.0, "sampling_probability": 0.01}\'',
    )
    status = commands.add_parser("status", parents=[where], help="a round's stage (JSON)")
    status.add_argument("app_id")
    status.add_argument("round_id")
    status.add_argument("--wait", type=float, default=0, help="seconds to wait for it to close")


def _operator(args: argparse.Namespace, token: str, parser: argparse.ArgumentParser) -> int:
    config = None
    if args.command == "create-round":
        try:
            config = RoundConfig.from_json(json.loads(args.config))
        except (TypeError, ValueError) as exc:
            parser.error(f"create-round: the config is not a valid RoundConfig ({exc})")
    try:
        with AdminClient(args.url, token, verify_tls=args.ca_file or True) as admin:
            if args.command == "create-app":
                print(
                    admin.create_app(
                        args.app_id, epsilon_budget=args.epsilon_budget, delta=args.delta
                    )
                )
            elif args.command == "put-model":
                admin.put_model(args.app_id, args.version, *load_model(args.file))
                print(json.dumps({"app_id": args.app_id, "version": args.version}))
            elif config is not None:
                print(json.dumps(dataclasses.asdict(admin.create_round(config))))
            elif args.wait > 0:
                state = admin.wait_for_round(args.app_id, args.round_id, timeout_s=args.wait)
                print(json.dumps(dataclasses.asdict(state)))
            else:
                print(
                    json.dumps(dataclasses.asdict(admin.round_status(args.app_id, args.round_id)))
                )
    except EdgePersoError as exc:
        print(f"edgeperso-coordinator: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
