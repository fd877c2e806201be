"""The real all-MiniLM-L6-v2, exported for each task: bundles load, gates pass, slots work."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from edgeperso import Bundle


def _session(bundle: Bundle, name: str = "infer.onnx") -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(bundle.path_of(name)), options)


def _encode(bundle: Bundle, texts: list[str]) -> dict[str, np.ndarray]:
    tok = Tokenizer.from_file(str(bundle.path_of(bundle.manifest.tokenizer)))
    tok.enable_padding()
    enc = tok.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in enc], np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
    }


@pytest.mark.parametrize("task", ["classification", "regression", "embedding"])
def test_exported_bundle_loads_and_passed_every_gate(bundles: dict[str, Path], task: str) -> None:
    bundle = Bundle.load(bundles[task])
    manifest = bundle.manifest
    assert manifest.task == task
    assert manifest.max_length == 256  # the model's own sentence_bert_config.json max_seq_length
    gated = [c for c in manifest.parity if not c.name.startswith("batch_")]
    assert gated, "the manifest must carry the parity report"
    assert all(c.passed for c in gated), [c for c in gated if not c.passed]
    names = {c.name for c in manifest.parity}
    assert {
        "min_cosine",
        "batch_invariance_cosine",
        "adapter_delta_cosine",
        "peft_max_abs",
    } <= names
    assert "grad_rel_error" in names
    assert [g.seq_len for g in manifest.train.graphs] == [32]
    assert (
        manifest.train.loss
        == {
            "classification": "weighted_cross_entropy",
            "regression": "weighted_mse",
            "embedding": "supervised_contrastive",
        }[task]
    )


def test_manifest_records_quantization_for_this_cpu(bundles: dict[str, Path]) -> None:
    quant = Bundle.load(bundles["classification"]).manifest.quantization
    assert quant.mode == "dynamic"
    assert quant.target in ("avx512_vnni", "avx2", "arm64")
    assert quant.per_channel


def test_base_weights_are_int8_and_slots_stay_float(bundles: dict[str, Path]) -> None:
    import onnx

    bundle = Bundle.load(bundles["classification"])
    graph = onnx.load(str(bundle.path_of("infer.onnx"))).graph
    ops = {n.op_type for n in graph.node}
    assert "DynamicQuantizeMatMul" in ops or "MatMulInteger" in ops
    inits = {i.name: i for i in graph.initializer}
    for slot in bundle.manifest.slots:
        for name in (slot.a_input, slot.b_input):
            assert inits[name].data_type == onnx.TensorProto.FLOAT
            assert not any(name in n.input for n in graph.node if n.op_type != "MatMul")
    # Only slots, history and head parameters are overridable; base weights are constants.
    overridable = {i.name for i in graph.input} & set(inits)
    expected = {p.name for p in bundle.manifest.params if p.name.split(".")[1] != "lora"}
    expected |= {s.a_input for s in bundle.manifest.slots} | {
        s.b_input for s in bundle.manifest.slots
    }
    expected |= {"history", "history_mask"}
    assert overridable <= expected


def test_feeding_nothing_equals_feeding_zero_slots(bundles: dict[str, Path]) -> None:
    bundle = Bundle.load(bundles["classification"])
    session = _session(bundle)
    feed = _encode(bundle, ["hello there", "a second, longer text to pad against"])
    base = session.run(["output"], feed)[0]
    zeros = {
        name: np.zeros(
            (s.in_features, s.rank) if name == s.a_input else (s.rank, s.out_features), np.float32
        )
        for s in bundle.manifest.slots
        for name in (s.a_input, s.b_input)
    }
    assert np.array_equal(session.run(["output"], {**feed, **zeros})[0], base)


def test_user_adapter_fed_at_run_time_changes_the_output(bundles: dict[str, Path]) -> None:
    bundle = Bundle.load(bundles["classification"])
    session = _session(bundle)
    feed = _encode(bundle, ["hello there"])
    rng = np.random.default_rng(0)
    adapter = {}
    for s in bundle.manifest.slots:
        adapter[s.a_input] = rng.normal(0, 0.05, (s.in_features, s.rank)).astype(np.float32)
        adapter[s.b_input] = rng.normal(0, 0.05, (s.rank, s.out_features)).astype(np.float32)
    base = session.run(["features"], feed)[0]
    tuned = session.run(["features"], {**feed, **adapter})[0]
    assert np.abs(tuned - base).max() > 1e-3
    # and the next run without the feed is back to base: nothing stuck in the session
    assert np.array_equal(session.run(["features"], feed)[0], base)


def test_embedding_bundle_honours_sentence_transformers_normalize(bundles: dict[str, Path]) -> None:
    bundle = Bundle.load(bundles["embedding"])
    assert bundle.manifest.normalize and bundle.manifest.pooling == "mean"
    out = _session(bundle).run(["output"], _encode(bundle, ["one", "two words"]))[0]
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, atol=1e-5)


def test_train_step_runs_on_stock_onnxruntime(bundles: dict[str, Path]) -> None:
    bundle = Bundle.load(bundles["classification"])
    graph = bundle.manifest.train.graphs[0]
    session = _session(bundle, graph.file)
    inputs = {i.name: i for i in session.get_inputs()}
    params = bundle.initial_params()
    rng = np.random.default_rng(0)
    b, L, d = graph.batch_size, graph.seq_len, bundle.manifest.hidden_size
    feed: dict[str, np.ndarray] = {
        "prefix": rng.normal(size=(b, L, d)).astype(np.float32),
        "attention_mask": np.ones((b, L), np.int64),
        "history": np.zeros((bundle.manifest.user_embedding.history_size, d), np.float32),
        "history_mask": np.zeros(bundle.manifest.user_embedding.history_size, np.float32),
        "targets": np.eye(3, dtype=np.float32)[rng.integers(0, 3, b)],
        "weights": np.full(b, 1.0 / b, np.float32),
        "prox_weight": np.array(0.0, np.float32),
    }
    for spec in bundle.manifest.params:
        if spec.name in inputs:
            value = params.get(spec.name, np.zeros(spec.shape, np.float32))
            feed[spec.name] = value
            feed[f"ref.{spec.name}"] = value
    outputs = [o.name for o in session.get_outputs()]
    result = dict(zip(outputs, session.run(outputs, feed), strict=True))
    assert np.isfinite(result["loss"]) and result["loss"] > 0
    trainable = [p.name for p in bundle.manifest.params if p.trainable]
    assert sorted(o.removeprefix("grad.") for o in outputs if o != "loss") == sorted(trainable)
    # padding rows (weight 0) do not move the loss
    feed["weights"] = np.array([1.0 / b] * (b - 1) + [0.0], np.float32)
    feed["prefix"][-1] *= 5
    again = session.run(["loss"], feed)[0]
    feed["prefix"][-1] /= 5
    assert np.isclose(again, session.run(["loss"], feed)[0], rtol=1e-5)
