"""onebit.diagnostics: output scales, block errors and sign flips, with numbers."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from onebit.diagnostics import (
    attention_stats,
    diagnose,
    layer_output_scales,
    massive_layers,
    output_scale,
)
from onebit.models import tiny_causal_lm
from onebit.quant import OneBitConfig, OneBitLinear, freeze_, pack_, quantize_


@pytest.fixture
def pair():
    teacher = tiny_causal_lm("llama").eval()
    student = freeze_(quantize_(copy.deepcopy(teacher), OneBitConfig())).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12))
    return teacher, student, ids


def test_output_scale_numbers() -> None:
    y = torch.ones(2, 3, 4)  # 6 tokens of 4 channels, RMS 1 each
    y[1, 2, 3] = -10.0  # flat token 5, channel 3
    s = output_scale(y)
    assert s.absmax == 10.0 and (s.absmax_token, s.absmax_channel) == (5, 3)
    assert s.rms_median == pytest.approx(1.0)
    assert s.rms_max == pytest.approx(math.sqrt((3 + 100) / 4))


def test_the_teacher_against_itself_has_no_error(pair) -> None:
    teacher, _, ids = pair
    report = diagnose(teacher, copy.deepcopy(teacher), ids)
    assert [b.rel_err for b in report.blocks] == [0.0] * teacher.config.num_hidden_layers
    assert all(b.cosine == pytest.approx(1.0) for b in report.blocks)
    assert all(r.student is None and r.flip_frac is None for r in report.layers)  # no 1-bit layer
    assert len(report.layers) == 7 * teacher.config.num_hidden_layers


def test_block_error_and_scales_of_a_student(pair) -> None:
    teacher, student, ids = pair
    report = diagnose(teacher, student, ids)
    t = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    s = student(input_ids=ids, output_hidden_states=True).hidden_states
    for b in report.blocks:  # block i is hidden_states[i + 1]
        expected = ((s[b.index + 1] - t[b.index + 1]).norm() / t[b.index + 1].norm()).item()
        assert b.rel_err == pytest.approx(expected, rel=1e-5)
    for r in report.layers:  # a LayerNorm'd layer: per-token RMS 1 (a little less: its eps),
        assert 0.95 < r.student.rms_median <= 1.0 + 1e-5  # so |y| <= sqrt(out - 1)
        assert r.student.absmax <= math.sqrt(r.out_features - 1) + 1e-4
        assert r.rms_ratio == pytest.approx(r.student.rms_median / r.teacher.rms_median)


def test_flip_fraction_counts_flipped_signs(pair) -> None:
    teacher, student, ids = pair
    assert diagnose(teacher, student, ids).flip_frac == 0.0  # SVID init: sign(W) exactly
    layer = student.model.layers[1].mlp.up_proj
    with torch.no_grad():
        layer.weight.view(-1)[:10].neg_()  # flip 10 signs
    report = diagnose(teacher, student, ids)
    by_name = {r.name: r for r in report.layers}
    assert by_name["model.layers.1.mlp.up_proj"].flip_frac == 10 / layer.weight.numel()
    assert sum(r.flip_frac > 0 for r in report.layers) == 1
    total = sum(r.out_features * r.in_features for r in report.layers)
    assert report.flip_frac == pytest.approx(10 / total)
    packed = diagnose(teacher, pack_(student), ids)  # the packed student: the same signs
    assert packed.flip_frac == report.flip_frac
    for a, b in zip(packed.blocks, report.blocks, strict=True):
        assert a.rel_err == pytest.approx(b.rel_err, rel=1e-4)


def test_kept_layers_are_reported_full_precision() -> None:
    teacher = tiny_causal_lm("llama").eval()
    q = OneBitConfig(skip_modules=("model.layers.0.mlp.down_proj",))
    student = quantize_(copy.deepcopy(teacher), q)
    ids = torch.randint(0, teacher.config.vocab_size, (1, 8))
    report = diagnose(teacher, student, ids)
    kept = [r.name for r in report.layers if r.student is None]
    assert kept == ["model.layers.0.mlp.down_proj"]
    assert isinstance(student.model.layers[0].mlp.up_proj, OneBitLinear)
    assert "fp" in report.format(top=100)


def test_massive_layers_are_those_above_the_layernorm_bound() -> None:
    teacher = tiny_causal_lm("llama").eval()
    down = teacher.model.layers[1].mlp.down_proj
    with torch.no_grad():
        down.weight.mul_(1e4)  # its outputs now far exceed sqrt(out - 1)
    ids = torch.randint(0, teacher.config.vocab_size, (1, 8))
    report = diagnose(teacher, None, ids)
    bound = math.sqrt(down.out_features - 1)
    expected = [r.name for r in report.layers if r.teacher.absmax > bound]
    assert "model.layers.1.mlp.down_proj" in massive_layers(report)
    assert sorted(massive_layers(report)) == sorted(expected)
    assert massive_layers(report, factor=1e9) == []
    assert report.blocks == [] and "diagnostics on 8 tokens" in report.format()


def test_a_student_of_another_architecture_is_refused(pair) -> None:
    teacher, _, ids = pair
    other = tiny_causal_lm("llama", num_hidden_layers=1)
    with pytest.raises(ValueError, match="not the same architecture"):
        diagnose(teacher, other, ids)


def test_report_serialises(pair) -> None:
    import json

    teacher, student, ids = pair
    d = diagnose(teacher, student, ids).to_dict()
    assert json.loads(json.dumps(d))["summary"]["flip_frac"] == 0.0
    assert d["has_student"] and len(d["blocks"]) == teacher.config.num_hidden_layers


def test_attention_sink_and_entropy_per_block_match_the_eager_maps(pair) -> None:
    teacher, student, ids = pair
    teacher.config._attn_implementation = student.config._attn_implementation = "sdpa"
    report = diagnose(teacher, student, ids)
    for model, who in ((teacher, "teacher"), (student, "student")):
        model.config._attn_implementation = "eager"
        with torch.no_grad():
            maps = model(input_ids=ids, output_attentions=True).attentions
        model.config._attn_implementation = "sdpa"  # diagnose left it as it found it
        for b, p in zip(report.blocks, maps, strict=True):
            p = p[:, :, 1:]  # every query after the first (query 0 sees only token 0)
            assert getattr(b, f"{who}_sink") == pytest.approx(float(p[..., 0].mean()), rel=1e-5)
            entropy = -(p * p.clamp_min(1e-30).log()).sum(-1).mean()
            assert getattr(b, f"{who}_entropy") == pytest.approx(float(entropy), rel=1e-4)
    assert all(0 < b.teacher_sink < 1 for b in report.blocks)
    assert report.blocks[0].student_sink != report.blocks[0].teacher_sink  # a 1-bit student
    summary = report.summary()
    mean = sum(b.student_sink for b in report.blocks) / len(report.blocks)
    assert summary["attn_sink_student_mean"] == pytest.approx(mean)
    assert "sink t / s" in report.format()


def test_diagnose_runs_one_forward_per_model(pair) -> None:
    """Scales, hidden states and attention statistics come from one pass of each model, and the
    statistics equal a separate attention_stats pass."""
    teacher, student, ids = pair
    calls = {"teacher": 0, "student": 0}
    hooks = [
        m.register_forward_pre_hook(lambda *_, who=who: calls.__setitem__(who, calls[who] + 1))
        for m, who in ((teacher, "teacher"), (student, "student"))
    ]
    report = diagnose(teacher, student, ids)
    for h in hooks:
        h.remove()
    assert calls == {"teacher": 1, "student": 1}
    for model, who in ((teacher, "teacher"), (student, "student")):
        got = [getattr(b, f"{who}_{k}") for b in report.blocks for k in ("sink", "entropy")]
        assert got == pytest.approx([v for pair in attention_stats(model, ids) for v in pair])


def test_output_scales_leave_no_hook_behind_when_a_name_is_wrong(pair) -> None:
    teacher, _, ids = pair
    with pytest.raises(KeyError):
        layer_output_scales(teacher, ids, ["model.layers.0.mlp.down_proj", "nope"], attention=True)
    assert not any(m._forward_hooks for m in teacher.modules())


def test_perplexity_by_position_buckets_the_next_token_losses(pair) -> None:
    teacher, student, ids = pair  # 12 tokens: 11 predicted positions, [0, 8) and [8, 11)
    report = diagnose(teacher, student, ids)
    assert [(p.start, p.end) for p in report.positions] == [(0, 8), (8, 11)]
    for model, who in ((teacher, "teacher"), (student, "student")):
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).view(2, 11)
        for p in report.positions:
            want = math.exp(float(nll[:, p.start : p.end].mean()))
            assert getattr(p, f"{who}_ppl") == pytest.approx(want, rel=1e-4)
    last = report.positions[-1]
    assert report.summary()["ppl_ratio_last_positions"] == pytest.approx(
        last.student_ppl / last.teacher_ppl
    )
    alone = diagnose(teacher, None, ids)  # the teacher alone: its perplexities, no student's
    assert [p.student_ppl for p in alone.positions] == [None, None]
    assert alone.positions[0].teacher_ppl == pytest.approx(report.positions[0].teacher_ppl)
    assert "[8, 11)" in report.format()
