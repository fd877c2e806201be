"""evaluate() end to end on the tiny bundle and the generated six-user data set."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeperso import InvalidInputError, Personalizer, RawKey, Store, TrainConfig
from edgeperso.evaluate import EvalConfig, EvalReport, LabelMap, evaluate, macro_f1
from edgeperso.evaluate._evaluate import _read_cache, _write_cache
from edgeperso.runtime._head import fit_logistic
from tests.edgeperso.evaluate.conftest import TEXTS_PER_USER, annotation_rows

CONFIG = EvalConfig(
    label_column="score",
    label_map=LabelMap("x>0"),
    time_column="time",
    split="time",
    cold_start=(10,),
    train=TrainConfig(adapter=True, epochs=3, min_steps=20, max_seconds=20),
    bootstrap=200,
)


def rows_with_a_small_user() -> list[dict[str, str]]:
    small = [
        {"user": "gus", "text": f"hello {i}", "label": "no", "score": "0", "time": str(i)}
        for i in range(5)
    ]
    return annotation_rows() + small


@pytest.fixture(scope="module")
def report(noyes_bundle: Path) -> EvalReport:
    return evaluate(rows_with_a_small_user(), noyes_bundle, CONFIG)


def test_the_report_has_every_figure(report: EvalReport) -> None:
    data = report.to_json()
    json.dumps(data, allow_nan=False)  # NaN never reaches the JSON
    assert set(data) >= {"task", "labels", "primary_metric", "bundle", "config", "data"}
    assert set(data) >= {"global_head", "users", "summary", "cold_start", "timing", "machine"}
    assert data["primary_metric"] == "macro_f1" and data["labels"] == ["no", "yes"]
    assert data["data"]["evaluated_users"] == 6 and "gus" in data["data"]["skipped_users"]
    for summary in data["summary"].values():
        assert set(summary) >= {"global_mean", "global_median", "personal_mean"}
        assert set(summary) >= {"gain_mean", "gain_median", "gain_ci95", "share_worse"}
        assert set(summary) >= {"worst_decile", "worst_decile_mean_gain"}
        low, high = summary["gain_ci95"]
        assert low <= summary["gain_mean"] <= high
    assert set(data["summary"]) == {"macro_f1", "accuracy"}
    assert [c["k"] for c in data["cold_start"]] == [10, None]
    assert data["cold_start"][0]["users"] == 6
    assert data["timing"]["train_seconds_per_user_mean"] > 0
    assert data["bundle"]["user_param_bytes"] > 0
    assert data["machine"]["cpu"] and data["machine"]["cores"]
    for user in data["users"]:
        assert user["train_rows"] == 21 and user["test_rows"] == 9
        assert set(user["global_metrics"]) == {"macro_f1", "accuracy"}
        assert user["kept"] in ("personal", "global")
        assert (user["adapter_bytes"] > 0) == (user["kept"] == "personal")


def test_a_user_the_runtime_kept_global_scores_as_global(report: EvalReport) -> None:
    for user in report.users:
        if user.kept == "global":
            assert user.personal_metrics == user.global_metrics


def test_global_scores_are_those_of_the_fitted_head_on_each_users_latest_rows(
    report: EvalReport, noyes_bundle: Path, tmp_path: Path
) -> None:
    """Redo the global level by hand: features, logistic regression, the runtime's predict."""
    by_user: dict[str, list[dict[str, str]]] = {}
    for row in rows_with_a_small_user():
        by_user.setdefault(row["user"], []).append(row)
    # 30% of each user's rows, by time, are tested; the small user's training rows count too
    train = [r for user_rows in by_user.values() for r in user_rows[: len(user_rows) * 7 // 10]]
    with Store.open(tmp_path / "check.db", RawKey(os.urandom(32))) as store:
        model = Personalizer.open(noyes_bundle, store)
        texts = sorted({r["text"] for r in train})
        features = model.embed("nobody", texts)
        x = features[[texts.index(r["text"]) for r in train]]
        y = np.array([int(float(r["score"]) > 0) for r in train])
        chosen = report.global_head
        assert chosen["l2"] in CONFIG.head_l2 and len(chosen["selection"]["candidates"]) == 10
        w, b = fit_logistic(
            x,
            y,
            2,
            l2=chosen["l2"],
            steps=CONFIG.head_steps,
            class_weighting=chosen["class_weighting"],
        )
        head = np.zeros(model.manifest.param("global.head.w").shape, np.float32)
        head[: w.shape[0]] = w
        model.install_shared({"global.head.w": head, "global.head.b": b})
        assert report.global_head["train_rows"] == len(train) == 6 * 21 + 3
        assert report.global_head["train_fit"] == pytest.approx(np.mean((x @ w + b).argmax(1) == y))
        for result in report.users:
            test = by_user[result.user][21:]
            predicted = [p.label or "" for p in model.predict("nobody", [r["text"] for r in test])]
            # the runtime serves exactly the head fitted on the features it returned
            numpy_labels = (model.embed("nobody", [r["text"] for r in test]) @ w + b).argmax(1)
            assert predicted == [("no", "yes")[i] for i in numpy_labels]
            truth = ["yes" if float(r["score"]) > 0 else "no" for r in test]
            assert result.global_metrics["macro_f1"] == pytest.approx(macro_f1(truth, predicted))


def test_the_global_heads_choice_never_sees_a_test_row(noyes_bundle: Path) -> None:
    """Every user's test rows (the latest 30%) relabelled: the cross-validated choice and
    the fitted head are the same, since only training rows take part."""
    config = dataclasses.replace(CONFIG, cold_start=(), train=TrainConfig(), max_users=1)
    rows = annotation_rows()
    flipped = [dict(r) for r in rows]
    for user in {r["user"] for r in rows}:
        own = [r for r in flipped if r["user"] == user]
        for r in own[len(own) * 7 // 10 :]:
            r["score"] = str(-float(r["score"]))
    one, other = evaluate(rows, noyes_bundle, config), evaluate(flipped, noyes_bundle, config)
    assert one.global_head["selection"] == other.global_head["selection"]
    assert one.global_head["train_fit"] == other.global_head["train_fit"]
    assert one.users[0].global_metrics != other.users[0].global_metrics  # the test rows did change


def test_raw_numeric_labels_without_a_label_map_are_refused(noyes_bundle: Path) -> None:
    with pytest.raises(InvalidInputError, match="not among the bundle's labels"):
        evaluate(annotation_rows(), noyes_bundle, EvalConfig(label_column="score"))


def test_global_epochs_train_the_global_adapter_then_cross_validate_the_head_again(
    noyes_bundle: Path, tmp_path: Path
) -> None:
    """global_epochs > 0: the global LoRA and head train on the training rows, then the
    head is cross-validated again on the trained model's features (cached apart from the
    bundle's own)."""
    cache = tmp_path / "features.npz"
    config = dataclasses.replace(
        CONFIG,
        cold_start=(),
        train=TrainConfig(),
        max_users=2,
        global_epochs=4,
        global_learning_rate=1e-2,
        feature_cache=str(cache),
    )
    report = evaluate(annotation_rows(), noyes_bundle, config)

    adapter = report.global_head["adapter"]
    rows = report.global_head["train_rows"]
    # (that it learns is tested on the runtime's own, in test_train_shared.py: these six
    # users contradict each other, and the pooled loss may barely move)
    assert adapter["steps"] == 4 * -(-rows // 8)
    assert np.isfinite(adapter["loss_start"]) and np.isfinite(adapter["loss_end"])
    assert any(name.startswith("global.lora.") for name in adapter["parameters"])
    before = report.global_head["before_adapter"]
    assert before["train_rows"] == rows and before["selection"]["candidates"]
    # the trained LoRA was installed: features under it and under the bundle's own
    # parameters are different, and cached apart
    with np.load(cache) as npz:
        assert len(npz["keys"]) == 2 * report.global_head["distinct_texts"]


def test_a_feature_cache_in_a_missing_folder_is_refused_before_any_work(tmp_path: Path) -> None:
    config = EvalConfig(feature_cache=str(tmp_path / "missing" / "f.npz"))
    with pytest.raises(InvalidInputError, match=r"feature_cache: the folder of .*missing"):
        evaluate(annotation_rows(), tmp_path / "no-bundle", config)
    with pytest.raises(InvalidInputError, match="is a folder"):
        evaluate(annotation_rows(), tmp_path / "no-bundle", EvalConfig(feature_cache=str(tmp_path)))


def unreadable_caches(folder: Path) -> list[Path]:
    """Half of a real cache (a torn write), a file that is not an npz, another npz."""
    good = folder / "good.npz"
    np.savez(good, keys=np.array(["a" * 64, "b" * 64]), features=np.ones((2, 4), np.float32))
    torn, junk, other = folder / "torn.npz", folder / "junk.npz", folder / "other.npz"
    torn.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    junk.write_bytes(b"junk\n")
    np.savez(other, a=np.zeros(3))
    return [torn, junk, other]


def test_an_unreadable_feature_cache_is_read_as_empty_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for path in unreadable_caches(tmp_path):
        caplog.clear()
        assert _read_cache(path) == {}
        assert "is rewritten" in caplog.text and str(path) in caplog.text


def one_user_with_cache(cache: Path) -> EvalConfig:
    """A quick run (one user, a fixed head) that reads and writes the feature cache."""
    return EvalConfig(
        cold_start=(),
        max_users=1,
        head_l2=0.1,
        head_class_weighting=True,
        bootstrap=10,
        feature_cache=str(cache),
    )


def test_an_unreadable_feature_cache_is_computed_again_and_rewritten(
    noyes_bundle: Path, tmp_path: Path
) -> None:
    cache = unreadable_caches(tmp_path)[0]
    report = evaluate(annotation_rows(), noyes_bundle, one_user_with_cache(cache))
    with np.load(cache) as npz:
        assert len(npz["keys"]) == report.global_head["distinct_texts"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_feature_cache_shared_with_a_bundle_of_another_width_keeps_this_bundles(
    noyes_bundle: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "features.npz"
    _write_cache(cache, {"f" * 64: np.ones(768, np.float32)})  # another model's feature
    report = evaluate(annotation_rows(), noyes_bundle, one_user_with_cache(cache))
    with np.load(cache) as npz:
        assert "f" * 64 not in npz["keys"].tolist()
        assert len(npz["keys"]) == report.global_head["distinct_texts"]


def test_a_failed_feature_cache_write_keeps_the_previous_file_and_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = tmp_path / "features.npz"
    _write_cache(cache, {"a" * 64: np.ones(4, np.float32)})
    before = cache.read_bytes()

    def torn_savez(file: Any, **arrays: Any) -> None:
        file.write(b"PK half of a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", torn_savez)
    _write_cache(cache, {"b" * 64: np.zeros(4, np.float32)})
    assert cache.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["features.npz"]
    assert "was not written: No space left on device" in caplog.text


def test_a_run_that_would_evaluate_no_user_is_refused_up_front(noyes_bundle: Path) -> None:
    config = EvalConfig(min_user_rows=TEXTS_PER_USER + 1)
    with pytest.raises(
        InvalidInputError, match=r"no user can be evaluated: of 6 user\(s\), 6 have fewer .* is 30;"
    ):
        evaluate(annotation_rows(), noyes_bundle, config)
    one_text = [r | {"text": "the same text"} for r in annotation_rows()]
    with pytest.raises(InvalidInputError, match="6 have a single distinct text"):
        evaluate(one_text, noyes_bundle, EvalConfig())


def test_duplicate_rows_are_counted_in_the_report(report: EvalReport, noyes_bundle: Path) -> None:
    assert report.data["duplicate_rows"] == 0
    rows = annotation_rows()
    config = EvalConfig(
        cold_start=(), max_users=1, head_l2=0.1, head_class_weighting=True, bootstrap=10
    )
    doubled = evaluate(rows + rows[:7], noyes_bundle, config)
    assert doubled.data["duplicate_rows"] == 7 and doubled.data["rows"] == len(rows) + 7
