"""Bad input to the exporter: clear errors, and never a half-written bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from edgeperso_export import ExportConfig, ExportError, ParityError, ParityThresholds, export_bundle
from edgeperso_export._cli import main as cli_main
from edgeperso_export._export import _max_length, _sentence_transformers_head, _usable_positions
from edgeperso_export._parity import _short_name

from edgeperso import InvalidInputError, UnsupportedError
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
    (target / "manifest.json").write_text('{"schema_version": 1, "versions": {"edgeperso": "0"}}')
    (target / "stale.onnx").write_text("old")
    new.mkdir()
    (new / "infer.onnx").write_text("new")
    _replace_dir(new, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == ["infer.onnx"]
    assert (target / "infer.onnx").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


# -- max_length and the position table --------------------------------------------------


def test_max_length_beyond_the_position_table_is_refused(tmp_path: Path, tiny_bert: Path) -> None:
    # A longer max_length would pass every parity check (short probe texts) and then fail
    # on device, with an onnxruntime error, on the first text over 160 tokens.
    config = ExportConfig(task="regression", max_length=512, **FAST)
    with pytest.raises(InvalidInputError, match=r"max_length 512 .* the 160 positions"):
        export_bundle(tiny_bert, tmp_path / "out", config)
    assert not (tmp_path / "out").exists()
    assert _no_leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("model_type", "positions", "pad", "usable"),
    [("bert", 512, 0, 512), ("distilbert", 512, 0, 512), ("roberta", 514, 1, 512)],
)
def test_usable_positions_follow_each_architecture(
    model_type: str, positions: int, pad: int, usable: int
) -> None:
    from transformers import AutoConfig

    # RoBERTa numbers positions after its padding id: roberta-base's 514 hold 512 tokens.
    config = AutoConfig.for_model(model_type, max_position_embeddings=positions, pad_token_id=pad)
    assert _usable_positions(SimpleNamespace(config=config)) == usable


def test_default_max_length_never_exceeds_the_position_table(tmp_path: Path) -> None:
    assert _max_length(tmp_path, 160) == 160  # no sentence-transformers config: the table
    assert _max_length(tmp_path, 1024) == 512  # ... capped at 512
    (tmp_path / "sentence_bert_config.json").write_text('{"max_seq_length": 512}')
    assert _max_length(tmp_path, 160) == 160
    assert _max_length(tmp_path, 1024) == 512


# -- ExportConfig types ------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"task": "classification", "labels": "neg,pos"},  # would be 7 one-letter labels
        {"task": "classification", "labels": (0, 1)},
        {"task": "classification", "labels": ("", " ")},
        {"task": "classification", "labels": None},
        {"task": "embedding", "lora_target_modules": "query"},
        {"task": "embedding", "lora_target_modules": ("query", "")},
        {"task": "embedding", "lora_alpha": float("nan")},
        {"task": "embedding", "lora_alpha": float("inf")},
        {"task": "embedding", "lora_r": 2.5},
        {"task": "embedding", "lora_r": True},
        {"task": "embedding", "lora_r": None},
        {"task": "embedding", "train_batch_size": 4.0},
        {"task": "embedding", "seq_buckets": "64"},
        {"task": "embedding", "seq_buckets": (32.5,)},
        {"task": "embedding", "seq_buckets": None},
        {"task": "embedding", "lora_layers": ()},
        {"task": "embedding", "lora_layers": (1.0,)},
        {"task": "embedding", "thresholds": None},
        {"task": None},
    ],
    ids=repr,
)
def test_config_values_of_the_wrong_type_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError) as raised:
        ExportConfig(**kwargs)
    assert isinstance(raised.value, ExportError)


@pytest.mark.parametrize(
    "kwargs", [{"min_cosine": None}, {"max_kl": float("inf")}, {"grad_rel_error": True}]
)
def test_thresholds_of_the_wrong_type_are_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidInputError):
        ParityThresholds(**kwargs)


def test_config_takes_lists_and_numpy_ints_as_their_python_types() -> None:
    config = ExportConfig(
        task="classification", labels=["a", "b"], lora_r=np.int64(4), seq_buckets=[64, 32]
    )
    assert config.labels == ("a", "b") and config.seq_buckets == (64, 32)
    assert type(config.lora_r) is int and config.lora_r == 4


# -- what the source model holds ---------------------------------------------------------


def _copy(model: Path, root: Path) -> Path:
    return Path(shutil.copytree(model, root / "model"))


def _st_modules(model: Path, *kinds: str) -> None:
    modules = [
        {"idx": i, "name": str(i), "path": path, "type": f"sentence_transformers.models.{kind}"}
        for i, (path, kind) in enumerate(
            [("", "Transformer"), ("1_Pooling", "Pooling")] + [(f"{2}_{k}", k) for k in kinds]
        )
    ]
    (model / "modules.json").write_text(json.dumps(modules))


def test_sentence_transformers_dense_module_is_refused_not_dropped(
    tmp_path: Path, tiny_bert: Path
) -> None:
    model = _copy(tiny_bert, tmp_path)
    _st_modules(model, "Dense", "Normalize")
    with pytest.raises(UnsupportedError, match=r"Dense module \('2_Dense'\)"):
        export_bundle(model, tmp_path / "out", ExportConfig(task="embedding", **FAST))
    assert _no_leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("pooling", "expected"),
    [
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}, "cls"),
        ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False}, "mean"),
        ({"word_embedding_dimension": 32}, "mean"),
        ({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True}, None),
        ({"pooling_mode_max_tokens": True}, None),
        ({"pooling_mode_mean_tokens": False}, None),
    ],
)
def test_sentence_transformers_pooling_is_one_mode_we_export(
    tmp_path: Path, pooling: dict[str, Any], expected: str | None
) -> None:
    _st_modules(tmp_path, "Normalize")
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    if expected is None:
        with pytest.raises(UnsupportedError, match="pooling"):
            _sentence_transformers_head(tmp_path)
    else:
        assert _sentence_transformers_head(tmp_path) == (expected, True)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:1000])


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("sentence_bert_config.json", lambda p: p.write_text("{oops")),
        ("modules.json", lambda p: p.write_text("")),
        ("modules.json", lambda p: p.write_text('{"a": 1}')),
        ("modules.json", lambda p: p.write_text('[{"path": ""}]')),
        ("1_Pooling/config.json", lambda p: p.write_text("x")),
        ("sentence_bert_config.json", lambda p: p.write_text("[256]")),
        ("model.safetensors", _truncate),
    ],
    ids=[
        "sbert-not-json",
        "modules-empty",
        "modules-dict",
        "modules-no-type",
        "pooling-bad",
        "sbert-list",
        "weights-truncated",
    ],
)
def test_damaged_source_files_are_an_error_not_a_traceback(
    tmp_path: Path, tiny_bert: Path, name: str, damage: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _copy(tiny_bert, tmp_path)
    (model / name).parent.mkdir(exist_ok=True)
    damage(model / name)
    code = cli_main([str(model), str(tmp_path / "out"), "--task", "regression", "-q"])
    assert code == 2
    assert "edgeperso-export: error:" in capsys.readouterr().err
    assert _no_leftovers(tmp_path) == []


def test_target_modules_sharing_a_slot_name_are_refused_before_the_export(
    tmp_path: Path, tiny_bert: Path
) -> None:
    # BERT's attention.output.dense, intermediate.dense and output.dense all end in "dense".
    config = ExportConfig(task="regression", lora_target_modules=("dense",), **FAST)
    with pytest.raises(InvalidInputError, match=r"share the slot name 'l1\.dense'"):
        export_bundle(tiny_bert, tmp_path / "out", config)
    assert _no_leftovers(tmp_path) == []


def test_a_peft_module_without_a_slot_is_an_export_error() -> None:
    with pytest.raises(ExportError, match="has no slot"):
        _short_name("base_model.model.encoder.layer.1.output.dense", SimpleNamespace(sites=[]))  # type: ignore[arg-type]
