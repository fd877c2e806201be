"""Personal retrieval with an embedding bundle: does training a user's LoRA on their own groups
make a new text's nearest stored text more often one of its group?

For each user of a labelled data set (StudEmo by default, each annotator's own label as the
group, e.g. "texts I found angry"), the user's rows are split 70/30 as `edgeperso evaluate`
splits them; the training rows are stored as examples with their group, `train()` runs on
device, and every test text is given the group of its most cosine-similar training text,
once with the shared model and once with the user's parameters (what `embed()` serves).
Reported: per-user macro-F1 of those groups, what train() kept, seconds.

    python benchmarks/bench_embedding_training.py BUNDLE --data studemo/ \
        --users 6 --label-column anger --label-map "x>0"

BUNDLE: `edgeperso-export <model> BUNDLE --task embedding` (this script does not export).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeperso import Example, Personalizer, RawKey, Store, TrainConfig
from edgeperso.evaluate import EvalConfig, LabelMap, read_table
from edgeperso.evaluate._data import Record, split_users
from edgeperso.evaluate._report import machine_info
from edgeperso.runtime._head import unit_rows
from edgeperso.runtime._trainer import macro_f1

NOBODY = "__shared_model__"  # a user id with no adapter: the shared model


def nearest_group_f1(
    keys: np.ndarray, key_groups: list[str], queries: np.ndarray, truth: list[str]
) -> float:
    nearest = np.argmax(unit_rows(queries) @ unit_rows(keys).T, axis=1)
    names = sorted(set(key_groups) | set(truth))
    index = {g: i for i, g in enumerate(names)}
    predicted = np.array([index[key_groups[i]] for i in nearest])
    return macro_f1(np.array([index[g] for g in truth]), predicted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument(
        "--data", type=Path, required=True, help="StudEmo folder (annotation_data.csv, ...)"
    )
    parser.add_argument(
        "--users", type=int, default=6, help="the first N users by id, in string order"
    )
    parser.add_argument("--label-column", default="anger")
    parser.add_argument("--label-map", default="x>0")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    parser.add_argument("--max-seconds", type=float, default=300.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/embedding_training.json"))
    args = parser.parse_args()

    rows = read_table(
        args.data / "annotation_data.csv", texts=args.data / "text_data.csv", join_on="text_id"
    )
    label_map = LabelMap(args.label_map)
    config = EvalConfig(user_column="annotator_id", label_column=args.label_column)
    records = [
        Record(r["annotator_id"], r["text"], label_map.apply(r[args.label_column]), float(i))
        for i, r in enumerate(rows)
        if r.get("text", "").strip() and r.get(args.label_column, "").strip()
    ]
    splits = split_users(records, config)
    users = sorted(splits)[: args.users]
    train_config = TrainConfig(
        epochs=args.epochs, learning_rate=args.learning_rate, max_seconds=args.max_seconds
    )
    per_user: list[dict[str, Any]] = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        Store.open(Path(tmp) / "profile.db", RawKey(os.urandom(32))) as store,
    ):
        model = Personalizer.open(args.bundle, store)
        for user in users:
            split = splits[user]
            train_texts = [r.text for r in split.train]
            train_groups = [str(r.label) for r in split.train]
            test_texts = [r.text for r in split.test]
            test_groups = [str(r.label) for r in split.test]
            model.add_examples(
                user, [Example(t, label=g) for t, g in zip(train_texts, train_groups, strict=True)]
            )
            start = time.perf_counter()
            result = model.train(user, train_config)
            seconds = time.perf_counter() - start
            scores = {}
            for name, who in (("shared", NOBODY), ("personal", user)):
                keys = model.embed(who, train_texts)
                queries = model.embed(who, test_texts)
                scores[name] = nearest_group_f1(keys, train_groups, queries, test_groups)
            per_user.append(
                {
                    "user": user,
                    "train_rows": len(train_texts),
                    "test_rows": len(test_texts),
                    "shared": scores["shared"],
                    "personal": scores["personal"],
                    "kept": result.kept,
                    "held_out_shared": result.global_score,
                    "held_out_personal": result.personal_score,
                    "steps": result.steps,
                    "train_seconds": seconds,
                }
            )
            print(
                f"{user}: shared {scores['shared']:.3f} personal {scores['personal']:.3f} "
                f"kept {result.kept} ({result.global_score:.3f} -> {result.personal_score:.3f} "
                f"held out) {result.steps} steps {seconds:.1f} s",
                flush=True,
            )
    shared = [u["shared"] for u in per_user]
    personal = [u["personal"] for u in per_user]
    summary = {
        "users": len(per_user),
        "shared_mean": statistics.fmean(shared),
        "personal_mean": statistics.fmean(personal),
        "share_worse": sum(p < s - 1e-9 for s, p in zip(shared, personal, strict=True))
        / len(per_user),
        "share_better": sum(p > s + 1e-9 for s, p in zip(shared, personal, strict=True))
        / len(per_user),
        "kept_personal": sum(u["kept"] == "personal" for u in per_user),
        "train_seconds_median": statistics.median(u["train_seconds"] for u in per_user),
    }
    report = {
        "machine": machine_info(),
        "bundle": str(args.bundle),
        "data": str(args.data),
        "label_column": args.label_column,
        "label_map": args.label_map,
        "train_config": {
            "epochs": args.epochs,
            "learning_rate": args.learning_rate,
            "max_seconds": args.max_seconds,
        },
        "summary": summary,
        "users": per_user,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
