"""`edgeperso evaluate`: outputs on success, exit code 2 and a clear message on bad input."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from edgeperso._cli import main
from tests.edgeperso.evaluate.conftest import annotation_rows, write_csv

FAST = ["--max-users", "2", "--cold-start", "", "--epochs", "2", "--max-seconds", "10", "-q"]


def test_evaluate_writes_the_json_report_and_the_plots(
    noyes_bundle: Path, annotations_csv: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    head = ["--global-l2", "0.5, 2", "--global-class-weighting", "off", "--knn-k", ""]
    head += ["--global-epochs", "1", "--global-learning-rate", "1e-3", "--selection-se", "2.5"]
    head += ["--head-l2", "3"]
    args = ["evaluate", str(annotations_csv), str(noyes_bundle), "--out", str(out), *head]
    assert main([*args, *FAST]) == 0
    report = json.loads((out / "report.json").read_text())
    assert (out / "report.json").stat().st_mode & 0o777 == 0o600  # it lists user ids
    assert report["data"]["evaluated_users"] == 2
    assert report["config"]["head_l2"] == [0.5, 2.0]
    assert report["config"]["head_class_weighting"] == [False]
    assert report["global_head"]["l2"] in (0.5, 2.0)
    assert report["global_head"]["class_weighting"] is False
    assert report["global_head"]["adapter"]["epochs"] == 1.0
    assert report["global_head"]["adapter"]["learning_rate"] == 1e-3
    assert report["config"]["cold_start"] == []
    assert report["config"]["train"]["knn_k"] == []  # no retrieval candidate offered
    assert report["config"]["train"]["selection_se"] == 2.5
    assert report["config"]["train"]["head_l2"] == [3.0]
    assert all(user["head_l2"] in (None, 3.0) for user in report["users"])
    assert all(user["stage"] != "knn" for user in report["users"])
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "per_user.png").stat().st_size > 0
        assert (out / "gain_by_user.png").stat().st_size > 0


def test_a_numeric_column_is_binarised_with_label_map(
    noyes_bundle: Path, annotations_csv: Path, tmp_path: Path
) -> None:
    args = ["--label-column", "score", "--label-map", "x>0", "--no-plots", "--out", str(tmp_path)]
    assert main(["evaluate", str(annotations_csv), str(noyes_bundle), *args, *FAST]) == 0


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--user-column", "rater"], "column(s) ['rater'] not found"),
        (["--label-column", "score"], "not among the bundle's labels"),
        (["--label-map", "x>>0"], "neither a comparison"),
        (["--time-column", "when"], "column(s) ['when'] not found"),
        (["--cold-start", "ten"], "--cold-start takes integers"),
        (["--global-l2", "0.1,big"], "--global-l2 takes numbers"),
        (["--global-l2", "-1"], "EvalConfig.head_l2 is out of range"),
        (["--head-l2", "1,strong"], "--head-l2 takes numbers"),
        (["--head-l2", "0"], "TrainConfig.head_l2 must be a non-empty tuple of finite numbers > 0"),
        (["--head-l2", ""], "TrainConfig.head_l2 must be a non-empty tuple of finite numbers > 0"),
        (["--knn-k", "5,many"], "--knn-k takes integers"),
        (["--knn-k", "0"], "TrainConfig.knn_k must be a tuple of ints >= 1"),
        (["--selection-se", "-1"], "TrainConfig.selection_se must be >= 0"),
        (["--selection-se", "nan"], "TrainConfig.selection_se must be a number (not NaN)"),
        (["--global-epochs", "-1"], "EvalConfig.global_epochs is out of range"),
        (["--global-learning-rate", "0"], "EvalConfig.global_learning_rate is out of range"),
        (
            ["--global-params", "g.safetensors", "--global-epochs", "1"],
            "global_params loads a trained global level and global_epochs trains one",
        ),
        (["--global-params", "/nonexistent/g.safetensors"], "no such file"),
        (["--save-global", "/nonexistent/g.safetensors"], "does not exist; create it first"),
        (["--feature-cache", "/nonexistent/f.npz"], "the folder of /nonexistent/f.npz does not"),
        (["--min-user-rows", "31"], "no user can be evaluated"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    noyes_bundle: Path,
    annotations_csv: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
) -> None:
    args = ["evaluate", str(annotations_csv), str(noyes_bundle), "--out", str(tmp_path), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeperso evaluate: error: ") and message in err
    assert not (tmp_path / "report.json").exists()


def test_an_empty_or_missing_file_exits_2(
    noyes_bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = write_csv(tmp_path / "empty.csv", annotation_rows()[:1])
    empty.write_text(empty.read_text().splitlines()[0] + "\n")
    assert main(["evaluate", str(empty), str(noyes_bundle)]) == 2
    assert "has no data rows" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nope.csv"), str(noyes_bundle)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_missing_bundle_exits_2(
    annotations_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", str(annotations_csv), "/nonexistent/bundle"]) == 2
    assert "error" in capsys.readouterr().err


def test_a_saved_global_level_is_evaluated_again_without_refitting(
    noyes_bundle: Path, annotations_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--save-global writes the trained global level; --global-params loads it in a second
    run on the same split, which then fits and trains nothing at the global level and
    serves every user the same global predictions. On another split it is refused."""
    saved = tmp_path / "global.safetensors"
    base = ["evaluate", str(annotations_csv), str(noyes_bundle), "--no-plots", *FAST]
    first, second = tmp_path / "first", tmp_path / "second"
    trained = ["--global-epochs", "1", "--global-learning-rate", "1e-2"]
    assert main([*base, *trained, "--save-global", str(saved), "--out", str(first)]) == 0
    assert main([*base, "--global-params", str(saved), "--out", str(second)]) == 0

    one = json.loads((first / "report.json").read_text())
    two = json.loads((second / "report.json").read_text())
    assert one["global_head"]["adapter"]["steps"] > 0
    loaded = two["global_head"]["loaded_from"]
    assert loaded["sha256"] == one["global_head"]["saved_to"]["sha256"]
    assert loaded["same_training_rows"] is True
    assert loaded["metadata"]["rows"] == str(one["global_head"]["train_rows"])
    assert "adapter" not in two["global_head"] and "selection" not in two["global_head"]
    for a, b in zip(one["users"], two["users"], strict=True):
        assert a["user"] == b["user"] and a["global_metrics"] == b["global_metrics"]

    other_split = ["--seed", "1", "--out", str(tmp_path / "third")]
    assert main([*base, "--global-params", str(saved), *other_split]) == 2
    assert "fitted on other training rows" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["a-file", "a-file/out"])
def test_an_unusable_out_folder_exits_2_before_the_evaluation(
    annotations_csv: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    where: str,
) -> None:
    def evaluate(*args: object, **kwargs: object) -> None:
        raise AssertionError("the evaluation ran before --out was checked")

    monkeypatch.setattr("edgeperso.evaluate.evaluate", evaluate)
    (tmp_path / "a-file").write_text("")
    out = tmp_path / where
    assert main(["evaluate", str(annotations_csv), "bundle/", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgeperso evaluate: error: --out ") and str(out) in err
