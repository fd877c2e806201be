"""examples/federated_round.py end to end: a coordinator, device processes, two rounds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[2] / "examples" / "federated_round.py"


@pytest.mark.slow
def test_the_walkthrough_runs_two_rounds_that_every_device_survives(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "report.json"
    command = [sys.executable, str(SCRIPT), "--bundle", str(bundles["classification"])]
    command += ["--devices", "3", "--rounds", "2", "--train", "8", "--test", "8"]
    command += ["--noise-multiplier", "0.3"]  # so that the ledger has epsilons to check
    command += ["--json", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads(out.read_text())
    rounds = report["rounds"]
    assert [(r["round"], r["stage"], r["version"]) for r in rounds] == [
        (1, "published", 1),
        (2, "published", 2),
    ]
    assert all(r["survivors"] == r["devices"] == 3 for r in rounds)
    assert all(r["neighbours"] == 2 and r["threshold"] >= 2 for r in rounds)
    epsilons = [r["epsilon"] for r in rounds]
    assert all(math.isfinite(e) and e > 0 for e in epsilons) and epsilons[1] > epsilons[0]
    assert len(report["devices"]) == 3
    for device in report["devices"].values():
        assert [r["status"] for r in device["rounds"]] == ["published", "published"]
        assert [r["version"] for r in device["rounds"]] == [1, 2]
        assert all(r["persona"] in (0, 1) for r in device["rounds"])
        scores = [device["before"], device["rounds"][0]["alone"]]
        scores += [r["after"] for r in device["rounds"]]
        assert all(0 <= s <= 1 for s in scores), scores
    assert "Macro-F1 of the shared model" in done.stdout
    assert "survivors 3/3" in done.stdout
