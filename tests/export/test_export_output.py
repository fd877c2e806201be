"""Where the bundle goes: what --overwrite may replace, what an interrupted export leaves,
and what the finished folder looks like. The build itself is stubbed: these are about paths."""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from edgeperso_export import ExportConfig, ExportError, export_bundle
from edgeperso_export import _export as export_module
from edgeperso_export._cli import _sigterm_exits
from edgeperso_export._cli import main as cli_main

from edgeperso import InvalidInputError

CONFIG = ExportConfig(task="embedding")


def _write_bundle(folder: Path, marker: str) -> None:
    manifest = {"schema_version": 1, "versions": {"edgeperso": "0.1.0"}, "marker": marker}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "infer.onnx").write_text(marker)


@pytest.fixture
def stub_build(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """_build replaced by one that writes a two-file bundle; yields the work folders used."""
    used: list[Path] = []

    def build(source: str, work: Path, config: ExportConfig, stage: object) -> str:
        used.append(work)
        _write_bundle(work, "new")
        return "manifest"

    monkeypatch.setattr(export_module, "_build", build)
    yield used


def _marker(bundle: Path) -> str:
    return str(json.loads((bundle / "manifest.json").read_text())["marker"])


def _hidden(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


# -- what --overwrite may replace -------------------------------------------------------


@pytest.mark.parametrize(
    ("output", "relation"), [("model", "is"), ("model/bundle", "is inside"), ("", "contains")]
)
def test_overwrite_never_touches_the_source_model(
    tmp_path: Path,
    output: str,
    relation: str,
    stub_build: list[Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "MY_NOTES.txt").write_text("precious")
    argv = [str(model), str(tmp_path / output), "--task", "regression", "-q", "--overwrite"]
    assert cli_main(argv) == 2
    assert f"error: output {str(tmp_path / output)!r} {relation} the source model folder" in (
        capsys.readouterr().err
    )
    assert sorted(p.name for p in model.iterdir()) == ["MY_NOTES.txt", "config.json"]
    assert stub_build == []


@pytest.mark.parametrize("output", [".", "..", "bundle/.."])
def test_output_without_a_folder_name_is_refused_up_front(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: str
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidInputError, match="does not name a folder"):
        export_bundle(tmp_path / "model", output, CONFIG, overwrite=True)


def test_overwrite_refuses_a_folder_that_is_not_a_bundle(
    tmp_path: Path, stub_build: list[Path]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match=r"holding keep\.txt and no EdgePerso manifest"):
        export_bundle("model", out, CONFIG, overwrite=True)
    assert (out / "keep.txt").read_text() == "mine"
    assert stub_build == [] and _hidden(tmp_path) == []


def test_overwrite_refuses_a_file(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.write_text("mine")
    with pytest.raises(InvalidInputError, match="is a file"):
        export_bundle("model", out, CONFIG, overwrite=True)
    assert out.read_text() == "mine"


def test_overwrite_replaces_a_bundle_or_an_empty_folder(
    tmp_path: Path, stub_build: list[Path]
) -> None:
    bundle, empty = tmp_path / "bundle", tmp_path / "empty"
    bundle.mkdir()
    empty.mkdir()
    _write_bundle(bundle, "old")
    (bundle / "stale.onnx").write_text("old")
    for out in (bundle, empty):
        export_bundle("model", out, CONFIG, overwrite=True)
        assert sorted(p.name for p in out.iterdir()) == ["infer.onnx", "manifest.json"]
        assert _marker(out) == "new"
    assert _hidden(tmp_path) == []


def test_a_failed_swap_puts_the_old_bundle_back(
    tmp_path: Path, stub_build: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    _write_bundle(bundle, "old")

    def refuse(new: Path, target: Path) -> None:
        raise ExportError("the disk said no")

    monkeypatch.setattr(export_module, "_rename", refuse)
    with pytest.raises(ExportError, match="the disk said no"):
        export_bundle("model", bundle, CONFIG, overwrite=True)
    assert _marker(bundle) == "old"
    assert _hidden(tmp_path) == []


def test_a_bundle_left_aside_by_a_killed_swap_is_restored_first(
    tmp_path: Path, stub_build: list[Path], caplog: pytest.LogCaptureFixture
) -> None:
    """Killed between --overwrite's two renames: the old bundle is .bundle.old, nothing is
    at bundle. The next export puts it back, and then (without --overwrite) refuses."""
    aside = tmp_path / ".bundle.old"
    aside.mkdir()
    _write_bundle(aside, "old")

    with pytest.raises(InvalidInputError, match="exists"):
        export_bundle("model", tmp_path / "bundle", CONFIG)

    assert _marker(tmp_path / "bundle") == "old"
    assert _hidden(tmp_path) == []
    assert "an export replacing it was killed midway" in caplog.text


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_something_else_where_the_swap_keeps_the_old_bundle_is_refused_up_front(
    tmp_path: Path, stub_build: list[Path], kind: str
) -> None:
    aside = tmp_path / ".bundle.old"
    if kind == "file":
        aside.write_text("mine")
    else:
        aside.mkdir()
        (aside / "notes.txt").write_text("mine")
    with pytest.raises(InvalidInputError, match="is in the way"):
        export_bundle("model", tmp_path / "bundle", CONFIG, overwrite=True)
    assert stub_build == []  # refused before the build
    assert aside.exists()


def test_output_that_appears_during_the_export_is_not_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"

    def build(source: str, work: Path, config: ExportConfig, stage: object) -> str:
        _write_bundle(work, "new")
        out.mkdir()  # another export, or a copy, arriving while this one builds
        (out / "keep.txt").write_text("someone else's")
        return "manifest"

    monkeypatch.setattr(export_module, "_build", build)
    with pytest.raises(ExportError, match="appeared while the export ran"):
        export_bundle("model", out, CONFIG)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert _hidden(tmp_path) == []


def test_quiet_cli_prints_only_the_bundle_digest(
    tmp_path: Path, stub_build: list[Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "bundle"
    assert cli_main(["model", str(out), "--task", "embedding", "-q"]) == 0
    printed = capsys.readouterr().out
    assert printed == hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest() + "\n"


# -- the finished folder, and what an interrupted export leaves -------------------------


def test_bundle_folder_gets_ordinary_permissions(tmp_path: Path, stub_build: list[Path]) -> None:
    old = os.umask(0o027)
    try:
        export_bundle("model", tmp_path / "bundle", CONFIG)
    finally:
        os.umask(old)
    assert (tmp_path / "bundle").stat().st_mode & 0o777 == 0o750  # as mkdir would make it


def test_work_folders_of_killed_exports_are_removed_by_the_next_one(
    tmp_path: Path, stub_build: list, caplog: pytest.LogCaptureFixture
) -> None:
    """A work folder is a leftover when nobody holds the lock file beside it (flock works
    across processes and PID namespaces); anything else is left alone."""

    def work_folder(name: str, *, lock: bool) -> Path:
        folder = tmp_path / f"{name}.partial"
        folder.mkdir()
        (folder / "infer.onnx").write_text("partial")
        if lock:
            (tmp_path / f"{name}.lock").touch()
        return folder

    killed = work_folder(".bundle.1234-0123456789abcdef", lock=True)
    running = work_folder(".bundle.5678-fedcba9876543210", lock=True)
    unlocked = [
        work_folder(".bundle.k3j_x9a2", lock=False),  # an older exporter's, or a user's
        work_folder(".bundle.999-00112233445566ff", lock=False),  # no lock file: not judged
    ]
    other = work_folder(".bundle.v2.1234-0123456789abcdef", lock=True)  # output bundle.v2
    fd = os.open(tmp_path / ".bundle.5678-fedcba9876543210.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the running export's
    try:
        with caplog.at_level(logging.WARNING, logger="edgeperso_export._export"):
            export_bundle("model", tmp_path / "bundle", CONFIG)
    finally:
        os.close(fd)
    assert not killed.exists() and not killed.with_suffix(".lock").exists()
    assert running.exists() and other.exists() and all(p.exists() for p in unlocked)
    assert sum("left behind by an export that was killed" in r.message for r in caplog.records) == 1
    # the kept folders' locks remain; this export's own was removed when it finished
    assert sorted(p.name for p in tmp_path.glob("*.lock")) == [
        ".bundle.5678-fedcba9876543210.lock",
        ".bundle.v2.1234-0123456789abcdef.lock",
    ]


def test_sigterm_during_a_cli_export_is_an_exit_that_cleans_up() -> None:
    received: list[int] = []

    def record(signum: int, frame: object) -> None:
        received.append(signum)

    previous = signal.signal(signal.SIGTERM, record)
    try:
        with pytest.raises(SystemExit) as exc, _sigterm_exits():
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next line
            pytest.fail("SIGTERM did not end the export")
        restored = signal.getsignal(signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert exc.value.code == 128 + signal.SIGTERM
    assert received == []  # the export's handler, not the one before it, got the signal
    assert restored is record  # and the handler from before is back
