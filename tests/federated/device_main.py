"""One device as its own OS process: `python device_main.py URL APP KEY STATE_DIR SEED [--die-after STEP]`.

Checks in, trains (deterministically from SEED), contributes, and prints the outcome as JSON.
With --die-after, it SIGKILLs itself right after that protocol step was sent, the way an app
dies mid-round; run it again without the flag to resume from its state directory. With
--pause-after, it waits after that step for a line on stdin, which holds the round in the next
stage for as long as the test needs.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))

from _fixtures import local_update

from edgeperso.federation import DirectoryStateStore, FederationClient, FederationConfig
from edgeperso.federation._wire import decode_tensors


class DyingStore(DirectoryStateStore):
    def __init__(self, directory: str, die_after: str | None, pause_after: str | None) -> None:
        super().__init__(directory)
        self._die_after = die_after
        self._pause_after = pause_after

    def put(self, key: str, value: bytes) -> None:
        super().put(key, value)
        if key != "federation.round":
            return
        if self._die_after and _sent(value, self._die_after):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._pause_after and _sent(value, self._pause_after):
            self._pause_after = None
            sys.stdin.readline()


def _sent(value: bytes, step: str) -> bool:
    _, meta = decode_tensors(value)
    return step in json.loads(meta["record"])["sent"]


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("url", "app", "key", "state"):
        parser.add_argument(name)
    parser.add_argument("seed", type=int)
    parser.add_argument("--die-after")
    parser.add_argument("--pause-after")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    config = FederationConfig(args.url, args.app, args.key, opt_in=True, retries=10, backoff_s=0.1)
    with FederationClient(
        config, DyingStore(args.state, args.die_after, args.pause_after)
    ) as client:
        if args.resume:
            outcome = client.resume(timeout_s=120)
            assert outcome is not None
        else:
            task = client.check_in()  # the test opens the round before starting devices
            assert task is not None, "no round is open"
            update = local_update(task, args.seed)
            outcome = client.contribute(task, **update, timeout_s=120)
    params = {k: np.asarray(v).tolist() for k, v in (outcome.params or {}).items()}
    print(
        json.dumps(
            {
                "status": outcome.status,
                "version": outcome.model_version,
                "persona": outcome.persona,
                "params": params,
            }
        )
    )


if __name__ == "__main__":
    main()
