"""Dynamic int8 quantization of the inference graph, with the config chosen for the CPU.

The quantizer rewrites MatMuls whose weight is an initializer. It runs before the LoRA slots
and head parameters get their default initializers, so only base weights are quantized and
every slot stays float.
"""

from __future__ import annotations

import platform
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.onnx_pb import TensorProto
from optimum.onnxruntime import ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig, QuantizationConfig

from edgeperso.bundle import QuantizationSpec
from edgeperso_export._config import QuantTarget
from edgeperso_export._quiet import quiet


def cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def detect_target() -> QuantTarget:
    """The quantization target this machine's CPU runs best.

    Per-channel QInt8 with VNNI is both the fastest and the most accurate config on CPUs
    that have it; on AVX2 without VNNI the u8*s8 dot product can saturate, hence
    reduce_range there; ARM has its own preset.
    """
    if platform.machine().lower() in ("arm64", "aarch64"):
        return "arm64"
    flags = cpu_flags()
    if "avx512_vnni" in flags or "avx_vnni" in flags:
        return "avx512_vnni"
    return "avx2"


def _optimum_config(
    target: QuantTarget, include: Sequence[str], exclude: Sequence[str]
) -> QuantizationConfig:
    common = {
        "is_static": False,
        "per_channel": True,
        # Named explicitly: left to itself the quantizer also rewrites MatMuls of two
        # activations (the LoRA slots, the head, attention over history).
        "nodes_to_quantize": [n for n in include if n not in set(exclude)],
        "nodes_to_exclude": list(exclude),
        "operators_to_quantize": ["MatMul"],
    }
    if target == "avx512_vnni":
        return AutoQuantizationConfig.avx512_vnni(**common)
    if target == "arm64":
        return AutoQuantizationConfig.arm64(**common)
    return AutoQuantizationConfig.avx2(reduce_range=True, **common)


def quantize(
    fp32_path: Path, int8_path: Path, target: QuantTarget, exclude: Sequence[str] = ()
) -> QuantizationSpec:
    config = _optimum_config(target, quantizable_matmuls(onnx.load(str(fp32_path))), exclude)
    with tempfile.TemporaryDirectory() as tmp, quiet():
        quantizer = ORTQuantizer.from_pretrained(fp32_path.parent, file_name=fp32_path.name)
        written = quantizer.quantize(config, save_dir=tmp, file_suffix="int8")
        out = Path(written)
        if out.is_dir():
            out = next(out.glob("*.onnx"))
        int8_path.write_bytes(out.read_bytes())
    return QuantizationSpec(
        mode="dynamic",
        target=target,
        per_channel=config.per_channel,
        weight_type=config.weights_dtype.name,
        reduce_range=config.reduce_range,
        excluded_nodes=tuple(exclude),
        batch_invariant=True,  # set from the parity gate's measurement
    )


def dequantized_weights(int8_model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """fp32 initializer name -> the value the int8 graph actually multiplies with.

    Dynamic quantization replaces initializer W by W_quantized, W_scale, W_zero_point; the
    training graph is built on these dequantized values so that an adapter is trained
    against the model that will serve it.
    """
    inits = {i.name: i for i in int8_model.graph.initializer}
    out = {}
    for name, tensor in inits.items():
        if not name.endswith("_quantized"):
            continue
        base = name.removesuffix("_quantized")
        scale = numpy_helper.to_array(inits[base + "_scale"]).astype(np.float32)
        zero = numpy_helper.to_array(inits[base + "_zero_point"]).astype(np.float32)
        q = numpy_helper.to_array(tensor).astype(np.float32)
        # Per-channel scales run along the output axis (the last one of a MatMul weight).
        out[base] = ((q - zero) * scale).astype(np.float32)
    return out


def quantizable_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes whose second input is a 2-D initializer: the ones dynamic int8 rewrites."""
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return [
        n.name
        for n in model.graph.node
        if n.op_type == "MatMul" and len(shapes.get(n.input[1], ())) == 2
    ]


def rank_sensitivity(
    fp32_path: Path,
    defaults: Mapping[str, np.ndarray],
    feed: Mapping[str, np.ndarray],
) -> list[str]:
    """Quantizable MatMuls, most sensitive first.

    Dynamic int8 gives a whole activation tensor one scale, max|x| / 127, so the MatMuls whose
    inputs carry outliers (a large max|x| against their RMS) lose the most precision. One fp32
    run over the probe texts measures that ratio for every MatMul input.
    """
    from edgeperso_export._graphs import add_overridable_defaults

    model = onnx.load(str(fp32_path))
    nodes = quantizable_matmuls(model)
    by_name = {n.name: n for n in model.graph.node}
    inputs = [by_name[n].input[0] for n in nodes]
    unique = list(dict.fromkeys(inputs))  # Q, K and V share one input
    for name in unique:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.onnx"
        onnx.save(model, str(probe))
        add_overridable_defaults(probe, defaults)
        values = dict(zip(unique, _run(probe, unique, feed), strict=True))
    ratio = {
        node: float(np.abs(x).max() / (np.sqrt(np.mean(x.astype(np.float64) ** 2)) + 1e-12))
        for node, x in ((n, values[i]) for n, i in zip(nodes, inputs, strict=True))
    }
    return sorted(nodes, key=lambda n: -ratio[n])


def _run(path: Path, outputs: list[str], feed: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    from edgeperso_export._parity import session_for

    return list(session_for(path).run(outputs, dict(feed)))
