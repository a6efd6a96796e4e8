"""Distillation losses: zero for identical models, padding ignored, official scaling factor."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from onebit.distill import (
    DistillLoss,
    DistillLossConfig,
    attention_kl,
    hidden_mse,
    lm_cross_entropy,
    logit_kd,
)
from onebit.errors import OneBitInputError
from onebit.models import tiny_causal_lm
from onebit.quant import OneBitConfig, quantize_


def _outputs(model, ids, mask=None):
    return model(ids, attention_mask=mask, output_hidden_states=True)


@pytest.fixture(scope="module")
def pair():
    teacher = tiny_causal_lm("llama")
    student = quantize_(tiny_causal_lm("llama"), OneBitConfig())
    return teacher, student


def test_all_terms_are_zero_for_identical_models() -> None:
    model = tiny_causal_lm("llama")
    ids = torch.randint(0, 128, (2, 10))
    out = _outputs(model, ids)
    for cfg in (DistillLossConfig(), DistillLossConfig.official()):
        terms = DistillLoss(cfg)(out.logits, out.logits, out.hidden_states, out.hidden_states)
        assert terms["kd"].item() == pytest.approx(0.0, abs=1e-6)
        assert terms["hidden"].item() == pytest.approx(0.0, abs=1e-6)
        assert terms["loss"].item() == pytest.approx(0.0, abs=1e-6)


def test_student_differs_and_total_is_the_weighted_sum(pair) -> None:
    teacher, student = pair
    ids = torch.randint(0, 128, (2, 10))
    t, s = _outputs(teacher, ids), _outputs(student, ids)
    cfg = DistillLossConfig(kd_weight=0.5, hidden_weight=3.0, lm_weight=0.25)
    terms = DistillLoss(cfg)(s.logits, t.logits, s.hidden_states, t.hidden_states, input_ids=ids)
    assert terms["kd"] > 0 and terms["hidden"] > 0 and terms["lm"] > 0
    expected = 0.5 * terms["kd"] + 3.0 * terms["hidden"] + 0.25 * terms["lm"]
    torch.testing.assert_close(terms["loss"], expected)


def test_kd_matches_torch_kl_div_and_temperature() -> None:
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    ref = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="sum") / 10
    torch.testing.assert_close(logit_kd(s, t), ref)
    tau = 2.0
    ref_t = F.kl_div(F.log_softmax(s / tau, -1), F.softmax(t / tau, -1), reduction="sum") / 10
    torch.testing.assert_close(logit_kd(s, t, temperature=tau), ref_t * tau**2)


def test_official_batchmean_is_per_token_times_tokens_per_sequence() -> None:
    s, t = torch.randn(3, 7, 13), torch.randn(3, 7, 13)
    official = logit_kd(s, t, reduction="batchmean")
    ref = F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean")
    torch.testing.assert_close(official, ref)  # the official code's expression
    torch.testing.assert_close(official, logit_kd(s, t) * 7)  # factor: n_tokens / batch = seq len


def test_padding_is_ignored(pair) -> None:
    teacher, student = pair
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    t, s = _outputs(teacher, ids, mask), _outputs(student, ids, mask)
    loss = DistillLoss(DistillLossConfig(lm_weight=1.0))
    base = loss(s.logits, t.logits, s.hidden_states, t.hidden_states, mask, ids)
    # garbage in the padded positions must not change any term
    s_logits = s.logits.clone()
    s_logits[1, 8:] += 100 * torch.randn_like(s_logits[1, 8:])
    s_hidden = [h.clone() for h in s.hidden_states]
    for h in s_hidden:
        h[1, 8:] = torch.randn_like(h[1, 8:])
    ids2 = ids.clone()
    ids2[1, 9:] = 0
    moved = loss(s_logits, t.logits, s_hidden, t.hidden_states, mask, ids2)
    for key in ("kd", "hidden", "lm", "loss"):
        torch.testing.assert_close(moved[key], base[key], msg=key)
    # and the padded positions are really excluded from the mean, not weighted in
    kl_rows = [
        logit_kd(s.logits[i : i + 1, :n], t.logits[i : i + 1, :n]) for i, n in ((0, 12), (1, 8))
    ]
    torch.testing.assert_close(base["kd"], (kl_rows[0] * 12 + kl_rows[1] * 8) / 20)


def test_hidden_layer_indexing_blocks_vs_official() -> None:
    torch.manual_seed(1)
    t = [torch.randn(2, 4, 8) for _ in range(4)]  # embedding + 3 blocks
    s = [x.clone() for x in t]
    s[3] = torch.randn(2, 4, 8)  # only the last block differs
    d_last = (F.normalize(s[3], dim=-1) - F.normalize(t[3], dim=-1)).pow(2).sum(-1).mean()
    torch.testing.assert_close(hidden_mse(s, t, layers="blocks", layer_reduction="sum"), d_last)
    torch.testing.assert_close(hidden_mse(s, t, layers="blocks"), d_last / 3)
    assert hidden_mse(s, t, layers="official", layer_reduction="sum").item() == 0.0
    s = [x.clone() for x in t]
    s[1] = torch.randn(2, 4, 8)  # first block differs: both see it
    assert hidden_mse(s, t, layers="official", layer_reduction="sum") > 0
    torch.testing.assert_close(
        hidden_mse(s, t, layers="official", layer_reduction="sum"),
        hidden_mse(s, t, layers="blocks", layer_reduction="sum"),
    )


def test_hidden_mask_is_its_own_key_whatever_the_layers() -> None:
    """loss.hidden_mask: padding left out of the hidden MSE (default) or counted (official), for
    either layer indexing; hidden_layers only picks the layers."""
    torch.manual_seed(2)
    t = [torch.randn(2, 4, 8) for _ in range(3)]
    s = [torch.randn(2, 4, 8) for _ in range(3)]
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    d = [(F.normalize(a, dim=-1) - F.normalize(b, dim=-1)).pow(2).sum(-1) for a, b in zip(s, t)]
    real = mask.bool()
    for layers, idx in (("blocks", [1, 2]), ("official", [0, 1])):
        masked = hidden_mse(s, t, mask, layers=layers, layer_reduction="sum")
        plain = hidden_mse(s, t, mask, layers=layers, layer_reduction="sum", masked=False)
        torch.testing.assert_close(masked, sum(d[i][real].mean() for i in idx))
        torch.testing.assert_close(plain, sum(d[i].mean() for i in idx))
    assert DistillLossConfig.official().hidden_mask is False
    assert DistillLossConfig().hidden_mask is True
    with pytest.raises(OneBitInputError, match=r"loss\.hidden_mask='yes' must be true or false"):
        DistillLossConfig(hidden_mask="yes")


def test_hidden_mse_is_scale_invariant_per_token() -> None:
    t = [torch.randn(1, 3, 6) for _ in range(3)]
    s = [x * torch.rand(1, 3, 1) * 10 for x in t]  # same directions, other norms
    assert hidden_mse(s, t).item() == pytest.approx(0.0, abs=1e-6)


def test_fp16_logits_do_not_overflow() -> None:
    s = (torch.rand(1, 4, 50) * 1.2e5 - 6e4).half()  # near fp16's ±65504 limit
    t = (torch.rand(1, 4, 50) * 1.2e5 - 6e4).half()
    t[0, 0, :5] = float("-inf")  # masked vocabulary entries
    kd = logit_kd(s, t, reduction="batchmean")
    assert kd.dtype == torch.float32 and math.isfinite(kd.item())
    assert kd.item() > torch.finfo(torch.float16).max  # the official fp16 sum would be inf
    assert math.isfinite(logit_kd(s, t).item())


def test_lm_cross_entropy_matches_hf_loss() -> None:
    model = tiny_causal_lm("llama")
    ids = torch.randint(0, 128, (2, 9))
    out = model(ids, labels=ids)
    torch.testing.assert_close(lm_cross_entropy(out.logits, ids), out.loss)


@pytest.mark.parametrize("key", ["kd_weight", "hidden_weight", "attention_weight", "lm_weight"])
@pytest.mark.parametrize("value", [-1.0, float("nan"), float("inf")])
def test_bad_weights_are_refused_naming_the_key(key: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"loss.{key}="):
        DistillLossConfig(**{key: value})


def test_missing_hidden_states_is_a_clear_error() -> None:
    x = torch.randn(1, 2, 5)
    with pytest.raises(ValueError, match="hidden_weight > 0 needs the hidden states"):
        DistillLoss()(x, x)
    assert DistillLoss(DistillLossConfig(hidden_weight=0))(x, x)["loss"].item() == pytest.approx(
        0, abs=1e-6
    )


def _eager_outputs(model, ids, mask=None):
    model.config._attn_implementation = "eager"  # only eager attention returns the maps
    return model(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)


def test_attention_kl_is_zero_for_identical_maps_and_matches_kl_div_per_query(pair) -> None:
    teacher, student = pair
    ids = torch.randint(0, 128, (2, 9))
    t, s = _eager_outputs(teacher, ids), _eager_outputs(student, ids)
    assert attention_kl(t.attentions, t.attentions).item() == pytest.approx(0.0, abs=1e-6)
    # by hand: F.kl_div per (batch, head, query) row over the causal keys, mean over all rows
    per_block = []
    for sa, ta in zip(s.attentions, t.attentions):
        rows = [
            F.kl_div(sa[b, h, q, : q + 1].log(), ta[b, h, q, : q + 1], reduction="sum")
            for b in range(2)
            for h in range(ta.shape[1])
            for q in range(9)
        ]
        per_block.append(torch.stack(rows).mean())
    expected = torch.stack(per_block).mean()
    assert expected > 0.01
    torch.testing.assert_close(attention_kl(s.attentions, t.attentions), expected)


def test_attention_kl_leaves_out_padded_queries(pair) -> None:
    teacher, student = pair
    ids = torch.randint(0, 128, (1, 8))
    mask = torch.ones(1, 8, dtype=torch.long)
    mask[0, 5:] = 0  # right padding: queries 5..7 are not real tokens
    t, s = _eager_outputs(teacher, ids, mask), _eager_outputs(student, ids, mask)
    short_t, short_s = _eager_outputs(teacher, ids[:, :5]), _eager_outputs(student, ids[:, :5])
    torch.testing.assert_close(
        attention_kl(s.attentions, t.attentions, mask),
        attention_kl(short_s.attentions, short_t.attentions),
    )


def test_attention_term_is_weighted_into_the_total_and_needs_the_maps(pair) -> None:
    teacher, student = pair
    ids = torch.randint(0, 128, (2, 9))
    t, s = _eager_outputs(teacher, ids), _eager_outputs(student, ids)
    cfg = DistillLossConfig(hidden_weight=2.0, attention_weight=5.0)
    assert cfg.needs_attentions and not DistillLossConfig().needs_attentions
    terms = DistillLoss(cfg)(
        s.logits, t.logits, s.hidden_states, t.hidden_states, None, ids, s.attentions, t.attentions
    )
    expected = terms["kd"] + 2.0 * terms["hidden"] + 5.0 * terms["attention"]
    torch.testing.assert_close(terms["loss"], expected)
    with pytest.raises(ValueError, match="attention_weight > 0 needs the attention maps"):
        DistillLoss(cfg)(s.logits, t.logits, s.hidden_states, t.hidden_states)
