"""The bundle manifest: what an exported bundle contains, as frozen, validated dataclasses.

`manifest.json` is written by `edgeperso_export` and read here; this module is the single
definition of its schema. Every dataclass round-trips through `to_json()` / `from_json()`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, Literal, cast, get_args

from edgeperso._errors import InvalidInputError, UnsupportedError

SCHEMA_VERSION = 1

Task = Literal["embedding", "classification", "regression"]
Level = Literal["user", "persona", "global"]
Role = Literal["lora_a", "lora_b", "user_vector", "mlp", "head", "bias"]
Pooling = Literal["mean", "cls"]

TASKS: tuple[str, ...] = get_args(Task)
LEVELS: tuple[str, ...] = get_args(Level)
ROLES: tuple[str, ...] = get_args(Role)
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise InvalidInputError(f"invalid bundle manifest: {what}")


@dataclasses.dataclass(frozen=True)
class FileEntry:
    """One file of the bundle with the hash that loading verifies."""

    path: str
    sha256: str
    size: int

    def __post_init__(self) -> None:
        _require("/" not in self.path and ".." not in self.path, f"file path {self.path!r}")
        _require(bool(_SHA256.match(self.sha256)), f"sha256 of {self.path!r} is not hex")
        _require(self.size >= 0, f"size of {self.path!r} is negative")


@dataclasses.dataclass(frozen=True)
class ParamSpec:
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

    def __post_init__(self) -> None:
        _require(bool(self.name), "parameter without a name")
        _require(self.level in LEVELS, f"level {self.level!r} of {self.name}")
        _require(self.role in ROLES, f"role {self.role!r} of {self.name}")
        _require(all(d > 0 for d in self.shape), f"shape {self.shape} of {self.name}")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))


@dataclasses.dataclass(frozen=True)
class LoraSlot:
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


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    r_user: int
    r_shared: int
    alpha: float
    target_modules: tuple[str, ...]
    layers: tuple[int, ...]  # encoder layers that carry adapters (upper layers by default)
    shared_a_seed: int  # the frozen shared A is drawn from this seed, the same on every device

    @property
    def scaling(self) -> float:
        return self.alpha / self.r_user


@dataclasses.dataclass(frozen=True)
class UserEmbeddingSpec:
    """Persona-Plug user embedding: attention of the text over the user's history."""

    dim: int  # size of u, concatenated to the pooled text features
    history_size: int  # history slots fed to the graphs (padded + masked)
    mlp_hidden: int


@dataclasses.dataclass(frozen=True)
class QuantizationSpec:
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
class TrainGraph:
    """One training-step graph for a fixed micro-batch shape."""

    file: str
    batch_size: int
    seq_len: int


@dataclasses.dataclass(frozen=True)
class TrainSpec:
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

    def graph_for(self, seq_len: int) -> TrainGraph:
        """The smallest exported sequence-length bucket that fits `seq_len` tokens."""
        fitting = [g for g in self.graphs if g.seq_len >= seq_len]
        if not fitting:
            return max(self.graphs, key=lambda g: g.seq_len)
        return min(fitting, key=lambda g: g.seq_len)


@dataclasses.dataclass(frozen=True)
class ParityCheck:
    name: str
    value: float
    threshold: float
    higher_is_better: bool
    passed: bool


@dataclasses.dataclass(frozen=True)
class Manifest:
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

    def __post_init__(self) -> None:
        if self.schema_version > SCHEMA_VERSION:
            raise UnsupportedError(
                f"bundle schema version {self.schema_version} is newer than this runtime "
                f"supports ({SCHEMA_VERSION}); upgrade edgeperso"
            )
        _require(self.schema_version == SCHEMA_VERSION, f"schema {self.schema_version}")
        _require(self.task in TASKS, f"task {self.task!r}")
        _require(self.task != "classification" or len(self.labels) >= 2, "labels")
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
        try:
            version = int(data["schema_version"])
            if version > SCHEMA_VERSION:
                raise UnsupportedError(
                    f"bundle schema version {version} is newer than this runtime supports "
                    f"({SCHEMA_VERSION}); upgrade edgeperso"
                )
            ue = data.get("user_embedding")
            return cls(
                schema_version=version,
                task=data["task"],
                labels=tuple(data["labels"]),
                max_length=int(data["max_length"]),
                pooling=data["pooling"],
                normalize=bool(data["normalize"]),
                hidden_size=int(data["hidden_size"]),
                output_size=int(data["output_size"]),
                source=str(data["source"]),
                architecture=str(data["architecture"]),
                tokenizer=str(data["tokenizer"]),
                files=tuple(FileEntry(**f) for f in data["files"]),
                versions=dict(data["versions"]),
                quantization=_build(QuantizationSpec, data["quantization"]),
                lora=_build(LoraSpec, data["lora"]),
                user_embedding=None if ue is None else _build(UserEmbeddingSpec, ue),
                slots=tuple(_build(LoraSlot, s) for s in data["slots"]),
                params=tuple(_build(ParamSpec, p) for p in data["params"]),
                train=TrainSpec(
                    graphs=tuple(_build(TrainGraph, g) for g in data["train"]["graphs"]),
                    loss=data["train"]["loss"],
                ),
                parity=tuple(_build(ParityCheck, c) for c in data["parity"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, InvalidInputError):
                raise
            raise InvalidInputError(
                f"invalid bundle manifest ({type(exc).__name__}: {exc}); re-export the bundle"
            ) from exc


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
