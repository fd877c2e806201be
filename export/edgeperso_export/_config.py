"""Export configuration: frozen dataclasses, validated on construction."""

from __future__ import annotations

import dataclasses
from typing import Literal

from edgeperso_export._errors import ExportError

Task = Literal["embedding", "classification", "regression"]
QuantTarget = Literal["avx512_vnni", "avx2", "arm64"]


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
            value = getattr(self, field.name)
            if not value >= 0:
                raise ExportError(f"threshold {field.name} must be >= 0, got {value}")
        for name in ("min_cosine", "batch_invariance_cosine", "adapter_delta_cosine"):
            if getattr(self, name) > 1:
                raise ExportError(f"threshold {name} is a cosine and must be <= 1")


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    """Everything that shapes a bundle besides the source model.

    `lora_target_modules=None` takes peft's default for the architecture (query/value for
    BERT-like encoders); `lora_layers=None` puts adapters on the upper half of the encoder so
    the training step's backward stops half-way and the lower half is computed once per example.
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
        if self.task not in ("embedding", "classification", "regression"):
            raise ExportError(
                f"unsupported task {self.task!r}: use embedding, classification or regression"
            )
        if self.task == "classification" and len(self.labels) < 2:
            raise ExportError("classification needs at least two labels (--labels a,b,...)")
        if self.task != "classification" and self.labels:
            raise ExportError(f"labels are only for classification, not {self.task}")
        if len(set(self.labels)) != len(self.labels):
            raise ExportError("labels must be distinct")
        if self.max_length is not None and not 8 <= self.max_length <= 4096:
            raise ExportError(f"max_length must be in 8..4096, got {self.max_length}")
        if self.lora_r < 1 or self.shared_r < 0:
            raise ExportError("lora_r must be >= 1 and shared_r >= 0")
        if self.lora_alpha <= 0:
            raise ExportError("lora_alpha must be > 0")
        if self.user_embedding_dim < 0 or self.history_size < 1 or self.mlp_hidden < 1:
            raise ExportError("user_embedding_dim >= 0, history_size >= 1, mlp_hidden >= 1")
        if self.train_batch_size < (2 if self.task == "embedding" else 1):
            raise ExportError(
                "train_batch_size must be >= 1 (>= 2 for embedding: its contrastive loss "
                "compares the texts of a micro-batch)"
            )
        if not self.seq_buckets or any(b < 8 for b in self.seq_buckets):
            raise ExportError("seq_buckets must be a non-empty list of lengths >= 8")
        if self.lora_target_modules is not None and not self.lora_target_modules:
            raise ExportError("lora_target_modules must not be empty")
        if self.quantization_target not in (None, "avx512_vnni", "avx2", "arm64"):
            raise ExportError(
                f"unknown quantization target {self.quantization_target!r}: "
                "use avx512_vnni, avx2 or arm64"
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
