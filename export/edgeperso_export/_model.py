"""The personal model in torch, written so that both exported graphs come from one definition.

    prefix = Layers[:k](Embed(x))                         frozen, adapter-free: cached on device
    h      = Layers[k:](prefix; W + LoRA_user + LoRA_persona + LoRA_global)
    e      = pool(h)                                       text features
    u      = softmax(H e / sqrt(d)) MLP(H) + v_user        Persona-Plug user embedding
    out    = [e ; u] (W_global + W_user) + b + b_persona + b_user   logits / score
    (embedding task: out = normalize?(e))

`k` is the lowest layer that carries an adapter. Everything below it does not depend on any
trainable parameter, so the device computes `prefix` once per example with the int8 inference
graph and the training graph starts there: its backward stops at layer k by construction.

In the inference graph each LoRA slot is one A [in, R] / B [R, out] pair whose rank R is the
sum of the levels' ranks (the runtime concatenates them); in the training graph every level
has its own pair so that each gets its own gradient. The two are equal:
[A_u A_p A_g] @ [B_u; B_p; B_g] = A_u B_u + A_p B_p + A_g B_g.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from edgeperso.bundle import LoraSpec, UserEmbeddingSpec
from edgeperso_export._errors import ExportInputError, ExportUnsupportedError

LEVELS = ("user", "persona", "global")


@dataclasses.dataclass(frozen=True)
class Family:
    """How to run one encoder family layer by layer."""

    layers: Callable[[Any], nn.ModuleList]  # HF models are untyped: Any
    embed: Callable[[Any, torch.Tensor], torch.Tensor]
    run_layer: Callable[[Any, torch.Tensor, torch.Tensor], torch.Tensor]
    default_targets: tuple[str, ...]
    layer_pattern: str  # the module-name segment before the layer index


def _bert_embed(model: Any, ids: torch.Tensor) -> torch.Tensor:
    # token_type_ids all zero: single-sentence inputs.
    out: torch.Tensor = model.embeddings(input_ids=ids, token_type_ids=torch.zeros_like(ids))
    return out


def _bert_layer(layer: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    additive = (1.0 - mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
    out: torch.Tensor = layer(hidden, attention_mask=additive)[0]
    return out


def _distilbert_layer(layer: Any, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = layer(hidden, attn_mask=mask)[0]
    return out


_BERT_LIKE = Family(
    layers=lambda m: m.encoder.layer,
    embed=_bert_embed,
    run_layer=_bert_layer,
    default_targets=("query", "value"),
    layer_pattern="layer",
)

FAMILIES: dict[str, Family] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,  # RoBERTa's layers are BERT's; its embeddings differ inside
    "distilbert": Family(
        layers=lambda m: m.transformer.layer,
        embed=lambda m, ids: m.embeddings(ids),  # no token types
        run_layer=_distilbert_layer,
        default_targets=("q_lin", "v_lin"),
        layer_pattern="layer",
    ),
}


def family_of(model_type: str) -> Family:
    family = FAMILIES.get(model_type)
    if family is None:
        raise ExportUnsupportedError(
            f"unsupported architecture {model_type!r}: supported encoder families are "
            f"{sorted(FAMILIES)}"
        )
    return family


class SlotLinear(nn.Module):
    """A frozen Linear plus LoRA branches: one pair per level (train) or one pair (infer)."""

    def __init__(self, base: nn.Linear, ranks: dict[str, int], scaling: float) -> None:
        super().__init__()
        self.base = base
        self.scaling = scaling
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        for name, rank in ranks.items():
            self.a[name] = nn.Parameter(torch.zeros(base.in_features, rank))
            self.b[name] = nn.Parameter(torch.zeros(rank, base.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y: torch.Tensor = self.base(x)
        for name in self.a:
            y = y + (x @ self.a[name]) @ self.b[name] * self.scaling
        return y


@dataclasses.dataclass(frozen=True)
class SlotSite:
    """Where a LoRA slot sits: the module path in the HF model and its short graph name."""

    module: str
    short: str  # e.g. "l3.query": used to name graph inputs
    layer: int
    in_features: int
    out_features: int


def find_slot_sites(
    encoder: nn.Module, family: Family, targets: Sequence[str], layers: Sequence[int]
) -> list[SlotSite]:
    """The Linear modules matched by `targets` (peft suffix semantics) in `layers`."""
    pattern = re.compile(rf"(?:^|\.){family.layer_pattern}\.(\d+)\.(.+)$")
    sites: dict[str, SlotSite] = {}
    for name, module in encoder.named_modules():
        match = pattern.search(name)
        if match is None or not isinstance(module, nn.Linear):
            continue
        layer, rest = int(match.group(1)), match.group(2)
        if layer not in layers or not any(rest == t or rest.endswith("." + t) for t in targets):
            continue
        # Graph inputs are named after the last segment ("l3.query"): a target matching two
        # modules that end alike in one layer ("dense") would give both one slot.
        short = f"l{layer}." + rest.split(".")[-1]
        if short in sites:
            raise ExportInputError(
                f"LoRA target modules {list(targets)} match both {sites[short].module} and "
                f"{name}, which would share the slot name {short!r}; name each module by a "
                f"longer suffix, e.g. --target-modules {rest}"
            )
        sites[short] = SlotSite(name, short, layer, module.in_features, module.out_features)
    return list(sites.values())


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, module)


class PersonalModel(nn.Module):
    """The HF encoder with LoRA slots, pooling, Persona-Plug user embedding and head.

    `per_level=True` builds the training layout (one LoRA pair per level); False builds the
    inference layout (one concatenated pair per slot).
    """

    def __init__(
        self,
        encoder: Any,  # a transformers PreTrainedModel
        family: Family,
        sites: Sequence[SlotSite],
        lora: LoraSpec,
        *,
        task: str,
        output_size: int,
        pooling: str,
        normalize: bool,
        user_embedding: UserEmbeddingSpec | None,
        per_level: bool,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.family = family
        self.task = task
        self.pooling = pooling
        self.normalize = normalize
        self.sites = list(sites)
        self.first_layer = min(s.layer for s in sites)
        ranks = {"user": lora.r_user, "persona": lora.r_shared, "global": lora.r_shared}
        ranks = {k: v for k, v in ranks.items() if v > 0}
        if not per_level:
            ranks = {"all": sum(ranks.values())}
        self.slots: dict[str, SlotLinear] = {}
        for site in sites:
            base = encoder.get_submodule(site.module)
            assert isinstance(base, nn.Linear)
            slot = SlotLinear(base, ranks, lora.scaling)
            _set_module(encoder, site.module, slot)
            self.slots[site.short] = slot
        hidden = int(encoder.config.hidden_size)
        self.hidden = hidden
        self.user_embedding = user_embedding
        self.has_head = task != "embedding"
        if not self.has_head:
            return
        du = user_embedding.dim if user_embedding else 0
        if user_embedding:
            h = user_embedding.mlp_hidden
            self.mlp_w1 = nn.Parameter(torch.empty(hidden, h))
            self.mlp_b1 = nn.Parameter(torch.zeros(h))
            self.mlp_w2 = nn.Parameter(torch.empty(h, du))
            self.mlp_b2 = nn.Parameter(torch.zeros(du))
            self.user_vector = nn.Parameter(torch.zeros(du))
            for w in (self.mlp_w1, self.mlp_w2):
                nn.init.normal_(w, std=1.0 / math.sqrt(w.shape[0]))
        self.head_w = nn.Parameter(torch.empty(hidden + du, output_size))
        nn.init.normal_(self.head_w, std=0.02)
        # HuBi-style per-user head: the user's own linear read-out of [e ; u], a delta on the
        # shared head (zero for a new user).
        self.user_head_w = nn.Parameter(torch.zeros(hidden + du, output_size))
        self.head_b = nn.Parameter(torch.zeros(output_size))
        self.persona_bias = nn.Parameter(torch.zeros(output_size))
        self.user_bias = nn.Parameter(torch.zeros(output_size))

    # -- the two halves ------------------------------------------------------------------

    def prefix(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = self.family.embed(self.encoder, input_ids)
        for layer in self.family.layers(self.encoder)[: self.first_layer]:
            hidden = self.family.run_layer(layer, hidden, mask)
        return hidden

    def features(self, prefix: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = prefix
        for layer in self.family.layers(self.encoder)[self.first_layer :]:
            hidden = self.family.run_layer(layer, hidden, mask)
        if self.pooling == "cls":
            return hidden[:, 0]
        m = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)

    def head(
        self, e: torch.Tensor, history: torch.Tensor, history_mask: torch.Tensor
    ) -> torch.Tensor:
        if not self.has_head:
            return nn.functional.normalize(e, dim=-1) if self.normalize else e
        parts = [e]
        if self.user_embedding is not None:
            hm = history_mask.to(e.dtype)
            scores = (e @ history.T) / math.sqrt(self.hidden) + (hm - 1.0) * 1e4
            p = torch.softmax(scores, dim=-1) * hm
            p = p / p.sum(-1, keepdim=True).clamp(min=1e-6)  # all masked: u = v_user
            values = torch.relu(history @ self.mlp_w1 + self.mlp_b1) @ self.mlp_w2 + self.mlp_b2
            parts.append(p @ values + self.user_vector)
        x = torch.cat(parts, dim=-1)
        head = self.head_w + self.user_head_w
        return x @ head + self.head_b + self.persona_bias + self.user_bias

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        history: torch.Tensor,
        history_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        prefix = self.prefix(input_ids, attention_mask)
        e = self.features(prefix, attention_mask)
        return self.head(e, history, history_mask), e, prefix

    # -- parameters by graph name --------------------------------------------------------

    def named_slot_params(self) -> dict[str, nn.Parameter]:
        """Graph-input name -> parameter, for every LoRA pair and head parameter."""
        out: dict[str, nn.Parameter] = {}
        for short, slot in self.slots.items():
            for level in slot.a:
                prefix = f"lora.{short}" if level == "all" else f"{level}.lora.{short}"
                out[f"{prefix}.A"] = slot.a[level]
                out[f"{prefix}.B"] = slot.b[level]
        if not self.has_head:
            return out
        if self.user_embedding is not None:
            out["global.mlp.w1"] = self.mlp_w1
            out["global.mlp.b1"] = self.mlp_b1
            out["global.mlp.w2"] = self.mlp_w2
            out["global.mlp.b2"] = self.mlp_b2
            out["user.vector"] = self.user_vector
        out["global.head.w"] = self.head_w
        out["user.head.w"] = self.user_head_w
        out["global.head.b"] = self.head_b
        out["persona.bias"] = self.persona_bias
        out["user.bias"] = self.user_bias
        return out


class InferModule(nn.Module):
    """The inference graph: every slot and head parameter is a graph input, never a constant.

    Feeding them as inputs (not parameters) keeps the exporter's optimizer from folding
    zero-valued slots or sums of biases away; export adds each input's default value as an
    initializer of the same name afterwards, which makes it overridable.
    """

    def __init__(self, model: PersonalModel) -> None:
        super().__init__()
        self.model = model
        params = model.named_slot_params()
        fqn = {id(p): n for n, p in model.named_parameters()}
        self.input_names = list(params)
        self._fqns = [fqn[id(p)] for p in params.values()]

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, L] int64
        attention_mask: torch.Tensor,  # [B, L] int64
        history: torch.Tensor,  # [H, d] float32
        history_mask: torch.Tensor,  # [H] float32
        slots: dict[str, torch.Tensor],  # graph-input name -> value, as self.input_names
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        values = {fqn: slots[name] for name, fqn in zip(self.input_names, self._fqns, strict=True)}
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] = functional_call(
            self.model, values, (input_ids, attention_mask, history, history_mask)
        )
        return out


CONTRASTIVE_TEMPERATURE = 0.05  # sentence-transformers' MultipleNegativesRankingLoss scale 20


def _supervised_contrastive(
    out: torch.Tensor,  # [B, d] the embeddings
    attention_mask: torch.Tensor,  # [B, L]; an all-zero row is padding
    positives: torch.Tensor,  # [B, B] 1 where j is a positive of anchor i (0 on the diagonal)
) -> torch.Tensor:
    """[B] supervised contrastive loss per anchor (Khosla et al. 2020): minus the mean log
    probability of the anchor's positives in a softmax over every other real row of the
    micro-batch, on cosine similarity / temperature.

    Masked entries get -1e4 rather than -inf, so that no NaN reaches the gradients; an
    anchor with no positive contributes 0 (its weight should be 0 too)."""
    z = nn.functional.normalize(out, dim=-1)
    sim = z @ z.T / CONTRASTIVE_TEMPERATURE
    real = (attention_mask.sum(-1) > 0).to(sim.dtype)  # [B]
    eye = torch.eye(sim.shape[0], dtype=sim.dtype)
    excluded = torch.clamp(eye + (1.0 - real).unsqueeze(0), max=1.0)
    logp = torch.log_softmax(sim - 1e4 * excluded, dim=-1)
    count = positives.sum(-1).clamp(min=1.0)
    return -(positives * logp).sum(-1) / count


class TrainLoss(nn.Module):
    """prefix, mask, history, targets, weights, prox, refs -> (loss,) for aot_autograd.

    The loss is written as plain sums: the ONNX converter gets nll_loss_backward with mean
    reduction wrong (gradients N times too large), and a per-example weight of 0 marks the
    padding rows of the fixed micro-batch.
    """

    def __init__(self, model: PersonalModel, trainable: Sequence[str]) -> None:
        super().__init__()
        self.model = model
        self.trainable = list(trainable)

    def forward(
        self,
        prefix: torch.Tensor,  # [B, L, d] float32
        attention_mask: torch.Tensor,  # [B, L] int64
        history: torch.Tensor,  # [H, d] float32
        history_mask: torch.Tensor,  # [H] float32
        targets: torch.Tensor,  # [B, C] one-hot/soft labels or scores; [B, B] positive pairs
        weights: torch.Tensor,  # [B] float32, 0 for padding
        prox_weight: torch.Tensor,  # [] float32
        *refs: torch.Tensor,  # one per trainable param, same order
    ) -> tuple[torch.Tensor]:
        e = self.model.features(prefix, attention_mask)
        out = self.model.head(e, history, history_mask)
        if self.model.task == "classification":
            per_example = -(targets * torch.log_softmax(out, dim=-1)).sum(-1)
        elif self.model.task == "embedding":
            per_example = _supervised_contrastive(out, attention_mask, targets)
        else:
            per_example = ((out - targets) ** 2).sum(-1)
        loss = (per_example * weights).sum()
        # Looked up at call time: aot_autograd swaps the module's parameters while tracing.
        params = self.model.named_slot_params()
        current = [params[name] for name in self.trainable]
        prox = sum(((p - r) ** 2).sum() for p, r in zip(current, refs, strict=True))
        return (loss + 0.5 * prox_weight * prox,)
