from pathlib import Path

import pytest

from tests.conftest import make_tiny_model

pytest.importorskip("torch", reason="the export toolchain needs torch (make test installs it)")


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """A random 2-layer BERT with 160 positions, made once: copy it before changing it."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), "bert", minilm_dir)
