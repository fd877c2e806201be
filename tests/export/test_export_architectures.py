"""The export is not MiniLM-specific: tiny random BERT, DistilBERT and RoBERTa export too."""

from __future__ import annotations

from pathlib import Path

import pytest
from edgeperso_export import ExportConfig, export_bundle

from edgeperso import Bundle
from tests.conftest import FAST, make_tiny_model


@pytest.mark.parametrize("model_type", ["bert", "distilbert", "roberta"])
def test_tiny_random_encoder_exports_and_passes_its_gates(
    tmp_path: Path, minilm_dir: Path, model_type: str
) -> None:
    model = make_tiny_model(tmp_path, model_type, minilm_dir)
    config = ExportConfig(task="classification", labels=("a", "b"), **FAST)
    export_bundle(model, tmp_path / "bundle", config)
    manifest = Bundle.load(tmp_path / "bundle").manifest
    assert manifest.architecture == model_type
    # No --max-length: the model's position table decides (160 positions; RoBERTa's ids
    # start after the padding id, 0 here, so one fewer; DistilBERT keeps its default 512).
    assert manifest.max_length == {"bert": 160, "distilbert": 512, "roberta": 159}[model_type]
    assert len(manifest.slots) == 2  # query/value (q_lin/v_lin) in the upper of 2 layers
    assert all(c.passed for c in manifest.parity if not c.name.startswith("batch_"))
