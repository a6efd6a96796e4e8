"""PackedOneBitLinear: the inference form of OneBitLinear, holding 1 bit per weight.

It stores the packed signs (uint8, 8 per byte, see :mod:`onebit.quant.packing`), the value vectors g
and h and the bias, and computes exactly what the trained layer computes: the signs are unpacked to
the activation dtype and fed through the same forward function, so for the same dtype the output is
bitwise equal. This reference path unpacks the whole matrix on each call; a fast kernel that reads
the bits directly comes with the export format.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from onebit.quant.linear import OneBitLinear, onebit_forward
from onebit.quant.packing import pack_signs, unpack_signs


class PackedOneBitLinear(nn.Module):
    """``y = LN(((x ⊙ g) · Sᵀ) ⊙ h) + bias`` with S stored as packed bits.

    Shapes: packed_signs (out, ceil(in / 8)) uint8; in_scale (in,); out_scale (out,); bias (out,);
        forward x (..., in) → (..., out).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        output_norm: bool = True,
        norm_eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.output_norm = output_norm
        self.norm_eps = norm_eps
        kw = {"device": device, "dtype": dtype}
        self.register_buffer(
            "packed_signs",
            torch.zeros(out_features, (in_features + 7) // 8, dtype=torch.uint8, device=device),
        )
        self.register_buffer("in_scale", torch.ones(in_features, **kw))
        self.register_buffer("out_scale", torch.ones(out_features, **kw))
        self.register_buffer("bias", torch.zeros(out_features, **kw) if bias else None)

    @classmethod
    @torch.no_grad()
    def from_onebit(cls, layer: OneBitLinear) -> PackedOneBitLinear:
        """Pack a trained :class:`OneBitLinear` (its signs, g, h and bias, in their dtype)."""
        if layer.config.sign_of_zero != "plus" and bool((layer.weight == 0).any()):
            raise ValueError(
                "this layer uses quant.sign_of_zero='zero' and has latent weights equal to 0, "
                "which a bit cannot represent; pack layers trained with sign_of_zero='plus'."
            )
        p = cls(
            layer.in_features,
            layer.out_features,
            bias=layer.bias is not None,
            output_norm=layer.config.output_norm,
            norm_eps=layer.config.norm_eps,
            device=layer.weight.device,
            dtype=layer.in_scale.dtype,
        )
        p.packed_signs.copy_(pack_signs(layer.weight))
        p.in_scale.copy_(layer.in_scale)
        p.out_scale.copy_(layer.out_scale)
        if layer.bias is not None:
            p.bias.copy_(layer.bias)
        return p

    def signs(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The ±1 sign matrix. Shapes: (out, in)."""
        return unpack_signs(self.packed_signs, self.in_features, dtype)

    def forward(self, x: Tensor) -> Tensor:
        y = onebit_forward(
            x, self.signs(x.dtype), self.in_scale, self.out_scale, self.output_norm, self.norm_eps
        )
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, output_norm={self.output_norm}"
        )
