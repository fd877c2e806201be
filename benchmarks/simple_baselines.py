"""The simple frozen-feature baselines behind the accuracy targets, on the evaluator's split.

The targets in the README compare `edgeperso evaluate` with "the best simple personal
baseline" (frozen int8 MiniLM features + logistic regression). This script fits those
baselines on the same rows the evaluator uses (its per-user 70/30 split, seeded by user id)
and scores them on the same test rows, so that each comes with the share of users it makes
worse than the shared model, the figure the targets bound at 10%:

- `global head`: the evaluator's shared model (L2 and class weighting cross-validated over
  users), the reference every "worse" is counted against;
- `global LR`: scikit-learn's LogisticRegression (C=1) on every user's training rows;
- `global LR + user one-hot`: the same with one indicator column per user (a per-user
  intercept learned with everybody's rows);
- `per-user LR` and `per-user LR balanced`: one LogisticRegression per user on that user's
  training rows alone (plain, and with class_weight="balanced"); a user whose training rows
  hold a single class keeps the global head.

The features are the bundle's base features (no trained global level), computed once and
cached in the same file `benchmarks/nested_selection.py` uses.

    python benchmarks/simple_baselines.py BUNDLE --data DATA_DIR --feature-cache F.npz \
        --tasks anger,joy,sign,arousal,tweeteval,goemotions
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from nested_selection import TASKS, chosen_tasks, compared, data_arguments, features
from sklearn.linear_model import LogisticRegression

from edgeperso.evaluate._data import split_users, to_records
from edgeperso.evaluate._global import configured_global_head
from edgeperso.evaluate._report import machine_info
from edgeperso.runtime._trainer import macro_f1

UserRows = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # x, y, test x, test y
# The user indicator's value. The features are unit-norm embeddings and the model is
# unscaled (as the baselines were), so at 3.0 a user's intercept costs 1/9 of the L2 penalty
# it would at 1.0: set once, not tuned on these rows.
ONE_HOT_SCALE = 3.0


def per_user_lr(rows: UserRows, *, balanced: bool) -> np.ndarray:
    """Test-row predictions of a LogisticRegression fitted on the user's training rows."""
    x, y, xt, _ = rows
    model = LogisticRegression(max_iter=2000, class_weight="balanced" if balanced else None)
    predicted: np.ndarray = model.fit(x, y).predict(xt)
    return predicted


def run(task: str, data: Path, bundle: Path, cache: Path | None) -> dict[str, Any]:
    table, config, labels = TASKS[task](data)
    records, _ = to_records(table, config, "classification", labels)
    splits = split_users(records, config)
    feats = features(bundle, [r.text for r in records], cache)
    n_classes = len(labels)

    def rows(part: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray]:
        x = np.stack([feats[r.text] for r in part]).astype(np.float64)
        return x, np.array([labels.index(str(r.label)) for r in part])

    # As the evaluator: the shared models learn from every user's training rows; users with
    # fewer than min_user_rows rows (or no test row) are not scored.
    trained = {user: rows(split.train) for user, split in sorted(splits.items()) if split.train}
    users: dict[str, UserRows] = {
        user: (*trained[user], *rows(split.test))
        for user, split in sorted(splits.items())
        if len(split.train) + len(split.test) >= config.min_user_rows and split.test
    }
    names = list(trained)
    x_all = np.concatenate([trained[u][0] for u in names])
    y_all = np.concatenate([trained[u][1] for u in names])
    owner = np.concatenate([[i] * len(trained[u][1]) for i, u in enumerate(names)])
    head = configured_global_head(
        x_all.astype(np.float32), y_all, np.array(names)[owner], n_classes, config
    )
    plain = LogisticRegression(max_iter=2000).fit(x_all, y_all)
    indicator = np.eye(len(names))[owner] * ONE_HOT_SCALE
    with_user = LogisticRegression(max_iter=3000).fit(np.hstack([x_all, indicator]), y_all)

    def one_hot(i: int, count: int) -> np.ndarray:
        out = np.zeros((count, len(names)))
        out[:, i] = ONE_HOT_SCALE
        return out

    scores: dict[str, list[float]] = {
        name: []
        for name in (
            "global head",
            "global LR",
            "global LR + user one-hot",
            "per-user LR",
            "per-user LR balanced",
        )
    }
    for name, user_rows in users.items():
        _, y, xt, yt = user_rows
        shared = (xt @ head.weights + head.bias).argmax(1)
        scores["global head"].append(macro_f1(yt, shared))
        scores["global LR"].append(macro_f1(yt, plain.predict(xt)))
        scores["global LR + user one-hot"].append(
            macro_f1(yt, with_user.predict(np.hstack([xt, one_hot(names.index(name), len(xt))])))
        )
        one_class = len(set(y.tolist())) < 2
        for label, balanced in (("per-user LR", False), ("per-user LR balanced", True)):
            alone = shared if one_class else per_user_lr(user_rows, balanced=balanced)
            scores[label].append(macro_f1(yt, alone))
    return {
        "users": len(users),
        "training_users": len(names),
        "global_head": {"l2": head.l2, "class_weighting": head.class_weighting},
        "methods": compared(scores, np.array(scores["global head"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    data_arguments(parser, "simple_baselines.json")
    args = parser.parse_args()
    tasks = chosen_tasks(parser, args.tasks)
    report: dict[str, Any] = {"machine": machine_info(), "tasks": {}}
    for task in tasks:
        start = time.perf_counter()
        report["tasks"][task] = run(task, args.data, args.bundle, args.feature_cache)
        report["tasks"][task]["seconds"] = time.perf_counter() - start
        methods = report["tasks"][task]["methods"]
        print(
            task,
            "  ".join(
                f"{m}: {v['mean']:.3f} / {100 * v['share_worse']:.0f}% worse"
                for m, v in methods.items()
            ),
            flush=True,
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
