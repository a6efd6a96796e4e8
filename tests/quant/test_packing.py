"""Packing: exact round trip, documented bit order, packed layer equals trained layer exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

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
    assert packed.packed_signs.numel() == 13 * ((in_features + 7) // 8)
    x = torch.randn(3, 7, in_features, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(packed(x), layer(x), atol=0, rtol=0)


def test_packed_model_logits_equal_the_students() -> None:
    student = freeze_(quantize_(tiny_causal_lm("llama"), OneBitConfig()))
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
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
