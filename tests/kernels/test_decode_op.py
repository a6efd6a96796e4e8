"""packed_linear_decode: the whole packed layer for a few tokens in one C++ call gives what the
layer's step-by-step kernel path gives (the same fp32 arithmetic; the LayerNorm's sums in another
order), for every layer variant and activation dtype."""

from __future__ import annotations

import pytest
import torch

from onebit import kernels
from onebit.quant import OneBitConfig, PackedOneBitLinear
from onebit.quant.linear import OneBitLinear, add_skips

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs the C++ kernels")


def _layer(in_f: int, out_f: int, norm: bool, gain: bool, bias: bool, outliers: int):
    torch.manual_seed(in_f * 7 + out_f)
    cfg = OneBitConfig(output_norm=norm, output_gain=gain, outliers=outliers)
    layer = OneBitLinear(in_f, out_f, bias=bias, config=cfg)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
        for name, b in layer.named_buffers():
            if name == "outlier_value":
                b.copy_(torch.randn_like(b))
    return PackedOneBitLinear.from_onebit(layer).eval()


def _step_by_step(p: PackedOneBitLinear, x: torch.Tensor) -> torch.Tensor:
    """The kernel path as the layer computed it before the fused op (fp32 throughout)."""
    x2 = x.reshape(-1, p.in_features)
    u = (x2.float() * p.in_scale.float()).contiguous()
    y = (
        torch.ops.onebit.sign_matmul(u, p.packed_signs, p.in_features, p.out_features, 8)
        * p.out_scale.float()
    )
    if p.output_norm:
        y = torch.nn.functional.layer_norm(y, (p.out_features,), eps=p.norm_eps)
    if p.out_gain is not None:
        y = y * p.out_gain.float()
    return add_skips(p, y, x2.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("norm", "gain", "bias", "outliers"),
    [
        (True, False, False, 0),
        (False, True, True, 5),
        (True, True, False, 3),
        (False, False, True, 0),
    ],
)
@pytest.mark.parametrize(("in_f", "out_f"), [(1, 3), (17, 9), (130, 33)])
def test_the_fused_decode_equals_the_step_by_step_kernel_path(
    in_f, out_f, norm, gain, bias, outliers, dtype
) -> None:
    p = _layer(in_f, out_f, norm, gain, bias, outliers).to(dtype)
    for tokens in (1, 3, 8):
        x = torch.randn(2, tokens, in_f).to(dtype)[:1]  # (1, tokens, in), as a decoder passes it
        with torch.no_grad():
            fused = p(x)
            expected = _step_by_step(p, x).reshape(1, tokens, out_f)
        assert fused.dtype == dtype and fused.shape == expected.shape
        tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
        torch.testing.assert_close(fused.float(), expected.float(), rtol=tol, atol=tol)
