"""The bundle manifest: what an exported bundle contains, as frozen, validated dataclasses.

`manifest.json` is written by `edgeperso_export` and read here; this module is the single
definition of its schema. Every dataclass round-trips through `to_json()` / `from_json()`.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, cast, get_args, get_origin

from edgeperso._errors import InvalidInputError, UnsupportedError

SCHEMA_VERSION = 1

Task = Literal["embedding", "classification", "regression"]
Level = Literal["user", "persona", "global"]
Role = Literal["lora_a", "lora_b", "user_vector", "mlp", "head", "bias"]
Pooling = Literal["mean", "cls"]

TASKS: tuple[str, ...] = get_args(Task)
LEVELS: tuple[str, ...] = get_args(Level)
ROLES: tuple[str, ...] = get_args(Role)
SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # a digest as hexdigest() writes it; fullmatch


_MAX_INT = 1 << 53  # JSON's exact integers; file sizes are the largest ints a manifest holds
_MAX_DIM = 1 << 24  # no tensor dimension or token count comes near this


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise InvalidInputError(f"invalid bundle manifest: {what}")


class _Entry:
    """Base of the manifest dataclasses: on construction every field is checked against its
    annotation (`_check_fields`), then the class's own rules (`_validate`) run."""

    def __post_init__(self) -> None:
        _check_fields(self)
        self._validate()

    def _validate(self) -> None:
        pass


def _check_fields(entry: Any) -> None:
    """Every field of a manifest dataclass has its annotated type, exactly.

    JSON gives loose types (1.0 for 1, true for 1, "ab" for a list of labels) and no hash
    inside a bundle covers its manifest, so nothing is coerced: a value of the wrong type is
    an edited or foreign manifest, and loading stops here rather than inside onnxruntime or
    numpy.
    """
    hints = _hints(type(entry))
    for field in dataclasses.fields(entry):
        value = getattr(entry, field.name)
        if not _conforms(value, hints[field.name]):
            raise InvalidInputError(
                f"invalid bundle manifest: {type(entry).__name__}.{field.name} is "
                f"{_shown(value)}, not {_type_name(hints[field.name])}; re-export the bundle"
            )


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The class's resolved annotations, computed once per class rather than per entry."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _conforms(value: Any, hint: Any) -> bool:
    origin = get_origin(hint)
    if hint is Any:
        return True
    if origin is Literal:
        return isinstance(value, str) and value in get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, arm) for arm in get_args(hint))
    if hint is type(None):
        return value is None
    if origin is tuple:
        item = get_args(hint)[0]
        return isinstance(value, tuple) and all(_conforms(v, item) for v in value)
    if origin is Mapping:
        key, item = get_args(hint)
        return isinstance(value, Mapping) and all(
            _conforms(k, key) and _conforms(v, item) for k, v in value.items()
        )
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # bool is an int to Python, never to a manifest
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) <= _MAX_INT
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str) and "\0" not in value
    return isinstance(value, hint)


def _check_dims(owner: str, **dims: int) -> None:
    for name, value in dims.items():
        _require(1 <= value <= _MAX_DIM, f"{owner}.{name} is {value}, not in 1..{_MAX_DIM}")


def _type_name(hint: Any) -> str:
    if get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(hint))
    if hint is str:
        return "str without NUL characters"
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclasses.dataclass(frozen=True)
class FileEntry(_Entry):
    """One file of the bundle with the hash that loading verifies."""

    path: str
    sha256: str
    size: int

    def _validate(self) -> None:
        _require(
            self.path not in ("", ".", "..") and not any(c in self.path for c in "/\\:\0"),
            f"file path {self.path!r} is not a plain file name in the bundle",
        )
        _require(bool(SHA256_HEX.fullmatch(self.sha256)), f"sha256 of {self.path!r} is not hex")
        _require(self.size >= 0, f"size of {self.path!r} is negative")


@dataclasses.dataclass(frozen=True)
class ParamSpec(_Entry):
    """A parameter the runtime feeds to the graphs.

    `level` says who owns it: user parameters never leave the device; persona and global
    parameters are trained by federation. `trainable` is False for the frozen shared LoRA A
    (frozen so that averaging B across devices is exact). `init` is how a fresh value is
    made: "zeros", "kaiming_uniform" (LoRA A, as peft does), or "bundle" (the exported value
    in params.npz).
    """

    name: str
    shape: tuple[int, ...]
    level: Level
    role: Role
    init: Literal["zeros", "kaiming_uniform", "bundle"]
    trainable: bool = True
    slot: str | None = None  # for LoRA params: the LoRA slot they compose into

    def _validate(self) -> None:
        _require(bool(self.name), "parameter without a name")
        _require(
            bool(self.shape) and all(1 <= d <= _MAX_DIM for d in self.shape),
            f"shape {self.shape} of {self.name}",
        )


@dataclasses.dataclass(frozen=True)
class LoraSlot(_Entry):
    """An overridable LoRA branch in infer.onnx: y = W x + scaling * (x @ A) @ B.

    The graph inputs `a_input` [in_features, rank] and `b_input` [rank, out_features] default
    to zeros (base behaviour). The runtime concatenates the user, persona and global
    adapters of this slot along the rank axis, padding unused rank with zeros.
    """

    module: str
    in_features: int
    out_features: int
    rank: int
    a_input: str
    b_input: str

    def _validate(self) -> None:
        _check_dims("slot", in_features=self.in_features, out_features=self.out_features)
        _require(0 <= self.rank <= _MAX_DIM, f"rank {self.rank} of slot {self.module}")


@dataclasses.dataclass(frozen=True)
class LoraSpec(_Entry):
    r_user: int
    r_shared: int
    alpha: float
    target_modules: tuple[str, ...]
    layers: tuple[int, ...]  # encoder layers that carry adapters (upper layers by default)
    shared_a_seed: int  # the frozen shared A is drawn from this seed, the same on every device

    def _validate(self) -> None:
        _require(1 <= self.r_user <= _MAX_DIM, f"lora.r_user {self.r_user}")
        _require(0 <= self.r_shared <= _MAX_DIM, f"lora.r_shared {self.r_shared}")
        _require(math.isfinite(self.alpha) and self.alpha > 0, f"lora.alpha {self.alpha}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r_user


@dataclasses.dataclass(frozen=True)
class UserEmbeddingSpec(_Entry):
    """Persona-Plug user embedding: attention of the text over the user's history."""

    dim: int  # size of u, concatenated to the pooled text features
    history_size: int  # history slots fed to the graphs (padded + masked)
    mlp_hidden: int

    def _validate(self) -> None:
        _check_dims(
            "user_embedding",
            dim=self.dim,
            history_size=self.history_size,
            mlp_hidden=self.mlp_hidden,
        )


@dataclasses.dataclass(frozen=True)
class QuantizationSpec(_Entry):
    mode: Literal["dynamic"]
    target: str  # avx512_vnni, avx2, arm64: the CPU the int8 graph was tuned for
    per_channel: bool
    weight_type: str
    reduce_range: bool
    excluded_nodes: tuple[str, ...]  # MatMuls kept in float (mixed precision)
    # Dynamic int8 picks activation scales per run, so a text's output can depend on the
    # rest of its batch. When the export measured that, the runtime runs texts one by one.
    batch_invariant: bool


@dataclasses.dataclass(frozen=True)
class TrainGraph(_Entry):
    """One training-step graph for a fixed micro-batch shape."""

    file: str
    batch_size: int
    seq_len: int

    def _validate(self) -> None:
        _check_dims("train graph", batch_size=self.batch_size, seq_len=self.seq_len)


@dataclasses.dataclass(frozen=True)
class TrainSpec(_Entry):
    """Inputs: every ParamSpec by name, `ref.<name>` for each trainable one, the batch
    (`prefix`: the frozen lower layers' hidden states, `attention_mask`, `history`,
    `history_mask`, `targets`, `weights`) and `prox_weight`. Outputs: `loss` and
    `grad.<name>` per trainable param.
    Loss = sum_i weights[i] * loss_i + prox_weight / 2 * sum ||p - ref.p||^2; rows with
    weight 0 are padding.
    """

    graphs: tuple[TrainGraph, ...]
    # supervised_contrastive (embedding): `targets` is [B, B], 1 where text j is a positive
    # of anchor i (same group, j != i); none: no train graph (bundles before it existed)
    loss: Literal["weighted_cross_entropy", "weighted_mse", "supervised_contrastive", "none"]

    def _validate(self) -> None:
        _require(
            (self.loss == "none") == (not self.graphs),
            f"train.loss {self.loss!r} with {len(self.graphs)} train graphs",
        )

    def graph_for(self, seq_len: int) -> TrainGraph:
        """The smallest exported sequence-length bucket that fits `seq_len` tokens."""
        fitting = [g for g in self.graphs if g.seq_len >= seq_len]
        if not fitting:
            return max(self.graphs, key=lambda g: g.seq_len)
        return min(fitting, key=lambda g: g.seq_len)


@dataclasses.dataclass(frozen=True)
class ParityCheck(_Entry):
    name: str
    value: float
    threshold: float
    higher_is_better: bool
    passed: bool


@dataclasses.dataclass(frozen=True)
class Manifest(_Entry):
    schema_version: int
    task: Task
    labels: tuple[str, ...]
    max_length: int
    pooling: Pooling
    normalize: bool
    hidden_size: int
    output_size: int
    source: str
    architecture: str
    tokenizer: str
    files: tuple[FileEntry, ...]
    versions: Mapping[str, str]
    quantization: QuantizationSpec
    lora: LoraSpec
    user_embedding: UserEmbeddingSpec | None
    slots: tuple[LoraSlot, ...]
    params: tuple[ParamSpec, ...]
    train: TrainSpec
    parity: tuple[ParityCheck, ...]

    def _validate(self) -> None:
        if self.schema_version > SCHEMA_VERSION:
            raise UnsupportedError(
                f"bundle schema version {self.schema_version} is newer than this runtime "
                f"supports ({SCHEMA_VERSION}); upgrade edgeperso"
            )
        _require(self.schema_version == SCHEMA_VERSION, f"schema {self.schema_version}")
        _check_dims(
            "manifest",
            max_length=self.max_length,
            hidden_size=self.hidden_size,
            output_size=self.output_size,
        )
        if self.task == "classification":
            _require(
                len(self.labels) >= 2 and len(set(self.labels)) == len(self.labels),
                f"labels {list(self.labels)[:8]}: a classifier needs two or more distinct ones",
            )
            _require(
                self.output_size == len(self.labels),
                f"output_size {self.output_size} for {len(self.labels)} labels",
            )
            _require(all(self.labels), "an empty label")
        elif self.task == "regression":
            _require(self.output_size == 1, f"output_size {self.output_size} for regression")
        else:
            _require(
                self.output_size == self.hidden_size,
                f"output_size {self.output_size} for embeddings of {self.hidden_size}",
            )
        names = [p.name for p in self.params]
        _require(len(names) == len(set(names)), "duplicate parameter names")
        files = {f.path for f in self.files}
        _require(self.tokenizer in files, "tokenizer file is not hashed")
        for graph in self.train.graphs:
            _require(graph.file in files, f"train graph {graph.file} is not hashed")

    def param(self, name: str) -> ParamSpec:
        for spec in self.params:
            if spec.name == name:
                return spec
        raise InvalidInputError(f"the bundle has no parameter {name!r}")

    def params_at(self, level: Level) -> tuple[ParamSpec, ...]:
        return tuple(p for p in self.params if p.level == level)

    def to_json(self) -> dict[str, Any]:
        return cast(dict[str, Any], _to_jsonable(dataclasses.asdict(self)))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        if not isinstance(data, Mapping):
            raise InvalidInputError("invalid bundle manifest: not a JSON object")
        try:
            version = data["schema_version"]
            # Before the fields: a newer schema may have fields this runtime does not know.
            if isinstance(version, int) and version > SCHEMA_VERSION:
                raise UnsupportedError(
                    f"bundle schema version {version} is newer than this runtime "
                    f"supports ({SCHEMA_VERSION}); upgrade edgeperso"
                )
            ue = data.get("user_embedding")
            train = data["train"]
            if not isinstance(train, Mapping):
                raise InvalidInputError("invalid bundle manifest: train is not an object")
            return cls(
                schema_version=version,
                task=data["task"],
                labels=_list(data, "labels"),
                max_length=data["max_length"],
                pooling=data["pooling"],
                normalize=data["normalize"],
                hidden_size=data["hidden_size"],
                output_size=data["output_size"],
                source=data["source"],
                architecture=data["architecture"],
                tokenizer=data["tokenizer"],
                files=tuple(_build(FileEntry, f) for f in _list(data, "files")),
                versions=data["versions"],
                quantization=_build(QuantizationSpec, data["quantization"]),
                lora=_build(LoraSpec, data["lora"]),
                user_embedding=None if ue is None else _build(UserEmbeddingSpec, ue),
                slots=tuple(_build(LoraSlot, s) for s in _list(data, "slots")),
                params=tuple(_build(ParamSpec, p) for p in _list(data, "params")),
                train=TrainSpec(
                    graphs=tuple(_build(TrainGraph, g) for g in _list(train, "graphs")),
                    loss=train["loss"],
                ),
                parity=tuple(_build(ParityCheck, c) for c in _list(data, "parity")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InvalidInputError):
                raise
            raise InvalidInputError(
                f"invalid bundle manifest ({type(exc).__name__}: {exc}); re-export the bundle"
            ) from exc


def _list(data: Mapping[str, Any], key: str) -> tuple[Any, ...]:
    value = data[key]
    if not isinstance(value, list):
        raise InvalidInputError(
            f"invalid bundle manifest: {key} is {_shown(value)}, not a list; re-export the bundle"
        )
    return tuple(value)


def _build(cls: type[Any], data: Mapping[str, Any]) -> Any:
    if not isinstance(data, Mapping):
        raise InvalidInputError(
            f"invalid bundle manifest: a {cls.__name__} entry is not an object; re-export "
            "the bundle"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise InvalidInputError(f"invalid bundle manifest: unknown fields {sorted(unknown)}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    return cls(**kwargs)


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    return value
