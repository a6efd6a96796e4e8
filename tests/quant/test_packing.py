"""Packing: exact round trip, documented bit order, packed layer equals trained layer exactly
(reference path) and to fp32 rounding (C++ kernel)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from onebit import kernels
from onebit.models import tiny_causal_lm
from onebit.quant import (
    OneBitConfig,
    OneBitLinear,
    PackedOneBitLinear,
    freeze_,
    pack_,
    pack_signs,
    quantize_,
    unpack_signs,
)
from onebit.quant.packed_linear import set_prefill_mode_
from onebit.quant.packing import tile_signs, tiled_shape, untile_signs


@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 100])
def test_round_trip_is_exact(n: int) -> None:
    w = torch.randn(5, n)
    w[0, 0] = 0.0  # zero packs as +1
    packed = pack_signs(w)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (n + 7) // 8)
    expected = torch.where(w >= 0, 1.0, -1.0)
    assert torch.equal(unpack_signs(packed, n), expected)


def test_bit_order_is_lsb_first_and_set_bit_is_plus_one() -> None:
    w = torch.tensor([[1.0, -1, -1, -1, -1, -1, -1, -1, -1, 1]])  # +1 at positions 0 and 9
    assert pack_signs(w).tolist() == [[0b00000001, 0b00000010]]


def test_unpack_rejects_wrong_shapes_and_dtypes() -> None:
    with pytest.raises(ValueError, match="3 bytes per row, but 9 signs need 2"):
        unpack_signs(torch.zeros(2, 3, dtype=torch.uint8), 9)
    with pytest.raises(ValueError, match="must be uint8"):
        unpack_signs(torch.zeros(2, 2), 9)


@pytest.mark.parametrize(("out", "n"), [(1, 1), (13, 29), (16, 32), (17, 33), (40, 100)])
def test_tiles_hold_each_rows_bits_and_round_trip(out: int, n: int) -> None:
    w = torch.randn(out, n)
    rows = pack_signs(w)
    tiles = tile_signs(rows, n)
    assert tiles.shape == tiled_shape(out, n) == (-(-out // 16), -(-n // 32), 16, 4)
    assert torch.equal(untile_signs(tiles, out, n), rows)
    bits = tiles.reshape(tiles.shape[0], tiles.shape[1], 16, 4, 1)
    bits = bits.bitwise_right_shift(torch.arange(8, dtype=torch.uint8)).bitwise_and(1)
    bits = bits.permute(0, 2, 1, 3, 4).reshape(tiles.shape[0] * 16, tiles.shape[1] * 32)
    assert torch.equal(bits[:out, :n].bool(), w >= 0)  # tile (t, w): rows 16t.., columns 32w..
    assert bits[out:].sum() == 0 and bits[:, n:].sum() == 0  # padding: clear bits
    with pytest.raises(ValueError, match="must be uint8"):
        untile_signs(tiles[:, :1], out, n + 64)
    with pytest.raises(ValueError, match="must be uint8"):
        tile_signs(rows[:, :-1], n + 8)


def test_a_packed_layer_loads_tiled_and_row_major_state_dicts() -> None:
    layer = OneBitLinear.from_linear(nn.Linear(45, 19), OneBitConfig())
    packed = PackedOneBitLinear.from_onebit(layer)
    state = packed.state_dict()
    assert state["packed_signs"].shape == (2, 2, 16, 4)
    rows = {**state, "packed_signs": packed.row_signs()}  # as a format-1 export holds them
    assert rows["packed_signs"].shape == (19, 6)
    for given in (state, rows):
        again = PackedOneBitLinear(45, 19, bias=True)
        again.load_state_dict(given)
        assert torch.equal(again.packed_signs, packed.packed_signs)
        assert torch.equal(again.signs(), torch.where(layer.weight >= 0, 1.0, -1.0))
    with pytest.raises(RuntimeError, match="packed_signs"):
        again.load_state_dict({**state, "packed_signs": rows["packed_signs"][:, :5]})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("in_features", [29, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_equals_trained_exactly(dtype: torch.dtype, in_features: int, bias: bool) -> None:
    layer = OneBitLinear.from_linear(nn.Linear(in_features, 13, bias=bias), OneBitConfig()).to(
        dtype
    )
    with torch.no_grad():  # as after training: signs and scales moved
        layer.weight.add_(0.02 * torch.randn_like(layer.weight))
        layer.in_scale.mul_(1 + 0.1 * torch.rand_like(layer.in_scale))
    packed = PackedOneBitLinear.from_onebit(layer)
    assert packed.packed_signs.shape == tiled_shape(13, in_features)  # tiles, also in exports
    assert torch.equal(packed.row_signs(), pack_signs(layer.weight))
    x = torch.randn(3, 7, in_features, dtype=dtype)
    with torch.no_grad(), kernels.disabled():  # the reference path: bitwise
        torch.testing.assert_close(packed(x), layer(x), atol=0, rtol=0)


def test_packed_model_logits_equal_the_students() -> None:
    student = freeze_(quantize_(tiny_causal_lm("llama"), OneBitConfig()))
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad(), kernels.disabled():
        expected = student(ids).logits
        pack_(student)
        got = student(ids).logits
    assert not any(isinstance(m, OneBitLinear) for m in student.modules())
    assert sum(isinstance(m, PackedOneBitLinear) for m in student.modules()) == 14
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_packing_refuses_zero_signs_under_the_official_convention() -> None:
    layer = OneBitLinear.from_linear(nn.Linear(8, 4), OneBitConfig.official(svid_method="svd"))
    with torch.no_grad():
        layer.weight[0, 0] = 0.0
    with pytest.raises(ValueError, match="sign_of_zero='zero'"):
        PackedOneBitLinear.from_onebit(layer)


def _trained_like(in_features: int, out_features: int, bias: bool, norm: bool) -> OneBitLinear:
    cfg = OneBitConfig(output_norm=norm)
    layer = OneBitLinear.from_linear(nn.Linear(in_features, out_features, bias=bias), cfg)
    with torch.no_grad():
        layer.weight.add_(0.02 * torch.randn_like(layer.weight))
        layer.in_scale.mul_(1 + 0.1 * torch.rand_like(layer.in_scale))
        if bias:
            layer.bias.normal_()
    return layer


# The kernel sums in another order than F.linear: it agrees to fp32 rounding. Outputs are O(1)
# after the LayerNorm (and O(|h|·sqrt(in)) without it), so the tolerance is relative to that.
KERNEL_RTOL, KERNEL_ATOL = 1e-4, 1e-4


@pytest.mark.parametrize("tokens", [1, 3, 8, 9, 40])  # bit-mask kernel ≤ 8 tokens, GEMM above
@pytest.mark.parametrize(("in_features", "out_features"), [(1, 1), (29, 13), (100, 67), (333, 258)])
@pytest.mark.parametrize("norm", [True, False])
def test_kernel_equals_trained_layer(
    tokens: int, in_features: int, out_features: int, norm: bool
) -> None:
    if not kernels.available():
        pytest.skip(kernels.status())
    layer = _trained_like(in_features, out_features, bias=True, norm=norm)
    packed = PackedOneBitLinear.from_onebit(layer)
    x = torch.randn(tokens, in_features)
    with torch.no_grad():
        expected = layer(x)
        got = packed(x)
    scale = 1.0 if norm else float(expected.abs().max())
    torch.testing.assert_close(got, expected, rtol=KERNEL_RTOL, atol=KERNEL_ATOL * scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_keeps_the_activation_dtype(dtype: torch.dtype) -> None:
    if not kernels.available():
        pytest.skip(kernels.status())
    packed = PackedOneBitLinear.from_onebit(_trained_like(70, 30, bias=False, norm=True))
    x = torch.randn(2, 5, 70).to(dtype)
    with torch.no_grad():
        got = packed(x)
        with kernels.disabled():
            expected = packed(x.float())  # fp32 reference on the same (rounded) inputs
    assert got.dtype == dtype and got.shape == (2, 5, 30)
    # the kernel computes in fp32 and rounds once at the end
    torch.testing.assert_close(got, expected.to(dtype), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("mode", ["bf16", "int8"])
def test_lossy_prefill_is_close_and_decode_stays_exact(mode: str) -> None:
    if not kernels.available():
        pytest.skip(kernels.status())
    layer = _trained_like(300, 200, bias=False, norm=True)
    packed = PackedOneBitLinear.from_onebit(layer)
    set_prefill_mode_(packed, mode)
    assert packed.prefill == mode
    x = torch.randn(64, 300)
    with torch.no_grad():
        exact, got = layer(x), packed(x)
        one = packed(x[:1])
    err = float((got - exact).abs().max())
    assert 0 < err < 0.05  # lossy, but by at most a few percent of the unit-scale output
    torch.testing.assert_close(one, exact[:1], rtol=KERNEL_RTOL, atol=KERNEL_ATOL)


def test_kernel_is_not_used_under_autograd() -> None:
    packed = PackedOneBitLinear.from_onebit(_trained_like(16, 8, bias=False, norm=True))
    x = torch.randn(2, 16, requires_grad=True)
    y = packed(x)
    # the reference path: differentiable in x (not y.sum(): a LayerNorm'd row sums to 0 whatever x)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_unknown_prefill_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="prefill mode 'fp8' is not one of fp32, bf16, int8"):
        set_prefill_mode_(nn.Sequential(), "fp8")
