"""Fuzz the coordinator's HTTP API from its OpenAPI document for longer than the test suite does.

    python scripts/fuzz_coordinator.py --max-examples 500 [--seed 1234] [-- extra pytest args]

Runs tests/federated/test_api_fuzz.py (a live coordinator on loopback with rounds in every stage,
schemathesis checks on each response) with more generated requests per operation and mode.
A failure prints the request that reproduces it as a curl command. Exits with pytest's status.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FUZZ_TESTS = ROOT / "tests" / "federated" / "test_api_fuzz.py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-examples", type=int, default=200, help="per operation and mode")
    parser.add_argument("--seed", type=int, help="hypothesis seed, to replay a run")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args()
    if args.max_examples < 1:
        parser.error("--max-examples must be at least 1")
    command = [sys.executable, "-m", "pytest", "-q", str(FUZZ_TESTS), *args.pytest_args]
    if args.seed is not None:
        command.append(f"--hypothesis-seed={args.seed}")
    env = {**os.environ, "EDGEPERSO_FUZZ_EXAMPLES": str(args.max_examples)}
    return subprocess.run(command, cwd=ROOT, env=env, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
