"""Training the shared (persona/global) parameters on pooled labelled examples through the
bundle's train graph: the global level's LoRA and head, fitted where many users' labelled
data may be pooled (an evaluation's training users, a server's seed data), then installed
on devices with `Personalizer.install_shared`.

A user's data never goes through here on a device: `Personalizer.train` trains user-level
parameters only, and federated rounds send clipped, masked deltas.

The layers below the first LoRA layer are frozen, so their output (the graph's `prefix`)
is computed once per distinct text; each step then runs only the adapted layers.

`save_shared_file` / `load_shared_file` keep the result: a safetensors file tied to the
bundle it was trained for (the persona/global level a server ships, or an evaluation
reuses). It holds shared parameters only, never a user's, so it is not encrypted.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import safetensors
import safetensors.numpy

from edgeperso._atomic import write_atomically
from edgeperso._errors import InvalidInputError, StorageError, UnsupportedError
from edgeperso._paths import check_path
from edgeperso.bundle import sha256_file
from edgeperso.runtime import _params
from edgeperso.runtime._params import Params
from edgeperso.runtime._tokenize import check_texts
from edgeperso.runtime._trainer import (
    AdamW,
    TrainProgress,
    class_weights,
    clip_by_global_norm,
    learning_rate,
)
from edgeperso.store import Example

if TYPE_CHECKING:
    from edgeperso.runtime._personalizer import Personalizer


@dataclasses.dataclass(frozen=True)
class SharedTrainConfig:
    """How the shared parameters are trained: AdamW over `epochs` passes of the pooled
    examples (micro-batches of the train graph's size), linear warm-up then cosine decay."""

    epochs: float = 2.0
    learning_rate: float = 5e-4
    weight_decay: float = 0.0
    warmup_fraction: float = 0.06
    max_grad_norm: float = 1.0
    class_weighting: bool = True  # inverse-frequency example weights (classification)
    max_seconds: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "learning_rate", "max_grad_norm"):
            value = getattr(self, name)
            if not _number(value) or not value > 0:
                raise InvalidInputError(f"SharedTrainConfig.{name} must be a finite number > 0")
        if not _number(self.weight_decay) or self.weight_decay < 0:
            raise InvalidInputError("SharedTrainConfig.weight_decay must be a finite number >= 0")
        if not _number(self.warmup_fraction) or not 0 <= self.warmup_fraction < 1:
            raise InvalidInputError("SharedTrainConfig.warmup_fraction must be in [0, 1)")
        if not isinstance(self.class_weighting, bool):
            raise InvalidInputError("SharedTrainConfig.class_weighting must be a bool")
        if self.max_seconds is not None and (
            not _number(self.max_seconds) or not self.max_seconds > 0
        ):
            raise InvalidInputError("SharedTrainConfig.max_seconds must be > 0 or None")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InvalidInputError("SharedTrainConfig.seed must be an int >= 0")


@dataclasses.dataclass(frozen=True)
class SharedTrainResult:
    params: Params  # the trained values of the names asked for (install with install_shared)
    steps: int
    seconds: float
    loss_start: float  # mean loss of the first tenth of the steps
    loss_end: float  # mean loss of the last tenth
    texts: int  # distinct texts
    truncated_texts: int  # cut at the largest train bucket
    stopped: Literal["completed", "max_seconds", "cancelled"]


def default_names(model: Personalizer) -> list[str]:
    """The global level's trainable parameters that reach the output without a user: its
    LoRA B matrices and the head (the Persona-Plug MLP needs a history to matter)."""
    return [
        spec.name
        for spec in model.manifest.params_at("global")
        if spec.trainable and (spec.role == "lora_b" or spec.name.startswith("global.head."))
    ]


def train_shared(
    model: Personalizer,
    examples: Sequence[Example],
    names: Sequence[str] | None,
    config: SharedTrainConfig,
    on_progress: Callable[[TrainProgress], None] | None,
    cancel: Callable[[], bool] | None,
) -> SharedTrainResult:
    manifest = model.manifest
    if manifest.task not in ("classification", "regression"):
        raise UnsupportedError(
            "train_shared takes classification and regression bundles (an embedding bundle "
            "has no labels to pool)"
        )
    if not isinstance(config, SharedTrainConfig):
        raise InvalidInputError("config must be a SharedTrainConfig")
    if names is not None and (isinstance(names, str) or not isinstance(names, Sequence)):
        raise InvalidInputError("names must be a sequence of parameter names, or None")
    if isinstance(examples, str) or not isinstance(examples, Sequence):
        raise InvalidInputError("examples must be a sequence of edgeperso Examples")
    for i, ex in enumerate(examples):
        if not isinstance(ex, Example):
            raise InvalidInputError(f"examples[{i}] is not an edgeperso Example")
    shared = model.shared_params()
    names = default_names(model) if names is None else list(names)
    graph0 = model._train_graph(manifest.train.graphs[0].file)
    trainable = {s.name for s in manifest.params if s.level != "user" and s.trainable}
    bad = [n for n in names if n not in trainable or f"grad.{n}" not in graph0.outputs]
    if not names or bad:
        raise InvalidInputError(
            f"not trainable persona/global parameters of this bundle: {sorted(bad) or names}"
        )
    if not examples:
        raise InvalidInputError("train_shared needs labelled examples")
    texts = [ex.text for ex in examples]
    check_texts(texts)
    for i, ex in enumerate(examples):
        if ex.label is None:
            raise InvalidInputError(f"example {i} has no label: pooled training needs one")
        model._check_label(ex.label, f"example {i}")
    start = time.perf_counter()

    # The frozen layers' output, once per distinct text.
    distinct = sorted(set(texts))
    at = {t: i for i, t in enumerate(distinct)}
    longest = max(g.seq_len for g in manifest.train.graphs)
    feeds = _params.infer_feeds(manifest, shared | model._zero_user())
    size = manifest.user_embedding.history_size if manifest.user_embedding else 1
    history = np.zeros((size, manifest.hidden_size), np.float32)  # no user, no history
    history_mask = np.zeros(size, np.float32)
    feeds |= {"history": history, "history_mask": history_mask}
    prefixes, truncated = [], 0
    for text in distinct:
        enc = model._encoder.encode([text])
        truncated += int(enc.truncated[0] or enc.input_ids.shape[1] > longest)
        prefixes.append(model._infer.run(["prefix"], feeds | model._base_feeds(enc))[0][0])
    rows = np.array([at[t] for t in texts], np.int64)
    if manifest.task == "classification":
        labels = np.array([manifest.labels.index(str(ex.label)) for ex in examples], np.int64)
        targets = np.eye(len(manifest.labels), dtype=np.float32)[labels]
        weight_of = class_weights(labels, len(manifest.labels), config.class_weighting)[labels]
    else:
        targets = np.array([[float(ex.label)] for ex in examples], np.float32)  # type: ignore[arg-type]
        weight_of = np.ones(len(examples), np.float32)

    params = {n: shared[n].copy() for n in names}
    optimizer = AdamW(config.weight_decay)
    batch = manifest.train.graphs[0].batch_size
    steps_per_epoch = math.ceil(len(examples) / batch)
    total = max(1, round(steps_per_epoch * config.epochs))
    rng = np.random.default_rng([config.seed, 0x5A])
    losses: list[float] = []
    stopped: Literal["completed", "max_seconds", "cancelled"] = "completed"
    d = manifest.hidden_size
    zero_user = model._zero_user()
    while len(losses) < total and stopped == "completed":
        order = rng.permutation(len(examples))
        for i in range(0, len(order), batch):
            step = len(losses)
            if step >= total:
                break
            if cancel is not None and cancel():
                stopped = "cancelled"
                break
            if config.max_seconds is not None and time.perf_counter() - start >= config.max_seconds:
                stopped = "max_seconds"
                break
            chosen = order[i : i + batch]
            spec = manifest.train.graph_for(max(len(prefixes[rows[j]]) for j in chosen))
            length = spec.seq_len
            prefix = np.zeros((batch, length, d), np.float32)
            mask = np.zeros((batch, length), np.int64)
            y = np.zeros((batch, targets.shape[1]), np.float32)
            w = np.zeros(batch, np.float32)
            for slot, j in enumerate(chosen):
                p = prefixes[rows[j]][:length]
                prefix[slot, : len(p)] = p
                mask[slot, : len(p)] = 1
                y[slot] = targets[j]
                w[slot] = weight_of[j]
            w /= max(float(w.sum()), 1e-12)
            step_feeds: dict[str, np.ndarray] = {
                "prefix": prefix,
                "attention_mask": mask,
                "history": history,
                "history_mask": history_mask,
                "targets": y,
                "weights": w,
                "prox_weight": np.array(0.0, np.float32),
            }
            for name, value in (shared | zero_user | params).items():
                step_feeds[name] = value
                step_feeds[f"ref.{name}"] = value
            graph = model._train_graph(spec.file)
            outputs = ["loss", *(f"grad.{n}" for n in names)]
            values = graph.run(outputs, step_feeds)
            grads = dict(zip(names, values[1:], strict=True))
            if "global.head.w" in grads:
                # Trained without a user, the head's rows that read the user embedding stay
                # as they were: the global model must not depend on a history it never saw.
                grads["global.head.w"][d:] = 0.0
            clip_by_global_norm(grads, config.max_grad_norm)
            optimizer.step(params, grads, learning_rate(config, step, total))
            losses.append(float(values[0]))
            if on_progress is not None:
                on_progress(
                    TrainProgress(
                        len(losses),
                        total,
                        len(losses) // steps_per_epoch,
                        losses[-1],
                        time.perf_counter() - start,
                    )
                )
    tenth = max(1, len(losses) // 10)
    return SharedTrainResult(
        params=params,
        steps=len(losses),
        seconds=time.perf_counter() - start,
        loss_start=float(np.mean(losses[:tenth])) if losses else math.nan,
        loss_end=float(np.mean(losses[-tenth:])) if losses else math.nan,
        texts=len(distinct),
        truncated_texts=truncated,
        stopped=stopped,
    )


SHARED_FILE_FORMAT = "edgeperso.shared/1"  # the `format` entry of a shared-parameters file


def save_shared_file(
    path: str | os.PathLike[str],
    params: Mapping[str, np.ndarray],
    bundle_identity: str,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Write `params` to `path` (safetensors) with the bundle identity they belong to and
    `metadata`; atomically (a temporary file renamed over `path`). Returns the file's
    SHA-256 (hex)."""
    check_path(path)
    if metadata is not None and not isinstance(metadata, Mapping):
        raise InvalidInputError("metadata must map str to str")
    extra = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise InvalidInputError("metadata must map str to str")
    reserved = {"format", "bundle_identity"} & set(extra)
    if reserved:
        raise InvalidInputError(f"metadata may not set {sorted(reserved)}: they are written here")
    target = Path(path)
    tensors = {name: np.ascontiguousarray(value, np.float32) for name, value in params.items()}
    header = {"format": SHARED_FILE_FORMAT, "bundle_identity": bundle_identity, **extra}
    data = safetensors.numpy.save(tensors, metadata=header)
    try:
        write_atomically(target, lambda out: out.write(data))
    except OSError as exc:
        raise StorageError(f"cannot write {target}: {exc}") from exc
    return sha256_file(target)


def load_shared_file(
    path: str | os.PathLike[str], bundle_identity: str
) -> tuple[Params, dict[str, str]]:
    """(parameters, metadata) of a file `save_shared_file` wrote for this bundle identity.
    InvalidInputError when it is missing, not such a file, or made for another bundle."""
    check_path(path)
    source = Path(path)
    if not source.is_file():
        raise InvalidInputError(f"{source}: no such file (write one with save_shared)")
    try:
        with safetensors.safe_open(str(source), framework="numpy") as handle:
            header = dict(handle.metadata() or {})
            params = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (OSError, ValueError, safetensors.SafetensorError) as exc:
        raise InvalidInputError(f"{source} is not a safetensors file ({exc})") from exc
    if header.get("format") != SHARED_FILE_FORMAT:
        raise InvalidInputError(
            f"{source} is not a shared-parameters file (format {header.get('format')!r}, "
            f"expected {SHARED_FILE_FORMAT!r})"
        )
    if header.get("bundle_identity") != bundle_identity:
        raise InvalidInputError(
            f"{source} holds parameters for another bundle (its graphs differ from this "
            "one's): load it with the bundle it was trained for"
        )
    return params, header


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
