"""The bundle's train-step graph computes the gradient of its own loss.

The check is against central finite differences of the graph's loss, run in float32 as the
device runs it. With eps = 1e-2 the rounding error of a float32 loss of order 1 is about
1e-7 / 1e-2 = 1e-5 and the truncation error eps^2 * f''' / 6 is of the same order, so a
correct gradient agrees to well within 5% (plus an absolute 1e-4 for near-zero entries),
while the failures this guards against (a gradient N times too large from a mis-converted
mean reduction, a wrong sign, a missing scaling or a dropped term) are off by 100% or more.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from edgeperso import Bundle
from tests.edgeperso.runtime.conftest import MARKETS, PETS

EPS = 1e-2
REL_TOL = 5e-2
ABS_TOL = 1e-4


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # slots are initializers that are also inputs; expected
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def train_feeds(
    tiny_bundles: dict[str, Path],
) -> tuple[ort.InferenceSession, dict[str, np.ndarray]]:
    """One micro-batch for the classification train graph: six real texts and two padding
    rows, a half-filled history, random non-zero user parameters and a Ditto term."""
    bundle = Bundle.load(tiny_bundles["classification"])
    manifest = bundle.manifest
    spec = manifest.train.graphs[0]
    infer = session(bundle.path_of("infer.onnx"))
    train = session(bundle.path_of(spec.file))
    tokenizer = Tokenizer.from_file(str(bundle.path_of(manifest.tokenizer)))
    rng = np.random.default_rng(0)
    d, b, length = manifest.hidden_size, spec.batch_size, spec.seq_len

    prefix = np.zeros((b, length, d), np.float32)
    mask = np.zeros((b, length), np.int64)
    for row, text in enumerate([*PETS[:3], *MARKETS[:3]]):
        ids = np.array([tokenizer.encode(text).ids], np.int64)
        (out,) = infer.run(["prefix"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        prefix[row, : ids.shape[1]] = out[0]
        mask[row, : ids.shape[1]] = 1
    labels = [0, 0, 1, 1, 2, 1, 0, 0]
    weights = np.array([1, 2, 1, 1, 2, 1, 0, 0], np.float32)  # rows 6, 7: padding
    ue = manifest.user_embedding
    assert ue is not None
    history = rng.normal(size=(ue.history_size, d)).astype(np.float32)
    history_mask = (np.arange(ue.history_size) < ue.history_size // 2).astype(np.float32)

    feeds: dict[str, np.ndarray] = {
        "prefix": prefix,
        "attention_mask": mask,
        "history": history,
        "history_mask": history_mask,
        "targets": np.eye(len(manifest.labels), dtype=np.float32)[labels],
        "weights": weights / weights.sum(),
        "prox_weight": np.array(0.1, np.float32),
    }
    feeds |= param_feeds(bundle, rng)
    inputs = {i.name for i in train.get_inputs()}
    return train, {k: v for k, v in feeds.items() if k in inputs}


def param_feeds(bundle: Bundle, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every parameter and its Ditto reference: random non-zero user parameters (pulled
    toward 0), the bundle's exported values or zeros for the shared ones (their own
    references)."""
    feeds: dict[str, np.ndarray] = {}
    exported = bundle.initial_params()
    for p in bundle.manifest.params:
        if p.level == "user":
            value = (0.3 * rng.normal(size=p.shape)).astype(np.float32)
        elif p.init == "bundle":
            value = np.array(exported[p.name], np.float32)
        else:
            value = np.zeros(p.shape, np.float32)
        feeds[p.name] = value
        feeds[f"ref.{p.name}"] = np.zeros_like(value) if p.level == "user" else value
    return feeds


def loss_of(train: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> float:
    return float(train.run(["loss"], feeds)[0])


@pytest.mark.parametrize("name", ["user.bias", "user.vector", "user.lora.l1.value.B"])
def test_train_graph_gradient_matches_finite_differences_of_its_loss(
    train_feeds: tuple[ort.InferenceSession, dict[str, np.ndarray]], name: str
) -> None:
    train, feeds = train_feeds
    (grad,) = train.run([f"grad.{name}"], feeds)
    assert grad.shape == feeds[name].shape
    assert np.abs(grad).max() > 1e-3, "a vanishing gradient would make this check vacuous"

    rng = np.random.default_rng(zlib.crc32(name.encode()))
    coordinates = [tuple(int(rng.integers(n)) for n in grad.shape) for _ in range(4)]
    for index in coordinates:
        moved = dict(feeds)
        moved[name] = feeds[name].copy()
        moved[name][index] += EPS
        up = loss_of(train, moved)
        moved[name][index] -= 2 * EPS
        down = loss_of(train, moved)
        numeric = (up - down) / (2 * EPS)
        analytic = float(grad[index])
        tolerance = REL_TOL * max(abs(analytic), abs(numeric)) + ABS_TOL
        assert abs(numeric - analytic) <= tolerance, (name, index, numeric, analytic)


def test_train_graph_padding_rows_with_weight_zero_change_nothing(
    train_feeds: tuple[ort.InferenceSession, dict[str, np.ndarray]],
) -> None:
    train, feeds = train_feeds
    outputs = [o.name for o in train.get_outputs()]
    before = train.run(outputs, feeds)
    noisy = dict(feeds)
    noisy["prefix"] = feeds["prefix"].copy()
    noisy["prefix"][6:] = np.random.default_rng(1).normal(size=noisy["prefix"][6:].shape)
    after = train.run(outputs, noisy)
    for name, x, y in zip(outputs, before, after):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7, err_msg=name)


def test_train_graph_loss_is_the_weighted_cross_entropy_plus_the_ditto_term(
    train_feeds: tuple[ort.InferenceSession, dict[str, np.ndarray]],
) -> None:
    train, feeds = train_feeds
    user = [k for k in feeds if k.startswith("user.")]
    with_prox = loss_of(train, feeds)
    without = loss_of(train, feeds | {"prox_weight": np.array(0.0, np.float32)})
    squared = sum(float((feeds[k].astype(np.float64) ** 2).sum()) for k in user)
    assert with_prox - without == pytest.approx(0.1 / 2 * squared, rel=1e-4)
