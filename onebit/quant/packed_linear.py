"""PackedOneBitLinear: the inference form of OneBitLinear, holding 1 bit per weight.

It stores the packed signs (1 bit per weight, in :func:`onebit.quant.packing.tile_signs`'s tiled
layout: 16 rows × 32 columns per 64 bytes; so does its state dict, and so every export), the value
vectors g and h and the bias. A state dict with row-major signs (a format-1 export) is tiled as it
is loaded. Two paths compute the same layer:

* the C++ kernel (``onebit.kernels``, CPU): ``z = (x ⊙ g) · Sᵀ`` straight from the bits in fp32,
  whatever the activation dtype (the result is cast back). Up to ``GEMV_MAX_TOKENS`` tokens it
  reads the bits as stored (1 bit per weight) on the best instruction set of the CPU, chosen at
  run time (``onebit.kernels.isa()``): for one token, on AVX-512 or AVX2, a table of the 16
  signed sums of each 4 inputs indexed by 4 bits of each row; for more, AVX-512 masked adds
  (``Σ x_j s_j = 2 Σ_{s_j=+1} x_j − Σ x_j``) or AVX2 FMAs with ±1 from a byte table; else
  portable C++. Above, it unpacks 256-row blocks of ±1 and calls the BLAS GEMM. The decode
  case runs as one C++ call for the whole layer
  (``packed_linear_decode``: scales, LayerNorm, gain, bias and outlier weights with it, in fp32).
  It agrees with the trained layer to fp32 rounding (a different summation order), not bitwise.
  ``prefill`` chooses the many-token arithmetic: ``fp32`` (default, exact to rounding), ``bf16``
  (``x ⊙ g`` and the products rounded to bf16, the BLAS bf16 GEMM) or ``int8`` (``x ⊙ g``
  quantized to int8 per token by its absmax, int8 tiles through ``torch._int_mm``). Decode stays
  fp32 in every mode. ``bf16`` and ``int8`` are lossy; their effect on perplexity is measured in
  docs/inference.md.
* the reference path (other devices, autograd, or kernels off): the signs are unpacked to the
  activation dtype and fed through the trained layer's own forward function, so for the same
  dtype the output is bitwise equal to :class:`OneBitLinear`'s. It unpacks the whole matrix on
  every call, as the official inference code does, and is slow.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from onebit import kernels
from onebit.quant.linear import OneBitLinear, add_skips, onebit_forward
from onebit.quant.packing import pack_signs, tile_signs, tiled_shape, unpack_signs, untile_signs

GEMV_MAX_TOKENS = 8  # up to this many tokens per call the bit-mask kernel, above it tiled GEMM
PREFILL_MODES = ("fp32", "bf16", "int8")
_INT8_MIN_TOKENS = 17  # torch._int_mm needs more than 16 rows


class PackedOneBitLinear(nn.Module):
    """``y = γ ⊙ LN(((x ⊙ g) · Sᵀ) ⊙ h) + bias + W_K x`` with S stored as packed bits (γ:
    ``out_gain``, present when the layer was trained with ``output_gain``; ``W_K``: the ``outliers``
    weights kept in full precision, at flat positions ``outlier_index``, when trained with them).

    Shapes: packed_signs (ceil(out / 16), ceil(in / 32), 16, 4) uint8 (tiled); in_scale (in,);
        out_scale (out,);
        out_gain (out,) or None; bias (out,); outlier_index (k,) int32 and outlier_value (k,) or
        None; forward x (..., in) → (..., out).
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
        out_gain: bool = False,
        outliers: int = 0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.output_norm = output_norm
        self.norm_eps = norm_eps
        self.prefill = "fp32"  # see the module docstring; set_prefill_mode_ sets a whole model
        kw = {"device": device, "dtype": dtype}
        self.register_buffer(
            "packed_signs",
            torch.zeros(tiled_shape(out_features, in_features), dtype=torch.uint8, device=device),
        )
        self.register_buffer("in_scale", torch.ones(in_features, **kw))
        self.register_buffer("out_scale", torch.ones(out_features, **kw))
        self.register_buffer("out_gain", torch.ones(out_features, **kw) if out_gain else None)
        self.register_buffer("bias", torch.zeros(out_features, **kw) if bias else None)
        self.register_buffer(
            "outlier_index",
            torch.zeros(outliers, dtype=torch.int32, device=device) if outliers else None,
        )
        self.register_buffer("outlier_value", torch.zeros(outliers, **kw) if outliers else None)

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
            out_gain=layer.out_gain is not None,
            outliers=0 if layer.outlier_value is None else layer.outlier_value.numel(),
        )
        p.packed_signs.copy_(tile_signs(pack_signs(layer.weight), layer.in_features))
        p.in_scale.copy_(layer.in_scale)
        p.out_scale.copy_(layer.out_scale)
        if layer.out_gain is not None:
            p.out_gain.copy_(layer.out_gain)
        if layer.bias is not None:
            p.bias.copy_(layer.bias)
        if layer.outlier_value is not None:
            p.outlier_index.copy_(layer.outlier_index)
            p.outlier_value.copy_(layer.outlier_value)
        return p

    def signs(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The ±1 sign matrix. Shapes: (out, in)."""
        return unpack_signs(self.row_signs(), self.in_features, dtype)

    def row_signs(self) -> Tensor:
        """The signs packed row-major, 8 per byte (:func:`onebit.quant.packing.pack_signs`'s).

        Shapes: (out, ceil(in / 8)) uint8."""
        if self.packed_signs.dim() == 2:  # held row-major for a loader (hold_row_signs_)
            return self.packed_signs
        return untile_signs(self.packed_signs, self.out_features, self.in_features)

    def hold_row_signs_(self) -> None:
        """Make ``packed_signs`` an empty row-major buffer, for a loader that writes a format-1
        export's tensors straight into the buffers (transformers' ``from_pretrained``);
        :meth:`tile_` after it."""
        shape = (self.out_features, (self.in_features + 7) // 8)
        self.packed_signs = torch.empty(shape, dtype=torch.uint8, device=self.packed_signs.device)

    def tile_(self) -> PackedOneBitLinear:
        """Lay row-major signs (as :meth:`hold_row_signs_` and a loader left them) out in tiles;
        nothing when they are tiled already."""
        if self.packed_signs.dim() == 2:
            self.packed_signs = tile_signs(self.packed_signs, self.in_features)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        key = prefix + "packed_signs"
        rows = state_dict.get(key)
        row_major = (self.out_features, (self.in_features + 7) // 8)
        if isinstance(rows, Tensor) and rows.dtype == torch.uint8 and rows.shape == row_major:
            # a format-1 export's row-major signs; any other shape fails in the base class
            state_dict[key] = tile_signs(rows, self.in_features)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        if (torch.is_grad_enabled() and x.requires_grad) or not kernels.use_kernel(x):
            y = onebit_forward(
                x, self.signs(x.dtype), self.in_scale, self.out_scale, self.output_norm,
                self.norm_eps, self.out_gain,
            )  # fmt: skip
            return add_skips(self, y, x)
        return self._forward_kernel(x)

    def _forward_kernel(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= GEMV_MAX_TOKENS:  # decode: the whole layer in one C++ call
            y = torch.ops.onebit.packed_linear_decode(
                x2, self.packed_signs, self.in_scale, self.out_scale, self.out_gain, self.bias,
                self.outlier_index, self.outlier_value, self.output_norm, self.norm_eps,
            )  # fmt: skip
            return y.reshape(*x.shape[:-1], self.out_features)
        u = (x2.float() * self.in_scale.float()).contiguous()
        tokens = u.shape[0]
        if self.prefill == "bf16" and tokens > GEMV_MAX_TOKENS:
            z = torch.ops.onebit.sign_matmul_bf16(
                u.bfloat16(), self.packed_signs, self.in_features, self.out_features
            )
            z = z.float()
        elif self.prefill == "int8" and tokens >= _INT8_MIN_TOKENS:
            scale = u.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127  # (tokens, 1)
            q = torch.round(u / scale).to(torch.int8)
            z = torch.ops.onebit.sign_matmul_int8(
                q, self.packed_signs, self.in_features, self.out_features
            )
            z = z.float() * scale  # (tokens, out)
        else:
            z = torch.ops.onebit.sign_matmul(
                u, self.packed_signs, self.in_features, self.out_features, GEMV_MAX_TOKENS
            )  # (tokens, out)
        y = z * self.out_scale.float()
        if self.output_norm:
            y = torch.nn.functional.layer_norm(y, (self.out_features,), eps=self.norm_eps)
        if self.out_gain is not None:
            y = y * self.out_gain.float()
        y = add_skips(self, y, x.reshape(-1, self.in_features).float())  # bias, W_K x in fp32
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, output_norm={self.output_norm}, "
            f"out_gain={self.out_gain is not None}"
            + (f", outliers={self.outlier_value.numel()}" if self.outlier_value is not None else "")
        )


def set_prefill_mode_(model: nn.Module, mode: str) -> nn.Module:
    """Set the many-token arithmetic (``fp32``, ``bf16`` or ``int8``) of every packed layer."""
    if mode not in PREFILL_MODES:
        raise ValueError(f"prefill mode {mode!r} is not one of {', '.join(PREFILL_MODES)}.")
    for m in model.modules():
        if isinstance(m, PackedOneBitLinear):
            m.prefill = mode
    return model
