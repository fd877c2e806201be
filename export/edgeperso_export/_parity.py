"""The parity gate: what the exported graphs compute, measured against torch before writing.

Every figure is measured on a probe set at export time and written into the manifest with its
threshold, pass or fail.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from edgeperso._onnxruntime import ort
from edgeperso.bundle import ParityCheck
from edgeperso_export._config import ExportConfig
from edgeperso_export._errors import ExportError
from edgeperso_export._graphs import TRAIN_BATCH
from edgeperso_export._model import PersonalModel, TrainLoss

Tokenize = Callable[[list[str]], Mapping[str, torch.Tensor]]

PROBE_TEXTS: tuple[str, ...] = (
    "I finally got the job, I can't stop smiling!",
    "The train was late again and nobody told us why.",
    "ok",
    "Could you send me the report by Friday?",
    "This is the worst customer service I have ever experienced.",
    "The quarterly figures show a modest rise in operating margin across all regions.",
    "My cat knocked the plant off the windowsill this morning.",
    "What a beautiful sunset over the lake tonight.",
    "I'm not sure how I feel about the new policy.",
    "Thanks a lot, that really helped.",
    "Heavy rain is expected tomorrow afternoon in the northern districts, with strong winds "
    "and a risk of local flooding near the river banks.",
    "Why does this keep happening to me?",
    "Lovely to see you all at the reunion, let's not wait ten years next time.",
    "The patch fixes a race condition in the scheduler.",
    "He didn't even say goodbye.",
    "Best. Pizza. Ever.",
)


@dataclass
class Measured:
    checks: list[ParityCheck]

    def add(self, name: str, value: float, threshold: float, higher_is_better: bool) -> None:
        passed = bool(value >= threshold if higher_is_better else value <= threshold)
        self.checks.append(ParityCheck(name, float(value), threshold, higher_is_better, passed))

    @property
    def failed(self) -> list[ParityCheck]:
        return [c for c in self.checks if not c.passed]


def session_for(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # slots are initializers listed as inputs, by design
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _cos_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.reshape(a.shape[0], -1)
    b = b.reshape(b.shape[0], -1)
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12
    return np.asarray(num / den)


def _torch_outputs(
    model: PersonalModel, batch: Mapping[str, torch.Tensor]
) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        ids, mask = batch["input_ids"], batch["attention_mask"]
        prefix = model.prefix(ids, mask)
        e = model.features(prefix, mask)
        out = model.head(e, torch.zeros(1, model.hidden), torch.zeros(1))
    return out.numpy(), e.numpy()


def _ort_outputs(
    session: ort.InferenceSession,
    batch: Mapping[str, torch.Tensor],
    feeds: Mapping[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    feed = {
        "input_ids": batch["input_ids"].numpy(),
        "attention_mask": batch["attention_mask"].numpy(),
        **(feeds or {}),
    }
    out, e = session.run(["output", "features"], feed)
    return out, e


def random_adapter(model: PersonalModel, seed: int, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Random values for every LoRA pair of a per-level model (B non-zero, unlike a fresh init)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(p.shape, generator=gen) * scale
        for name, p in model.named_slot_params().items()
        if ".lora." in name
    }


def concat_levels(
    adapter: Mapping[str, torch.Tensor], slots: Sequence[str]
) -> dict[str, np.ndarray]:
    """Per-level pairs -> the inference graph's concatenated slots (user, persona, global)."""
    feeds = {}
    for short in slots:
        a = [
            adapter[f"{lv}.lora.{short}.A"]
            for lv in ("user", "persona", "global")
            if f"{lv}.lora.{short}.A" in adapter
        ]
        b = [
            adapter[f"{lv}.lora.{short}.B"]
            for lv in ("user", "persona", "global")
            if f"{lv}.lora.{short}.B" in adapter
        ]
        feeds[f"lora.{short}.A"] = torch.cat(a, dim=1).numpy()
        feeds[f"lora.{short}.B"] = torch.cat(b, dim=0).numpy()
    return feeds


def _set_params(model: PersonalModel, values: Mapping[str, torch.Tensor]) -> None:
    params = model.named_slot_params()
    with torch.no_grad():
        for name, value in values.items():
            params[name].copy_(value)


def check_inference(
    measured: Measured,
    config: ExportConfig,
    reference: PersonalModel,
    int8_path: Path,
    tokenize: Tokenize,
) -> None:
    """int8 graph vs torch fp32: features, head outputs, batch invariance, adapter effect."""
    th = config.thresholds
    session = session_for(int8_path)
    batch = tokenize(list(PROBE_TEXTS))
    t_out, t_e = _torch_outputs(reference, batch)
    o_out, o_e = _ort_outputs(session, batch)
    if config.task == "embedding":
        measured.add("min_cosine", _cos_rows(t_out, o_out).min(), th.min_cosine, True)
    else:
        measured.add("min_cosine", _cos_rows(t_e, o_e).min(), th.min_cosine, True)
    if config.task == "classification":
        p = torch.softmax(torch.from_numpy(t_out), -1).numpy()
        log_q = torch.log_softmax(torch.from_numpy(o_out), -1).numpy()
        kl = (p * (np.log(p + 1e-12) - log_q)).sum(-1).mean()
        measured.add("mean_kl", kl, th.max_kl, False)
        agreement = (t_out.argmax(-1) == o_out.argmax(-1)).mean()
        measured.add("argmax_agreement", agreement, 0.0, True)  # reported, not gated
    elif config.task == "regression":
        err = np.abs(t_out - o_out).max() / (t_out.std() + 1e-6)
        measured.add("max_score_error", err, th.max_score_error, False)

    alone = np.concatenate([_ort_outputs(session, tokenize([t]))[1] for t in PROBE_TEXTS])
    measured.add(
        "batch_invariance_cosine",
        _cos_rows(alone, o_e).min(),
        th.batch_invariance_cosine,
        True,
    )

    adapter = random_adapter(reference, seed=1)
    tuned = copy.deepcopy(reference)
    _set_params(tuned, adapter)
    _, t_e2 = _torch_outputs(tuned, batch)
    _, o_e2 = _ort_outputs(session, batch, concat_levels(adapter, list(reference.slots)))
    delta_cos = _cos_rows(t_e2 - t_e, o_e2 - o_e).min()
    measured.add("adapter_delta_cosine", delta_cos, th.adapter_delta_cosine, True)


def check_against_peft(
    measured: Measured,
    config: ExportConfig,
    hf_encoder: nn.Module,
    reference: PersonalModel,
    targets: Sequence[str],
    layers: Sequence[int],
    tokenize: Tokenize,
) -> None:
    """Our LoRA slots and layer loop vs peft's LoRA on the stock HF forward, same A and B."""
    adapter = random_adapter(reference, seed=2)
    user_only = {k: v for k, v in adapter.items() if k.startswith("user.")}
    tuned = copy.deepcopy(reference)
    _set_params(tuned, user_only)
    peft_config = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,  # type: ignore[arg-type]  # peft types it int
        target_modules=list(targets),
        layers_to_transform=list(layers),
        lora_dropout=0.0,
    )
    peft_model = get_peft_model(copy.deepcopy(hf_encoder), peft_config).eval()
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            short = _short_name(name, reference)
            module.lora_A["default"].weight.copy_(user_only[f"user.lora.{short}.A"].T)
            module.lora_B["default"].weight.copy_(user_only[f"user.lora.{short}.B"].T)
    batch = tokenize(list(PROBE_TEXTS))
    with torch.no_grad():
        hidden = peft_model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        if reference.pooling == "cls":
            peft_e = hidden[:, 0]
        else:
            m = batch["attention_mask"].unsqueeze(-1).float()
            peft_e = (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)
    _, ours = _torch_outputs(tuned, batch)
    diff = np.abs(peft_e.numpy() - ours).max()
    measured.add("peft_max_abs", diff, config.thresholds.peft_max_abs, False)


def _short_name(peft_module_name: str, reference: PersonalModel) -> str:
    for site in reference.sites:
        if peft_module_name == site.module or peft_module_name.endswith("." + site.module):
            return site.short
    raise ExportError(
        f"peft put a LoRA adapter on {peft_module_name!r}, which has no slot in the bundle; "
        "report this with the model and --target-modules used"
    )


def check_gradients(
    measured: Measured,
    config: ExportConfig,
    train_model: PersonalModel,
    train_path: Path,
    output_names: Sequence[str],
    batch: Sequence[torch.Tensor],
    trainable: Sequence[str],
) -> None:
    """train_step graph vs torch autograd on the same (dequantized) weights and values."""
    # Frozen parameters (the shared LoRA A) are constants of the graph: leave them as exported.
    values = {
        name: torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 0.05
        for i, (name, p) in enumerate(train_model.named_slot_params().items())
        if name in trainable
    }
    _set_params(train_model, values)
    params = train_model.named_slot_params()
    refs = {n: torch.zeros_like(params[n]) for n in trainable}
    for name in trainable:
        params[name].requires_grad_(True)
        params[name].grad = None
    loss = TrainLoss(train_model, trainable)(*batch, *refs.values())[0]
    loss.backward()
    session = session_for(train_path)
    feed = {k: v.detach().numpy() for k, v in zip(TRAIN_BATCH, batch, strict=True)}
    for name in train_model.named_slot_params():
        if name in trainable:
            feed[name] = params[name].detach().numpy()
            feed[f"ref.{name}"] = refs[name].numpy()
    got = dict(zip(output_names, session.run(list(output_names), feed), strict=True))
    worst = abs(float(got["loss"]) - loss.item()) / max(abs(loss.item()), 1e-12)
    for name in trainable:
        expected = params[name].grad
        assert expected is not None
        ref = expected.numpy()
        err = np.abs(got[f"grad.{name}"] - ref).max() / (np.abs(ref).max() + 1e-12)
        worst = max(worst, float(err))
        params[name].requires_grad_(False)
    measured.add("grad_rel_error", worst, config.thresholds.grad_rel_error, False)
