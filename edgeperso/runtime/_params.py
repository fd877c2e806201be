"""Parameter sets by level, and how they compose into the graphs' feeds.

user     LoRA (own A and B), free user vector, user bias      device only, encrypted at rest
persona  LoRA B (shared frozen A), persona bias                from federation
global   LoRA B (shared frozen A), Persona-Plug MLP, head      from the bundle / federation
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np

from edgeperso._errors import IntegrityError, InvalidInputError
from edgeperso.bundle import Manifest, ParamSpec, TrainGraph

Params = dict[str, np.ndarray]
LORA_LEVELS = ("user", "persona", "global")  # concatenation order along the rank axis


def fresh_user_params(manifest: Manifest, rng: np.random.Generator) -> Params:
    """A new user's parameters: A drawn as peft does (kaiming-uniform), everything else zero,
    so a fresh user predicts exactly like the global model."""
    out: Params = {}
    for spec in manifest.params_at("user"):
        if spec.init == "kaiming_uniform":
            bound = 1.0 / math.sqrt(spec.shape[0])
            out[spec.name] = rng.uniform(-bound, bound, spec.shape).astype(np.float32)
        else:
            out[spec.name] = np.zeros(spec.shape, np.float32)
    return out


def shared_params(manifest: Manifest, exported: Mapping[str, np.ndarray]) -> Params:
    """Persona and global parameters as exported: the frozen shared A and the head from the
    bundle, zeros elsewhere."""
    out: Params = {}
    for spec in manifest.params:
        if spec.level == "user":
            continue
        value = exported.get(spec.name) if spec.init == "bundle" else None
        out[spec.name] = (
            np.array(value, np.float32) if value is not None else np.zeros(spec.shape, np.float32)
        )
    return out


def infer_feeds(manifest: Manifest, params: Mapping[str, np.ndarray]) -> Params:
    """All levels' parameters -> the inference graph's inputs (LoRA levels concatenated)."""
    feeds: Params = {}
    for slot in manifest.slots:
        short = slot.a_input.removeprefix("lora.").removesuffix(".A")
        a = [
            params[f"{lv}.lora.{short}.A"] for lv in LORA_LEVELS if f"{lv}.lora.{short}.A" in params
        ]
        b = [
            params[f"{lv}.lora.{short}.B"] for lv in LORA_LEVELS if f"{lv}.lora.{short}.B" in params
        ]
        feeds[slot.a_input] = np.ascontiguousarray(np.concatenate(a, axis=1), np.float32)
        feeds[slot.b_input] = np.ascontiguousarray(np.concatenate(b, axis=0), np.float32)
    for spec in manifest.params:
        if spec.role not in ("lora_a", "lora_b"):
            feeds[spec.name] = params[spec.name]
    return feeds


def infer_shapes(manifest: Manifest) -> dict[str, tuple[int | None, ...]]:
    """What infer.onnx must take and give, by the manifest (None: batch or sequence)."""
    shapes: dict[str, tuple[int | None, ...]] = {
        "features": (None, manifest.hidden_size),
        "output": (None, manifest.output_size),
    }
    for slot in manifest.slots:
        shapes[slot.a_input] = (slot.in_features, slot.rank)
        shapes[slot.b_input] = (slot.rank, slot.out_features)
    if manifest.user_embedding is not None:
        shapes["history"] = (None, manifest.hidden_size)
    # The head, MLP, user vector and biases are fed by name; LoRA params go through slots.
    fed = {s.name: s.shape for s in manifest.params if s.slot is None}
    return shapes | fed


def train_shapes(manifest: Manifest, graph: TrainGraph) -> dict[str, tuple[int | None, ...]]:
    """What a train-step graph must take, by the manifest."""
    shapes: dict[str, tuple[int | None, ...]] = {
        "prefix": (graph.batch_size, graph.seq_len, manifest.hidden_size),
        "loss": (),
    }
    for spec in manifest.params:
        if spec.trainable:
            shapes[spec.name] = spec.shape
            shapes[f"grad.{spec.name}"] = spec.shape
    return shapes


def check_params(specs: tuple[ParamSpec, ...], params: Mapping[str, np.ndarray]) -> None:
    for spec in specs:
        value = params.get(spec.name)
        if value is None:
            raise InvalidInputError(f"parameter {spec.name} is missing")
        if not isinstance(value, np.ndarray):
            raise InvalidInputError(
                f"parameter {spec.name} is a {type(value).__name__}, expected a numpy array"
            )
        if value.shape != spec.shape or value.dtype != np.float32:
            raise InvalidInputError(
                f"parameter {spec.name} is {value.dtype}{list(value.shape)}, "
                f"expected float32{list(spec.shape)}"
            )
        if not np.isfinite(value).all():
            raise InvalidInputError(f"parameter {spec.name} holds NaN or Inf")


def to_bytes(params: Mapping[str, np.ndarray]) -> bytes:
    """npz without pickle: the format the store seals for adapters and checkpoints."""
    buf = io.BytesIO()
    np.savez(buf, **params)  # type: ignore[arg-type]
    return buf.getvalue()


def from_bytes(data: bytes) -> Params:
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except (ValueError, OSError) as exc:
        raise IntegrityError(f"stored parameters cannot be decoded ({exc})") from exc


KNN_KEYS = ("knn.keys", "knn.labels", "knn.k", "knn.weight")


def split_knn(
    params: Params, manifest: Manifest
) -> tuple[Params, tuple[np.ndarray, np.ndarray, int, float] | None]:
    """A stored or imported adapter -> (user parameters, retrieval memory or None). The
    memory (stage "knn" of training) is the user's examples' unit-norm features, their label
    indices, k and the mixing weight; it is checked here because imported packages carry it."""
    memory = {k: params.pop(k) for k in KNN_KEYS if k in params}
    if not memory:
        return params, None
    if set(memory) != set(KNN_KEYS):
        raise InvalidInputError(f"an adapter's retrieval memory needs all of {list(KNN_KEYS)}")
    keys, labels = memory["knn.keys"], memory["knn.labels"]
    k, weight = memory["knn.k"], memory["knn.weight"]
    if (
        keys.dtype != np.float32
        or keys.ndim != 2
        or keys.shape[1] != manifest.hidden_size
        or not len(keys)
        or not np.isfinite(keys).all()
        or labels.dtype != np.int64
        or labels.shape != (len(keys),)
        or not ((labels >= 0) & (labels < len(manifest.labels))).all()
        or k.shape != ()
        or int(k) < 1
        or weight.shape != ()
        or not 0 < float(weight) <= 1
    ):
        raise InvalidInputError("an adapter's retrieval memory is malformed for this bundle")
    return params, (keys, labels, int(k), float(weight))


def knn_memory(keys: np.ndarray, labels: np.ndarray, k: int, weight: float) -> Params:
    return {
        "knn.keys": keys.astype(np.float32),
        "knn.labels": labels.astype(np.int64),
        "knn.k": np.array(k, np.int64),
        "knn.weight": np.array(weight, np.float64),
    }
