"""Export configuration: frozen dataclasses, validated on construction."""

from __future__ import annotations

import dataclasses
import math
from numbers import Integral, Real
from typing import Any, Literal

from edgeperso_export._errors import ExportInputError

Task = Literal["embedding", "classification", "regression"]
QuantTarget = Literal["avx512_vnni", "avx2", "arm64"]


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ExportInputError(f"{name} must be an int, got {value!r}")
    return int(value)


def _float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ExportInputError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _sequence(name: str, value: Any) -> tuple[Any, ...]:
    # A str is a sequence too: "neg,pos" would become seven one-letter labels.
    if not isinstance(value, tuple | list):
        what = "the str" if isinstance(value, str) else type(value).__name__
        raise ExportInputError(
            f"{name} must be a tuple or list, got {what} {value!r} (a str is not split)"
        )
    return tuple(value)


def _names(name: str, value: Any) -> tuple[str, ...]:
    items = _sequence(name, value)
    bad = [v for v in items if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ExportInputError(f"{name} must be non-empty strings, got {bad!r}")
    return items


def _ints(name: str, value: Any) -> tuple[int, ...]:
    return tuple(_int(f"{name} item", v) for v in _sequence(name, value))


@dataclasses.dataclass(frozen=True)
class ParityThresholds:
    """What the export must reach to be written. Defaults are strict; loosening one is a
    decision the manifest records, since the measured values go into it either way."""

    min_cosine: float = 0.99  # int8 graph vs torch fp32: features / embeddings, worst text
    batch_invariance_cosine: float = 0.999  # one text alone vs inside a batch of others
    max_kl: float = 1e-3  # classification: mean KL(torch || int8) of the head's softmax
    max_score_error: float = 0.05  # regression: worst |int8 - torch| / std(torch scores)
    adapter_delta_cosine: float = 0.95  # effect of a random adapter: int8 graph vs torch
    peft_max_abs: float = 1e-4  # slot semantics vs peft's LoRA with the same A, B
    grad_rel_error: float = 1e-4  # train step vs torch autograd, worst parameter

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = _float(f"threshold {field.name}", getattr(self, field.name))
            if value < 0:
                raise ExportInputError(f"threshold {field.name} must be >= 0, got {value}")
            object.__setattr__(self, field.name, value)
        for name in ("min_cosine", "batch_invariance_cosine", "adapter_delta_cosine"):
            if getattr(self, name) > 1:
                raise ExportInputError(f"threshold {name} is a cosine and must be <= 1")


_INT_FIELDS = (
    "lora_r",
    "shared_r",
    "user_embedding_dim",
    "history_size",
    "mlp_hidden",
    "train_batch_size",
    "seed",
)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Everything that shapes a bundle besides the source model.

    `lora_target_modules=None` takes peft's default for the architecture (query/value for
    BERT-like encoders); `lora_layers=None` puts adapters on the upper half of the encoder so
    the training step's backward stops half-way and the lower half is computed once per example.
    `max_length` may not exceed what the model's position table holds (checked at export).
    `user_embedding_dim`, `history_size` and `mlp_hidden` shape the Persona-Plug user
    embedding of the classification and regression heads; the embedding task has no head
    and ignores them. Lists are accepted for the tuple fields and stored as tuples; every
    field is type-checked (ExportInputError, also an InvalidInputError).
    """

    task: Task
    labels: tuple[str, ...] = ()
    max_length: int | None = None  # None: the model's own (sentence-transformers' max_seq_length)
    lora_r: int = 8
    lora_alpha: float = 16.0
    shared_r: int = 4  # rank of the persona and global adapters (0: no shared adapters)
    lora_target_modules: tuple[str, ...] | None = None
    lora_layers: tuple[int, ...] | None = None
    user_embedding_dim: int = 32  # Persona-Plug user embedding size (0: off)
    history_size: int = 64
    mlp_hidden: int = 64
    train_batch_size: int = 8
    seq_buckets: tuple[int, ...] = (32, 64, 128)
    quantization_target: QuantTarget | None = None  # None: detect from this machine's CPU
    thresholds: ParityThresholds = ParityThresholds()
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_types()
        if self.task not in ("embedding", "classification", "regression"):
            raise ExportInputError(
                f"unsupported task {self.task!r}: use embedding, classification or regression"
            )
        if self.task == "classification" and len(self.labels) < 2:
            raise ExportInputError("classification needs at least two labels (--labels a,b,...)")
        if self.task != "classification" and self.labels:
            raise ExportInputError(f"labels are only for classification, not {self.task}")
        if len(set(self.labels)) != len(self.labels):
            raise ExportInputError("labels must be distinct")
        if self.max_length is not None and not 8 <= self.max_length <= 4096:
            raise ExportInputError(f"max_length must be in 8..4096, got {self.max_length}")
        if self.lora_r < 1 or self.shared_r < 0:
            raise ExportInputError("lora_r must be >= 1 and shared_r >= 0")
        if self.lora_alpha <= 0:
            raise ExportInputError("lora_alpha must be > 0")
        if self.user_embedding_dim < 0 or self.history_size < 1 or self.mlp_hidden < 1:
            raise ExportInputError("user_embedding_dim >= 0, history_size >= 1, mlp_hidden >= 1")
        if self.train_batch_size < (2 if self.task == "embedding" else 1):
            raise ExportInputError(
                "train_batch_size must be >= 1 (>= 2 for embedding: its contrastive loss "
                "compares the texts of a micro-batch)"
            )
        if not self.seq_buckets or any(b < 8 for b in self.seq_buckets):
            raise ExportInputError("seq_buckets must be a non-empty list of lengths >= 8")
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ExportInputError("lora_target_modules must not be empty")
        if self.lora_layers is not None and not self.lora_layers:
            raise ExportInputError("lora_layers must not be empty (None: the upper half)")
        if self.quantization_target not in (None, "avx512_vnni", "avx2", "arm64"):
            raise ExportInputError(
                f"unknown quantization target {self.quantization_target!r}: "
                "use avx512_vnni, avx2 or arm64"
            )

    def _check_types(self) -> None:
        """Refuse values of the wrong type (a str for a list, a float or bool for an int,
        NaN, None) and store lists as tuples, so that the checks above compare like with like."""
        set_ = object.__setattr__
        if not isinstance(self.task, str):
            raise ExportInputError(
                f"task must be a str (embedding, classification or regression), got {self.task!r}"
            )
        set_(self, "labels", _names("labels", self.labels))
        if self.max_length is not None:
            set_(self, "max_length", _int("max_length", self.max_length))
        for name in _INT_FIELDS:
            set_(self, name, _int(name, getattr(self, name)))
        set_(self, "lora_alpha", _float("lora_alpha", self.lora_alpha))
        if self.lora_target_modules is not None:
            modules = _names("lora_target_modules", self.lora_target_modules)
            set_(self, "lora_target_modules", modules)
        if self.lora_layers is not None:
            set_(self, "lora_layers", _ints("lora_layers", self.lora_layers))
        set_(self, "seq_buckets", _ints("seq_buckets", self.seq_buckets))
        if not isinstance(self.thresholds, ParityThresholds):
            raise ExportInputError(
                f"thresholds must be a ParityThresholds, got {type(self.thresholds).__name__}"
            )

    @property
    def output_size(self) -> int:
        return len(self.labels) if self.task == "classification" else 1

    @property
    def buckets(self) -> tuple[int, ...]:
        """Training sequence-length buckets, capped at max_length, ascending."""
        cap = self.max_length if self.max_length is not None else max(self.seq_buckets)
        kept = sorted({min(b, cap) for b in self.seq_buckets})
        return tuple(kept)
