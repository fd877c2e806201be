"""Bad input to the exporter: clear errors, and never a half-written bundle."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from edgeperso_export import ExportConfig, ExportError, ParityError, ParityThresholds, export_bundle
from edgeperso_export._cli import main as cli_main

from tests.conftest import FAST, make_tiny_model


def _no_leftovers(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(".")]


def test_missing_model_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="does not exist"):
        export_bundle(tmp_path / "nope", tmp_path / "out", ExportConfig(task="embedding"))
    assert not (tmp_path / "out").exists()
    assert _no_leftovers(tmp_path) == []


def test_model_without_tokenizer_is_refused(tmp_path: Path, minilm_dir: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(minilm_dir / name, model / name)
    with pytest.raises(ExportError, match="tokenizer"):
        export_bundle(model, tmp_path / "out", ExportConfig(task="embedding"))
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_is_named(tmp_path: Path, minilm_dir: Path) -> None:
    from transformers import GPT2Config, GPT2Model

    model = tmp_path / "gpt2"
    GPT2Model(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=30522)).save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(minilm_dir / name, model / name)
    with pytest.raises(ExportError, match="unsupported architecture 'gpt2'"):
        export_bundle(model, tmp_path / "out", ExportConfig(task="embedding"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task": "generation"}, "unsupported task"),
        ({"task": "classification"}, "at least two labels"),
        ({"task": "regression", "labels": ("a", "b")}, "only for classification"),
        ({"task": "embedding", "max_length": 2}, "max_length"),
        ({"task": "embedding", "seq_buckets": ()}, "seq_buckets"),
        ({"task": "embedding", "quantization_target": "tpu"}, "quantization target"),
    ],
)
def test_invalid_config_is_refused_on_construction(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ExportError, match=message):
        ExportConfig(**kwargs)  # type: ignore[arg-type]


def test_target_modules_that_match_nothing(tmp_path: Path, minilm_dir: Path) -> None:
    config = ExportConfig(task="embedding", lora_target_modules=("q_proj",))
    with pytest.raises(ExportError, match=r"match no Linear layer"):
        export_bundle(minilm_dir, tmp_path / "out", config)
    assert _no_leftovers(tmp_path) == []


def test_existing_output_needs_overwrite(tmp_path: Path, minilm_dir: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="exists"):
        export_bundle(minilm_dir, out, ExportConfig(task="embedding"))
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_parity_gate_names_the_figure_and_writes_nothing(
    tmp_path: Path, minilm_dir: Path
) -> None:
    # A gradient error of exactly 0 is unreachable in float32: the gate must stop the export.
    model = make_tiny_model(tmp_path / "models", "bert", minilm_dir)
    config = ExportConfig(
        task="regression", thresholds=ParityThresholds(grad_rel_error=0.0), **FAST
    )
    with pytest.raises(ParityError, match=r"grad_rel_error = .* threshold 0\.0"):
        export_bundle(model, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()
    assert _no_leftovers(tmp_path) == []


def test_cli_reports_errors_with_exit_code_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli_main([str(tmp_path / "missing"), str(tmp_path / "out"), "--task", "embedding", "-q"])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err


def test_overwrite_swaps_the_new_bundle_in_and_leaves_no_trash(tmp_path: Path) -> None:
    from edgeperso_export._export import _replace_dir

    target, new = tmp_path / "bundle", tmp_path / ".bundle.partial"
    target.mkdir()
    (target / "infer.onnx").write_text("old")
    (target / "stale.onnx").write_text("old")
    new.mkdir()
    (new / "infer.onnx").write_text("new")
    _replace_dir(new, target)
    assert sorted(p.name for p in target.iterdir()) == ["infer.onnx"]
    assert (target / "infer.onnx").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]
