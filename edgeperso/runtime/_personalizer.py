"""Personalizer: one bundle, one encrypted store, every user of the app."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, overload

import numpy as np

from edgeperso._cpu import check_quantization
from edgeperso._errors import (
    BundleIntegrityError,
    CancelledError,
    EdgePersoError,
    InvalidInputError,
    LockedError,
    UnsupportedError,
)
from edgeperso.bundle import INFER_GRAPH, Bundle, Manifest
from edgeperso.bundle._bundle import check_pin
from edgeperso.runtime import _params, _shared
from edgeperso.runtime._head import fit_head_delta, knn_mix, stage1_candidates, unit_rows
from edgeperso.runtime._params import Params
from edgeperso.runtime._session import Graph, SessionOptions
from edgeperso.runtime._shared import SharedTrainConfig, SharedTrainResult
from edgeperso.runtime._tokenize import Encoded, TextEncoder, check_texts
from edgeperso.runtime._trainer import (
    AdamW,
    Budget,
    TrainConfig,
    TrainProgress,
    TrainResult,
    class_weights,
    clear_advantage,
    clip_by_global_norm,
    learning_rate,
    macro_f1,
    split_holdout,
    stratified_folds,
)
from edgeperso.store import Example, Feedback, KeyProvider, Store
from edgeperso.store._codec import FEDERATION_ACCOUNT, check_user
from edgeperso.store._package import open_package, seal_package

log = logging.getLogger(__name__)

ADAPTER = "adapter"  # the user's accepted parameters (blob name in the store)
IMPORTED_HISTORY = "imported-history"  # history embeddings that came with an imported adapter
ADAPTER_PACKAGE = "edgeperso.adapter/1"  # the kind of sealed package export_adapter writes
CHECKPOINT = "train-checkpoint"  # optimizer state of an unfinished train() call
CORRECTION = "correction"  # a feedback event that relabels an example
SHARED_USER = "__edgeperso_shared__"  # persona/global parameters installed by federation
# Store accounts the SDK keeps beside the app's users: never listed or accepted as a user.
_RESERVED_USERS = {
    SHARED_USER: "the installed persona/global parameters",
    FEDERATION_ACCOUNT: "the federation client's sealed state (SealedStateStore)",
}
# Beside the arrays of every stored adapter, checkpoint and shared-parameter blob: the
# bundle_identity they were made for. What another bundle made is not used (an app update
# that ships a new export): its shapes may match and its meaning not.
BUNDLE_KEY = "__bundle__"
EMBEDDINGS_OF = "edgeperso.embeddings_of"  # user state: the bundle that made the embeddings


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
    """A user's training data in memory: what the frozen model gives once per example."""

    ids: list[np.ndarray]  # per example [len] int64 token ids
    prefix: list[np.ndarray]  # per example [len, d] float32 (empty without an adapter stage)
    features: np.ndarray  # [n, d] pooled features under the shared parameters
    shared_out: np.ndarray  # [n, C] the shared model's outputs (logits or scores)
    targets: np.ndarray  # [n, C] float32
    labels: np.ndarray | None  # [n] int64 for classification
    history: np.ndarray  # [H, d]
    history_mask: np.ndarray  # [H]
    truncated: int
    # The persona/global parameters all of the above was computed under. Training uses these
    # to the end: an install_shared meanwhile (another process's) applies from the next call.
    shared: Params


@dataclasses.dataclass(frozen=True)
class SharedUpdate:
    """What `Personalizer.shared_update` gives `FederationClient.contribute`."""

    before: Params  # the persona/global parameters the device started from
    after: Params  # the same names, refitted on the user's examples
    summary: np.ndarray  # [hidden] unit-norm mean of the user's text features
    num_examples: int


@dataclasses.dataclass(frozen=True)
class _AdapterRun:
    steps: int
    holdout: int
    stopped: str
    resumed: int
    epochs: float = 0.0
    global_score: float = math.nan
    score: float = math.nan


@dataclasses.dataclass(frozen=True)
class _Served:
    """A user's decrypted serving state, kept in memory between calls (never written out)
    while `token` (Store.user_version) says nothing of the user's changed."""

    token: bytes | None
    shared_token: bytes | None  # of the shared parameters these feeds were composed with
    feeds: Params  # the inference graph's parameter and history inputs for this user
    knn: tuple[np.ndarray, np.ndarray, int, float] | None
    personal: bool


_BOOTSTRAP = 200  # resamples of the held-out slice behind the adapter stage's keep decision
_SERVED_USERS = 8  # users whose serving state stays decrypted in memory (least recent out)


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
        self._infer.expect(_params.infer_shapes(self.manifest))
        self._train_graphs: dict[str, Graph] = {}
        self._encoder = TextEncoder(
            bundle.path_of(self.manifest.tokenizer), self.manifest.max_length
        )
        self._shared_defaults = _params.shared_params(self.manifest, bundle.initial_params())
        self._shared_now = self._shared_defaults
        self._shared_token: bytes | None = b""  # never a token: read at first use
        self._served: OrderedDict[str, _Served] = OrderedDict()
        self._served_lock = threading.Lock()
        # Users a forget() is waiting for: their running train() calls cancel themselves.
        self._forgetting: Counter[str] = Counter()
        self._shared_state()  # reads the installed ones now: a bad store fails at open
        mismatch = check_quantization(self.manifest.quantization)
        if mismatch is not None:
            log.warning(mismatch)

    @classmethod
    def open(
        cls,
        bundle: str | os.PathLike[str] | Bundle,
        store: Store,
        *,
        session: SessionOptions | None = None,
        sha256: str | None = None,
    ) -> Personalizer:
        """Verify the bundle (every hash; with `sha256`, the digest edgeperso-export printed,
        that it is that bundle) and create the one shared inference session."""
        if not isinstance(bundle, Bundle):
            bundle = Bundle.load(bundle, sha256=sha256)
        elif sha256 is not None and check_pin(sha256) != bundle.sha256:
            raise BundleIntegrityError(
                f"the bundle at {str(bundle.root)!r} has sha256 {bundle.sha256}, not the pinned "
                f"{sha256!r:.80}: ship the bundle the app was built with"
            )
        if not isinstance(store, Store):
            raise InvalidInputError("store must be an edgeperso Store (Store.open(...))")
        if session is not None and not isinstance(session, SessionOptions):
            raise InvalidInputError("session must be a SessionOptions (or None)")
        return cls(bundle, store, session or SessionOptions())

    # -- data -------------------------------------------------------------------------------

    def add_examples(self, user: str, examples: Sequence[Example]) -> list[int]:
        """Validate and store examples (encrypted), and cache their history embeddings."""
        _check_app_user(user)
        examples = _as_list(examples, "examples", Example)
        for i, ex in enumerate(examples):
            if not isinstance(ex, Example):
                raise InvalidInputError(f"examples[{i}] is not an edgeperso Example")
            self._check_label(ex.label, f"examples[{i}].label")
        check_texts([ex.text for ex in examples])
        # Embedded first: the slow part stores nothing if it is interrupted.
        features = self._run_base([ex.text for ex in examples], ["features"])[0]
        ids = self.store.add_examples(user, examples)
        # only_examples: a forget() between the two writes leaves nothing behind
        self.store.put_embeddings(user, dict(zip(ids, features, strict=True)), only_examples=True)
        if self.store.get_state(user, EMBEDDINGS_OF) != self.bundle_identity:
            self._embeddings(user, fill=True)  # stamps them (and redoes another bundle's)
        return ids

    def add_feedback(self, user: str, events: Sequence[Feedback]) -> list[int]:
        """Store feedback events (encrypted). A `Feedback("correction", value=label,
        example_id=id)` replaces that example's label in later training; other events are
        kept for the app."""
        _check_app_user(user)
        events = _as_list(events, "events", Feedback)
        known: set[int | None] | None = None
        for i, event in enumerate(events):
            if not isinstance(event, Feedback):
                raise InvalidInputError(f"events[{i}] is not an edgeperso Feedback")
            if event.event == CORRECTION:
                if event.example_id is None or event.value is None:
                    raise InvalidInputError(
                        f"events[{i}]: a correction names an example_id and its new value"
                    )
                self._check_label(event.value, f"events[{i}].value")
                if known is None:
                    known = {ex.id for ex in self.store.examples(user)}
                if event.example_id not in known:
                    raise InvalidInputError(
                        f"events[{i}]: example {event.example_id} is not one of this user's "
                        "examples (use an id that add_examples returned for this user)"
                    )
        return self.store.add_feedback(user, events)

    def users(self) -> list[str]:
        """The app's users with data in the store, sorted (Store.users() without the
        accounts under which the SDK keeps shared parameters and federation state)."""
        return [u for u in self.store.users() if u not in _RESERVED_USERS]

    def forget(self, user: str, *, wait_s: float = 60.0) -> bool:
        """Crypto-shred everything about `user`: examples, embeddings, adapter, checkpoints,
        and the user's lock file. Returns False if the store held nothing of theirs.

        Holds the user's lock while it shreds, so that no trainer can write afterwards
        what it derived from the shredded examples: a `train()` of this user in this process
        is cancelled and waited for; one in another process (e.g. `edgeperso train`) is
        waited for up to `wait_s` seconds, then LockedError is raised and nothing is deleted.
        """
        _check_app_user(user)
        if not (isinstance(wait_s, int | float) and 0 <= wait_s < math.inf):
            raise InvalidInputError("wait_s must be a finite number of seconds >= 0")
        with self._served_lock:
            self._forgetting[user] += 1
        try:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    lock = self.store.lock_user(user)
                    break
                except LockedError:
                    if time.monotonic() >= deadline:
                        raise LockedError(
                            f"a trainer of this user is still running after {wait_s:g} s, "
                            "probably in another process: nothing was deleted; stop it and "
                            "call forget() again"
                        ) from None
                    time.sleep(0.05)
            try:
                with self._served_lock:
                    self._served.pop(user, None)
                found = self.store.forget_user(user)
            except BaseException:
                lock.release()
                raise
            lock.remove()
            return found
        finally:
            with self._served_lock:
                self._forgetting[user] -= 1
                if not self._forgetting[user]:
                    del self._forgetting[user]

    # -- moving a user between devices --------------------------------------------------------

    def export_adapter(self, user: str, key: KeyProvider) -> bytes:
        """The user's accepted adapter and the history embeddings it attends over, sealed so
        that `import_adapter(..., key)` on another device opens it (e.g. a PassphraseKey the
        user types on both). Raw examples are not included: move those with a store backup.
        """
        _check_app_user(user)
        stored = self._stored_adapter(user)
        if stored is None:
            raise InvalidInputError(
                "this user has no accepted adapter for this bundle to export (train() kept "
                "the shared model, was never run, or ran under another bundle)"
            )
        user_params, knn = stored
        if knn is not None:
            user_params |= _params.knn_memory(*knn)
        history, mask = self._history(user, fill=True)
        payload = user_params | {
            "__history__": history[mask > 0],
            BUNDLE_KEY: np.frombuffer(self.bundle_identity.encode(), np.uint8),
        }
        return seal_package(_params.to_bytes(payload), ADAPTER_PACKAGE, key)

    def import_adapter(self, user: str, package: bytes, key: KeyProvider) -> None:
        """Install an adapter exported by `export_adapter` for `user` on this device. The
        package must come from the same bundle; the user's own later examples are attended
        over after the imported history."""
        _check_app_user(user)
        params = _params.from_bytes(open_package(package, ADAPTER_PACKAGE, key))
        identity = bytes(params.pop(BUNDLE_KEY, np.zeros(0, np.uint8))).decode(errors="replace")
        if identity != self.bundle_identity:
            raise UnsupportedError(
                "this adapter was trained for another bundle (a different model or export); "
                "retrain the user on this device instead"
            )
        history = params.pop("__history__", None)
        if history is None:
            raise InvalidInputError("the package holds no history embeddings: not an adapter")
        specs = self.manifest.params_at("user")
        params, knn = _params.split_knn(params, self.manifest)
        if knn is not None:
            params |= _params.knn_memory(*knn)  # checked above; stored with the adapter
        if set(params) - set(_params.KNN_KEYS) != {s.name for s in specs}:
            raise InvalidInputError("the package does not hold this bundle's user parameters")
        _params.check_params(specs, params)
        width = self.manifest.hidden_size
        if history.dtype != np.float32 or history.ndim != 2 or history.shape[1] != width:
            raise InvalidInputError("the package's history embeddings have the wrong shape")
        with self.store.lock_user(user):
            self.store.put_blob(user, IMPORTED_HISTORY, self._stamp({"h": history}), keep=1)
            self.store.put_blob(user, ADAPTER, self._stamp(params), keep=2)

    @property
    def bundle_identity(self) -> str:
        """The hashes of the graphs a user's parameters are tied to: adapters, exported
        packages and caches made for one bundle identity are valid for that one only."""
        graphs = {INFER_GRAPH, *(g.file for g in self.manifest.train.graphs)}
        return ",".join(
            sorted(f"{f.path}={f.sha256}" for f in self.manifest.files if f.path in graphs)
        )

    def _stamp(self, params: Mapping[str, np.ndarray]) -> bytes:
        """Parameters as stored, with the bundle they are for."""
        identity = np.frombuffer(self.bundle_identity.encode(), np.uint8)
        return _params.to_bytes({**params, BUNDLE_KEY: identity})

    def _unstamp(self, blob: bytes, what: str) -> Params | None:
        """Stored parameters, or None (logged) when another bundle made them. A blob
        without a stamp (written before stamps existed) is taken as this bundle's."""
        params = _params.from_bytes(blob)
        stamp = params.pop(BUNDLE_KEY, None)
        if stamp is not None and bytes(stamp).decode(errors="replace") != self.bundle_identity:
            log.warning(
                "%s were made for another bundle (a different model or export) and are not "
                "used; train again, or install them again, under this bundle",
                what,
            )
            return None
        return params

    # -- inference --------------------------------------------------------------------------

    # A str is a Sequence[str] too: the one-text form is matched first, and says so.
    @overload
    def predict(self, user: str, texts: str) -> Prediction: ...  # type: ignore[overload-overlap]
    @overload
    def predict(self, user: str, texts: Sequence[str]) -> list[Prediction]: ...
    def predict(self, user: str, texts: str | Sequence[str]) -> Prediction | list[Prediction]:
        """The user's prediction for one text, or a list of them for a batch of texts."""
        if isinstance(texts, str):
            return self.predict(user, [texts])[0]
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

    def score(self, user: str, texts: str | Sequence[str]) -> np.ndarray:
        """Raw outputs: [n] scores (regression) or [n, C] class probabilities; for one text
        (a str), that text's row: a 0-d score or [C] probabilities."""
        if isinstance(texts, str):
            row: np.ndarray = self.score(user, [texts])[0, ...]
            return row
        out, _, _ = self._run_user(user, texts, "output")
        if self.manifest.task == "regression":
            scores: np.ndarray = out[:, 0]
            return scores
        if self.manifest.task == "classification":
            e = np.exp(out - out.max(-1, keepdims=True))
            probs: np.ndarray = e / e.sum(-1, keepdims=True)
            return probs
        raise UnsupportedError("an embedding bundle has no scores: use embed()")

    def embed(self, user: str, texts: str | Sequence[str]) -> np.ndarray:
        """[n, d] embeddings with the user's adapter (the bundle's output for embedding
        bundles, the pooled text features otherwise); [d] for one text (a str)."""
        if isinstance(texts, str):
            vector: np.ndarray = self.embed(user, [texts])[0]
            return vector
        name = "output" if self.manifest.task == "embedding" else "features"
        out, _, _ = self._run_user(user, texts, name)
        return out

    def similar(self, user: str, text: str, k: int = 5) -> list[tuple[Example, float]]:
        """Retrieval over the user's own history: the k examples most similar to `text`
        (cosine of base-model embeddings), best first."""
        _check_app_user(user)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidInputError("k must be an int >= 1")
        check_texts([text])
        cached, examples = self._embedded(user, fill=True)
        if not cached:
            return []
        query = self._run_base([text], ["features"])[0][0]
        ids = sorted(cached)
        matrix = np.stack([cached[i] for i in ids])
        sims = matrix @ query / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query) + 1e-12)
        by_id = {ex.id: ex for ex in examples}
        order = [i for i in np.argsort(-sims) if ids[i] in by_id][:k]
        return [(by_id[ids[i]], float(sims[i])) for i in order]

    # -- shared parameters ----------------------------------------------------------------------

    def shared_params(self) -> Params:
        """The persona and global parameters currently in use (copies)."""
        return {k: v.copy() for k, v in self._shared.items()}

    @property
    def _shared(self) -> Params:
        """The persona/global parameters in use: the bundle's, updated by the last
        `install_shared` of any process on this store (read again when the store says they
        changed, as a user's adapter is)."""
        return self._shared_state()[0]

    def _shared_state(self) -> tuple[Params, bytes | None]:
        """(the shared parameters in use, the store's token for them), read as one."""
        token = self.store.user_version(SHARED_USER)
        with self._served_lock:
            if token == self._shared_token:
                return self._shared_now, token
        installed = self.store.get_blob(SHARED_USER, "shared") if token is not None else None
        shared = self._shared_from(installed)
        with self._served_lock:
            self._shared_now, self._shared_token = shared, token
        return shared, token

    def _shared_from(self, installed: bytes | None) -> Params:
        """The bundle's shared parameters, updated by the stored ones where they fit."""
        shared = dict(self._shared_defaults)
        if installed is not None:
            params = self._unstamp(installed, "the installed persona/global parameters")
            if params is not None and self._fits_shared(params):
                shared |= params
        return shared

    def _fits_shared(self, params: Params) -> bool:
        """Whether stored shared parameters (unstamped ones, written before stamps existed,
        included) have this bundle's names and shapes."""
        specs = {p.name: p for p in self.manifest.params if p.level != "user"}
        try:
            if set(params) - set(specs):
                raise InvalidInputError("unknown names")
            _params.check_params(tuple(specs[n] for n in params), params)
        except InvalidInputError:
            log.warning(
                "the installed persona/global parameters do not fit this bundle and are not "
                "used; install them again under this bundle"
            )
            return False
        return True

    def install_shared(self, params: Mapping[str, np.ndarray]) -> None:
        """Install new persona/global parameters (from a federated round); persisted, and
        used by every Personalizer on this store from its next call."""
        if not isinstance(params, Mapping) or not all(isinstance(k, str) for k in params):
            raise InvalidInputError("params must be a mapping of parameter name (str) -> array")
        specs = tuple(p for p in self.manifest.params if p.level != "user" and p.name in params)
        unknown = set(params) - {p.name for p in self.manifest.params if p.level != "user"}
        if unknown:
            raise InvalidInputError(
                f"not persona/global parameters of this bundle: {sorted(unknown)}"
            )
        _params.check_params(specs, params)
        new = {k: np.array(v, np.float32) for k, v in params.items()}
        # Merged into what is stored in the same write transaction: two installs at once (in
        # two processes) each keep the other's parameters.
        self.store.update_blob(
            SHARED_USER,
            "shared",
            lambda installed: self._stamp(self._shared_from(installed) | new),
            keep=2,
        )
        self._shared_state()  # takes them in (users' cached feeds follow the token)

    def shared_update(self, user: str, names: Sequence[str], *, l2: float = 1.0) -> SharedUpdate:
        """This device's contribution to a federated round over the shared parameters `names`
        (a round's persona/global parameter names): the global head's delta and the persona
        bias refitted on the user's examples, the user's summary for persona routing, and the
        example count. User-level parameters are never part of it.

            update = model.shared_update("alice", [p.name for p in task.layout.params])
            client.contribute(task, before=update.before, after=update.after,
                              summary=update.summary, num_examples=update.num_examples)
        """
        _check_app_user(user)
        if self.manifest.task == "embedding":
            raise UnsupportedError(
                "an embedding bundle has no shared head to refit: federated rounds take "
                "classification and regression bundles"
            )
        if (
            isinstance(names, str)
            or not isinstance(names, Sequence)
            or not all(isinstance(n, str) for n in names)
        ):
            raise InvalidInputError("names must be a sequence of parameter names")
        unknown = [n for n in names if n not in self._shared]
        if unknown:
            raise InvalidInputError(
                f"not persona/global parameters of this bundle: {sorted(unknown)}"
            )
        if not (isinstance(l2, int | float) and math.isfinite(l2) and l2 > 0):
            raise InvalidInputError("l2 must be a finite number > 0")
        config = TrainConfig()
        examples = self._training_examples(user, config)
        self._check_enough(examples)
        data = self._prepare(user, examples, with_prefix=False)
        w, b = self._fit_head(data, np.arange(len(examples)), float(l2), config)
        before = {n: data.shared[n].copy() for n in names}  # what the refit started from
        after = {n: v.copy() for n, v in before.items()}
        if "global.head.w" in after:
            after["global.head.w"][: w.shape[0]] += w
        bias = "persona.bias" if "persona.bias" in after else "global.head.b"
        if bias in after:
            after[bias] += b
        summary = data.features.mean(0)
        summary /= max(float(np.linalg.norm(summary)), 1e-12)
        return SharedUpdate(before, after, summary.astype(np.float32), len(examples))

    def train_shared(
        self,
        examples: Sequence[Example],
        names: Sequence[str] | None = None,
        config: SharedTrainConfig | None = None,
        *,
        on_progress: Callable[[TrainProgress], None] | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> SharedTrainResult:
        """Train persona/global parameters (default: the global LoRA B matrices and head) on
        pooled labelled examples through the bundle's train graph, starting from the ones in
        use. Returns them; nothing is installed (`install_shared` does that). For data that
        may be pooled, such as an evaluation's training users or a server's seed set: a
        user's own examples stay on the device and go through `train`.

            result = model.train_shared(seed_examples, config=SharedTrainConfig(epochs=2))
            model.install_shared(result.params)
        """
        return _shared.train_shared(
            self, examples, names, config or SharedTrainConfig(), on_progress, cancel
        )

    def save_shared(
        self, path: str | os.PathLike[str], metadata: Mapping[str, str] | None = None
    ) -> str:
        """Write the persona/global parameters in use to `path`: a safetensors file tied to
        this bundle, with `metadata` (str -> str) beside them. Returns its SHA-256. The file
        holds no user data: it is what `train_shared` produced, for other devices to
        `load_shared`.

            model.install_shared(model.train_shared(seed_examples).params)
            model.save_shared("global-v2.safetensors", {"trained_on": "seed set 2026-11"})
        """
        return _shared.save_shared_file(path, self._shared, self.bundle_identity, metadata)

    def load_shared(self, path: str | os.PathLike[str]) -> dict[str, str]:
        """Install the persona/global parameters of a file `save_shared` wrote for this
        bundle (validated as `install_shared` does); returns the file's metadata. A file
        made for another bundle, or not such a file, raises InvalidInputError and installs
        nothing."""
        params, metadata = _shared.load_shared_file(path, self.bundle_identity)
        self.install_shared(params)
        return metadata

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
        predicting meanwhile with the previous adapter. The adapter stage is checkpointed
        (encrypted) about ten times per call and when it stops early, so the next call with
        the same examples and settings (the time budget may differ) goes on where a killed,
        cancelled or out-of-time call stopped; a completed call removes its checkpoint.

        `cancel` is asked between examples of the feature pass, after the head and retrieval
        stage, and between adapter steps. Cancelled before the adapter stage, train()
        raises CancelledError and changes nothing; cancelled in the adapter stage, it keeps
        the best parameters found so far and says `stopped="cancelled"`. A `forget()` of the
        same user cancels it, and train() then raises CancelledError.

        On an embedding bundle an example's label names a group (any string): the adapter
        stage, the only one there is, trains the user's LoRA so that texts of one group
        embed close together (supervised contrastive loss), and keeps it only if a held-out
        text's most similar training text is of its group more often than with the shared
        model.
        """
        _check_app_user(user)
        config = config or TrainConfig()
        if not isinstance(config, TrainConfig):
            raise InvalidInputError("config must be a TrainConfig")
        for name, hook in (("on_progress", on_progress), ("cancel", cancel)):
            if hook is not None and not callable(hook):
                raise InvalidInputError(f"{name} must be a function or None")
        if not self.manifest.train.graphs:
            raise UnsupportedError(
                f"this {self.manifest.task} bundle has no training graph; export it again "
                "with this version of edgeperso-export to train on device"
            )

        def stop() -> bool:  # the caller's cancel, or a forget() of this user
            return user in self._forgetting or (cancel is not None and bool(cancel()))

        lock = self.store.lock_user(user)
        try:
            result = self._train_locked(user, config, on_progress, stop)
        except BaseException:
            with contextlib.suppress(EdgePersoError):  # the original error is the one to see
                if self.store.user_version(user) is None:
                    # No data of this user's in the store (never added, or forgotten just
                    # now): the lock file must not be left to say this user trained here.
                    lock.remove()
            raise
        finally:
            lock.release()
        if user in self._forgetting:  # what it wrote is being shredded now
            raise CancelledError("train() was cancelled by a forget() of the same user")
        return result

    def _train_locked(
        self,
        user: str,
        config: TrainConfig,
        on_progress: Callable[[TrainProgress], None] | None,
        cancel: Callable[[], bool] | None,
    ) -> TrainResult:
        start = time.perf_counter()
        examples = self._training_examples(user, config)
        self._check_enough(examples)
        embedding = self.manifest.task == "embedding"  # the adapter is its only stage
        data = self._prepare(user, examples, with_prefix=config.adapter or embedding, cancel=cancel)
        rng = np.random.default_rng(config.seed)
        chosen: tuple[str, Any] | None = None
        global_score = best_score = math.nan
        if not embedding:
            chosen, global_score, best_score = self._stage1(data, config, rng)
            if cancel is not None and cancel():
                raise _cancelled_before_storing()
        head_l2 = float(chosen[1]) if chosen is not None and chosen[0] == "head" else None
        knn = chosen[1] if chosen is not None and chosen[0] == "knn" else None
        kept: Params | None = None
        stage, personal_score = "global", best_score
        if head_l2 is not None:
            kept = self._head_params(
                *self._fit_head(data, np.arange(len(examples)), head_l2, config)
            )
            stage = "head"
        elif knn is not None:
            assert data.labels is not None  # retrieval candidates are for classification
            memory = _params.knn_memory(unit_rows(data.features), data.labels, *knn)
            kept, stage = self._zero_user() | memory, "knn"

        # Stage 2: the adapter, from the head fitted on the training slice only.
        adapter = _AdapterRun(0, 0, "completed", 0)
        if config.adapter or embedding:
            trained, adapter = self._train_adapter(
                user, data, head_l2, config, rng, start, on_progress, cancel
            )
            if trained is not None:
                kept, stage = trained, "adapter"
            if trained is not None or embedding:  # embedding: the held-out slice's figures
                global_score, personal_score = adapter.global_score, adapter.score
        if adapter.stopped not in ("cancelled", "max_seconds"):
            self.store.delete_blob(user, CHECKPOINT)
        # else it stays: the next train() with the same settings goes on from it (max_steps
        # ends the schedule itself, so a run it stopped is complete)

        size = 0
        if kept is not None:
            blob = self._stamp(kept)
            self.store.put_blob(user, ADAPTER, blob, keep=2)
            size = len(blob)
            reason = {
                "head": "the head beats the shared model in cross-validation",
                "knn": "mixing in the user's most similar examples beats the shared model in "
                "cross-validation",
                "adapter": "the adapter beats the shared model and the head on held-out data",
                # an embedding bundle's only stage
                "retrieval": "with the adapter, held-out texts retrieve a training text of "
                "their own group more often than with the shared model",
            }["retrieval" if embedding else stage]
        else:
            self.store.delete_blob(user, ADAPTER)
            reason = "the user's parameters did not beat the shared model on held-out data"
        return TrainResult(
            kept="global" if kept is None else "personal",
            stage=stage,  # type: ignore[arg-type]
            reason=reason,
            metric={
                "classification": "macro_f1",
                "regression": "mae",
                "embedding": "retrieval_macro_f1",
            }[self.manifest.task],  # type: ignore[arg-type]
            global_score=global_score,
            personal_score=personal_score,
            head_l2=head_l2 if stage != "global" else None,
            knn=knn if stage == "knn" else None,
            examples=len(examples),
            holdout=adapter.holdout,
            steps=adapter.steps,
            epochs=adapter.epochs,
            seconds=time.perf_counter() - start,
            stopped=adapter.stopped,  # type: ignore[arg-type]
            truncated_texts=data.truncated,
            resumed_from_step=adapter.resumed,
            adapter_bytes=size,
        )

    def _stage1(
        self, data: _Prepared, config: TrainConfig, rng: np.random.Generator
    ) -> tuple[tuple[str, Any] | None, float, float]:
        """Stage 1: the head and the retrieval mix, cross-validated against the shared model
        on every example. Returns the chosen candidate (None: the shared model), the shared
        model's score and the chosen one's."""
        labels = None if data.labels is None else list(data.labels)
        folds = stratified_folds(labels, len(data.ids), config.folds, rng)
        every = np.arange(len(data.ids))
        parts = [np.flatnonzero(folds == k) for k in range(int(folds.max()) + 1)]
        global_score = self._score(data, every, data.shared_out)
        global_folds = np.array([self._score(data, held, data.shared_out) for held in parts])
        chosen: tuple[str, Any] | None = None
        best_score = global_score
        candidates = stage1_candidates(
            data.features,
            data.shared_out,
            data.labels,
            data.targets,
            len(self.manifest.labels),
            parts,
            config,
        )
        for candidate, predicted in candidates:
            score = self._score(data, every, predicted)
            advantage = np.array([self._score(data, held, predicted) for held in parts])
            advantage = advantage - global_folds
            if self.manifest.task == "regression":
                advantage = -advantage  # MAE: lower is better
            if clear_advantage(advantage, config.selection_se) and self._better(score, best_score):
                chosen, best_score = candidate, score
        return chosen, global_score, best_score

    def _fit_head(
        self, data: _Prepared, rows: np.ndarray, l2: float, config: TrainConfig
    ) -> tuple[np.ndarray, np.ndarray]:
        """The user's head delta (W [d, C], b [C]) on top of the shared model's outputs."""
        return fit_head_delta(
            data.features[rows],
            data.shared_out[rows],
            None if data.labels is None else data.labels[rows],
            data.targets[rows],
            len(self.manifest.labels),
            l2,
            config.class_weighting,
        )

    def _head_params(self, w: np.ndarray, b: np.ndarray, base: Params | None = None) -> Params:
        params = base if base is not None else self._zero_user()
        params["user.head.w"][: w.shape[0]] = w
        params["user.bias"][:] = b
        return params

    def _score(self, data: _Prepared, rows: np.ndarray, out: np.ndarray) -> float:
        return self._metric(data, rows, self._predictions(data, rows, out))

    def _predictions(self, data: _Prepared, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """What the model `out` predicts for each of `rows`: a class, a score, or (embedding
        bundles) the group of the most cosine-similar example outside `rows`."""
        if self.manifest.task == "embedding":
            assert data.labels is not None
            keys = np.setdiff1d(np.arange(len(out)), rows)
            unit = unit_rows(out)
            nearest = keys[np.argmax(unit[rows] @ unit[keys].T, axis=1)]
            groups: np.ndarray = data.labels[nearest]
            return groups
        if data.labels is not None:
            classes: np.ndarray = out[rows].argmax(-1)
            return classes
        scores: np.ndarray = out[rows, 0]
        return scores

    def _metric(self, data: _Prepared, rows: np.ndarray, predicted: np.ndarray) -> float:
        if data.labels is not None:
            return macro_f1(data.labels[rows], predicted)
        return float(np.abs(predicted - data.targets[rows, 0]).mean())

    def _clear_gain(
        self,
        data: _Prepared,
        rows: np.ndarray,
        new: np.ndarray,
        old: np.ndarray,
        config: TrainConfig,
    ) -> bool:
        """Whether outputs `new` beat `old` on `rows` by more than `selection_se` bootstrap
        standard errors of the difference (rows resampled with replacement, paired). The
        held-out slice also chose the best pass, so its plain score flatters the adapter;
        this is stage 1's standard-error rule, on the slice instead of folds."""
        sign = -1.0 if self.manifest.task == "regression" else 1.0  # MAE: lower is better
        a, b = self._predictions(data, rows, new), self._predictions(data, rows, old)
        gain = sign * (self._metric(data, rows, a) - self._metric(data, rows, b))
        rng = np.random.default_rng([config.seed, 0xB007])
        draws = []
        for _ in range(_BOOTSTRAP):
            i = rng.integers(len(rows), size=len(rows))
            draws.append(
                sign * (self._metric(data, rows[i], a[i]) - self._metric(data, rows[i], b[i]))
            )
        return gain > 0 and gain > config.selection_se * float(np.std(draws))

    def _train_adapter(
        self,
        user: str,
        data: _Prepared,
        head_l2: float | None,
        config: TrainConfig,
        rng: np.random.Generator,
        start: float,
        on_progress: Callable[[TrainProgress], None] | None,
        cancel: Callable[[], bool] | None,
    ) -> tuple[Params | None, _AdapterRun]:
        """Train LoRA, user embedding and head from the stage-1 head (fitted on the training
        slice), picking the best pass on the held-out slice. Returns the parameters when
        they beat both the shared model and that head on the held-out slice."""
        n = len(data.ids)
        train_idx, held_idx = split_holdout(
            None if data.labels is None else list(data.labels), n, config.holdout_fraction, rng
        )
        params = _params.fresh_user_params(self.manifest, rng)
        if head_l2 is not None:
            params = self._head_params(*self._fit_head(data, train_idx, head_l2, config), params)
        optimizer = AdamW(config.weight_decay)
        batch = self.manifest.train.graphs[0].batch_size
        steps_per_epoch = math.ceil(len(train_idx) / batch)
        total = max(steps_per_epoch * config.epochs, config.min_steps)
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        fingerprint = self._fingerprint(data, config)
        step, best, best_score, resumed = self._resume(user, fingerprint, params, optimizer)
        best_out = None  # the best pass's held-out outputs (recomputed for a resumed best)
        global_score = self._score(data, held_idx, data.shared_out)
        start_out = self._outputs(data, held_idx, params)
        start_score = self._score(data, held_idx, start_out)
        from_head = self._better(start_score, global_score)  # the stage-1 head is the floor
        floor = start_score if from_head else global_score
        floor_out = start_out if from_head else data.shared_out
        if best is None:
            best_score = floor
        budget = Budget(config, cancel, start)
        weights = None
        if self.manifest.task == "classification" and data.labels is not None:
            weights = class_weights(
                data.labels[train_idx], len(self.manifest.labels), config.class_weighting
            )
        stopped = "completed"
        # Held-out evaluation (and checkpointing) about ten times per call, not every pass.
        passes, eval_every = 0, max(1, math.ceil(total / steps_per_epoch / 10))
        while step < total:
            order = (
                _pairs_first(data, train_idx, rng)
                if self.manifest.task == "embedding"
                else rng.permutation(train_idx)
            )
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
            out = self._outputs(data, held_idx, params)
            score = self._score(data, held_idx, out)
            if self._better(score, best_score):
                best, best_score, best_out = {k: v.copy() for k, v in params.items()}, score, out
            self._checkpoint(user, fingerprint, step, params, optimizer, best, best_score)
            if stopped != "completed":
                break
        run = _AdapterRun(
            step, len(held_idx), stopped, resumed, step / steps_per_epoch, global_score, best_score
        )
        if best is None or not self._better(best_score, floor):
            return None, run
        if best_out is None:
            best_out = self._outputs(data, held_idx, best)
        return (
            best if self._clear_gain(data, held_idx, best_out, floor_out, config) else None
        ), run

    def _training_examples(self, user: str, config: TrainConfig) -> list[Example]:
        corrections: dict[int, str | int | float | None] = {}
        for event in sorted(self.store.feedback(user), key=lambda e: (e.timestamp, e.id or 0)):
            if event.event == CORRECTION and event.example_id is not None:
                corrections[event.example_id] = event.value
        examples = [
            dataclasses.replace(ex, label=corrections[ex.id]) if ex.id in corrections else ex
            for ex in self.store.examples(user)
        ]
        examples = [ex for ex in examples if ex.label is not None]
        for ex in examples:
            # Stored through the Store API, or under a bundle with other labels: checked
            # here too, naming the example and never its label.
            try:
                self._check_label(ex.label, f"the label of stored example {ex.id}")
            except InvalidInputError as exc:
                raise InvalidInputError(
                    f"{exc}; correct it (add_feedback with a correction) or delete the "
                    "example, then train again"
                ) from None
        examples.sort(key=lambda ex: (ex.timestamp, ex.id or 0))
        if config.max_examples is not None:
            examples = examples[-config.max_examples :]
        return examples

    def _check_enough(self, examples: list[Example]) -> None:
        if len(examples) < 4:
            raise InvalidInputError(
                f"user has {len(examples)} labelled examples; training needs at least 4 "
                "(some are held out to check the result against the shared model)"
            )
        if self.manifest.task == "embedding":
            sizes = sorted(Counter(str(ex.label) for ex in examples).values())
            if len(sizes) < 2 or sizes[-1] < 3:
                raise InvalidInputError(
                    f"user's examples form {len(sizes)} group(s), the largest of "
                    f"{sizes[-1]}; training an embedding needs at least 2 groups and one "
                    "with 3 examples or more (a pair to train on and one to hold out)"
                )

    def _prepare(
        self,
        user: str,
        examples: list[Example],
        *,
        with_prefix: bool,
        cancel: Callable[[], bool] | None = None,
    ) -> _Prepared:
        """One run of the inference graph per example, under the shared parameters and the
        user's history with no user parameters: exactly what a fresh user is served.
        `cancel` is asked between examples: this pass is most of a head-only train()."""
        ids, prefixes, features, outputs, truncated = [], [], [], [], 0
        # Training pads to the exported sequence buckets; a text longer than the largest one
        # is cut there, and counted as truncated like a text over max_length.
        longest = max((g.seq_len for g in self.manifest.train.graphs), default=0)
        history, mask = self._history(user, fill=True)
        shared = self._shared
        feeds = _params.infer_feeds(self.manifest, shared | self._zero_user())
        feeds |= {"history": history, "history_mask": mask}
        wanted = ["features", "output", *(["prefix"] if with_prefix else [])]
        for ex in examples:
            if cancel is not None and cancel():
                raise _cancelled_before_storing()
            enc = self._encoder.encode([ex.text])
            truncated += int(enc.truncated[0] or (with_prefix and enc.input_ids.shape[1] > longest))
            values = self._infer.run(wanted, feeds | self._base_feeds(enc))
            ids.append(enc.input_ids[0])
            features.append(values[0][0])
            outputs.append(values[1][0])
            if with_prefix:
                prefixes.append(values[2][0])
        common = (ids, prefixes, np.stack(features), np.stack(outputs))
        if self.manifest.task != "regression":
            # an embedding bundle's labels are the user's own group names
            names = self.manifest.labels or tuple(sorted({str(ex.label) for ex in examples}))
            index = {label: i for i, label in enumerate(names)}
            labels = np.array([index[str(ex.label)] for ex in examples], np.int64)
            targets = np.eye(len(index), dtype=np.float32)[labels]
            return _Prepared(*common, targets, labels, history, mask, truncated, shared)
        scores = np.array([[float(ex.label)] for ex in examples], np.float32)  # type: ignore[arg-type]
        return _Prepared(*common, scores, None, history, mask, truncated, shared)

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
        embedding = self.manifest.task == "embedding"
        targets = np.zeros((b, b if embedding else data.targets.shape[1]), np.float32)
        w = np.zeros(b, np.float32)
        for slot, i in enumerate(rows):
            n = min(len(data.prefix[i]), length)
            prefix[slot, :n] = data.prefix[i][:n]
            mask[slot, :n] = 1
            if not embedding:
                targets[slot] = data.targets[i]
            w[slot] = 1.0 if weights is None or data.labels is None else weights[data.labels[i]]
        if embedding:
            # Positive pairs: the other texts of the anchor's group in this micro-batch; an
            # anchor without one has nothing to pull toward, and weight 0.
            assert data.labels is not None
            group = data.labels[rows]
            same = (group[:, None] == group[None, :]) & ~np.eye(len(rows), dtype=bool)
            targets[: len(rows), : len(rows)] = same
            w[: len(rows)] = same.any(1)
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
        for name, value in (data.shared | params).items():
            feeds[name] = value
            # Ditto: the user's deltas are pulled toward 0, i.e. toward the shared model.
            feeds[f"ref.{name}"] = np.zeros_like(value) if name in params else value
        outputs = ["loss", *(f"grad.{n}" for n in params if f"grad.{n}" in graph.outputs)]
        values = graph.run(outputs, feeds)
        grads = {n.removeprefix("grad."): g for n, g in zip(outputs[1:], values[1:], strict=True)}
        clip_by_global_norm(grads, config.max_grad_norm)
        optimizer.step(params, grads, lr)
        return float(values[0])

    def _outputs(self, data: _Prepared, rows: np.ndarray, user_params: Params | None) -> np.ndarray:
        """[n, C] the inference graph's outputs under `user_params` for `rows` (every
        example for an embedding bundle, whose retrieval compares with the others)."""
        params = data.shared | (user_params or self._zero_user())
        feeds = _params.infer_feeds(self.manifest, params)
        feeds |= {"history": data.history, "history_mask": data.history_mask}
        # Through the inference graph, one text per run: exactly how the user will be served.
        # Retrieval (embedding bundles) compares the held-out texts with every other one.
        texts = np.arange(len(data.ids)) if self.manifest.task == "embedding" else rows
        outs = []
        for i in texts:
            ids = data.ids[i][None, :]
            run = feeds | {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            outs.append(self._infer.run(["output"], run)[0][0])
        full = np.zeros((len(data.ids), outs[0].shape[-1]), np.float32)
        full[texts] = np.stack(outs)
        return full

    def _better(self, score: float, than: float) -> bool:
        return score < than if self.manifest.task == "regression" else score > than

    # -- helpers ----------------------------------------------------------------------------

    def _train_graph(self, name: str) -> Graph:
        if name not in self._train_graphs:
            graph = Graph(self.bundle.path_of(name), self._options)
            spec = next(g for g in self.manifest.train.graphs if g.file == name)
            graph.expect(_params.train_shapes(self.manifest, spec))
            self._train_graphs[name] = graph
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
        if task == "embedding" and (not isinstance(label, str) or not label.strip()):
            raise InvalidInputError(
                f"{where} must be a non-empty str on an embedding bundle: it names the "
                "example's group (texts of one group are trained to embed close together)"
            )

    def _embeddings(self, user: str, *, fill: bool) -> dict[int, np.ndarray]:
        return self._embedded(user, fill=fill)[0]

    def _embedded(self, user: str, *, fill: bool) -> tuple[dict[int, np.ndarray], list[Example]]:
        """(the user's history embeddings: example id -> base-model features, the examples
        read to fill them in: [] without `fill`). Only the embeddings this bundle made are
        returned: those another bundle made (an app update) are not used.

        With `fill`, the missing ones (another bundle's, or an add_examples interrupted
        between its two writes) are computed and stored now, only for examples that still
        exist at the write: a forget() meanwhile leaves nothing behind. Serving does not
        fill (it would decrypt every example on the hot path); similar(), train(),
        shared_update() and add_examples() do.
        """
        cached = self.store.embeddings(user)
        made_by = self.store.get_state(user, EMBEDDINGS_OF)
        width = (self.manifest.hidden_size,)
        stale = (made_by is not None and made_by != self.bundle_identity) or any(
            v.shape != width for v in cached.values()
        )
        if stale:
            if not fill:
                return {}, []
            log.info("recomputing a user's history embeddings: another bundle made them")
            self.store.delete_embeddings(user)
            cached = {}
        if not fill:
            return cached, []
        examples = self.store.examples(user)
        missing = [ex for ex in examples if ex.id not in cached]
        if missing:
            features = self._run_base([ex.text for ex in missing], ["features"])[0]
            fresh = {int(ex.id): row for ex, row in zip(missing, features, strict=True)}  # type: ignore[arg-type]
            self.store.put_embeddings(user, fresh, only_examples=True)
            cached |= fresh
        if examples and made_by != self.bundle_identity:
            self.store.set_state(user, EMBEDDINGS_OF, self.bundle_identity, create=False)
        return cached, examples

    def _history(self, user: str, *, fill: bool) -> tuple[np.ndarray, np.ndarray]:
        ue = self.manifest.user_embedding
        size = ue.history_size if ue else 1
        history = np.zeros((size, self.manifest.hidden_size), np.float32)
        mask = np.zeros(size, np.float32)
        cached = self._embeddings(user, fill=fill) if ue else {}
        rows = [cached[k] for k in sorted(cached)]
        blob = self.store.get_blob(user, IMPORTED_HISTORY) if ue else None
        imported = None if blob is None else self._unstamp(blob, "a user's imported history")
        if imported is not None and imported["h"].shape[1:] == (self.manifest.hidden_size,):
            rows = list(imported["h"]) + rows  # older than anything added on this device
        for row, vector in enumerate(rows[-size:]):
            history[row] = vector
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
        served = self._serving(user)
        if served.knn is None or output != "output":
            outs, enc = self._run(texts, [output], served.feeds)
            return outs[0], enc, served.personal
        (out, features), enc = self._run(texts, ["output", "features"], served.feeds)
        return knn_mix(out, features, *served.knn).astype(np.float32), enc, True

    def _serving(self, user: str) -> _Served:
        """The user's adapter and history as inference feeds: decrypted from the store once,
        then kept in memory until the store says the user's data changed (in any process)."""
        _check_app_user(user)
        shared, shared_token = self._shared_state()
        token = self.store.user_version(user)
        with self._served_lock:
            served = self._served.get(user)
            if served is not None and (served.token, served.shared_token) == (token, shared_token):
                self._served.move_to_end(user)
                return served
        stored = self._stored_adapter(user)
        user_params, knn = stored if stored is not None else (self._zero_user(), None)
        feeds = _params.infer_feeds(self.manifest, shared | user_params)
        history, mask = self._history(user, fill=False)  # fill-ins are for writers, not here
        feeds |= {"history": history, "history_mask": mask}
        # A write between the token and these reads leaves a stale token: the next call
        # sees a newer one and reads again, so the cache never serves older data than this.
        served = _Served(token, shared_token, feeds, knn, stored is not None)
        with self._served_lock:
            self._served[user] = served
            self._served.move_to_end(user)
            while len(self._served) > _SERVED_USERS:
                self._served.popitem(last=False)
        return served

    def _stored_adapter(
        self, user: str
    ) -> tuple[Params, tuple[np.ndarray, np.ndarray, int, float] | None] | None:
        """The user's stored adapter as (user parameters, retrieval memory), or None when
        there is none that fits this bundle."""
        blob = self.store.get_blob(user, ADAPTER)
        params = None if blob is None else self._unstamp(blob, "a user's stored adapter")
        if params is None:
            return None
        try:
            user_params, knn = _params.split_knn(params, self.manifest)
            _params.check_params(self.manifest.params_at("user"), user_params)
        except InvalidInputError:  # an unstamped adapter of another bundle
            log.warning("a user's stored adapter does not fit this bundle and is not used")
            return None
        return user_params, knn

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

    def _fingerprint(self, data: _Prepared, config: TrainConfig) -> str:
        """Same examples, labels and settings: a checkpoint made for them may be resumed.
        The time budget is left out: it changes when a run stops, not what it computes, so a
        run stopped by it goes on under another."""
        settings = dataclasses.asdict(config)
        del settings["max_seconds"]
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        digest.update(self.bundle_identity.encode())  # a checkpoint is for one bundle
        for ids in data.ids:
            digest.update(ids.tobytes() + b",")
        digest.update(data.targets.tobytes())
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


def _cancelled_before_storing() -> CancelledError:
    return CancelledError(
        "train() was cancelled before anything was stored: the user's stored adapter is "
        "unchanged; call train() again to train"
    )


def _as_list(items: object, what: str, kind: type) -> list[Any]:
    """A non-empty sequence of `kind`, as a list; one bare `kind` gets a hint."""
    if isinstance(items, kind):
        raise InvalidInputError(f"{what} must be a list of {kind.__name__}: wrap the one in [...]")
    if not isinstance(items, Sequence) or isinstance(items, str | bytes):
        raise InvalidInputError(f"{what} must be a list of {kind.__name__}")
    if not items:
        raise InvalidInputError(f"{what} is empty")
    return list(items)


def _check_app_user(user: object) -> None:
    check_user(user)
    if user in _RESERVED_USERS:
        raise InvalidInputError(
            f"the user id {user!r} is reserved: this store keeps {_RESERVED_USERS[user]} under it"
        )


def _pairs_first(data: _Prepared, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`rows` in an order for the contrastive loss: each group's examples shuffled and
    dealt in pairs, the pairs shuffled, so that consecutive micro-batches hold positives."""
    assert data.labels is not None
    units: list[np.ndarray] = []
    for group in np.unique(data.labels[rows]):
        members = rng.permutation(rows[data.labels[rows] == group])
        units += [members[i : i + 2] for i in range(0, len(members), 2)]
    return np.concatenate([units[i] for i in rng.permutation(len(units))])
