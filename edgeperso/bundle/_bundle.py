"""Loading a bundle: verify the manifest and every file hash before anything is used."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from edgeperso._errors import BundleIntegrityError, EdgePersoError, InvalidInputError
from edgeperso._paths import check_path
from edgeperso.bundle._manifest import SHA256_HEX, Manifest

MANIFEST = "manifest.json"
INFER_GRAPH = "infer.onnx"
PARAMS_FILE = "params.npz"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_pin(sha256: object) -> str:
    """A bundle digest as `edgeperso-export` prints it, or InvalidInputError."""
    if not (isinstance(sha256, str) and SHA256_HEX.fullmatch(sha256)):
        raise InvalidInputError(
            "sha256 must be the bundle digest edgeperso-export printed: 64 lowercase hex "
            f"digits, not {sha256!r:.80}"
        )
    return sha256


class Bundle:
    """A verified bundle directory. Construct it with `Bundle.load(path)`.

    `sha256` is the SHA-256 of the bundle's `manifest.json`. The manifest holds the hash of
    every other file, so this one digest names the whole bundle: the exporter prints it, and
    an app that pins it (`Bundle.load(path, sha256=...)`) runs only the bundle it shipped.
    """

    def __init__(self, root: Path, manifest: Manifest, sha256: str) -> None:
        self.root = root
        self.manifest = manifest
        self.sha256 = sha256

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, sha256: str | None = None) -> Bundle:
        """Read `manifest.json` and verify the size and sha256 of every file it lists.

        With `sha256` (the digest `edgeperso-export` printed, 64 hex digits), the manifest
        itself must have that digest too, so no file of the bundle, the manifest included,
        can be edited or swapped for another export's.

        Raises InvalidInputError if `path` is not a bundle directory or `sha256` is not a
        digest, UnsupportedError if the bundle's schema is newer than this runtime, and
        BundleIntegrityError if any file is missing, truncated or modified, or the manifest
        has a field of the wrong type or out of range (the message names it).
        """
        root = check_path(path, "bundle path")
        if sha256 is not None:
            check_pin(sha256)
        if not root.is_dir():
            raise InvalidInputError(f"bundle path {str(root)!r} is not a directory")
        manifest_path = root / MANIFEST
        if not manifest_path.is_file():
            raise InvalidInputError(
                f"{str(root)!r} has no {MANIFEST}; point Bundle.load at an exported bundle"
            )
        try:
            raw = manifest_path.read_bytes()
        except OSError as exc:
            raise EdgePersoError(f"cannot read {MANIFEST} in {str(root)!r}: {exc}") from exc
        digest = hashlib.sha256(raw).hexdigest()
        if sha256 is not None and digest != sha256:
            raise BundleIntegrityError(
                f"{MANIFEST} in {str(root)!r} has sha256 {digest}, not the pinned {sha256}: "
                "another export, or an edited one; ship the bundle the app was built with"
            )
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BundleIntegrityError(
                f"{MANIFEST} in {str(root)!r} is not valid JSON ({exc}); re-export the bundle"
            ) from exc
        if not isinstance(data, dict):
            raise BundleIntegrityError(f"{MANIFEST} in {str(root)!r} is not a JSON object")
        try:
            manifest = Manifest.from_json(data)
        except InvalidInputError as exc:  # a manifest on disk that fails is an edited file
            raise BundleIntegrityError(f"{MANIFEST} in {str(root)!r}: {exc}") from exc
        for entry in manifest.files:
            _verify(root, entry.path, entry.size, entry.sha256)
        required = {INFER_GRAPH, PARAMS_FILE}
        missing = required - {f.path for f in manifest.files}
        if missing:
            raise BundleIntegrityError(f"the manifest does not list {sorted(missing)}")
        return cls(root, manifest, digest)

    def path_of(self, name: str) -> Path:
        """Path of a verified bundle file."""
        if name not in {f.path for f in self.manifest.files}:
            raise InvalidInputError(f"the bundle has no file {name!r}")
        return self.root / name

    def initial_params(self) -> Mapping[str, np.ndarray]:
        """The exported values of the parameters whose init is "bundle"."""
        with np.load(self.path_of(PARAMS_FILE), allow_pickle=False) as npz:
            values = {name: npz[name] for name in npz.files}
        for spec in self.manifest.params:
            if spec.init != "bundle":
                continue
            value = values.get(spec.name)
            if value is None or value.shape != spec.shape or value.dtype != np.float32:
                raise BundleIntegrityError(
                    f"params.npz does not hold {spec.name} as float32{list(spec.shape)}"
                )
        return values


def _verify(root: Path, name: str, size: int, sha256: str) -> None:
    path = root / name
    try:
        actual_size = path.stat().st_size
    except FileNotFoundError:
        raise BundleIntegrityError(
            f"bundle file {name!r} is missing from {str(root)!r}; re-copy or re-export the bundle"
        ) from None
    except OSError as exc:
        raise EdgePersoError(f"cannot read bundle file {name!r}: {exc}") from exc
    if actual_size != size:
        raise BundleIntegrityError(
            f"bundle file {name!r} is {actual_size} bytes, the manifest says {size}: "
            "truncated or replaced; re-copy or re-export the bundle"
        )
    if sha256_file(path) != sha256:
        raise BundleIntegrityError(
            f"bundle file {name!r} does not match its sha256 in the manifest: modified "
            "after export; re-copy or re-export the bundle"
        )
