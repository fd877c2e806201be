"""A bundle quantized for another CPU than the device's is named at open (a log warning)."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

import pytest

from edgeperso._cpu import cpu_flags, quantization_mismatch
from edgeperso.bundle import Bundle, QuantizationSpec
from edgeperso.runtime import Personalizer
from edgeperso.runtime import _personalizer as personalizer_module
from edgeperso.store import RawKey, Store

VNNI_FULL_RANGE = QuantizationSpec(
    mode="dynamic",
    target="avx512_vnni",
    per_channel=True,
    weight_type="QInt8",
    reduce_range=False,
    excluded_nodes=(),
    batch_invariant=False,
)
AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma"})


def test_a_vnni_bundle_on_an_x86_cpu_without_vnni_is_named() -> None:
    message = quantization_mismatch(VNNI_FULL_RANGE, "x86_64", AVX2_ONLY)
    assert message is not None and "--quantization-target avx2" in message


@pytest.mark.parametrize(
    ("spec", "machine", "flags"),
    [
        (VNNI_FULL_RANGE, "x86_64", AVX2_ONLY | {"avx512_vnni"}),
        (VNNI_FULL_RANGE, "x86_64", AVX2_ONLY | {"avx_vnni"}),  # Alder Lake and later
        (VNNI_FULL_RANGE, "aarch64", frozenset({"asimd"})),
        (VNNI_FULL_RANGE, "x86_64", None),  # flags unknown: no guess
        (dataclasses.replace(VNNI_FULL_RANGE, reduce_range=True), "x86_64", AVX2_ONLY),
        (dataclasses.replace(VNNI_FULL_RANGE, target="avx2"), "x86_64", AVX2_ONLY),
    ],
    ids=["vnni", "avx-vnni", "arm", "unknown", "reduce-range", "avx2-bundle"],
)
def test_nothing_is_said_where_the_bundle_fits(
    spec: QuantizationSpec, machine: str, flags: frozenset[str] | None
) -> None:
    assert quantization_mismatch(spec, machine, flags) is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/cpuinfo")
def test_this_machine_lists_its_flags_on_linux() -> None:
    flags = cpu_flags()
    assert flags is not None and ("fpu" in flags or "asimd" in flags or "fp" in flags)


def test_the_mismatch_is_logged_when_a_personalizer_opens(
    tiny_bundles: dict[str, Path],
    tmp_path: Path,
    key: RawKey,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bundle = Bundle.load(tiny_bundles["classification"])
    seen: list[QuantizationSpec] = []

    def mismatched(spec: QuantizationSpec) -> str | None:  # a VNNI bundle on an AVX2 CPU
        seen.append(spec)
        return quantization_mismatch(VNNI_FULL_RANGE, "x86_64", AVX2_ONLY)

    monkeypatch.setattr(personalizer_module, "check_quantization", mismatched)
    with Store.open(tmp_path / "p.db", key) as store:
        Personalizer.open(bundle, store)
    assert seen == [bundle.manifest.quantization]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("--quantization-target avx2" in w for w in warnings)
