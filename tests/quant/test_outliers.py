"""Outlier weights (``quant.outliers``): the few weights a sign and rank-1 scales cannot hold, kept
in full precision on a sparse path; chosen, trained, packed, exported and counted."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from onebit.export import load_onebit, save_onebit
from onebit.models import tiny_causal_lm
from onebit.quant import (
    OneBitConfig,
    OneBitLinear,
    PackedOneBitLinear,
    calibrate_output_gains_,
    footprint,
    freeze_,
    pack_,
    quantize_,
)
from onebit.quant.linear import outlier_outputs, select_outliers
from onebit.quant.svid import svid


def _planted(out_f: int = 24, in_f: int = 40, k: int = 3) -> tuple[nn.Linear, list[int]]:
    """A linear whose weights are small except ``k`` planted ones, 100x the rest."""
    lin = nn.Linear(in_f, out_f, bias=True)
    with torch.no_grad():
        lin.weight.normal_(std=0.02)
        flat = torch.randperm(out_f * in_f)[:k].sort().values
        signs = torch.tensor([1.0, -1.0, 1.0, -1.0][:k])
        lin.weight.view(-1)[flat] = 3.0 * signs
    return lin, flat.tolist()


def test_select_outliers_finds_the_planted_weights() -> None:
    lin, planted = _planted()
    a, b = svid(lin.weight.detach(), "nmf", 200, 1e-6)
    assert select_outliers(lin.weight.detach(), a, b, 3).tolist() == planted
    layer = OneBitLinear.from_linear(lin, OneBitConfig(outliers=3))
    assert layer.outlier_index.dtype == torch.int32
    assert layer.outlier_index.tolist() == planted
    torch.testing.assert_close(layer.outlier_value, lin.weight.detach().view(-1)[planted])


def test_outlier_outputs_is_the_sparse_product() -> None:
    x = torch.randn(2, 5, 40)
    index = torch.tensor([3, 41, 41 + 39, 23 * 40 + 7], dtype=torch.int32)
    value = torch.tensor([1.5, -2.0, 0.25, 4.0])
    dense = torch.zeros(24, 40)
    dense.view(-1)[index.long()] = value
    torch.testing.assert_close(outlier_outputs(x, index, value, 40, 24), x @ dense.T)


def test_the_layer_adds_the_kept_weights_after_the_layernorm_and_learns_them() -> None:
    lin, planted = _planted()
    base = OneBitLinear.from_linear(lin, OneBitConfig(output_gain=True))
    layer = OneBitLinear.from_linear(lin, OneBitConfig(output_gain=True, outliers=3))
    x = torch.randn(4, 40)
    dense = torch.zeros(24, 40)
    dense.view(-1)[planted] = lin.weight.detach().view(-1)[planted]
    torch.testing.assert_close(layer(x), base(x) + x @ dense.T)  # same 1-bit path, plus W_K x
    # a token with a massive input channel gets the massive output the LayerNorm alone cannot
    j = planted[0] % 40
    x_big = torch.zeros(1, 40)
    x_big[0, j] = 1000.0
    assert base(x_big).abs().max() < 24**0.5 + 1  # LN: at most sqrt(out - 1) per entry
    assert layer(x_big).abs().max() > 2000
    layer(x).pow(2).sum().backward()
    assert layer.outlier_value.grad is not None and layer.outlier_value.grad.abs().sum() > 0
    assert layer.outlier_index.grad is None  # a buffer: positions are fixed


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_packed_export_and_load_equal_the_trained_student(arch, tmp_path) -> None:
    teacher = tiny_causal_lm(arch).eval()
    q = OneBitConfig(output_gain=True, gain_init="ls", outliers=5)
    student = freeze_(quantize_(copy.deepcopy(teacher), q)).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12))
    calibrate_output_gains_(teacher, student, ids, "ls")
    with torch.no_grad():  # trained-looking values
        for m in student.modules():
            if isinstance(m, OneBitLinear):
                m.outlier_value.mul_(1.5)
        ref = student(input_ids=ids).logits
    save_onebit(student, tmp_path / "export", q, dtype=torch.float32)
    loaded = load_onebit(tmp_path / "export")
    packed = [m for m in loaded.modules() if isinstance(m, PackedOneBitLinear)]
    assert packed and all(m.outlier_index.dtype == torch.int32 for m in packed)
    assert all(m.outlier_value.numel() == 5 for m in packed)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)
        pack_(student)
        torch.testing.assert_close(student(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-4)


def test_footprint_counts_the_outlier_weights() -> None:
    teacher = tiny_causal_lm("llama").eval()
    plain = footprint(teacher, OneBitConfig())
    k = 7
    planned = footprint(teacher, OneBitConfig(outliers=k))
    student = quantize_(copy.deepcopy(teacher), OneBitConfig(outliers=k))
    built = footprint(student)
    assert planned == built
    assert built.outlier_weights == k * built.quantized_layers
    extra_bits = (16 + 32) * k * built.quantized_layers
    assert built.quantized_bits - plain.quantized_bits == extra_bits
    assert built.onebit_bytes - plain.onebit_bytes == extra_bits // 8
    assert "outlier weights" in built.format()


def test_the_gain_calibration_leaves_out_the_outlier_share() -> None:
    """ls with outliers fits γ to the teacher's output less W_K x: the normal equations hold."""
    teacher = tiny_causal_lm("llama").eval()
    q = OneBitConfig(output_gain=True, outliers=4)
    student = freeze_(quantize_(copy.deepcopy(teacher), q)).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (2, 12))
    name = next(n for n, m in student.named_modules() if isinstance(m, OneBitLinear))
    layer, t_layer = student.get_submodule(name), teacher.get_submodule(name)
    seen = {}
    t_layer.register_forward_hook(lambda m, i, o: seen.update(t=(i[0], o)))
    calibrate_output_gains_(teacher, student, ids, "ls")
    x, y = seen["t"]  # the first layer's inputs are the same in both models
    with torch.no_grad():
        u = _pre_gain(layer, x).reshape(-1, y.shape[-1])
        residual = (y - layer(x)).reshape(-1, y.shape[-1])  # layer(x) = γ u + bias + W_K x
        without = (
            y - layer.out_gain * _pre_gain(layer, x) - (0 if layer.bias is None else layer.bias)
        ).reshape(-1, y.shape[-1])
    # the normal equations of y − bias − W_K x ≈ γ u hold; those of y − bias ≈ γ u do not
    torch.testing.assert_close((residual * u).sum(0), torch.zeros(y.shape[-1]), atol=1e-4, rtol=0)
    assert (without * u).sum(0).abs().max() > 1e-2


def _pre_gain(layer: OneBitLinear, x: torch.Tensor) -> torch.Tensor:
    """The layer's LayerNorm'd output before its gain, bias and outliers."""
    from onebit.quant import onebit_forward

    c = layer.config
    return onebit_forward(x, layer.signs(), layer.in_scale, layer.out_scale, True, c.norm_eps)


def test_bad_outlier_counts_are_refused() -> None:
    from onebit.errors import OneBitInputError

    for bad in (-1, 1.5, True, "3"):
        with pytest.raises(OneBitInputError, match=r"quant\.outliers"):
            OneBitConfig(outliers=bad)
