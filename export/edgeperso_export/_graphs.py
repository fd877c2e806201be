"""From the torch personal model to the two ONNX graphs of a bundle."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch._functorch.aot_autograd import aot_export_module

from edgeperso_export._errors import ExportError
from edgeperso_export._model import InferModule, PersonalModel, TrainLoss
from edgeperso_export._quiet import quiet

log = logging.getLogger(__name__)

INFER_INPUTS = ("input_ids", "attention_mask", "history", "history_mask")
INFER_OUTPUTS = ("output", "features", "prefix")
TRAIN_BATCH = (
    "prefix",
    "attention_mask",
    "history",
    "history_mask",
    "targets",
    "weights",
    "prox_weight",
)


def export_infer(model: PersonalModel, path: Path, sample: Mapping[str, torch.Tensor]) -> None:
    """Export the fp32 inference graph; every slot is a plain graph input (no default yet)."""
    module = InferModule(model).eval()
    slots = {name: p.detach().clone() for name, p in model.named_slot_params().items()}
    batch, seq, hist = (torch.export.Dim(n) for n in ("batch", "seq", "history"))
    dynamic = {
        "input_ids": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: seq},
        "history": {0: hist},
        "history_mask": {0: hist},
        "slots": {name: None for name in slots},
    }
    history = torch.zeros(2, model.hidden)
    args = (sample["input_ids"], sample["attention_mask"], history, torch.zeros(2))
    with quiet():
        torch.onnx.export(
            module,
            args,
            str(path),
            kwargs={"slots": slots},
            dynamo=True,
            external_data=False,
            input_names=[*INFER_INPUTS, *module.input_names],
            output_names=list(INFER_OUTPUTS),
            dynamic_shapes=dynamic,
        )


def add_overridable_defaults(path: Path, defaults: Mapping[str, np.ndarray]) -> None:
    """Give graph inputs a default value: an initializer with the input's name.

    onnxruntime then uses the default when the input is not fed, and the fed value when it
    is, so one session serves every user without any adapter touching disk.
    """
    model = onnx.load(str(path))
    inputs = {i.name for i in model.graph.input}
    existing = {i.name for i in model.graph.initializer}
    for name, value in defaults.items():
        if name not in inputs:
            continue  # the exporter dropped an input the graph does not use
        if name in existing:
            raise ExportError(f"graph already holds an initializer named {name!r}")
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    onnx.save(model, str(path))


def base_weight_names(fp32_model: onnx.ModelProto, encoder: nn.Module) -> dict[str, str]:
    """ONNX initializer name -> torch Linear-weight name, matched by value.

    The exporter folds each Linear's transpose into a new initializer (val_N), so names do not
    survive; the values do, bit for bit.
    """
    by_bytes = {}
    for name, module in encoder.named_modules():
        if isinstance(module, nn.Linear):
            by_bytes[module.weight.detach().T.contiguous().numpy().tobytes()] = name
    out = {}
    for init in fp32_model.graph.initializer:
        key = numpy_helper.to_array(init).tobytes()
        if key in by_bytes:
            out[init.name] = by_bytes[key]
    return out


def load_dequantized(
    encoder: nn.Module, names: Mapping[str, str], values: Mapping[str, Any]
) -> int:
    """Overwrite the encoder's Linear weights with the int8 graph's dequantized values."""
    count = 0
    with torch.no_grad():
        for onnx_name, module_name in names.items():
            value = values.get(onnx_name)
            if value is None:
                continue
            linear = encoder.get_submodule(module_name)
            assert isinstance(linear, nn.Linear)
            linear.weight.copy_(torch.from_numpy(np.ascontiguousarray(value.T)))
            count += 1
    return count


class _Joint(nn.Module):
    """aot_autograd's joint graph as a module: frozen weights as buffers (initializers),
    trainable parameters and their Ditto references as named inputs."""

    def __init__(
        self, graph: torch.fx.GraphModule, order: list[tuple[str, str]], trainable: list[str]
    ) -> None:
        super().__init__()
        self.joint = graph
        self.order = order
        self.trainable = trainable

    def forward(
        self,
        prefix: torch.Tensor,
        attention_mask: torch.Tensor,
        history: torch.Tensor,
        history_mask: torch.Tensor,
        targets: torch.Tensor,
        weights: torch.Tensor,
        prox_weight: torch.Tensor,
        params: dict[str, torch.Tensor],
        refs: dict[str, torch.Tensor],
    ) -> tuple[torch.Tensor, ...]:
        flat = [params[key] if kind == "param" else getattr(self, key) for kind, key in self.order]
        batch = (prefix, attention_mask, history, history_mask, targets, weights, prox_weight)
        out = self.joint(*flat, *batch, *(refs[name] for name in self.trainable))
        return tuple(out)


def trainable_names(model: PersonalModel) -> list[str]:
    """All slot/head parameters except the frozen shared LoRA A (frozen so that averaging B
    over devices is exact)."""
    return [
        name
        for name in model.named_slot_params()
        if not (name.startswith(("persona.lora.", "global.lora.")) and name.endswith(".A"))
    ]


def train_sample(
    model: PersonalModel, batch_size: int, seq_len: int, history_size: int, output_size: int
) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    mask = torch.ones(batch_size, seq_len, dtype=torch.int64)
    weights = torch.full((batch_size,), 1.0 / batch_size)
    if model.task == "embedding":
        # Positive pairs among three groups, and a last row of padding, so that the
        # gradient check covers the masking too.
        group = torch.arange(batch_size) % 3
        targets = (group[:, None] == group[None, :]).float() * (1 - torch.eye(batch_size))
        mask[-1] = 0
        targets[-1] = 0
        targets[:, -1] = 0
        weights[-1] = 0
    else:
        targets = torch.softmax(torch.randn(batch_size, output_size, generator=gen), -1)
    return (
        torch.randn(batch_size, seq_len, model.hidden, generator=gen),
        mask,
        torch.randn(history_size, model.hidden, generator=gen),
        torch.ones(history_size),
        targets,
        weights,
        torch.tensor(0.1),
    )


def export_train(
    model: PersonalModel, path: Path, batch: Sequence[torch.Tensor], trainable: Sequence[str]
) -> list[str]:
    """Trace forward + backward with aot_autograd and export the joint graph.

    Returns the graph's output names: `loss`, then `grad.<name>` per trainable parameter.
    """
    params = model.named_slot_params()
    for p in model.parameters():
        p.requires_grad_(False)
    for name in trainable:
        params[name].requires_grad_(True)
    loss_module = TrainLoss(model, trainable).eval()
    refs = [params[n].detach().clone() for n in trainable]
    with quiet():
        graph, signature = aot_export_module(
            loss_module, (*batch, *refs), trace_joint=True, output_loss_index=0
        )
    graph_name = {id(p): n for n, p in params.items()}
    by_fqn: dict[str, torch.Tensor] = dict(loss_module.named_parameters())
    by_fqn.update(dict(loss_module.named_buffers()))
    module_params = dict(loss_module.named_parameters())
    order: list[tuple[str, str]] = []
    frozen: dict[str, torch.Tensor] = {}
    for i, fqn in enumerate([*signature.parameters, *signature.buffers]):
        param_name = graph_name.get(id(module_params.get(fqn)))
        if param_name is not None and param_name in trainable:
            order.append(("param", param_name))
        else:
            frozen[f"frozen{i}"] = by_fqn[fqn].detach().clone()
            order.append(("frozen", f"frozen{i}"))
    assert isinstance(graph, torch.fx.GraphModule)
    assert signature.backward_signature is not None  # trace_joint=True
    joint = _Joint(graph, order, list(trainable))
    for key, value in frozen.items():
        joint.register_buffer(key, value)
    grads = signature.backward_signature.gradients_to_parameters
    grad_order = [graph_name[id(module_params[fqn])] for fqn in grads.values()]
    output_names = ["loss", *(f"grad.{n}" for n in grad_order)]
    values = {n: params[n].detach().clone() for n in trainable}
    ref_values = {n: torch.zeros_like(v) for n, v in values.items()}
    with quiet():
        torch.onnx.export(
            joint,
            tuple(batch),
            str(path),
            kwargs={"params": values, "refs": ref_values},
            dynamo=True,
            external_data=False,
            input_names=[*TRAIN_BATCH, *trainable, *(f"ref.{n}" for n in trainable)],
            output_names=output_names,
        )
    for p in model.parameters():
        p.requires_grad_(False)
    return output_names
