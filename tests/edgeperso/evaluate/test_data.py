"""Reading tables, mapping labels and splitting per user (no bundle needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edgeperso import InvalidInputError
from edgeperso.evaluate import EvalConfig, LabelMap, evaluate, read_table
from edgeperso.evaluate._data import as_table, duplicate_rows, split_users, to_records
from tests.edgeperso.evaluate.conftest import TEXTS_PER_USER, annotation_rows, write_csv

LABELS = ("no", "yes")


@pytest.mark.parametrize(
    ("spec", "value", "expected"),
    [
        ("x>0", "1.0", "yes"),
        ("x>0", "0", "no"),
        ("x >= 2", "2", "yes"),
        ("x<-1.5", "-2", "yes"),
        ("x!=0", "0.0", "no"),
        ("Hateful=yes,Non-hateful=no", "Non-hateful", "no"),
    ],
)
def test_label_map_binarises_numbers_and_renames_values(
    spec: str, value: str, expected: str
) -> None:
    assert LabelMap(spec).apply(value) == expected


@pytest.mark.parametrize("spec", ["", "x>>0", "y>0", "a=yes,a=no", "=yes"])
def test_a_malformed_label_map_is_refused(spec: str) -> None:
    with pytest.raises(InvalidInputError):
        LabelMap(spec)


def test_label_map_errors_name_the_problem() -> None:
    with pytest.raises(InvalidInputError, match="needs finite numbers"):
        LabelMap("x>0").apply("high")
    with pytest.raises(InvalidInputError, match="not listed"):
        LabelMap("a=yes").apply("b")
    rows = annotation_rows()
    rows[4] = rows[4] | {"score": "very-high"}
    config = EvalConfig(label_column="score", label_map=LabelMap("x>0"))
    with pytest.raises(InvalidInputError, match=r"label of row 5 does not fit") as refused:
        to_records(rows, config, "classification", LABELS)
    assert "very-high" not in str(refused.value)


def test_csv_jsonl_and_a_joined_text_table_read_alike(tmp_path: Path) -> None:
    rows = annotation_rows()[:5]
    csv_rows = read_table(write_csv(tmp_path / "a.csv", rows))
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert read_table(jsonl) == csv_rows == rows
    texts = [{"text_id": str(i), "text": r["text"]} for i, r in enumerate(rows)]
    labels = [
        {"text_id": str(i), "user": r["user"], "label": r["label"]} for i, r in enumerate(rows)
    ]
    joined = read_table(
        write_csv(tmp_path / "l.csv", labels), texts=write_csv(tmp_path / "t.csv", texts)
    )
    assert [(r["user"], r["text"], r["label"]) for r in joined] == [
        (r["user"], r["text"], r["label"]) for r in rows
    ]


def test_unreadable_inputs_are_typed_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.csv").write_text("user,text,label\n")
    with pytest.raises(InvalidInputError, match="no data rows"):
        read_table(tmp_path / "empty.csv")
    with pytest.raises(InvalidInputError, match="does not exist"):
        read_table(tmp_path / "missing.csv")
    (tmp_path / "bad.jsonl").write_text("{not json}\n")
    with pytest.raises(InvalidInputError, match="not valid JSON"):
        read_table(tmp_path / "bad.jsonl")


def test_missing_columns_and_unknown_labels_are_named() -> None:
    rows = annotation_rows()
    with pytest.raises(InvalidInputError, match=r"\['rater'\] not found"):
        to_records(rows, EvalConfig(user_column="rater"), "classification", LABELS)
    with pytest.raises(InvalidInputError, match=r"rows 1, 2, 3, \.\.\.\) are not among") as refused:
        to_records(rows, EvalConfig(label_column="score"), "classification", LABELS)
    assert not {r["score"] for r in rows} & set(re.findall(r"'([^']*)'", str(refused.value)))
    config = EvalConfig(label_column="score", label_map=LabelMap("x>0"))
    records, dropped = to_records(rows, config, "classification", LABELS)
    assert dropped == 0 and [r.label for r in records] == [r["label"] for r in rows]


def test_rows_without_a_label_are_dropped_and_counted() -> None:
    rows = annotation_rows()
    rows[0] = rows[0] | {"label": ""}
    rows[1] = rows[1] | {"label": "nan"}
    records, dropped = to_records(rows, EvalConfig(), "classification", LABELS)
    assert dropped == 2 and len(records) == len(rows) - 2


def test_random_split_is_seeded_and_independent_of_other_users() -> None:
    records, _ = to_records(annotation_rows(), EvalConfig(), "classification", LABELS)
    first = split_users(records, EvalConfig(seed=1))
    assert all(len(s.test) == 9 and len(s.train) == TEXTS_PER_USER - 9 for s in first.values())
    assert first == split_users(records, EvalConfig(seed=1))
    assert first != split_users(records, EvalConfig(seed=2))
    alone = split_users([r for r in records if r.user == "bob"], EvalConfig(seed=1))
    assert alone["bob"] == first["bob"]


def test_time_split_tests_each_users_latest_rows() -> None:
    config = EvalConfig(time_column="time", split="time")
    records, _ = to_records(annotation_rows()[::-1], config, "classification", LABELS)
    for split in split_users(records, config).values():
        assert max(r.time for r in split.train) < min(r.time for r in split.test)


def test_regression_labels_must_be_numbers() -> None:
    rows = annotation_rows()
    records, _ = to_records(rows, EvalConfig(label_column="score"), "regression", ())
    assert {r.label for r in records} == {2.0, -1.0}
    with pytest.raises(InvalidInputError, match=r"the label of row 1 is not a finite number"):
        to_records(rows, EvalConfig(), "regression", ())


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_a_non_finite_time_value_is_refused_like_an_unparsable_one(value: str) -> None:
    rows = annotation_rows()
    rows[3] = rows[3] | {"time": value}
    config = EvalConfig(time_column="time", split="time")
    with pytest.raises(InvalidInputError, match=r"\(row 4\) is neither a finite number"):
        to_records(rows, config, "classification", LABELS)


def test_a_byte_order_mark_is_skipped_and_a_file_that_is_not_utf8_is_refused(
    tmp_path: Path,
) -> None:
    rows = annotation_rows()[:3]
    text = write_csv(tmp_path / "a.csv", rows).read_text(encoding="utf-8")
    bom = tmp_path / "bom.csv"
    bom.write_bytes(text.encode("utf-8-sig"))  # a spreadsheet's "CSV UTF-8"
    assert read_table(bom) == rows
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes(text.replace("the cat", "the café").encode("latin-1"))
    with pytest.raises(InvalidInputError, match=r"latin1.csv is not UTF-8 text \(line 2,"):
        read_table(latin1)
    jsonl = tmp_path / "latin1.jsonl"
    jsonl.write_bytes('{"user": "a"}\n{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(InvalidInputError, match=r"not UTF-8 text \(line 2,"):
        read_table(jsonl)


def test_rows_with_values_that_are_not_str_read_as_the_jsonl_reader_reads_them(
    tmp_path: Path,
) -> None:
    """Rows from pandas' to_dict("records") carry ints, floats, None and NaN."""
    rows: list[dict[str, object]] = [
        {"user": i % 2, "text": f"text {i}", "score": float(i % 3) - 1.0} for i in range(6)
    ]
    rows[4]["score"], rows[5]["text"] = None, float("nan")
    config = EvalConfig(label_column="score", label_map=LabelMap("x>0"))
    records, dropped = to_records(rows, config, "classification", LABELS)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert (records, dropped) == to_records(read_table(jsonl), config, "classification", LABELS)
    assert dropped == 2 and [(r.user, r.label) for r in records] == [
        ("0", "no"),
        ("1", "no"),
        ("0", "yes"),
        ("1", "no"),
    ]


@pytest.mark.parametrize("data", [{"user": "a"}, ["user,text,label"], "not a path", 3])
def test_data_that_is_not_rows_is_a_typed_error(data: object) -> None:
    with pytest.raises(InvalidInputError, match="mapping of column"):
        as_table(data)
    with pytest.raises(InvalidInputError, match="mapping of column"):
        evaluate(data if not isinstance(data, str) else [data], "/nonexistent/bundle")  # type: ignore[arg-type]


@pytest.mark.parametrize("column", ["user", "text", "label"])
@pytest.mark.parametrize("value", ["", " ", "nan", "NaN", "null", "None"])
def test_a_missing_user_text_or_label_drops_the_row_and_counts_it(column: str, value: str) -> None:
    rows = annotation_rows()
    rows[0] = rows[0] | {column: value}
    records, dropped = to_records(rows, EvalConfig(), "classification", LABELS)
    assert dropped == 1 and len(records) == len(rows) - 1
    assert {r.text for r in records} == {r["text"] for r in rows[1:]}


@pytest.mark.parametrize("split", ["random", "time"])
def test_every_copy_of_a_users_text_is_on_one_side_of_the_split(split: str) -> None:
    """Duplicated (user, text) rows: no test text is among the same user's training rows,
    and the copies are counted."""
    rows = annotation_rows()
    doubled = rows + [r | {"time": str(int(r["time"]) + 500)} for r in rows if r["user"] == "cid"]
    config = EvalConfig(time_column="time", split=split)  # type: ignore[arg-type]
    records, _ = to_records(doubled, config, "classification", LABELS)
    assert duplicate_rows(records) == TEXTS_PER_USER
    splits = split_users(records, config)
    for user, s in splits.items():
        assert not {r.text for r in s.train} & {r.text for r in s.test}
        assert len(s.train) + len(s.test) == (2 if user == "cid" else 1) * TEXTS_PER_USER
    assert len(splits["cid"].test) == 2 * len(splits["ann"].test)
    single, _ = to_records(rows, config, "classification", LABELS)
    assert duplicate_rows(single) == 0
