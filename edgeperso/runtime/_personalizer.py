"""Personalizer: one bundle, one encrypted store, every user of the app."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from edgeperso._errors import InvalidInputError, UnsupportedError
from edgeperso.bundle import INFER_GRAPH, Bundle, Manifest
from edgeperso.runtime import _params
from edgeperso.runtime._params import Params
from edgeperso.runtime._session import Graph, SessionOptions
from edgeperso.runtime._tokenize import Encoded, TextEncoder, check_texts
from edgeperso.runtime._trainer import (
    AdamW,
    Budget,
    TrainConfig,
    TrainProgress,
    TrainResult,
    class_weights,
    clip_by_global_norm,
    learning_rate,
    macro_f1,
    split_holdout,
)
from edgeperso.store import Example, Feedback, Store

log = logging.getLogger(__name__)

ADAPTER = "adapter"  # the user's accepted parameters (blob name in the store)
CHECKPOINT = "train-checkpoint"  # optimizer state of an unfinished train() call
SHARED_USER = "__edgeperso_shared__"  # persona/global parameters installed by federation


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One text's prediction. `label` and `probabilities` for classification, `score` for
    regression; `personalized` is False when the user has no accepted adapter."""

    label: str | None
    score: float | None
    probabilities: Mapping[str, float] | None
    personalized: bool
    truncated: bool


@dataclasses.dataclass
class _Prepared:
    """A user's training data in memory: the frozen lower half computed once."""

    ids: list[np.ndarray]  # per example [len] int64 token ids
    prefix: list[np.ndarray]  # per example [len, d] float32
    targets: np.ndarray  # [n, C] float32
    labels: np.ndarray | None  # [n] int64 for classification
    history: np.ndarray  # [H, d]
    history_mask: np.ndarray  # [H]
    truncated: int


class Personalizer:
    """Personalized inference and on-device training for every user of an app.

    store = Store.open("profile.db", key=KeyringKey("com.example.notes", "default"))
    model = Personalizer.open("bundle/", store)
    model.add_examples("alice", [Example("loved it", label="pos")])
    model.train("alice")
    model.predict("alice", ["what a day"])
    """

    def __init__(self, bundle: Bundle, store: Store, options: SessionOptions) -> None:
        self.bundle = bundle
        self.manifest: Manifest = bundle.manifest
        self.store = store
        self._options = options
        self._infer = Graph(bundle.path_of(INFER_GRAPH), options)
        self._train_graphs: dict[str, Graph] = {}
        self._encoder = TextEncoder(
            bundle.path_of(self.manifest.tokenizer), self.manifest.max_length
        )
        self._shared = _params.shared_params(self.manifest, bundle.initial_params())
        installed = store.get_blob(SHARED_USER, "shared") if SHARED_USER in store.users() else None
        if installed is not None:
            self._shared.update(_params.from_bytes(installed))

    @classmethod
    def open(
        cls,
        bundle: str | os.PathLike[str] | Bundle,
        store: Store,
        *,
        session: SessionOptions | None = None,
    ) -> Personalizer:
        """Verify the bundle (every hash) and create the one shared inference session."""
        if not isinstance(bundle, Bundle):
            bundle = Bundle.load(Path(bundle))
        if not isinstance(store, Store):
            raise InvalidInputError("store must be an edgeperso Store (Store.open(...))")
        return cls(bundle, store, session or SessionOptions())

    # -- data -------------------------------------------------------------------------------

    def add_examples(self, user: str, examples: Sequence[Example]) -> list[int]:
        """Validate and store examples (encrypted), and cache their history embeddings."""
        if not examples:
            raise InvalidInputError("examples is empty")
        for i, ex in enumerate(examples):
            if not isinstance(ex, Example):
                raise InvalidInputError(f"examples[{i}] is not an edgeperso Example")
            self._check_label(ex.label, f"examples[{i}].label")
        check_texts([ex.text for ex in examples])
        ids = self.store.add_examples(user, examples)
        features = self._run_base([ex.text for ex in examples], ["features"])[0]
        self.store.put_embeddings(user, dict(zip(ids, features, strict=True)))
        return ids

    def add_feedback(self, user: str, events: Sequence[Feedback]) -> list[int]:
        if not events:
            raise InvalidInputError("events is empty")
        return self.store.add_feedback(user, events)

    def forget(self, user: str) -> bool:
        """Crypto-shred everything about `user`: examples, embeddings, adapter, checkpoints."""
        return self.store.forget_user(user)

    # -- inference --------------------------------------------------------------------------

    def predict(self, user: str, texts: Sequence[str]) -> list[Prediction]:
        if self.manifest.task == "embedding":
            raise UnsupportedError("an embedding bundle has no labels or scores: use embed()")
        out, encoded, personal = self._run_user(user, texts, "output")
        preds = []
        for row, truncated in zip(out, encoded.truncated, strict=True):
            if self.manifest.task == "classification":
                p = np.exp(row - row.max())
                p /= p.sum()
                probs = {label: float(v) for label, v in zip(self.manifest.labels, p, strict=True)}
                label = self.manifest.labels[int(np.argmax(row))]
                preds.append(Prediction(label, None, probs, personal, truncated))
            else:
                preds.append(Prediction(None, float(row[0]), None, personal, truncated))
        return preds

    def score(self, user: str, texts: Sequence[str]) -> np.ndarray:
        """Raw outputs: [n] scores (regression) or [n, C] class probabilities."""
        out, _, _ = self._run_user(user, texts, "output")
        if self.manifest.task == "regression":
            scores: np.ndarray = out[:, 0]
            return scores
        if self.manifest.task == "classification":
            e = np.exp(out - out.max(-1, keepdims=True))
            probs: np.ndarray = e / e.sum(-1, keepdims=True)
            return probs
        raise UnsupportedError("an embedding bundle has no scores: use embed()")

    def embed(self, user: str, texts: Sequence[str]) -> np.ndarray:
        """[n, d] embeddings with the user's adapter (the bundle's output for embedding
        bundles, the pooled text features otherwise)."""
        name = "output" if self.manifest.task == "embedding" else "features"
        out, _, _ = self._run_user(user, texts, name)
        return out

    def similar(self, user: str, text: str, k: int = 5) -> list[tuple[Example, float]]:
        """Retrieval over the user's own history: the k examples most similar to `text`
        (cosine of base-model embeddings), best first."""
        if k < 1:
            raise InvalidInputError("k must be >= 1")
        check_texts([text])
        cached = self.store.embeddings(user)
        if not cached:
            return []
        query = self._run_base([text], ["features"])[0][0]
        ids = sorted(cached)
        matrix = np.stack([cached[i] for i in ids])
        sims = matrix @ query / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query) + 1e-12)
        by_id = {ex.id: ex for ex in self.store.examples(user)}
        order = [i for i in np.argsort(-sims) if ids[i] in by_id][:k]
        return [(by_id[ids[i]], float(sims[i])) for i in order]

    # -- shared parameters ----------------------------------------------------------------------

    def shared_params(self) -> Params:
        """The persona and global parameters currently in use (copies)."""
        return {k: v.copy() for k, v in self._shared.items()}

    def install_shared(self, params: Mapping[str, np.ndarray]) -> None:
        """Install new persona/global parameters (from a federated round); persisted."""
        specs = tuple(p for p in self.manifest.params if p.level != "user" and p.name in params)
        unknown = set(params) - {p.name for p in self.manifest.params if p.level != "user"}
        if unknown:
            raise InvalidInputError(
                f"not persona/global parameters of this bundle: {sorted(unknown)}"
            )
        _params.check_params(specs, params)
        updated = self._shared | {k: np.array(v, np.float32) for k, v in params.items()}
        self.store.put_blob(SHARED_USER, "shared", _params.to_bytes(updated), keep=2)
        self._shared = updated

    # -- training ---------------------------------------------------------------------------

    def train(
        self,
        user: str,
        config: TrainConfig | None = None,
        *,
        on_progress: Callable[[TrainProgress], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> TrainResult:
        """Train `user`'s parameters on their stored examples, on this device.

        Holds the user's lock (LockedError if another trainer has it); the app can keep
        predicting meanwhile with the previous adapter. Each epoch is checkpointed
        (encrypted), so a killed train() resumes where it stopped on the next call.
        """
        config = config or TrainConfig()
        if not isinstance(config, TrainConfig):
            raise InvalidInputError("config must be a TrainConfig")
        if not self.manifest.train.graphs:
            raise UnsupportedError(
                f"this {self.manifest.task} bundle has no training graph; export a "
                "classification or regression bundle to train on device"
            )
        with self.store.lock_user(user):
            return self._train_locked(user, config, on_progress, cancel)

    def _train_locked(
        self,
        user: str,
        config: TrainConfig,
        on_progress: Callable[[TrainProgress], None] | None,
        cancel: Callable[[], bool] | None,
    ) -> TrainResult:
        start = time.perf_counter()
        examples = self._training_examples(user, config)
        data = self._prepare(user, examples)
        rng = np.random.default_rng(config.seed)
        train_idx, held_idx = split_holdout(
            None if data.labels is None else list(data.labels),
            len(examples),
            config.holdout_fraction,
            rng,
        )
        if len(train_idx) == 0 or len(held_idx) == 0:
            raise InvalidInputError("not enough examples to hold some out; add more examples")
        params = _params.fresh_user_params(self.manifest, rng)
        optimizer = AdamW(config.weight_decay)
        batch = self.manifest.train.graphs[0].batch_size
        steps_per_epoch = math.ceil(len(train_idx) / batch)
        total = max(steps_per_epoch * config.epochs, config.min_steps)
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        fingerprint = self._fingerprint(examples, config)
        step, best, best_score, resumed = self._resume(user, fingerprint, params, optimizer)
        global_score = self._evaluate(data, held_idx, None)
        if best is None:
            best_score = global_score
        budget = Budget(config, cancel, start)
        weights = None
        if data.labels is not None:
            weights = class_weights(
                data.labels[train_idx], len(self.manifest.labels), config.class_weighting
            )
        stopped = "completed"
        loss = float("nan")
        # Held-out evaluation (and checkpointing) about ten times per call, not every pass.
        passes, eval_every = 0, max(1, math.ceil(total / steps_per_epoch / 10))
        while step < total:
            order = rng.permutation(train_idx)
            for i in range(0, len(order), batch):
                why = budget.stop_reason(step)
                if why is not None or step >= total:
                    stopped = why or "completed"
                    break
                loss = self._step(
                    params,
                    optimizer,
                    data,
                    order[i : i + batch],
                    weights,
                    config,
                    learning_rate(config, step, total),
                )
                step += 1
                if on_progress is not None:
                    on_progress(
                        TrainProgress(
                            step, total, step // steps_per_epoch, loss, time.perf_counter() - start
                        )
                    )
            passes += 1
            if passes % eval_every and step < total and stopped == "completed":
                continue
            score = self._evaluate(data, held_idx, params)
            if self._better(score, best_score):
                best, best_score = {k: v.copy() for k, v in params.items()}, score
            self._checkpoint(user, fingerprint, step, params, optimizer, best, best_score)
            if stopped != "completed":
                break
        self.store.delete_blob(user, CHECKPOINT)
        kept, reason = (
            "global",
            "the trained parameters did not beat the shared model on held-out data",
        )
        size = 0
        if best is not None and self._better(best_score, global_score):
            blob = _params.to_bytes(best)
            self.store.put_blob(user, ADAPTER, blob, keep=2)
            kept, reason, size = "personal", "beats the shared model on held-out data", len(blob)
        else:
            self.store.delete_blob(user, ADAPTER)
        return TrainResult(
            kept=kept,  # type: ignore[arg-type]
            reason=reason,
            metric="mae" if self.manifest.task == "regression" else "macro_f1",
            global_score=global_score,
            personal_score=best_score,
            examples=len(examples),
            holdout=len(held_idx),
            steps=step,
            epochs=step / steps_per_epoch,
            seconds=time.perf_counter() - start,
            stopped=stopped,  # type: ignore[arg-type]
            truncated_texts=data.truncated,
            resumed_from_step=resumed,
            adapter_bytes=size,
        )

    def _training_examples(self, user: str, config: TrainConfig) -> list[Example]:
        examples = [ex for ex in self.store.examples(user) if ex.label is not None]
        examples.sort(key=lambda ex: (ex.timestamp, ex.id or 0))
        if config.max_examples is not None:
            examples = examples[-config.max_examples :]
        if len(examples) < 4:
            raise InvalidInputError(
                f"user has {len(examples)} labelled examples; training needs at least 4 "
                "(some are held out to check the result against the shared model)"
            )
        return examples

    def _prepare(self, user: str, examples: list[Example]) -> _Prepared:
        texts = [ex.text for ex in examples]
        ids, prefixes, truncated = [], [], 0
        # Training pads to the exported sequence buckets; a text longer than the largest one
        # is cut there, and counted as truncated like a text over max_length.
        longest = max(g.seq_len for g in self.manifest.train.graphs)
        for text in texts:
            enc = self._encoder.encode([text])
            truncated += int(enc.truncated[0] or enc.input_ids.shape[1] > longest)
            (prefix,) = self._infer.run(["prefix"], self._base_feeds(enc))
            ids.append(enc.input_ids[0])
            prefixes.append(prefix[0])
        history, mask = self._history(user)
        if self.manifest.task == "classification":
            index = {label: i for i, label in enumerate(self.manifest.labels)}
            labels = np.array([index[str(ex.label)] for ex in examples], np.int64)
            targets = np.eye(len(index), dtype=np.float32)[labels]
            return _Prepared(ids, prefixes, targets, labels, history, mask, truncated)
        scores = np.array([[float(ex.label)] for ex in examples], np.float32)  # type: ignore[arg-type]
        return _Prepared(ids, prefixes, scores, None, history, mask, truncated)

    def _step(
        self,
        params: Params,
        optimizer: AdamW,
        data: _Prepared,
        rows: np.ndarray,
        weights: np.ndarray | None,
        config: TrainConfig,
        lr: float,
    ) -> float:
        longest = max(len(data.prefix[i]) for i in rows)
        spec = self.manifest.train.graph_for(longest)
        graph = self._train_graph(spec.file)
        b, length = spec.batch_size, spec.seq_len
        d = self.manifest.hidden_size
        prefix = np.zeros((b, length, d), np.float32)
        mask = np.zeros((b, length), np.int64)
        targets = np.zeros((b, data.targets.shape[1]), np.float32)
        w = np.zeros(b, np.float32)
        for slot, i in enumerate(rows):
            n = min(len(data.prefix[i]), length)
            prefix[slot, :n] = data.prefix[i][:n]
            mask[slot, :n] = 1
            targets[slot] = data.targets[i]
            w[slot] = 1.0 if weights is None or data.labels is None else weights[data.labels[i]]
        w /= max(float(w.sum()), 1e-12)
        feeds: dict[str, np.ndarray] = {
            "prefix": prefix,
            "attention_mask": mask,
            "history": data.history,
            "history_mask": data.history_mask,
            "targets": targets,
            "weights": w,
            "prox_weight": np.array(config.prox_weight, np.float32),
        }
        for name, value in (self._shared | params).items():
            feeds[name] = value
            # Ditto: the user's deltas are pulled toward 0, i.e. toward the shared model.
            feeds[f"ref.{name}"] = np.zeros_like(value) if name in params else value
        outputs = ["loss", *(f"grad.{n}" for n in params if f"grad.{n}" in graph.outputs)]
        values = graph.run(outputs, feeds)
        grads = {n.removeprefix("grad."): g for n, g in zip(outputs[1:], values[1:], strict=True)}
        clip_by_global_norm(grads, config.max_grad_norm)
        optimizer.step(params, grads, lr)
        return float(values[0])

    def _evaluate(self, data: _Prepared, rows: np.ndarray, user_params: Params | None) -> float:
        params = self._shared | (user_params or self._zero_user())
        feeds = _params.infer_feeds(self.manifest, params)
        feeds |= {"history": data.history, "history_mask": data.history_mask}
        # Through the inference graph, one text per run: exactly how the user will be served.
        outs = []
        for i in rows:
            ids = data.ids[i][None, :]
            run = feeds | {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            outs.append(self._infer.run(["output"], run)[0][0])
        out = np.stack(outs)
        if data.labels is not None:
            return macro_f1(data.labels[rows], out.argmax(-1))
        return float(np.abs(out[:, 0] - data.targets[rows, 0]).mean())

    def _better(self, score: float, than: float) -> bool:
        return score < than if self.manifest.task == "regression" else score > than

    # -- helpers ----------------------------------------------------------------------------

    def _train_graph(self, name: str) -> Graph:
        if name not in self._train_graphs:
            self._train_graphs[name] = Graph(self.bundle.path_of(name), self._options)
        return self._train_graphs[name]

    def _zero_user(self) -> Params:
        return {s.name: np.zeros(s.shape, np.float32) for s in self.manifest.params_at("user")}

    def _check_label(self, label: object, where: str) -> None:
        task = self.manifest.task
        if label is None:
            return
        if task == "classification" and label not in self.manifest.labels:
            # The label itself is user data: name where it is, never what it is.
            raise InvalidInputError(
                f"{where} is not one of the bundle's labels {list(self.manifest.labels)}"
            )
        if task == "regression" and (
            isinstance(label, bool)
            or not isinstance(label, int | float)
            or not math.isfinite(label)
        ):
            raise InvalidInputError(f"{where} must be a finite number for a regression bundle")
        if task == "embedding":
            raise InvalidInputError(f"{where}: an embedding bundle takes examples without labels")

    def _history(self, user: str) -> tuple[np.ndarray, np.ndarray]:
        ue = self.manifest.user_embedding
        size = ue.history_size if ue else 1
        history = np.zeros((size, self.manifest.hidden_size), np.float32)
        mask = np.zeros(size, np.float32)
        cached = self.store.embeddings(user) if ue else {}
        recent = sorted(cached)[-size:]
        for row, key in enumerate(recent):
            history[row] = cached[key]
            mask[row] = 1.0
        return history, mask

    def _base_feeds(self, enc: Encoded) -> dict[str, np.ndarray]:
        return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}

    def _run_base(self, texts: Sequence[str], outputs: list[str]) -> list[np.ndarray]:
        """The bundle's base model (no adapters, no history), one text per run when the int8
        graph is not batch-invariant, so a text's output never depends on its neighbours."""
        return self._run(texts, outputs, {})[0]

    def _run_user(
        self, user: str, texts: Sequence[str], output: str
    ) -> tuple[np.ndarray, Encoded, bool]:
        blob = self.store.get_blob(user, ADAPTER)
        user_params = _params.from_bytes(blob) if blob is not None else self._zero_user()
        feeds = _params.infer_feeds(self.manifest, self._shared | user_params)
        history, mask = self._history(user)
        feeds |= {"history": history, "history_mask": mask}
        outs, enc = self._run(texts, [output], feeds)
        return outs[0], enc, blob is not None

    def _run(
        self, texts: Sequence[str], outputs: list[str], feeds: Mapping[str, np.ndarray]
    ) -> tuple[list[np.ndarray], Encoded]:
        check_texts(texts)
        if self.manifest.quantization.batch_invariant:
            enc = self._encoder.encode(texts)
            return self._infer.run(outputs, {**feeds, **self._base_feeds(enc)}), enc
        rows: list[list[np.ndarray]] = []
        truncated = []
        for text in texts:
            enc = self._encoder.encode([text])
            rows.append(self._infer.run(outputs, {**feeds, **self._base_feeds(enc)}))
            truncated.append(enc.truncated[0])
        stacked = [np.concatenate([r[k] for r in rows]) for k in range(len(outputs))]
        empty = np.zeros((0, 0), np.int64)
        return stacked, Encoded(empty, empty, tuple(truncated))

    def _fingerprint(self, examples: list[Example], config: TrainConfig) -> str:
        digest = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
        for ex in examples:
            digest.update(str(ex.id).encode() + b",")
        return digest.hexdigest()

    def _checkpoint(
        self,
        user: str,
        fingerprint: str,
        step: int,
        params: Params,
        optimizer: AdamW,
        best: Params | None,
        best_score: float,
    ) -> None:
        meta = {"fingerprint": fingerprint, "step": step, "best_score": best_score}
        blob: dict[str, np.ndarray] = {f"p.{k}": v for k, v in params.items()}
        blob |= {f"o.{k}": v for k, v in optimizer.state().items()}
        if best is not None:
            blob |= {f"b.{k}": v for k, v in best.items()}
        blob["meta"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
        self.store.put_blob(user, CHECKPOINT, _params.to_bytes(blob), keep=1)

    def _resume(
        self, user: str, fingerprint: str, params: Params, optimizer: AdamW
    ) -> tuple[int, Params | None, float, int]:
        raw = self.store.get_blob(user, CHECKPOINT)
        if raw is None:
            return 0, None, float("nan"), 0
        blob = _params.from_bytes(raw)
        meta = json.loads(bytes(blob["meta"]).decode())
        if meta["fingerprint"] != fingerprint:
            log.info("discarding a checkpoint made for other examples or settings")
            return 0, None, float("nan"), 0
        params.update({k[2:]: v for k, v in blob.items() if k.startswith("p.")})
        optimizer.load({k[2:]: v for k, v in blob.items() if k.startswith("o.")})
        best = {k[2:]: v for k, v in blob.items() if k.startswith("b.")} or None
        return int(meta["step"]), best, float(meta["best_score"]), int(meta["step"])
