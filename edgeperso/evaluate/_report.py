"""What an evaluation measured, as frozen dataclasses that serialise to JSON."""

from __future__ import annotations

import dataclasses
import math
import os
import platform
from collections.abc import Mapping
from importlib import metadata
from typing import Any

from edgeperso.evaluate._metrics import GainSummary


@dataclasses.dataclass(frozen=True)
class UserResult:
    """One evaluated user. Metrics are on the user's test rows: `global_metrics` with the
    shared model (no adapter), `personal_metrics` after on-device training (the shared
    model again when the runtime kept "global")."""

    user: str
    train_rows: int
    test_rows: int
    global_metrics: Mapping[str, float]
    personal_metrics: Mapping[str, float]
    kept: str  # "personal" or "global": what train() kept
    stage: str  # TrainResult.stage: "global", "head", "knn" or "adapter"
    head_l2: float | None  # TrainResult.head_l2
    knn: tuple[int, float] | None  # TrainResult.knn: (k, weight) of a kept retrieval mix
    train_seconds: float  # TrainResult.seconds
    personalize_seconds: float  # storing the examples (encrypted, embedded) + training
    adapter_bytes: int  # size of the stored adapter (0 when the runtime kept "global")
    steps: int
    stopped: str
    # The runtime's own held-out scores of the training rows (TrainResult): what decided
    # `kept` (cross-validation for the head, a held-out slice for the adapter).
    holdout_global: float
    holdout_personal: float


@dataclasses.dataclass(frozen=True)
class ColdStartPoint:
    """The gain when each user trains on only their first `k` training rows (None: all).
    Only users with more than `k` training rows take part."""

    k: int | None
    users: int
    metric: str
    gain_mean: float
    gain_ci95: tuple[float, float]
    share_worse: float
    share_kept_personal: float  # users kept a personal model (head, kNN or adapter)


@dataclasses.dataclass(frozen=True)
class EvalReport:
    task: str
    labels: tuple[str, ...]
    primary_metric: str  # macro_f1 (classification) or mae (regression)
    bundle: Mapping[str, Any]
    config: Mapping[str, Any]
    data: Mapping[str, Any]  # rows, dropped and duplicate rows, users, evaluated, skipped
    global_head: Mapping[str, Any]
    users: tuple[UserResult, ...]
    summary: Mapping[str, GainSummary]  # by metric name
    cold_start: tuple[ColdStartPoint, ...]
    timing: Mapping[str, float]
    machine: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values; NaN (a statistic over no users) becomes null."""
        return dict(_clean(dataclasses.asdict(self)))


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def machine_info() -> dict[str, Any]:
    """The CPU and versions that timings depend on (figures are meaningless without them)."""
    model, flags = platform.processor() or platform.machine(), ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", platform.machine()):
                    model = value.strip()
                if key.strip() == "flags" and not flags:
                    flags = value.strip()
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "amx_int8", "amx_bf16")
    versions = {}
    for package in ("onnxruntime", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return {
        "cpu": model,
        "cpu_flags": [f for f in wanted if f in flags.split()],
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
    }
