"""evaluate(): global vs personalized, per user, on a labelled per-user data set."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import statistics
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeperso._atomic import write_atomically
from edgeperso._errors import InvalidInputError, UnsupportedError
from edgeperso.bundle import Bundle, sha256_file
from edgeperso.evaluate import _metrics
from edgeperso.evaluate._config import EvalConfig
from edgeperso.evaluate._data import (
    Record,
    UserSplit,
    as_table,
    duplicate_rows,
    read_table,
    split_users,
    to_records,
)
from edgeperso.evaluate._global import configured_global_head
from edgeperso.evaluate._paths import writable_file
from edgeperso.evaluate._report import ColdStartPoint, EvalReport, UserResult, machine_info
from edgeperso.runtime import Personalizer, SharedTrainConfig, _params
from edgeperso.runtime._shared import load_shared_file
from edgeperso.store import Example, RawKey, Store

log = logging.getLogger(__name__)

# A user the evaluation never gives data to: no adapter, no history, i.e. the shared model.
GLOBAL_USER = "__edgeperso_eval_global__"
TRAINED_ON = "trained_on_rows"  # metadata of a saved global level: digest of its rows
_CHUNK = 32  # texts per inference call (progress granularity)


@dataclasses.dataclass(frozen=True)
class EvalProgress:
    stage: str  # "features", "users" or "cold-start k=<k>"
    done: int
    total: int


def evaluate(
    data: str | os.PathLike[str] | Iterable[Mapping[str, object]],
    bundle: str | os.PathLike[str] | Bundle,
    config: EvalConfig | None = None,
    *,
    on_progress: Callable[[EvalProgress], None] | None = None,
) -> EvalReport:
    """Split each user's rows, fit the global head on every training row, personalize each
    evaluated user on device and compare both on the user's test rows.

    `data` is a .csv/.tsv/.jsonl path or rows already read (see `read_table`; values that
    are not str are converted as the JSONL reader does). Everything the run stores goes to
    a temporary encrypted store, deleted at the end.
    """
    config = config or EvalConfig()
    if not isinstance(config, EvalConfig):
        raise InvalidInputError("config must be an EvalConfig")
    # checked now rather than after minutes of features and training
    if config.save_global is not None:
        writable_file(config.save_global, "save_global")
    if config.feature_cache is not None:
        writable_file(config.feature_cache, "feature_cache")
    started = time.perf_counter()
    rows = read_table(data) if isinstance(data, str | os.PathLike) else as_table(data)
    loaded = bundle if isinstance(bundle, Bundle) else Bundle.load(Path(bundle))
    manifest = loaded.manifest
    if manifest.task not in ("classification", "regression"):
        raise UnsupportedError(
            f"a {manifest.task} bundle has no labels to evaluate; export a classification "
            "or regression bundle"
        )
    records, dropped = to_records(rows, config, manifest.task, manifest.labels)
    duplicates = duplicate_rows(records)
    if duplicates:
        log.warning(
            "%d rows repeat an earlier row's user and text; each text's copies are kept on "
            "one side of its user's split",
            duplicates,
        )
    splits = split_users(records, config)
    chosen, skipped = _choose_users(splits, config)
    progress = on_progress or (lambda _: None)
    with (
        tempfile.TemporaryDirectory(prefix="edgeperso-eval-") as tmp,
        Store.open(Path(tmp) / "eval.db", RawKey(os.urandom(32))) as store,
    ):
        run = _Run(Personalizer.open(loaded, store), config, progress)
        head = run.fit_global(splits)
        results = run.personalize_all(splits, chosen, skipped)
        cold = run.cold_start(splits, results)
    metric = "mae" if manifest.task == "regression" else "macro_f1"
    summary = _summaries(results, config, manifest.task)
    full = summary[metric]
    cold.append(
        ColdStartPoint(
            None,
            full.users,
            metric,
            full.gain_mean,
            full.gain_ci95,
            full.share_worse,
            _share([r.kept == "personal" for r in results]),
        )
    )
    train_s = [r.train_seconds for r in results]
    kept = [r.adapter_bytes for r in results if r.kept == "personal"]
    return EvalReport(
        task=manifest.task,
        labels=tuple(manifest.labels),
        primary_metric=metric,
        bundle={
            "source": manifest.source,
            "architecture": manifest.architecture,
            "hidden_size": manifest.hidden_size,
            "max_length": manifest.max_length,
            "quantization_target": manifest.quantization.target,
            "user_param_bytes": sum(4 * math.prod(p.shape) for p in manifest.params_at("user")),
        },
        config=config.to_json(),
        data={
            "rows": len(rows),
            "dropped_rows": dropped,
            "duplicate_rows": duplicates,
            "users": len(splits),
            "evaluated_users": len(results),
            "skipped_users": skipped,
            "train_rows": sum(len(s.train) for s in splits.values()),
            "test_rows_evaluated": sum(r.test_rows for r in results),
        },
        global_head=head,
        users=tuple(results),
        summary=summary,
        cold_start=tuple(cold),
        timing={
            "total_seconds": time.perf_counter() - started,
            "train_seconds_per_user_mean": _mean(train_s),
            "train_seconds_per_user_median": statistics.median(train_s) if train_s else math.nan,
            "train_seconds_per_user_max": max(train_s, default=math.nan),
            "personalize_seconds_per_user_mean": _mean([r.personalize_seconds for r in results]),
            "adapter_bytes_mean": _mean([float(b) for b in kept]),
            "adapter_bytes_max": float(max(kept, default=0)),
        },
        machine=machine_info(),
    )


def _choose_users(
    splits: Mapping[str, UserSplit], config: EvalConfig
) -> tuple[list[str], dict[str, str]]:
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for user, split in splits.items():
        n = len(split.train) + len(split.test)
        if n < config.min_user_rows:
            skipped[user] = f"{n} labelled rows < min_user_rows={config.min_user_rows}"
        elif config.max_users is not None and len(chosen) >= config.max_users:
            skipped[user] = f"beyond max_users={config.max_users}"
        elif not split.test:
            skipped[user] = "one distinct text: no test row can be held out"
        else:
            chosen.append(user)
    if not chosen:
        sizes = [len(s.train) + len(s.test) for s in splits.values()]
        few = sum(n < config.min_user_rows for n in sizes)
        reasons = []
        if few:
            reasons.append(
                f"{few} have fewer than min_user_rows={config.min_user_rows} labelled rows (the "
                f"most any user has is {max(sizes)}; lower --min-user-rows or add rows)"
            )
        if len(splits) > few:
            reasons.append(f"{len(splits) - few} have a single distinct text, none to test on")
        raise InvalidInputError(
            f"no user can be evaluated: of {len(splits)} user(s), {' and '.join(reasons)}"
        )
    return chosen, skipped


class _Run:
    """The state of one evaluation: the personalizer over its temporary store."""

    def __init__(
        self, model: Personalizer, config: EvalConfig, progress: Callable[[EvalProgress], None]
    ) -> None:
        self.model = model
        self.config = config
        self.progress = progress
        self.task = model.manifest.task
        self.labels = tuple(model.manifest.labels)
        self.global_predictions: dict[str, list[str | float]] = {}  # by user: test rows

    def fit_global(self, splits: Mapping[str, UserSplit]) -> dict[str, Any]:
        """Fit the global head on base features of every user's training rows and install
        it; with `global_epochs`, then train the global LoRA and head on those rows and
        cross-validate the head again on the trained model's features. With
        `global_params`, install a saved global level instead; with `save_global`, save
        the one fitted."""
        rows = [r for split in splits.values() for r in split.train]
        if self.config.global_params is not None:
            return self._load_global(rows, self.config.global_params)
        report = self._fit_head(rows)
        if self.config.global_epochs > 0:
            report = self._train_global(rows, report)
        if self.config.save_global is not None:
            sha = self.model.save_shared(
                self.config.save_global,
                {
                    TRAINED_ON: _rows_digest(rows),
                    "rows": str(len(rows)),
                    "by": "edgeperso evaluate",
                },
            )
            report["saved_to"] = {"path": self.config.save_global, "sha256": sha}
        return report

    def _train_global(self, rows: Sequence[Record], report: dict[str, Any]) -> dict[str, Any]:
        """Train the global LoRA and head from the installed head, install them and
        cross-validate the head again on the trained model's features."""
        examples = [Example(r.text, label=r.label) for r in rows]
        trained = self.model.train_shared(
            examples,
            config=SharedTrainConfig(
                epochs=self.config.global_epochs,
                learning_rate=self.config.global_learning_rate,
                seed=self.config.seed,
            ),
            on_progress=lambda p: self.progress(
                EvalProgress("global adapter", p.step, p.total_steps)
            ),
        )
        self.model.install_shared(trained.params)
        log.info(
            "global adapter: %d steps in %.0f s, loss %.4f -> %.4f",
            trained.steps,
            trained.seconds,
            trained.loss_start,
            trained.loss_end,
        )
        refit = self._fit_head(rows)
        refit["before_adapter"] = report
        refit["adapter"] = {
            "epochs": self.config.global_epochs,
            "learning_rate": self.config.global_learning_rate,
            "parameters": sorted(trained.params),
            "steps": trained.steps,
            "seconds": trained.seconds,
            "loss_start": trained.loss_start,
            "loss_end": trained.loss_end,
            "distinct_texts": trained.texts,
            "truncated_texts": trained.truncated_texts,
        }
        return refit

    def _load_global(self, rows: Sequence[Record], path: str) -> dict[str, Any]:
        """Install a saved global level, after checking it saw exactly these training rows."""
        params, metadata = load_shared_file(path, self.model.bundle_identity)
        stamp = metadata.get(TRAINED_ON)
        if stamp is not None and stamp != _rows_digest(rows):
            raise InvalidInputError(
                f"{path} was fitted on other training rows than this run's (another data "
                "set, split, seed or test fraction): this run's test rows may not be held "
                "out from it. Fit it again with save_global on this configuration"
            )
        if stamp is None:
            log.warning("%s does not say which rows it was trained on", path)
        self.model.install_shared(params)
        return {
            "train_rows": len(rows),
            "loaded_from": {
                "path": path,
                "sha256": sha256_file(Path(path)),
                "metadata": metadata,
                "same_training_rows": None if stamp is None else True,
            },
        }

    def _fit_head(self, rows: Sequence[Record]) -> dict[str, Any]:
        """Cross-validate and install the global head on the current model's features."""
        texts = sorted({r.text for r in rows})
        start = time.perf_counter()
        features = self._features(texts)  # [len(texts), hidden]
        feature_s = time.perf_counter() - start
        index = {t: i for i, t in enumerate(texts)}
        x = features[[index[r.text] for r in rows]]  # [n, hidden]
        start = time.perf_counter()
        if self.task == "classification":
            target = np.array([self.labels.index(str(r.label)) for r in rows], np.int64)
        else:
            target = np.array([float(r.label) for r in rows], np.float64)
        head = configured_global_head(
            x,
            target,
            np.array([r.user for r in rows]),
            len(self.labels) if self.task == "classification" else None,
            self.config,
        )
        w, b = head.weights, head.bias
        if self.task == "classification":
            fit = float(np.mean((x @ w + b).argmax(1) == target))
        else:
            fit = float(np.mean(np.abs(x @ w[:, 0] + b[0] - target)))
        full = np.zeros(self.model.manifest.param("global.head.w").shape, np.float32)
        full[: w.shape[0]] = w  # rows for the user embedding stay 0: no user, no history
        self.model.install_shared({"global.head.w": full, "global.head.b": b})
        log.info("global head fitted on %d rows (%d distinct texts)", len(rows), len(texts))
        return {
            "train_rows": len(rows),
            "distinct_texts": len(texts),
            "train_fit": fit,  # accuracy (classification) or MAE (regression) on its rows
            "l2": head.l2,
            "class_weighting": head.class_weighting,
            "selection": head.selection,
            "feature_seconds": feature_s,
            "fit_seconds": time.perf_counter() - start,
        }

    def personalize_all(
        self, splits: Mapping[str, UserSplit], users: Sequence[str], skipped: dict[str, str]
    ) -> list[UserResult]:
        results = []
        for done, user in enumerate(users):
            self.progress(EvalProgress("users", done, len(users)))
            split = splits[user]
            self.global_predictions[user] = self._predict(GLOBAL_USER, split.test)
            try:
                results.append(self._personalize(user, split.train, split.test, f"u:{user}"))
            except InvalidInputError as exc:
                skipped[user] = f"not trained: {exc}"
                log.warning("user %d of %d was not trained: %s", done + 1, len(users), exc)
        self.progress(EvalProgress("users", len(users), len(users)))
        return results

    def cold_start(
        self, splits: Mapping[str, UserSplit], results: Sequence[UserResult]
    ) -> list[ColdStartPoint]:
        metric = "mae" if self.task == "regression" else "macro_f1"
        points = []
        for k in self.config.cold_start:
            users = [r for r in results if r.train_rows > k]
            gains, kept = [], []
            for done, base in enumerate(users):
                self.progress(EvalProgress(f"cold-start k={k}", done, len(users)))
                split = splits[base.user]
                try:
                    result = self._personalize(
                        base.user, split.train[:k], split.test, f"u:{base.user}:k{k}"
                    )
                except InvalidInputError as exc:
                    log.warning("cold start k=%d: a user was not trained: %s", k, exc)
                    continue
                g, p = base.global_metrics[metric], result.personal_metrics[metric]
                gains.append(g - p if metric == "mae" else p - g)
                kept.append(result.kept == "personal")
            self.progress(EvalProgress(f"cold-start k={k}", len(users), len(users)))
            points.append(
                ColdStartPoint(
                    k,
                    len(gains),
                    metric,
                    _mean(gains),
                    _metrics.bootstrap_ci(
                        gains, resamples=self.config.bootstrap, seed=self.config.seed
                    ),
                    _share([gain < 0 for gain in gains]),
                    _share(kept),
                )
            )
        return points

    def _personalize(
        self, user: str, train: Sequence[Record], test: Sequence[Record], uid: str
    ) -> UserResult:
        start = time.perf_counter()
        examples = [Example(r.text, label=r.label, timestamp=float(r.time)) for r in train]
        try:
            self.model.add_examples(uid, examples)
            trained = self.model.train(uid, self.config.train)
            personal_s = time.perf_counter() - start
            personal = self._predict(uid, test)
        finally:
            self.model.forget(uid)
        truth = [r.label for r in test]
        return UserResult(
            user=user,
            train_rows=len(train),
            test_rows=len(test),
            global_metrics=self._metrics(truth, self.global_predictions[user]),
            personal_metrics=self._metrics(truth, personal),
            kept=trained.kept,
            stage=trained.stage,
            head_l2=trained.head_l2,
            knn=trained.knn,
            train_seconds=trained.seconds,
            personalize_seconds=personal_s,
            adapter_bytes=trained.adapter_bytes,
            steps=trained.steps,
            stopped=trained.stopped,
            holdout_global=trained.global_score,
            holdout_personal=trained.personal_score,
        )

    def _metrics(self, truth: list[str | float], pred: list[str | float]) -> dict[str, float]:
        if self.task == "regression":
            return {"mae": _metrics.mae([float(v) for v in truth], [float(v) for v in pred])}
        t, p = [str(v) for v in truth], [str(v) for v in pred]
        return {"macro_f1": _metrics.macro_f1(t, p), "accuracy": _metrics.accuracy(t, p)}

    def _predict(self, uid: str, rows: Sequence[Record]) -> list[str | float]:
        out: list[str | float] = []
        for i in range(0, len(rows), _CHUNK):
            chunk = self.model.predict(uid, [r.text for r in rows[i : i + _CHUNK]])
            for p in chunk:
                value = p.label if self.task == "classification" else p.score
                assert value is not None  # the bundle's task decides which one is set
                out.append(value)
        return out

    def _features(self, texts: Sequence[str]) -> np.ndarray:
        """Features of `texts` under the installed shared parameters, from the feature
        cache where it has them (keyed by the bundle, those parameters and the text)."""
        scope = self.model.bundle_identity.encode() + self._shared_digest()
        keys = [hashlib.sha256(scope + t.encode()).hexdigest() for t in texts]
        path = Path(self.config.feature_cache) if self.config.feature_cache else None
        cached = _read_cache(path) if path is not None and path.exists() else {}
        missing = [t for t, k in zip(texts, keys, strict=True) if k not in cached]
        for i in range(0, len(missing), _CHUNK):
            self.progress(EvalProgress("features", i, len(missing)))
            chunk = missing[i : i + _CHUNK]
            rows = self.model.embed(GLOBAL_USER, chunk).astype(np.float32)
            for text, row in zip(chunk, rows, strict=True):
                cached[hashlib.sha256(scope + text.encode()).hexdigest()] = row
        self.progress(EvalProgress("features", len(missing), len(missing)))
        if path is not None and missing:
            # A cache shared with a bundle of another width keeps this bundle's features.
            shape = cached[keys[0]].shape
            other = sum(v.shape != shape for v in cached.values())
            if other:
                log.warning("feature cache %s: dropping %d features of another width", path, other)
            _write_cache(path, {k: v for k, v in cached.items() if v.shape == shape})
        return np.stack([cached[k] for k in keys])

    def _shared_digest(self) -> bytes:
        """The shared parameters the features depend on: everything but the head, which
        reads the features. Empty while they are still the bundle's own (so a cache made
        before trained global adapters existed stays valid)."""
        params = self.model.shared_params()
        initial = _params.shared_params(self.model.manifest, self.model.bundle.initial_params())
        names = sorted(n for n in params if not n.startswith("global.head."))
        if all(np.array_equal(params[n], initial[n]) for n in names):
            return b""
        digest = hashlib.sha256()
        for name in names:
            digest.update(name.encode() + np.ascontiguousarray(params[name]).tobytes())
        return digest.digest()


def _read_cache(path: Path) -> dict[str, np.ndarray]:
    """The feature cache's features by key; empty (with a warning) when the file cannot be
    read as one (torn, another program's, another format): it is computed and rewritten."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys, features = npz["keys"], npz["features"]  # [n] str, [n, hidden] float
        if keys.ndim != 1 or keys.dtype.kind != "U" or features.ndim != 2:
            raise ValueError("not keys and features")
        if len(keys) != len(features) or features.dtype.kind != "f":
            raise ValueError("keys and features do not match")
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        log.warning(
            "feature cache %s is not a readable feature cache (%s): its features are "
            "computed again and the file is rewritten",
            path,
            type(exc).__name__,
        )
        return {}
    return dict(zip(keys.tolist(), features.astype(np.float32), strict=True))


def _write_cache(path: Path, cached: Mapping[str, np.ndarray]) -> None:
    """Write the cache whole (temporary file, then rename); a failure loses the cache, not
    the run."""
    names = sorted(cached)
    features = np.stack([cached[k] for k in names])
    try:
        write_atomically(path, lambda out: np.savez(out, keys=np.array(names), features=features))
    except OSError as exc:
        log.warning("feature cache %s was not written: %s", path, exc.strerror)


def _rows_digest(rows: Sequence[Record]) -> str:
    """SHA-256 of the (user, text, label) triples a global level was fitted on, in a
    canonical order: the stamp that ties a saved global level to one training split."""
    digest = hashlib.sha256()
    for line in sorted(f"{r.user}\x1f{r.text}\x1f{r.label}" for r in rows):
        digest.update(line.encode() + b"\x1e")
    return digest.hexdigest()


def _summaries(
    results: Sequence[UserResult], config: EvalConfig, task: str
) -> dict[str, _metrics.GainSummary]:
    names = ("mae",) if task == "regression" else ("macro_f1", "accuracy")
    return {
        name: _metrics.summarize(
            name,
            {r.user: r.global_metrics[name] for r in results},
            {r.user: r.personal_metrics[name] for r in results},
            lower_is_better=name == "mae",
            resamples=config.bootstrap,
            seed=config.seed,
        )
        for name in names
    }


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def _share(flags: Sequence[bool]) -> float:
    return float(np.mean(flags)) if len(flags) else math.nan
