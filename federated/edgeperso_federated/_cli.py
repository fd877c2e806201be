"""`edgeperso-coordinator`: serve the API, or print its OpenAPI document."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from edgeperso_federated._app import create_app
from edgeperso_federated._config import CoordinatorConfig


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
    args = parser.parse_args(argv)

    # The admin token is a secret: from the environment, never from argv (visible in ps).
    token = os.environ.get("EDGEPERSO_ADMIN_TOKEN", "")
    if args.command == "openapi":
        app = create_app(CoordinatorConfig(admin_token="x" * 16, database_url="sqlite://"))
        json.dump(app.openapi(), sys.stdout, indent=2)
        return 0
    if len(token) < 16:
        parser.error("set EDGEPERSO_ADMIN_TOKEN (at least 16 characters) for the operator API")
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


if __name__ == "__main__":
    raise SystemExit(main())
