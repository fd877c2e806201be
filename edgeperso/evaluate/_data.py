"""Reading an annotation table (CSV, TSV, JSONL), mapping labels, splitting per user."""

from __future__ import annotations

import csv
import dataclasses
import datetime
import io
import json
import math
import os
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from edgeperso._errors import InvalidInputError
from edgeperso.evaluate._config import EvalConfig, finite_number

Table = list[dict[str, str]]
# A user, text or label cell holding one of these (any case) is a missing value: pandas
# writes NaN as "nan", Python's None becomes "None", JSON's null "null".
MISSING = ("", "nan", "none", "null")


@dataclasses.dataclass(frozen=True)
class Record:
    """One labelled row: `label` is a bundle label (classification) or a number."""

    user: str
    text: str
    label: str | float
    time: float  # the time column, or the row's position in the file


@dataclasses.dataclass(frozen=True)
class UserSplit:
    train: tuple[Record, ...]  # in the order the cold-start curve adds them
    test: tuple[Record, ...]


def read_table(
    path: str | os.PathLike[str],
    *,
    texts: str | os.PathLike[str] | None = None,
    join_on: str = "text_id",
) -> Table:
    """Rows of a .csv, .tsv or .jsonl file as str -> str mappings. With `texts`, each row
    also gets the columns of the row of `texts` whose `join_on` value matches its own."""
    rows = _read(Path(path))
    if texts is None:
        return rows
    by_key: dict[str, dict[str, str]] = {}
    for row in _read(Path(texts)):
        if join_on not in row:
            raise InvalidInputError(f"{texts}: no column {join_on!r} to join on")
        by_key[row[join_on]] = row
    joined, missing = [], 0
    for row in rows:
        if join_on not in row:
            raise InvalidInputError(f"{path}: no column {join_on!r} to join on")
        extra = by_key.get(row[join_on])
        missing += extra is None
        joined.append({**(extra or {}), **row})
    if missing:
        raise InvalidInputError(
            f"{missing} rows of {path} have a {join_on!r} that {texts} does not contain"
        )
    return joined


def _read(path: Path) -> Table:
    if not path.is_file():
        raise InvalidInputError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".ndjson"):
        raise InvalidInputError(f"{path}: unknown format {suffix!r}; use .csv, .tsv or .jsonl")
    f = io.StringIO(_text(path), newline="")
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
        rows = [{k: v or "" for k, v in row.items() if k is not None} for row in reader]
    else:
        rows = [_json_row(line, path, i) for i, line in enumerate(f, 1) if line.strip()]
    if not rows:
        raise InvalidInputError(f"{path} has no data rows")
    return rows


def _text(path: Path) -> str:
    """The file decoded as UTF-8, without the byte-order mark spreadsheets put first."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bom = 3 if data.startswith(b"\xef\xbb\xbf") else 0
        line = data.count(b"\n", 0, bom + exc.start) + 1
        raise InvalidInputError(
            f"{path} is not UTF-8 text (line {line}, byte {bom + exc.start}): save it as "
            "UTF-8 (a spreadsheet's 'CSV UTF-8') and run again"
        ) from None


def _json_row(line: str, path: Path, number: int) -> dict[str, str]:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{path}:{number} is not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict):
        raise InvalidInputError(f"{path}:{number} is not a JSON object")
    return {str(k): _cell(v) for k, v in value.items()}


def _cell(value: object) -> str:
    """A value as the text a CSV would hold: None and float NaN are missing ("")."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value)


def as_table(rows: object) -> Table:
    """Rows already read (mappings of column name to value, e.g. a pandas DataFrame's
    `to_dict("records")`) as a Table, their values converted as the JSONL reader does."""
    if isinstance(rows, str | bytes | Mapping) or not isinstance(rows, Iterable):
        raise InvalidInputError(
            "data must be a .csv/.tsv/.jsonl path or a sequence of rows, each a mapping of "
            "column name to value (for a pandas DataFrame: df.to_dict('records'))"
        )
    table = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, Mapping):
            raise InvalidInputError(
                f"row {number} of the data is a {type(row).__name__}, not a mapping of column "
                "name to value (for a pandas DataFrame: df.to_dict('records'))"
            )
        table.append({str(k): _cell(v) for k, v in row.items()})
    return table


def to_records(
    rows: Iterable[Mapping[str, object]], config: EvalConfig, task: str, labels: Sequence[str]
) -> tuple[list[Record], int]:
    """Validated records and the number of rows dropped for a missing user, text or label
    (empty, or one of `MISSING`)."""
    rows = as_table(rows)
    if not rows:
        raise InvalidInputError("the data has no rows")
    wanted = [config.user_column, config.text_column, config.label_column]
    wanted += [config.time_column] if config.time_column else []
    present = set().union(*(row.keys() for row in rows))
    missing = [c for c in wanted if c not in present]
    if missing:
        raise InvalidInputError(
            f"column(s) {missing} not found; the data has {sorted(present)} "
            "(name them with --user-column / --text-column / --label-column / --time-column)"
        )
    # Rows are named by number, never by their values: a label is the data's own content.
    records, dropped, unknown = [], 0, []
    for position, row in enumerate(rows):
        user, text = row.get(config.user_column, ""), row.get(config.text_column, "")
        raw = row.get(config.label_column, "").strip()
        if any(v.strip().lower() in MISSING for v in (user, text, raw)):
            dropped += 1
            continue
        label = _label(raw, config, task, position)
        if isinstance(label, str) and label not in labels:
            unknown.append(position + 1)
            continue
        time = _time(row.get(config.time_column, ""), position) if config.time_column else position
        records.append(Record(user.strip(), text, label, time))
    if unknown:
        shown = ", ".join(map(str, unknown[:3])) + (", ..." if len(unknown) > 3 else "")
        raise InvalidInputError(
            f"the labels of {len(unknown)} row(s) (rows {shown}) are not among the bundle's "
            f"labels {list(labels)}; map them with --label-map (e.g. 'x>0' or 'a=yes,b=no')"
        )
    if not records:
        raise InvalidInputError(
            "every row has a missing user, text or label (empty, nan, none or null)"
        )
    return records, dropped


def _label(raw: str, config: EvalConfig, task: str, position: int) -> str | float:
    if task == "regression":
        if config.label_map is not None:
            raise InvalidInputError("a regression bundle takes numeric labels: drop --label-map")
        value = finite_number(raw)
        if value is None:
            raise InvalidInputError(
                f"the label of row {position + 1} is not a finite number (a regression bundle)"
            )
        return value
    if config.label_map is None:
        return raw
    try:
        return config.label_map.apply(raw)
    except InvalidInputError:  # its message shows the value: this one shows the row
        raise InvalidInputError(
            f"the label of row {position + 1} does not fit the label map "
            f"{config.label_map.spec!r} (a finite number to compare, or a value it lists)"
        ) from None


def _time(raw: str, position: int) -> float:
    value = finite_number(raw)  # "nan" and "inf" parse, but cannot be ordered
    if value is not None:
        return value
    try:
        return datetime.datetime.fromisoformat(raw.strip()).timestamp()
    except ValueError:
        raise InvalidInputError(
            f"time value {raw!r} (row {position + 1}) is neither a finite number nor an "
            "ISO 8601 date"
        ) from None


def split_users(records: Sequence[Record], config: EvalConfig) -> dict[str, UserSplit]:
    """Each user's rows into train and test: a seeded random `test_fraction` of the user's
    distinct texts (the same for a user whatever the other users are), or the latest texts
    by time. Every copy of a text goes to the side of the first copy, so that no test text
    is among the user's own training rows."""
    by_user: dict[str, dict[str, list[Record]]] = {}
    for record in records:
        by_user.setdefault(record.user, {}).setdefault(record.text, []).append(record)
    out = {}
    for user, by_text in sorted(by_user.items()):
        groups = list(by_text.values())  # one per distinct text, in order of first copy
        if len(groups) < 2:
            out[user] = UserSplit(tuple(r for g in groups for r in g), ())
            continue
        n_test = min(len(groups) - 1, max(1, round(config.test_fraction * len(groups))))
        if config.split == "time":
            ordered = sorted(groups, key=lambda g: min(r.time for r in g))
            train = sorted((r for g in ordered[:-n_test] for r in g), key=lambda r: r.time)
            test = sorted((r for g in ordered[-n_test:] for r in g), key=lambda r: r.time)
            out[user] = UserSplit(tuple(train), tuple(test))
            continue
        rng = np.random.default_rng([config.seed, zlib.crc32(user.encode())])
        order = rng.permutation(len(groups))
        tested = sorted(order[:n_test].tolist())
        trained = order[n_test:].tolist()  # random order: the cold-start curve takes a prefix
        out[user] = UserSplit(
            tuple(r for i in trained for r in groups[i]),
            tuple(r for i in tested for r in groups[i]),
        )
    return out


def duplicate_rows(records: Sequence[Record]) -> int:
    """Rows that repeat an earlier row's (user, text): kept, on the side of their first copy."""
    return len(records) - len({(r.user, r.text) for r in records})
