"""Stage 1's selection threshold, checked on training rows only (nested validation).

`TrainConfig.selection_se` decides how clearly a personal candidate (a head delta or the
retrieval mix) must beat the shared model in a user's cross-validation before it is kept.
Choosing it on the users' test rows would flatter the result, so this script never reads
them: each user's rows are split 70/30 exactly as `edgeperso evaluate` splits them, the
test side is dropped, and the training side is split 70/30 again (three inner seeds). The
global head is fitted (L2 and class weighting cross-validated over users, as the evaluator
does) on the inner-training rows of all users; each user's candidates are cross-validated on
their inner-training rows and the chosen one is scored on the inner-test rows, against the
global head. Reported per data set and threshold: mean per-user macro-F1, mean gain over the
global head, and the share of (user, inner seed) pairs made worse.

`--single-heads 0.3,1,3` also scores smaller candidate sets under the same rule: one head
strength alone, and with the retrieval mix, at each threshold, and that head kept for every
user ("always", no rule): how much of the rule's cost is the choice among many candidates.

The candidates and the rule are the runtime's: `stage1_candidates` (the `TrainConfig`
grids), `fit_head_delta`, `knn_mix`, `stratified_folds` and `clear_advantage`. The features are the bundle's base
features (no trained global level), computed once and cached.

    python benchmarks/nested_selection.py BUNDLE --data DATA_DIR \
        --feature-cache features.npz --tasks anger,joy,sign,arousal,tweeteval,goemotions

DATA_DIR holds studemo/ (annotation_data.csv, text_data.csv), tweeteval_hate_annotators.csv
and goemotions_raters.csv. BUNDLE is any classification bundle of the encoder (features do
not depend on its labels).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgeperso import Personalizer, RawKey, Store, TrainConfig
from edgeperso.evaluate import EvalConfig, LabelMap, read_table
from edgeperso.evaluate._data import Table, as_table, split_users, to_records
from edgeperso.evaluate._global import configured_global_head
from edgeperso.evaluate._report import machine_info
from edgeperso.runtime._head import (
    fit_head_delta,
    fit_logistic,
    knn_mix,
    stage1_candidates,
    unit_rows,
)
from edgeperso.runtime._trainer import clear_advantage, macro_f1, stratified_folds

NOBODY = "__shared_model__"  # a user id with no adapter: the base features
INNER_SEEDS = (1, 2, 3)
Candidate = tuple[str, Any]
Offered = Callable[[Candidate], bool]  # which candidates a rule may pick


def _studemo(column: str, spec: str, labels: tuple[str, ...]) -> Callable[[Path], Any]:
    def load(data: Path) -> tuple[Table, EvalConfig, tuple[str, ...]]:
        rows = read_table(
            data / "studemo/annotation_data.csv", texts=data / "studemo/text_data.csv"
        )
        config = EvalConfig(
            user_column="annotator_id", label_column=column, label_map=LabelMap(spec)
        )
        return rows, config, labels

    return load


def _tweeteval(data: Path) -> tuple[Table, EvalConfig, tuple[str, ...]]:
    """One column per annotator: melted to one row per (annotator, tweet)."""
    rows: list[dict[str, str]] = []
    with open(data / "tweeteval_hate_annotators.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            for column, value in row.items():
                if column.startswith("label_"):
                    rows.append({"user": column, "text": row["text"], "label": value})
    return (
        as_table(rows),
        EvalConfig(label_map=LabelMap("Hateful=yes,Non-hateful=no")),
        ("no", "yes"),
    )


def _goemotions(data: Path) -> tuple[Table, EvalConfig, tuple[str, ...]]:
    config = EvalConfig(
        user_column="rater_id", label_column="neutral", label_map=LabelMap("1=yes,0=no")
    )
    return read_table(data / "goemotions_raters.csv"), config, ("no", "yes")


SIGN = "-3.0=neg,-2.0=neg,-1.0=neg,0.0=zero,1.0=pos,2.0=pos,3.0=pos"
TASKS: dict[str, Callable[[Path], tuple[Table, EvalConfig, tuple[str, ...]]]] = {
    "anger": _studemo("anger", "x>0", ("no", "yes")),
    "joy": _studemo("joy", "x>0", ("no", "yes")),
    "sign": _studemo("valence", SIGN, ("neg", "zero", "pos")),
    "arousal": _studemo("arousal", "0.0=0,1.0=1,2.0=2,3.0=3", ("0", "1", "2", "3")),
    "tweeteval": _tweeteval,
    "goemotions": _goemotions,
}


def chosen_tasks(parser: argparse.ArgumentParser, text: str) -> list[str]:
    """`--tasks`, comma-separated names from TASKS (an unknown one is a usage error)."""
    tasks = [t for t in text.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown tasks {unknown}: choose from {', '.join(TASKS)}")
    return tasks


def compared(scores: dict[str, list[float]], reference: np.ndarray) -> dict[str, Any]:
    """Per method: mean per-user score, mean gain over `reference` (the shared model's
    scores, in the same order) and the shares of users it makes worse and better."""
    summary = {}
    for name, values in scores.items():
        v = np.array(values)
        summary[name] = {
            "mean": float(v.mean()),
            "gain": float(np.mean(v - reference)),
            "share_worse": float(np.mean(v < reference - 1e-12)),
            "share_better": float(np.mean(v > reference + 1e-12)),
        }
    return summary


def data_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """The arguments every script over TASKS takes: the bundle, the data and feature cache,
    the tasks, and where the JSON report goes (`out` under benchmarks/out/)."""
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--feature-cache", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out") / out)


def features(bundle: Path, texts: list[str], cache: Path | None) -> dict[str, np.ndarray]:
    cached: dict[str, np.ndarray] = {}
    if cache is not None and cache.exists():
        with np.load(cache, allow_pickle=True) as saved:
            cached = dict(zip(saved["texts"].tolist(), saved["x"], strict=True))
    missing = sorted({t for t in texts if t not in cached})
    if missing:
        with (
            tempfile.TemporaryDirectory() as tmp,
            Store.open(Path(tmp) / "features.db", RawKey(os.urandom(32))) as store,
        ):
            model = Personalizer.open(bundle, store)
            for i in range(0, len(missing), 32):
                chunk = missing[i : i + 32]
                rows = model.embed(NOBODY, chunk).astype(np.float32)
                cached.update(zip(chunk, rows, strict=True))
        if cache is not None:
            names = sorted(cached)
            np.savez(
                cache,
                texts=np.array(names, dtype=object),
                x=np.stack([cached[t] for t in names]),
            )
    return cached


def cross_validated(
    x: np.ndarray, y: np.ndarray, out: np.ndarray, n_classes: int, config: TrainConfig
) -> tuple[float, list[tuple[Candidate, float, np.ndarray]]]:
    """The shared model's score and, per candidate, its out-of-fold score and per-fold
    advantage over the shared model, as stage 1 computes them."""
    folds = stratified_folds(list(y), len(y), config.folds, np.random.default_rng(config.seed))
    parts = [np.flatnonzero(folds == k) for k in range(int(folds.max()) + 1)]
    shared = np.array([macro_f1(y[p], out[p].argmax(1)) for p in parts])
    table = []
    for candidate, predicted in stage1_candidates(x, out, y, y, n_classes, parts, config):
        folds_score = np.array([macro_f1(y[p], predicted[p].argmax(1)) for p in parts])
        table.append((candidate, macro_f1(y, predicted.argmax(1)), folds_score - shared))
    return macro_f1(y, out.argmax(1)), table


def choose(
    shared: float,
    table: list[tuple[Candidate, float, np.ndarray]],
    selection_se: float,
    offered: Offered = lambda candidate: True,
) -> Candidate | None:
    """The runtime's rule over the `offered` candidates: the best cross-validated score among
    those with a clear advantage over the shared model (None: keep the shared model)."""
    chosen, best = None, shared
    for candidate, score, advantage in table:
        if offered(candidate) and clear_advantage(advantage, selection_se) and score > best:
            chosen, best = candidate, score
    return chosen


def apply(
    candidate: Candidate | None,
    train: tuple[np.ndarray, np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    n_classes: int,
    config: TrainConfig,
) -> np.ndarray:
    (x, y, out), (xt, outt) = train, test
    if candidate is None:
        return outt
    kind, value = candidate
    if kind == "head":
        w, b = fit_head_delta(x, out, y, y, n_classes, value, config.class_weighting)
        head: np.ndarray = outt + xt @ w + b
        return head
    if kind == "scratch":  # a per-user logistic regression on the features alone
        w, b = fit_logistic(x, y, n_classes, l2=value, steps=200, class_weighting=True)
        alone: np.ndarray = xt @ w + b
        return alone
    result: np.ndarray = knn_mix(outt, xt, unit_rows(x), y, value[0], value[1])
    return result


def candidate_sets(
    default: TrainConfig, thresholds: list[float], single_heads: list[float]
) -> dict[str, tuple[float, Offered]]:
    """name: (selection_se, which candidates the rule may pick). The default grids at each
    threshold and without retrieval; with `single_heads`, one head strength alone and with
    the retrieval mix, at each threshold."""
    grid = set(default.head_l2)

    def in_grid(candidate: Candidate) -> bool:
        return candidate[0] == "knn" or candidate[1] in grid

    def no_knn(candidate: Candidate) -> bool:
        return candidate[0] == "head" and candidate[1] in grid

    rules: dict[str, tuple[float, Offered]] = {f"se{t:g}": (t, in_grid) for t in thresholds}
    rules[f"se{default.selection_se:g} without knn"] = (default.selection_se, no_knn)
    for l2 in single_heads:
        for t in thresholds:
            rules[f"head {l2:g} only, se{t:g}"] = (t, _one_head(l2, knn=False))
            rules[f"head {l2:g} + knn, se{t:g}"] = (t, _one_head(l2, knn=True))
    return rules


def _one_head(l2: float, *, knn: bool) -> Offered:
    def offered(candidate: Candidate) -> bool:
        return candidate == ("head", l2) or (knn and candidate[0] == "knn")

    return offered


def run(
    task: str,
    data: Path,
    bundle: Path,
    cache: Path | None,
    thresholds: list[float],
    single_heads: list[float],
) -> dict[str, Any]:
    rows, eval_config, labels = TASKS[task](data)
    records, _ = to_records(rows, eval_config, "classification", labels)
    splits = split_users(records, eval_config)
    feats = features(bundle, [r.text for r in records], cache)
    n_classes = len(labels)
    default = TrainConfig()
    # every candidate any rule offers is cross-validated once; each rule picks among its own
    config = dataclasses.replace(default, head_l2=tuple(sorted({*default.head_l2, *single_heads})))
    rules = candidate_sets(default, thresholds, single_heads)
    always = {f"head {l2:g} always": ("head", l2) for l2 in single_heads}
    personal = [*rules, *always, "scratch_lr"]
    scores: dict[str, list[float]] = {name: [] for name in ["global", *personal]}
    hyper: tuple[float, bool | None] | None = None
    for seed in INNER_SEEDS:
        rng = np.random.default_rng(1000 + seed)
        inner = {}
        for user, split in sorted(splits.items()):
            if len(split.train) + len(split.test) < eval_config.min_user_rows:
                continue
            order = rng.permutation(len(split.train))
            cut = max(1, round(0.3 * len(split.train)))
            x = np.stack([feats[r.text] for r in split.train]).astype(np.float64)
            y = np.array([labels.index(str(r.label)) for r in split.train])
            inner[user] = (x[order[cut:]], y[order[cut:]], x[order[:cut]], y[order[:cut]])
        all_x = np.concatenate([v[0] for v in inner.values()]).astype(np.float32)
        all_y = np.concatenate([v[1] for v in inner.values()])
        all_users = np.concatenate([[u] * len(v[1]) for u, v in inner.items()])
        if hyper is None:  # chosen once, on the first inner seed's training rows
            head = configured_global_head(all_x, all_y, all_users, n_classes, eval_config)
            hyper, (w_g, b_g) = (head.l2, head.class_weighting), (head.weights, head.bias)
        else:
            w_g, b_g = fit_logistic(
                all_x,
                all_y,
                n_classes,
                l2=hyper[0],
                steps=eval_config.head_steps,
                class_weighting=bool(hyper[1]),
            )
        for x, y, xt, yt in inner.values():
            out, outt = x @ w_g + b_g, xt @ w_g + b_g
            shared_test = macro_f1(yt, outt.argmax(1))
            scores["global"].append(shared_test)
            if len(y) < 4 or len(set(y.tolist())) < 2:  # not trained: the user keeps global
                for name in personal:
                    scores[name].append(shared_test)
                continue
            scratch = apply(("scratch", 1.0), (x, y, out), (xt, outt), n_classes, config)
            scores["scratch_lr"].append(macro_f1(yt, scratch.argmax(1)))
            shared, table = cross_validated(x, y, out, n_classes, config)
            scored: dict[Candidate | None, float] = {}  # rules often agree: fit each once
            picks = {
                name: choose(shared, table, se, offered) for name, (se, offered) in rules.items()
            }
            for name, chosen in [*picks.items(), *always.items()]:
                if chosen not in scored:
                    predicted = apply(chosen, (x, y, out), (xt, outt), n_classes, config)
                    scored[chosen] = macro_f1(yt, predicted.argmax(1))
                scores[name].append(scored[chosen])
    shared_scores = np.array(scores["global"])
    assert hyper is not None
    return {
        "users": len(inner),
        "user_seed_pairs": len(shared_scores),
        "global_head": {"l2": hyper[0], "class_weighting": hyper[1]},
        "rules": compared(scores, shared_scores),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    data_arguments(parser, "nested_selection.json")
    parser.add_argument("--thresholds", default="0,0.5,1,1.5,2,2.5")
    parser.add_argument(
        "--single-heads",
        default="",
        help="head L2 strengths to also try alone (and with retrieval), e.g. 0.3,1,3",
    )
    args = parser.parse_args()
    tasks = chosen_tasks(parser, args.tasks)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    single_heads = [float(v) for v in args.single_heads.split(",") if v]
    if any(not math.isfinite(v) or v <= 0 for v in single_heads):
        parser.error("--single-heads must be finite numbers > 0")
    if any(not math.isfinite(t) or t < 0 for t in thresholds):
        parser.error("--thresholds must be finite numbers >= 0")
    report: dict[str, Any] = {"machine": machine_info(), "tasks": {}}
    for task in tasks:
        start = time.perf_counter()
        report["tasks"][task] = run(
            task, args.data, args.bundle, args.feature_cache, thresholds, single_heads
        )
        report["tasks"][task]["seconds"] = time.perf_counter() - start
        print(task, json.dumps(report["tasks"][task]["rules"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
