"""What this CPU can do, as far as the int8 graphs care (Linux: /proc/cpuinfo)."""

from __future__ import annotations

import platform
from pathlib import Path

from edgeperso.bundle import QuantizationSpec

X86 = ("x86_64", "amd64", "i686", "i386")
VNNI = frozenset({"avx512_vnni", "avx_vnni"})


def cpu_flags() -> frozenset[str] | None:
    """The CPU's feature flags, or None where this platform does not list them."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return None


def quantization_mismatch(
    spec: QuantizationSpec, machine: str, flags: frozenset[str] | None
) -> str | None:
    """Why a bundle's int8 graph may serve this CPU badly, or None.

    The one known case: quantized for VNNI with the full 8-bit range (reduce_range off),
    served on an x86 CPU without VNNI, where the u8*s8 dot product (vpmaddubsw) saturates
    at 16 bits and outputs drift from what the parity gate measured.
    """
    if spec.target != "avx512_vnni" or spec.reduce_range or flags is None:
        return None
    if machine.lower() not in X86 or VNNI & flags:
        return None
    return (
        "this bundle's int8 graph was quantized for CPUs with VNNI (full 8-bit range); this "
        "CPU has no VNNI, where its int8 products can saturate and outputs drift from the "
        "export's parity figures: export the bundle for these devices with "
        "--quantization-target avx2"
    )


def check_quantization(spec: QuantizationSpec) -> str | None:
    """`quantization_mismatch` for this machine."""
    return quantization_mismatch(spec, platform.machine(), cpu_flags())
