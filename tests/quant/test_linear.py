"""OneBitLinear: its formula, its gradients, its initialisation, and the sign convention."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onebit.quant import OneBitConfig, OneBitLinear, sign, svid


def _formula(layer: OneBitLinear, x: torch.Tensor) -> torch.Tensor:
    """y = LN((x ⊙ g) sign(W)ᵀ ⊙ h) + bias, written out with plain tensor ops."""
    s = torch.where(layer.weight >= 0, 1.0, -1.0).to(x.dtype)
    z = (x * layer.in_scale) @ s.T * layer.out_scale
    if layer.config.output_norm:
        mu = z.mean(-1, keepdim=True)
        var = z.var(-1, unbiased=False, keepdim=True)
        z = (z - mu) / torch.sqrt(var + layer.config.norm_eps)
    return z if layer.bias is None else z + layer.bias


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("output_norm", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_equals_formula(fused: bool, output_norm: bool, bias: bool) -> None:
    cfg = OneBitConfig(fused=fused, output_norm=output_norm, latent_init="weight")
    layer = OneBitLinear.from_linear(nn.Linear(19, 11, bias=bias).double(), cfg)
    x = torch.randn(3, 5, 19, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _formula(layer, x), atol=1e-12, rtol=1e-12)


def test_sign_of_zero_is_plus_one() -> None:
    w = torch.tensor([-2.0, -0.0, 0.0, 1e-30, -1e-30, 3.0])
    assert sign(w).tolist() == [-1, 1, 1, 1, -1, 1]
    assert sign(w, sign_of_zero="zero").tolist() == [-1, 0, 0, 1, -1, 1]  # official torch.sign


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sign_is_plus_one_exactly_where_w_is_at_least_zero(w_dtype, dtype) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g).to(w_dtype) * 1e-3
    w.view(-1)[:12] = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 1e-40, -1e-40] * 2).to(w_dtype)
    out = sign(w, dtype)
    assert out.dtype == dtype
    assert torch.equal(out, torch.where(w >= 0, 1.0, -1.0).to(dtype))


@pytest.mark.parametrize("ste", ["identity", "clipped", "tanh"])
def test_fused_equals_unfused_in_forward_and_backward(ste: str) -> None:
    lin = nn.Linear(37, 21, bias=True)
    fused = OneBitLinear.from_linear(lin, OneBitConfig(ste=ste, latent_init="weight"))
    with torch.no_grad():  # make some latent weights exceed the clip at |w| = 1
        fused.weight[:3] *= 200
    plain = copy.deepcopy(fused)
    plain.config = OneBitConfig(ste=ste, fused=False)
    x1 = torch.randn(4, 6, 37, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_()
    proj = torch.randn(21)
    y1, y2 = fused(x1), plain(x2)
    torch.testing.assert_close(y1, y2, atol=0, rtol=0)
    (y1 @ proj).sum().backward()
    (y2 @ proj).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for (name, p1), (_, p2) in zip(fused.named_parameters(), plain.named_parameters(), strict=True):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-5, rtol=1e-5, msg=name)


def test_fused_gradients_of_x_g_h_match_autograd_numerically() -> None:
    from onebit.quant.linear import _FusedOneBitLinear

    layer = OneBitLinear.from_linear(nn.Linear(13, 9).double(), OneBitConfig())
    w = layer.weight.detach()
    g = layer.in_scale.detach().clone().requires_grad_()
    h = layer.out_scale.detach().clone().requires_grad_()
    x = torch.randn(2, 4, 13, dtype=torch.float64, requires_grad=True)
    fn = lambda x, g, h: _FusedOneBitLinear.apply(x, w, g, h, True, 1e-5, "identity", "plus", None)
    assert torch.autograd.gradcheck(fn, (x, g, h))


@pytest.mark.parametrize("output_norm", [True, False])
def test_fused_gradients_with_an_output_gain_match_autograd_numerically(output_norm) -> None:
    from onebit.quant.linear import _FusedOneBitLinear

    layer = OneBitLinear.from_linear(nn.Linear(13, 9).double(), OneBitConfig(output_gain=True))
    w = layer.weight.detach()
    g = layer.in_scale.detach().clone().requires_grad_()
    h = layer.out_scale.detach().clone().requires_grad_()
    gain = (torch.rand(9, dtype=torch.float64) + 0.5).requires_grad_()
    x = torch.randn(2, 4, 13, dtype=torch.float64, requires_grad=True)

    def fn(x, g, h, gain):
        return _FusedOneBitLinear.apply(x, w, g, h, output_norm, 1e-5, "identity", "plus", gain)

    assert torch.autograd.gradcheck(fn, (x, g, h, gain))


def test_output_gain_is_a_per_channel_gain_after_the_layernorm() -> None:
    """y = γ ⊙ LN(...) + bias: the gain scales each output channel of the paper's layer."""
    lin = nn.Linear(16, 6)
    paper = OneBitLinear.from_linear(lin, OneBitConfig())
    gained = OneBitLinear.from_linear(lin, OneBitConfig(output_gain=True))
    x = torch.randn(5, 16)
    torch.testing.assert_close(gained(x), paper(x), atol=0, rtol=0)  # γ = 1 at initialisation
    gamma = torch.tensor([0.1, 1.0, 2.0, 30.0, -1.0, 994.0])
    with torch.no_grad():
        gained.out_gain.copy_(gamma)
    bias = lin.bias.detach()
    expected = (paper(x) - bias) * gamma + bias
    torch.testing.assert_close(gained(x), expected)
    unfused = OneBitLinear.from_linear(lin, OneBitConfig(output_gain=True, fused=False))
    with torch.no_grad():
        unfused.out_gain.copy_(gamma)
    torch.testing.assert_close(unfused(x), gained(x), atol=0, rtol=0)
    # the gain lets a layer exceed the paper's bound sqrt(out - 1) on every entry of LN's output
    assert gained(x).sub(bias).abs().max() > (6 - 1) ** 0.5


@pytest.mark.parametrize("ste", ["identity", "clipped", "tanh"])
def test_ste_gradient_reaching_latent_weight(ste: str) -> None:
    """dL/dW = STE(dL/dS) where S = sign(W) and dL/dS is the gradient of a dense layer using S."""
    layer = OneBitLinear.from_linear(nn.Linear(8, 5), OneBitConfig(ste=ste, latent_init="weight"))
    with torch.no_grad():
        layer.weight[0] = torch.linspace(-3, 3, 8)  # entries on both sides of |w| = 1
    x = torch.randn(7, 8)
    proj = torch.randn(5)
    (layer(x) @ proj).sum().backward()

    s = layer.signs().requires_grad_()
    z = (x * layer.in_scale.detach()) @ s.T * layer.out_scale.detach()
    (F.layer_norm(z, (5,)) @ proj).sum().backward()
    w = layer.weight.detach()
    factor = {
        "identity": torch.ones_like(w),
        "clipped": (w.abs() <= 1).float(),
        "tanh": 1.001 - torch.tanh(w) ** 2,
    }[ste]
    torch.testing.assert_close(layer.weight.grad, s.grad * factor, atol=1e-5, rtol=1e-4)
    assert layer.weight.grad.abs().sum() > 0
    if ste == "clipped":
        assert (layer.weight.grad[0, w[0].abs() > 1] == 0).all()


def test_gradients_reach_latent_weight_and_both_scales() -> None:
    layer = OneBitLinear.from_linear(nn.Linear(16, 12, bias=True))
    x = torch.randn(4, 16, requires_grad=True)
    (layer(x) @ torch.randn(12)).sum().backward()  # a random projection: y² is ~constant after LN
    for name in ("weight", "in_scale", "out_scale", "bias"):
        grad = getattr(layer, name).grad
        assert grad is not None and grad.abs().max() > 1e-6, name
    assert x.grad.abs().max() > 1e-6


def test_from_linear_initialisation_official_and_weight() -> None:
    lin = nn.Linear(24, 10)
    with torch.no_grad():
        lin.weight[0, 0] = 0.0
    layer = OneBitLinear.from_linear(lin, OneBitConfig(svid_method="svd"))
    a, b = svid(lin.weight, "svd")
    torch.testing.assert_close(layer.out_scale.detach(), a)
    torch.testing.assert_close(layer.in_scale.detach(), b)
    torch.testing.assert_close(layer.weight.detach(), torch.where(lin.weight >= 0, 0.01, -0.01))
    torch.testing.assert_close(layer.bias.detach(), lin.bias.detach())
    as_w = OneBitLinear.from_linear(lin, OneBitConfig(latent_init="weight"))
    torch.testing.assert_close(as_w.weight.detach(), lin.weight.detach())
    official = OneBitLinear.from_linear(lin, OneBitConfig.official(svid_method="svd"))
    assert official.weight[0, 0].item() == 0.0  # torch.sign(0) * 0.01


def test_svid_layer_approximates_the_linear_without_norm() -> None:
    """Before training, LN-free OneBit ≈ x (sign(W) ⊙ a bᵀ)ᵀ, the SVID reconstruction, exactly."""
    lin = nn.Linear(32, 20, bias=False)
    layer = OneBitLinear.from_linear(lin, OneBitConfig(output_norm=False))
    x = torch.randn(5, 32)
    approx = torch.sign(lin.weight) * torch.outer(layer.out_scale, layer.in_scale)
    torch.testing.assert_close(layer(x), x @ approx.T.detach(), atol=1e-5, rtol=1e-5)


def test_config_rejects_bad_values_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"quant\.ste='round'"):
        OneBitConfig(ste="round")
    with pytest.raises(ValueError, match=r"quant\.latent_init_scale"):
        OneBitConfig(latent_init_scale=float("nan"))
    with pytest.raises(ValueError, match=r"quant\.svid_method"):
        OneBitConfig(svid_method="qr")
    with pytest.raises(ValueError, match=r"unknown key.*svid_metod"):
        OneBitConfig.from_dict({"svid_metod": "nmf"})
