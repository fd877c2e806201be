"""Bundle.load verifies everything before anything is used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from edgeperso import Bundle, BundleIntegrityError, InvalidInputError, UnsupportedError
from edgeperso.bundle import Manifest

pytest.importorskip("torch", reason="bundles for these tests are exported with torch")


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
    with pytest.raises(InvalidInputError, match="file path"):
        Bundle.load(bundle_copy)


@pytest.mark.parametrize("field", ["quantization", "lora", "user_embedding"])
@pytest.mark.parametrize("value", [[], "x", 5])
def test_a_manifest_section_that_is_not_an_object_is_refused(
    bundle_copy: Path, field: str, value: object
) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest[field] = value
    (bundle_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InvalidInputError, match="invalid bundle manifest"):
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
