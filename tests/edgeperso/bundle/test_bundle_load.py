"""Bundle.load verifies everything before anything is used."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeperso import (
    Bundle,
    BundleIntegrityError,
    InvalidInputError,
    Personalizer,
    Store,
    UnsupportedError,
)
from edgeperso.bundle import Manifest
from edgeperso.store import PassphraseKey

pytest.importorskip("torch", reason="bundles for these tests are exported with torch")

CHEAP = {"memory_kib": 1024, "iterations": 1, "lanes": 1}  # store key derivation, for tests


@pytest.fixture
def bundle_copy(tmp_path: Path, bundles: dict[str, Path]) -> Path:
    out = tmp_path / "bundle"
    shutil.copytree(bundles["classification"], out)
    return out


def test_intact_bundle_loads(bundle_copy: Path) -> None:
    assert Bundle.load(bundle_copy).manifest.task == "classification"


@pytest.mark.parametrize(
    "name", ["infer.onnx", "train_step_L32.onnx", "tokenizer.json", "params.npz"]
)
def test_a_flipped_byte_anywhere_is_refused(bundle_copy: Path, name: str) -> None:
    path = bundle_copy / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(BundleIntegrityError, match=name):
        Bundle.load(bundle_copy)


def test_a_truncated_file_is_refused(bundle_copy: Path) -> None:
    path = bundle_copy / "infer.onnx"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BundleIntegrityError, match="truncated"):
        Bundle.load(bundle_copy)


def test_a_missing_file_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "params.npz").unlink()
    with pytest.raises(BundleIntegrityError, match="missing"):
        Bundle.load(bundle_copy)


def test_a_newer_schema_is_refused_with_upgrade_advice(bundle_copy: Path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedError, match="upgrade edgeperso"):
        Bundle.load(bundle_copy)


def test_a_garbled_manifest_is_refused(bundle_copy: Path) -> None:
    (bundle_copy / "manifest.json").write_text("{not json")
    with pytest.raises(BundleIntegrityError, match="not valid JSON"):
        Bundle.load(bundle_copy)


def test_a_manifest_with_a_path_outside_the_bundle_is_refused(bundle_copy: Path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["files"][0]["path"] = "../etc/passwd"
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleIntegrityError, match="file path"):
        Bundle.load(bundle_copy)


@pytest.mark.parametrize("field", ["quantization", "lora", "user_embedding"])
@pytest.mark.parametrize("value", [[], "x", 5])
def test_a_manifest_section_that_is_not_an_object_is_refused(
    bundle_copy: Path, field: str, value: object
) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest[field] = value
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleIntegrityError, match="invalid bundle manifest"):
        Bundle.load(bundle_copy)


def test_not_a_bundle_directory(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match=r"no manifest\.json"):
        Bundle.load(tmp_path)
    with pytest.raises(InvalidInputError, match="not a directory"):
        Bundle.load(tmp_path / "nothing")
    with pytest.raises(InvalidInputError, match=r"str or os\.PathLike"):
        Bundle.load(None)  # type: ignore[arg-type]


def test_manifest_round_trips_through_json(bundle_copy: Path) -> None:
    manifest = Bundle.load(bundle_copy).manifest
    assert Manifest.from_json(json.loads(json.dumps(manifest.to_json()))) == manifest


# -- the manifest: the one file no hash in the bundle covers ------------------------------


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "s.db", key=PassphraseKey("correct horse battery", **CHEAP)) as s:
        yield s


def _edit(bundle: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda m: m.__setitem__("labels", "np"), r"labels is 'np', not a list"),
        (lambda m: m.__setitem__("max_length", -5), r"max_length is -5"),
        (lambda m: m.__setitem__("max_length", 128.0), r"max_length is 128\.0, not int"),
        (lambda m: m.__setitem__("max_length", float("inf")), r"max_length is inf"),
        (lambda m: m.__setitem__("schema_version", True), r"schema_version is True"),
        (lambda m: m.__setitem__("normalize", 1), r"normalize is 1, not bool"),
        (lambda m: m.__setitem__("task", "ranking"), r"task is 'ranking'"),
        (lambda m: m["params"][0].__setitem__("shape", [2.5, 3]), r"shape is \(2\.5, 3\)"),
        (lambda m: m["params"][0].__setitem__("shape", [0, 3]), r"shape \(0, 3\)"),
        (lambda m: m["user_embedding"].__setitem__("history_size", -1), r"history_size is -1"),
        (lambda m: m["lora"].__setitem__("alpha", float("nan")), r"lora\.alpha nan"),
        (
            lambda m: m["files"].append(m["files"][0] | {"path": "a\0b"}),
            r"FileEntry\.path .* without NUL",
        ),
        (lambda m: m["files"].append(m["files"][0] | {"path": "."}), r"file path '\.'"),
        (lambda m: m["files"][0].__setitem__("size", "12"), r"size is '12', not int"),
        (lambda m: m["train"].__setitem__("graphs", []), r"train\.loss .* with 0 train graphs"),
        (lambda m: m.__setitem__("labels", ["neg", "neu"]), r"output_size 3 for 2 labels"),
        (lambda m: m.__setitem__("labels", ["neg", "neg", "pos"]), r"two or more distinct"),
        (lambda m: m.__setitem__("task", "regression"), r"output_size 3 for regression"),
    ],
)
def test_an_edited_manifest_is_refused_before_anything_runs(
    bundle_copy: Path, edit: Callable[[dict[str, Any]], object], match: str
) -> None:
    _edit(bundle_copy, edit)
    with pytest.raises(BundleIntegrityError, match=match):
        Bundle.load(bundle_copy)


def test_a_manifest_that_disagrees_with_its_graphs_is_refused_at_open(
    bundle_copy: Path, store: Store
) -> None:
    """Sizes the graphs fix: a consistent but wrong manifest loads, the session check fails."""

    def three_more_labels(m: dict[str, Any]) -> None:
        m["labels"] = ["a", "b", "c", "d", "e", "f"]
        m["output_size"] = 6

    cases: list[tuple[Callable[[dict[str, Any]], object], str]] = [
        (lambda m: m.__setitem__("hidden_size", 7), r"features is \[\?, 384\] in the graph"),
        (three_more_labels, r"output is \[\?, 3\] in the graph, \[\?, 6\]"),
        (lambda m: m["slots"][0].__setitem__("rank", 5), r"lora\.l\d\.\w+\.A is \[\d+, \d+\]"),
    ]
    original = (bundle_copy / "manifest.json").read_text()
    for edit, match in cases:
        (bundle_copy / "manifest.json").write_text(original)
        _edit(bundle_copy, edit)
        bundle = Bundle.load(bundle_copy)
        with pytest.raises(BundleIntegrityError, match=match):
            Personalizer.open(bundle, store)
    assert store.users() == []


def test_a_tokenizer_entry_naming_another_file_is_refused(bundle_copy: Path, store: Store) -> None:
    _edit(bundle_copy, lambda m: m.__setitem__("tokenizer", "params.npz"))
    with pytest.raises(BundleIntegrityError, match=r"tokenizer 'params\.npz' cannot be read"):
        Personalizer.open(bundle_copy, store)


def test_the_bundle_digest_is_the_manifests_and_pins_the_bundle(
    bundle_copy: Path, store: Store
) -> None:
    digest = hashlib.sha256((bundle_copy / "manifest.json").read_bytes()).hexdigest()
    assert Bundle.load(bundle_copy).sha256 == digest
    assert Bundle.load(bundle_copy, sha256=digest).sha256 == digest
    assert Personalizer.open(bundle_copy, store, sha256=digest).bundle.sha256 == digest
    # An edit the schema accepts (another parity figure) still changes the digest.
    _edit(bundle_copy, lambda m: m["parity"][0].__setitem__("value", 1.0))
    Bundle.load(bundle_copy)
    with pytest.raises(BundleIntegrityError, match=f"not the pinned {digest}"):
        Bundle.load(bundle_copy, sha256=digest)
    for bundle in (bundle_copy, Bundle.load(bundle_copy)):  # a path, or a loaded bundle
        with pytest.raises(BundleIntegrityError, match="not the pinned"):
            Personalizer.open(bundle, store, sha256=digest)


@pytest.mark.parametrize("pin", ["", "A" * 64, "0" * 63, b"0" * 64, 5])
def test_a_pin_that_is_not_a_digest_is_refused(
    bundle_copy: Path, store: Store, pin: object
) -> None:
    for bundle in (bundle_copy, Bundle.load(bundle_copy)):  # a path, or a loaded bundle
        with pytest.raises(InvalidInputError, match="64 lowercase hex digits"):
            Personalizer.open(bundle, store, sha256=pin)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="64 lowercase hex digits"):
        Bundle.load(bundle_copy, sha256=pin)  # type: ignore[arg-type]
