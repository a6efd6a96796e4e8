"""OneBitLinear: the training-time 1-bit layer of the OneBit paper.

    y = LN( ((x ⊙ g) · sign(W)ᵀ) ⊙ h ) + bias          (the paper)
    y = γ ⊙ LN( ((x ⊙ g) · sign(W)ᵀ) ⊙ h ) + bias      (``output_gain``: a per-channel gain γ)
    y = ... + W_K x                                   (``outliers``: k full-precision weights)

``W`` is a latent full-precision weight whose sign reaches the forward pass through a
straight-through estimator; ``g`` (``in_scale``) and ``h`` (``out_scale``) are full-precision value
vectors; LN is a LayerNorm without parameters; the bias (kept from the source layer, if it had one)
is added after it; so is ``W_K x``, the product with the few weights the layer keeps in full
precision (``outliers``: a sparse path, the weights at flat positions ``outlier_index``).

The fused path is one autograd function that saves only ``x`` and ``z = (x ⊙ g) · sign(W)ᵀ`` (plus
two LayerNorm statistics per token) and recomputes ``sign(W)``, ``x ⊙ g`` and ``z ⊙ h`` in backward,
where the naive composition of autograd ops would keep ``sign(W)`` (a weight-sized tensor) and three
activation-sized tensors alive. Both paths run the same forward ops, so they give the same numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onebit.quant.config import OneBitConfig
from onebit.quant.ste import sign, sign_ste, ste_grad
from onebit.quant.svid import svid

_layer_norm = torch.ops.aten.native_layer_norm
_layer_norm_backward = torch.ops.aten.native_layer_norm_backward


def _forward_parts(
    x: Tensor,
    signs: Tensor,
    in_scale: Tensor,
    out_scale: Tensor,
    output_norm: bool,
    eps: float,
    gain: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    z = F.linear(x * in_scale.to(x.dtype), signs)  # (..., out)
    y = z * out_scale.to(x.dtype)
    mean = rstd = None
    if output_norm:
        y, mean, rstd = _layer_norm(y, [y.shape[-1]], None, None, eps)  # mean, rstd (..., 1)
    if gain is not None:
        y = y * gain.to(x.dtype)
    return y, z, mean, rstd


def onebit_forward(
    x: Tensor,
    signs: Tensor,
    in_scale: Tensor,
    out_scale: Tensor,
    output_norm: bool,
    eps: float,
    gain: Tensor | None = None,
) -> Tensor:
    """The layer's forward math on given ±1 signs (no bias); shared by training and packed layers.

    Shapes: x (..., in), signs (out, in) ±1 in x's dtype, in_scale (in,), out_scale (out,),
    gain (out,) or None → (..., out).
    """
    return _forward_parts(x, signs, in_scale, out_scale, output_norm, eps, gain)[0]


def outlier_outputs(
    x: Tensor, index: Tensor, value: Tensor, in_features: int, out_features: int
) -> Tensor:
    """``W_K x``: the product of ``x`` with a sparse weight holding ``value`` at the flat
    positions ``index`` (``row · in_features + col``) of an ``out × in`` matrix.

    Shapes: x (..., in); index (k,) integer; value (k,) → (..., out).
    """
    index = index.long()
    rows, cols = index // in_features, index % in_features
    contrib = x[..., cols] * value.to(x.dtype)  # (..., k)
    out = x.new_zeros(*x.shape[:-1], out_features)
    return out.index_add(-1, rows, contrib)


def add_skips(layer: nn.Module, y: Tensor, x: Tensor) -> Tensor:
    """``y`` plus what a OneBit layer (training or packed) adds after its LayerNorm and gain:
    its bias and ``W_K x`` (``outliers``), when it has them.

    Shapes: y (..., out); x (..., in) → (..., out).
    """
    if layer.bias is not None:
        y = y + layer.bias.to(y.dtype)
    if layer.outlier_value is not None:
        y = y + outlier_outputs(
            x, layer.outlier_index, layer.outlier_value, layer.in_features, layer.out_features
        ).to(y.dtype)
    return y


def select_outliers(W: Tensor, a: Tensor, b: Tensor, k: int) -> Tensor:
    """Flat positions of the ``k`` entries where ``|W|`` most exceeds its rank-1 approximation
    ``a bᵀ`` (the SVID of ``|W|``), in increasing order: the weights a sign and rank-1 value
    vectors represent worst. Ties are broken by position, so the choice is deterministic.

    Shapes: W (out, in); a (out,); b (in,) → (min(k, out·in),) int32.
    """
    excess = W.float().abs() - a.float()[:, None] * b.float()[None, :]
    k = min(k, excess.numel())
    top = torch.topk(excess.flatten(), k, sorted=False).indices
    return top.sort().values.to(torch.int32)


class _FusedOneBitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, in_scale, out_scale, output_norm, eps, ste, sign_of_zero, gain):
        s = sign(weight, x.dtype, sign_of_zero)  # (out, in) ±1
        y, z, mean, rstd = _forward_parts(x, s, in_scale, out_scale, output_norm, eps, gain)
        ctx.save_for_backward(x, weight, in_scale, out_scale, z, mean, rstd, gain)
        ctx.cfg = (output_norm, ste, sign_of_zero)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, in_scale, out_scale, z, mean, rstd, gain = ctx.saved_tensors
        output_norm, ste, sign_of_zero = ctx.cfg
        h = out_scale.to(x.dtype)
        grad_gain = None
        if gain is not None:
            n_out = weight.shape[0]
            if ctx.needs_input_grad[8]:
                y_hat = z * h  # the output before the gain, recomputed
                if output_norm:
                    y_hat = (y_hat - mean) * rstd
                grad_gain = (grad_y * y_hat).reshape(-1, n_out).sum(0).to(gain.dtype)
            grad_y = grad_y * gain.to(x.dtype)
        if output_norm:
            y = z * h
            grad_y = _layer_norm_backward(
                grad_y, y, [y.shape[-1]], mean, rstd, None, None, [True, False, False]
            )[0]
        grad_in = grad_w = grad_g = grad_h = None
        n_out, n_in = weight.shape
        if ctx.needs_input_grad[3]:
            grad_h = (grad_y * z).reshape(-1, n_out).sum(0).to(out_scale.dtype)
        grad_z = grad_y * h  # (..., out)
        g = in_scale.to(x.dtype)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[2]:
            grad_xs = grad_z @ sign(weight, x.dtype, sign_of_zero)  # (..., in)
            if ctx.needs_input_grad[0]:
                grad_in = grad_xs * g
            if ctx.needs_input_grad[2]:
                grad_g = (grad_xs * x).reshape(-1, n_in).sum(0).to(in_scale.dtype)
        if ctx.needs_input_grad[1]:
            xs = (x * g).reshape(-1, n_in)
            grad_w = grad_z.reshape(-1, n_out).T @ xs  # (out, in)
            grad_w = ste_grad(grad_w, weight, ste).to(weight.dtype)
        return grad_in, grad_w, grad_g, grad_h, None, None, None, None, grad_gain


class OneBitLinear(nn.Module):
    """Training-time replacement for ``nn.Linear``: ``y = LN(((x ⊙ g) · sign(W)ᵀ) ⊙ h) + bias``.

    Attributes:
        weight: latent full-precision weight; only its sign is used in the forward pass.
        in_scale: the paper's value vector g.
        out_scale: the paper's value vector h.
        out_gain: the per-channel gain γ after the LayerNorm (``config.output_gain``), or None.
        bias: kept from the source layer (added after the LayerNorm), or None.
        outlier_index: flat positions (``row · in + col``) of the weights kept in full precision
            (``config.outliers``; a buffer), or None.
        outlier_value: their values (learnable), or None.

    Shapes: weight (out, in); in_scale (in,); out_scale (out,); out_gain (out,); bias (out,);
        outlier_index, outlier_value (k,); forward x (..., in) → (..., out).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        config: OneBitConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.config = config or OneBitConfig()
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.in_scale = nn.Parameter(torch.ones(in_features, **kw))
        self.out_scale = nn.Parameter(torch.ones(out_features, **kw))
        self.out_gain = (
            nn.Parameter(torch.ones(out_features, **kw)) if self.config.output_gain else None
        )
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        k = min(self.config.outliers, out_features * in_features)
        if k and out_features * in_features >= 2**31:
            raise ValueError(
                f"quant.outliers: a {out_features}x{in_features} layer has more positions than "
                "int32 outlier indices address."
            )
        self.register_buffer(
            "outlier_index",
            torch.zeros(k, dtype=torch.int32, device=device) if k else None,
        )
        self.outlier_value = nn.Parameter(torch.zeros(k, **kw)) if k else None
        if self.weight.device.type != "meta":
            nn.init.normal_(self.weight, std=in_features**-0.5)

    @classmethod
    @torch.no_grad()
    def from_linear(
        cls,
        linear: nn.Module,
        config: OneBitConfig | None = None,
        transposed: bool = False,
        value_vectors: tuple[Tensor, Tensor] | None = None,
    ) -> OneBitLinear:
        """A OneBitLinear initialised from a full-precision layer by SVID.

        Args:
            linear: an ``nn.Linear`` (or any module with ``weight`` and optional ``bias``).
            config: layer and initialisation options.
            transposed: the source stores its weight as (in, out), as GPT-2's ``Conv1D`` does.
            value_vectors: ``(a, b)`` already computed (an SVID cache); skips the SVID.
        """
        config = config or OneBitConfig()
        W = linear.weight.T if transposed else linear.weight  # (out, in)
        out_f, in_f = W.shape
        bias = getattr(linear, "bias", None)
        layer = cls(
            in_f, out_f, bias=bias is not None, config=config, device=W.device, dtype=W.dtype
        )
        if W.device.type == "meta":  # shapes only
            return layer
        if value_vectors is None:
            value_vectors = svid(W, config.svid_method, config.svid_max_iter, config.svid_tol)
        a, b = value_vectors
        layer.out_scale.copy_(a)
        layer.in_scale.copy_(b)
        if config.latent_init == "sign":
            layer.weight.copy_(sign(W, W.dtype, config.sign_of_zero) * config.latent_init_scale)
        else:
            layer.weight.copy_(W)
        if bias is not None:
            layer.bias.copy_(bias)
        if layer.outlier_index is not None:
            index = select_outliers(W, a, b, layer.outlier_index.numel())
            layer.outlier_index.copy_(index)
            layer.outlier_value.copy_(W.flatten()[index.long()])
        return layer

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        if c.fused:
            y = _FusedOneBitLinear.apply(
                x,
                self.weight,
                self.in_scale,
                self.out_scale,
                c.output_norm,
                c.norm_eps,
                c.ste,
                c.sign_of_zero,
                self.out_gain,
            )
        else:
            s = sign_ste(self.weight, c.ste, c.sign_of_zero, x.dtype)  # (out, in) ±1
            y = F.linear(x * self.in_scale.to(x.dtype), s) * self.out_scale.to(x.dtype)
            if c.output_norm:
                y = F.layer_norm(y, (self.out_features,), eps=c.norm_eps)
            if self.out_gain is not None:
                y = y * self.out_gain.to(x.dtype)
        return add_skips(self, y, x)

    def signs(self) -> Tensor:
        """The ±1 sign matrix this layer uses in its forward pass (float32).

        Shapes: (out, in).
        """
        return sign(self.weight.detach(), torch.float32, self.config.sign_of_zero)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, output_norm={c.output_norm}, "
            f"output_gain={c.output_gain}, ste={c.ste}"
            + (f", outliers={self.outlier_value.numel()}" if self.outlier_value is not None else "")
        )
