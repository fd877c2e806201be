"""A second process for the runtime tests, run as a script:

    _child.py lock  STORE USER                 take USER's lock, say "locked", hold it
    _child.py train STORE USER BUNDLE CONFIG   train USER; at the first step after a
                                               checkpoint is in the store, say
                                               "checkpointed" and hang

Both then wait on stdin until the parent closes it or kills the process. The store key is
read from the EDGEPERSO_TEST_KEY environment variable (hex).
"""

from __future__ import annotations

import json
import os
import sys

from edgeperso.runtime import Personalizer, TrainConfig, TrainProgress
from edgeperso.store import RawKey, Store

CHECKPOINT = "train-checkpoint"


def main() -> None:
    mode, path, user = sys.argv[1:4]
    store = Store.open(path, RawKey(bytes.fromhex(os.environ["EDGEPERSO_TEST_KEY"])))
    if mode == "lock":
        with store.lock_user(user):
            print("locked", flush=True)
            sys.stdin.read()
        return
    bundle, config_json = sys.argv[4:6]
    config = TrainConfig(**json.loads(config_json))
    model = Personalizer.open(bundle, store)

    def hang_once_checkpointed(progress: TrainProgress) -> None:
        if progress.step < progress.total_steps and store.get_blob(user, CHECKPOINT):
            print("checkpointed", flush=True)
            sys.stdin.read()

    model.train(user, config, on_progress=hang_once_checkpointed)
    print("finished", flush=True)


if __name__ == "__main__":
    main()
