"""Bundles: the exported model files and the manifest that describes and verifies them."""

from edgeperso.bundle._bundle import INFER_GRAPH, MANIFEST, PARAMS_FILE, Bundle, sha256_file
from edgeperso.bundle._manifest import (
    SCHEMA_VERSION,
    FileEntry,
    LoraSlot,
    LoraSpec,
    Manifest,
    ParamSpec,
    ParityCheck,
    QuantizationSpec,
    TrainGraph,
    TrainSpec,
    UserEmbeddingSpec,
)

__all__ = [
    "INFER_GRAPH",
    "MANIFEST",
    "PARAMS_FILE",
    "SCHEMA_VERSION",
    "Bundle",
    "FileEntry",
    "LoraSlot",
    "LoraSpec",
    "Manifest",
    "ParamSpec",
    "ParityCheck",
    "QuantizationSpec",
    "TrainGraph",
    "TrainSpec",
    "UserEmbeddingSpec",
    "sha256_file",
]
