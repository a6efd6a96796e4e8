"""Sign with one convention everywhere, and its straight-through estimators.

``sign(w) = +1 if w >= 0 else -1``: the value a packed bit can hold, so the trained layer and the
packed layer agree on every entry. The official code uses ``torch.sign`` (0 at 0) in training but
packs 0 as +1; ``sign_of_zero="zero"`` reproduces that for comparison only.

Straight-through estimators (gradient of the latent weight given the gradient of the sign):
    identity: g
    clipped:  g · 1[|w| <= 1]
    tanh:     g · (1.001 − tanh(w)²)          (official code)
"""

from __future__ import annotations

import torch
from torch import Tensor


def sign(w: Tensor, dtype: torch.dtype | None = None, sign_of_zero: str = "plus") -> Tensor:
    """±1 signs of ``w`` (``+1`` at zero unless ``sign_of_zero="zero"``), in ``dtype``.

    Shapes: any; the output has the shape of ``w``.
    """
    dtype = dtype or w.dtype
    if sign_of_zero == "zero":
        return torch.sign(w).to(dtype)
    # sign(w) + 0.5 is in {-0.5, 0.5, 1.5}, so its sign maps w = ±0 to +1 and keeps the rest:
    # the values of ``w >= 0``'s +1/-1 in three elementwise passes, 7-17x faster on CPU than
    # filling a new tensor through a boolean mask (only a NaN differs: +1 here, -1 by ``w >= 0``)
    return torch.sign(w).add_(0.5).sign_().to(dtype)


def ste_grad(grad: Tensor, w: Tensor, kind: str) -> Tensor:
    """Gradient reaching the latent weight ``w`` from ``grad`` (the gradient of ``sign(w)``)."""
    if kind == "identity":
        return grad
    if kind == "clipped":
        return grad * (w.abs() <= 1).to(grad.dtype)
    if kind == "tanh":
        return grad * (1.001 - torch.tanh(w.to(grad.dtype)) ** 2)
    raise ValueError(f"quant.ste={kind!r} is not one of identity, clipped, tanh.")


class _SignSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, kind: str, sign_of_zero: str, dtype: torch.dtype | None) -> Tensor:
        ctx.kind = kind
        if kind != "identity":
            ctx.save_for_backward(w)
        return sign(w, dtype, sign_of_zero)

    @staticmethod
    def backward(ctx, grad: Tensor):
        w = ctx.saved_tensors[0] if ctx.kind != "identity" else None
        g = grad if w is None else ste_grad(grad, w, ctx.kind)
        return g, None, None, None


def sign_ste(
    w: Tensor, kind: str = "identity", sign_of_zero: str = "plus", dtype: torch.dtype | None = None
) -> Tensor:
    """``sign(w)`` in the forward pass, a straight-through estimator of kind ``kind`` in
    backward.
    """
    return _SignSTE.apply(w, kind, sign_of_zero, dtype)
