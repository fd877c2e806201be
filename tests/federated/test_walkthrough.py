"""examples/federated_round.py end to end: a coordinator, device processes, two rounds."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SCRIPT = Path(__file__).parents[2] / "examples" / "federated_round.py"


@pytest.mark.slow
def test_the_walkthrough_runs_two_rounds_that_every_device_survives(
    bundles: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, kept = tmp_path / "report.json", tmp_path / "kept"
    command = [sys.executable, str(SCRIPT), "--bundle", str(bundles["classification"])]
    command += ["--devices", "3", "--rounds", "2", "--train", "8", "--test", "8"]
    command += ["--noise-multiplier", "0.3"]  # so that the ledger has epsilons to check
    command += ["--json", str(out), "--keep", str(kept)]
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

    # What the devices trained on never reached the coordinator's database or log, nor any
    # device store in plaintext: the same texts, made again from the same seed.
    monkeypatch.syspath_prepend(str(SCRIPT.parent))  # as when run: its folder on the path
    try:
        users = _example().generated_users(3, 8, 8, 0)
    finally:
        for name in ("federated_round", "_bundle"):
            sys.modules.pop(name, None)
    texts = {text.encode() for user in users for text, _ in user.train}
    assert len(texts) >= 12
    files = sorted(p for p in kept.iterdir() if p.is_file())
    assert {"coordinator.db", "coordinator.log", "device-0.db"} <= {p.name for p in files}
    for path in files:
        data = path.read_bytes()
        assert not [t for t in texts if t in data], f"a device's text in {path.name}"


def _example() -> Any:
    spec = importlib.util.spec_from_file_location("federated_round", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["federated_round"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module
