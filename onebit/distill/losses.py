"""Quantization-aware knowledge distillation losses of OneBit.

    L = kd_weight · L_KD + hidden_weight · L_MSE + attention_weight · L_ATT + lm_weight · L_LM

L_KD is KL(teacher ‖ student) on the logits at temperature τ (multiplied by τ², as usual), computed
in float32 so that fp16/bf16 logits cannot overflow. Default reduction: the mean over the real
(unpadded) tokens. ``kd_reduction="batchmean"`` reproduces the official code's ``F.kl_div(...,
reduction="batchmean")`` on (batch, seq, vocab) logits, i.e. the sum over *all* tokens divided by
the batch size — larger than the per-token mean by the factor ``n_tokens / batch`` (the sequence
length when there is no padding); the official run multiplies it by 0.01.

L_MSE compares per-token L2-normalised hidden states, ``Σ_d (t/‖t‖ − s/‖s‖)²`` averaged over the
real tokens, then averaged (default) or summed (official) over the chosen layers.
``hidden_layers="blocks"`` uses every decoder block's output (Hugging Face's ``hidden_states[1:]``;
the last entry is after the final norm); ``"official"`` uses ``hidden_states[0:n_layers]`` as the
official code does — the embedding output (identical for teacher and student, so always 0) and not
the last block.

L_ATT (ours, off by default and in the paper) is KL(teacher ‖ student) between the attention
probabilities of each head, for each real query token, averaged over heads, tokens and blocks. It
asks the student to copy where the teacher looks, the attention sink included: from block 12 on,
SmolLM2-135M's heads put 29-63 % of their attention on a 2,048-token window's first token, while a
student distilled without this term puts 1.5-17 % there and spreads the rest
(docs/levers_smollm2_135m.md; at 120 steps, weight 3 restored the sink but not the perplexity). It
needs both models' attention probabilities, so the training forward passes run eager attention
(memory: blocks × batch × heads × seq² floats each).

L_LM is the student's next-token cross-entropy on the input ids (off by default, as in the paper).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onebit.config_utils import check_choice, check_number, from_mapping
from onebit.errors import OneBitInputError

KD_REDUCTIONS = ("token_mean", "batchmean")
HIDDEN_LAYERS = ("blocks", "official")
LAYER_REDUCTIONS = ("mean", "sum")


@dataclass
class DistillLossConfig:
    """Weights and reductions of the distillation loss (see the module docstring).

    Attributes:
        kd_weight: weight of the logit KD term (official: kd_alpha 1.0 × kd_loss_scale 0.01).
        hidden_weight: weight of the hidden-state MSE term (the paper's α; official kd_beta 1).
        attention_weight: weight of the attention-probability KL (ours; 0: the paper).
        lm_weight: weight of the student's own LM cross-entropy (official: 1 − kd_alpha = 0).
        temperature: KD temperature τ.
        kd_reduction: ``token_mean`` (masked per-token mean) or ``batchmean`` (official).
        hidden_layers: ``blocks`` (every block output) or ``official`` (the embedding output and
            not the last block).
        hidden_layer_reduction: ``mean`` or ``sum`` (official) over layers.
        hidden_mask: the hidden-state MSE averages over real tokens only (``True``) or over every
            position, padding included (``False``: the official code).
    """

    kd_weight: float = 1.0
    hidden_weight: float = 1.0
    attention_weight: float = 0.0
    lm_weight: float = 0.0
    temperature: float = 1.0
    kd_reduction: Literal["token_mean", "batchmean"] = "token_mean"
    hidden_layers: Literal["blocks", "official"] = "blocks"
    hidden_layer_reduction: Literal["mean", "sum"] = "mean"
    hidden_mask: bool = True

    def __post_init__(self) -> None:
        for key in ("kd_weight", "hidden_weight", "attention_weight", "lm_weight"):
            check_number("loss", key, getattr(self, key))
        check_number("loss", "temperature", self.temperature, allow_zero=False)
        for key, choices in (
            ("kd_reduction", KD_REDUCTIONS),
            ("hidden_layers", HIDDEN_LAYERS),
            ("hidden_layer_reduction", LAYER_REDUCTIONS),
        ):
            check_choice("loss", key, getattr(self, key), choices)
        if not isinstance(self.hidden_mask, bool):
            raise OneBitInputError(f"loss.hidden_mask={self.hidden_mask!r} must be true or false.")

    @classmethod
    def official(cls, **overrides: Any) -> DistillLossConfig:
        """The official run: ``0.01 · KL(batchmean) + 1 · Σ_layers MSE`` with its layer indexing."""
        base = dict(
            kd_weight=0.01,
            hidden_weight=1.0,
            lm_weight=0.0,
            kd_reduction="batchmean",
            hidden_layers="official",
            hidden_layer_reduction="sum",
            hidden_mask=False,
        )
        return cls(**{**base, **overrides})

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> DistillLossConfig:
        return from_mapping(cls, values, "loss")

    @property
    def needs_hidden_states(self) -> bool:
        return self.hidden_weight > 0

    @property
    def needs_attentions(self) -> bool:
        return self.attention_weight > 0


def _token_mask(attention_mask: Tensor | None, shape: torch.Size, device: torch.device) -> Tensor:
    if attention_mask is None:
        return torch.ones(shape, dtype=torch.float32, device=device)
    return attention_mask.to(device=device, dtype=torch.float32)


def logit_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    attention_mask: Tensor | None = None,
    temperature: float = 1.0,
    reduction: str = "token_mean",
) -> Tensor:
    """KL(teacher ‖ student) per token, reduced (see the module docstring), in float32.

    Shapes: logits (batch, seq, vocab); attention_mask (batch, seq), 1 for real tokens → scalar.
    """
    t = temperature
    vocab = student_logits.shape[-1]
    # at τ = 1 no division: each pass over (batch, seq, vocab) logits is a large temporary
    scaled_t, scaled_s = teacher_logits.float(), student_logits.float()
    if t != 1:
        scaled_t, scaled_s = scaled_t / t, scaled_s / t
    p_t = F.softmax(scaled_t, dim=-1)
    # KL(p_t ‖ p_s) = Σ p_t log p_t − Σ p_t log p_s: xlogy makes 0·log 0 = 0 (a masked vocabulary
    # entry of the teacher), and soft-target cross-entropy is one fused kernel for the second sum
    neg_entropy = torch.special.xlogy(p_t, p_t).sum(-1)
    cross = F.cross_entropy(
        scaled_s.reshape(-1, vocab), p_t.reshape(-1, vocab), reduction="none"
    ).view(neg_entropy.shape)
    kl = (neg_entropy + cross) * (t * t)  # (batch, seq)
    if reduction == "batchmean":  # official: no mask
        return kl.sum() / kl.shape[0]
    if reduction != "token_mean":
        raise ValueError(f"loss.kd_reduction={reduction!r} is not one of token_mean, batchmean.")
    mask = _token_mask(attention_mask, kl.shape, kl.device)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


def hidden_mse(
    student_hidden: Sequence[Tensor],
    teacher_hidden: Sequence[Tensor],
    attention_mask: Tensor | None = None,
    layers: str = "blocks",
    layer_reduction: str = "mean",
    masked: bool = True,
) -> Tensor:
    """Squared distance of per-token L2-normalised hidden states, over tokens and layers.

    Args:
        student_hidden, teacher_hidden: Hugging Face ``hidden_states`` tuples (the embedding
            output first, then one entry per block).
        attention_mask: 1 for real tokens; with ``masked``, padding is excluded from the mean.
        layers: ``blocks`` → entries ``1..n``; ``official`` → entries ``0..n-1``.
        layer_reduction: ``mean`` or ``sum`` over the selected layers.
        masked: average over real tokens only; ``False``: over every position (official).

    Shapes: each hidden state (batch, seq, dim) → scalar.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(
            f"student has {len(student_hidden)} hidden states, teacher {len(teacher_hidden)}."
        )
    n_layers = len(teacher_hidden) - 1
    idx = range(1, n_layers + 1) if layers == "blocks" else range(0, n_layers)
    terms = []
    for i in idx:
        s = F.normalize(student_hidden[i].float(), dim=-1)
        t = F.normalize(teacher_hidden[i].float(), dim=-1)
        d = (s - t).pow(2).sum(-1)  # (batch, seq)
        if not masked:  # official: plain mean, padding included
            terms.append(d.mean())
        else:
            mask = _token_mask(attention_mask, d.shape, d.device)
            terms.append((d * mask).sum() / mask.sum().clamp_min(1))
    stacked = torch.stack(terms)
    return stacked.sum() if layer_reduction == "sum" else stacked.mean()


def attention_kl(
    student_attentions: Sequence[Tensor],
    teacher_attentions: Sequence[Tensor],
    attention_mask: Tensor | None = None,
) -> Tensor:
    """KL(teacher ‖ student) between attention probabilities, in float32: per head and query
    token, averaged over heads and real query tokens, then over blocks.

    Args:
        student_attentions, teacher_attentions: Hugging Face ``attentions`` tuples, one
            (batch, heads, query, key) tensor of probabilities per block (eager attention).
        attention_mask: 1 for real tokens; padded queries are left out (padded keys have
            probability 0 for both models).

    Shapes: each attention (batch, heads, seq, seq) → scalar.
    """
    if len(student_attentions) != len(teacher_attentions) or not teacher_attentions:
        raise ValueError(
            f"student has {len(student_attentions)} attention maps, teacher "
            f"{len(teacher_attentions)}; both need one per block (eager attention)."
        )
    terms = []
    for s_att, t_att in zip(student_attentions, teacher_attentions):
        if s_att is None or t_att is None:
            raise ValueError("an attention map is None: attention_weight needs eager attention.")
        p_t = t_att.float()
        # Σ_k p_t (log p_t − log p_s); xlogy makes the causally masked keys (p_t = 0) add 0
        log_s = s_att.float().clamp_min(torch.finfo(torch.float32).tiny).log()
        kl = (torch.special.xlogy(p_t, p_t) - p_t * log_s).sum(-1).mean(1)  # (batch, query)
        mask = _token_mask(attention_mask, kl.shape, kl.device)
        terms.append((kl * mask).sum() / mask.sum().clamp_min(1))
    return torch.stack(terms).mean()


def next_token_nll(
    logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The negative log-likelihood of every next token, in float32, and which of them count:
    the one NLL of the training loss, validation and perplexity.

    Shapes: logits (batch, seq, vocab); input_ids, attention_mask (batch, seq) →
    (nll (batch, seq − 1), weight (batch, seq − 1): 1 for a real target token, 0 for padding).
    """
    labels = input_ids[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none"
    ).view_as(labels)
    weight = torch.ones_like(nll) if attention_mask is None else attention_mask[:, 1:].to(nll.dtype)
    return nll * weight, weight


def lm_cross_entropy(
    logits: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None
) -> Tensor:
    """Next-token cross-entropy of ``logits`` on ``input_ids``, ignoring padding, in float32.

    Shapes: logits (batch, seq, vocab); input_ids, attention_mask (batch, seq) → scalar.
    """
    nll, weight = next_token_nll(logits, input_ids, attention_mask)
    return nll.sum() / weight.sum().clamp_min(1)


class DistillLoss(nn.Module):
    """The weighted OneBit distillation loss; returns every named term and the total.

    Returns a dict with ``loss`` (the weighted total, for backward) and the unweighted terms
    ``kd``, ``hidden``, ``attention`` and ``lm`` (those with weight 0 are skipped).
    """

    def __init__(self, config: DistillLossConfig | None = None) -> None:
        super().__init__()
        self.config = config or DistillLossConfig()

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        student_hidden: Sequence[Tensor] | None = None,
        teacher_hidden: Sequence[Tensor] | None = None,
        attention_mask: Tensor | None = None,
        input_ids: Tensor | None = None,
        student_attentions: Sequence[Tensor] | None = None,
        teacher_attentions: Sequence[Tensor] | None = None,
    ) -> dict[str, Tensor]:
        c = self.config
        terms: dict[str, Tensor] = {}
        total = student_logits.new_zeros((), dtype=torch.float32)
        if c.kd_weight > 0:
            terms["kd"] = logit_kd(
                student_logits, teacher_logits, attention_mask, c.temperature, c.kd_reduction
            )
            total = total + c.kd_weight * terms["kd"]
        if c.hidden_weight > 0:
            if student_hidden is None or teacher_hidden is None:
                raise ValueError(
                    "loss.hidden_weight > 0 needs the hidden states of student and teacher."
                )
            terms["hidden"] = hidden_mse(
                student_hidden,
                teacher_hidden,
                attention_mask,
                c.hidden_layers,
                c.hidden_layer_reduction,
                c.hidden_mask,
            )
            total = total + c.hidden_weight * terms["hidden"]
        if c.attention_weight > 0:
            if student_attentions is None or teacher_attentions is None:
                raise ValueError(
                    "loss.attention_weight > 0 needs the attention maps of student and teacher."
                )
            terms["attention"] = attention_kl(
                student_attentions, teacher_attentions, attention_mask
            )
            total = total + c.attention_weight * terms["attention"]
        if c.lm_weight > 0:
            if input_ids is None:
                raise ValueError("loss.lm_weight > 0 needs the input ids.")
            terms["lm"] = lm_cross_entropy(student_logits, input_ids, attention_mask)
            total = total + c.lm_weight * terms["lm"]
        terms["loss"] = total
        return terms
