"""Bits per weight and bytes at rest of a OneBit model.

A quantized ``out × in`` layer stores ``out·in`` sign bits plus g (``in``) and h (``out``) in
``value_bits`` each (and a bias and the output gain γ (``out``), if any, and the ``outliers``
weights kept in full precision: ``value_bits`` for each value plus a 32-bit position). Two
per-weight figures are in use:

* bits per original weight: ``(out·in + 16·(in + out)) / (out·in)`` → 1.0078 at 4096×4096;
* bits per stored parameter, the paper's 1.0073 at 4096×4096: the same bits divided by
  ``out·in + in + out``, i.e. counting the entries of g and h as parameters too.

Everything outside the quantized layers (embeddings, norms, ``lm_head``, and decoder-block linears
kept in full precision by ``skip_modules``, also reported on their own) is counted at
``other_bits``. The report works on a full-precision model (what quantizing it would give), on a
quantized one and on a model built on the ``meta`` device (shapes only, no weights).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from torch import nn

from onebit.quant.config import OneBitConfig
from onebit.quant.convert import FilterFn, iter_target_linears, linear_shape
from onebit.quant.linear import OneBitLinear
from onebit.quant.packed_linear import PackedOneBitLinear


def _has_gain(module: nn.Module, config: OneBitConfig | None) -> bool:
    """The layer has (or, once quantized with ``config``, will have) an output gain γ."""
    if isinstance(module, OneBitLinear | PackedOneBitLinear):
        return module.out_gain is not None
    return config is not None and config.output_gain


def _outliers(module: nn.Module, config: OneBitConfig | None) -> int:
    """Weights the layer keeps (or, once quantized with ``config``, will keep) in full precision."""
    if isinstance(module, OneBitLinear | PackedOneBitLinear):
        return 0 if module.outlier_value is None else module.outlier_value.numel()
    if config is None:
        return 0
    out_f, in_f = linear_shape(module)
    return min(config.outliers, out_f * in_f)


@dataclass(frozen=True)
class FootprintReport:
    """Counts and sizes; bytes are at rest, with signs packed 8 per byte."""

    quantized_layers: int
    quantized_weights: int  # sum of out·in over the quantized layers
    value_params: int  # entries of g and h
    bias_params: int  # biases kept in quantized layers
    other_params: int  # everything else (embeddings, norms, lm_head, ...)
    value_bits: int
    other_bits: int
    packed_sign_bytes: int  # sum of out·ceil(in/8)
    kept_layers: int = 0  # decoder-block linears kept full precision (in other_params)
    kept_params: int = 0  # their parameters
    outlier_weights: int = 0  # weights kept full precision inside quantized layers (``outliers``)

    INDEX_BITS = 32  # an outlier weight's position, at rest

    @property
    def quantized_bits(self) -> int:
        return (
            self.quantized_weights
            + self.value_bits * (self.value_params + self.bias_params)
            + (self.value_bits + self.INDEX_BITS) * self.outlier_weights
        )

    @property
    def bits_per_weight(self) -> float:
        """Bits per original weight of the quantized layers (1.0078 at 4096×4096)."""
        return self.quantized_bits / self.quantized_weights

    @property
    def bits_per_param(self) -> float:
        """Bits per stored parameter of the quantized layers (the paper's 1.0073 at 4096×4096)."""
        return self.quantized_bits / (self.quantized_weights + self.value_params)

    @property
    def original_params(self) -> int:
        return self.quantized_weights + self.bias_params + self.other_params

    @property
    def model_bits_per_weight(self) -> float:
        """Bits per original parameter over the whole model, full-precision parts included."""
        return (self.quantized_bits + self.other_bits * self.other_params) / self.original_params

    @property
    def fp16_bytes(self) -> int:
        """The full-precision model at 16 bits per parameter."""
        return 2 * self.original_params

    @property
    def onebit_bytes(self) -> int:
        """The OneBit model at rest: packed signs, value vectors, biases, full-precision parts."""
        vb = self.value_bits // 8 * (self.value_params + self.bias_params)
        ob = (self.value_bits + self.INDEX_BITS) // 8 * self.outlier_weights
        return self.packed_sign_bytes + vb + ob + self.other_bits // 8 * self.other_params

    @property
    def compression(self) -> float:
        return self.fp16_bytes / self.onebit_bytes

    def to_dict(self) -> dict[str, float]:
        out: dict[str, float] = asdict(self)
        for key in (
            "bits_per_weight",
            "bits_per_param",
            "model_bits_per_weight",
            "fp16_bytes",
            "onebit_bytes",
            "compression",
            "original_params",
        ):
            out[key] = getattr(self, key)
        return out

    def format(self) -> str:
        rows = [
            ("quantized layers", f"{self.quantized_layers}"),
            ("quantized weights", f"{self.quantized_weights:,}"),
            ("bits / weight (quantized layers)", f"{self.bits_per_weight:.4f}"),
            ("bits / parameter (paper's count)", f"{self.bits_per_param:.4f}"),
            ("  outlier weights (full precision)", f"{self.outlier_weights:,}"),
            ("full-precision parameters", f"{self.other_params:,} at {self.other_bits} bits"),
            ("  of which kept linears", f"{self.kept_params:,} in {self.kept_layers} layers"),
            ("bits / weight (whole model)", f"{self.model_bits_per_weight:.4f}"),
            ("FP16 size", human_bytes(self.fp16_bytes)),
            ("OneBit size (packed)", human_bytes(self.onebit_bytes)),
            ("compression", f"{self.compression:.1f}x"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def human_bytes(n_bytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.3g} {unit}" if unit != "GB" else f"{n_bytes / scale:.2f} GB"
    return f"{n_bytes:.0f} B"


def layer_bits_per_weight(out_features: int, in_features: int, value_bits: int = 16) -> float:
    """Bits per original weight of one ``out × in`` OneBit layer (g and h at ``value_bits``)."""
    return (out_features * in_features + value_bits * (in_features + out_features)) / (
        out_features * in_features
    )


def footprint(
    model: nn.Module,
    config: OneBitConfig | None = None,
    filter_fn: FilterFn | None = None,
    value_bits: int = 16,
    other_bits: int = 16,
) -> FootprintReport:
    """Footprint of ``model`` once its decoder-block linears are OneBit layers.

    Args:
        model: full-precision, quantized, or built on the ``meta`` device.
        config, filter_fn: the same selection as :func:`~onebit.quant.quantize_` uses.
        value_bits: storage bits of g, h and biases (16 for fp16/bf16).
        other_bits: storage bits of the full-precision parts.
    """
    targets = list(iter_target_linears(model, config, filter_fn))
    target_ids = set()
    target_mods = {id(m) for _, m in targets}
    n_w = n_v = n_b = packed = n_o = 0
    for _, module in targets:
        out_f, in_f = linear_shape(module)
        n_o += _outliers(module, config)
        n_w += out_f * in_f
        n_v += out_f + in_f + (out_f if _has_gain(module, config) else 0)
        packed += out_f * ((in_f + 7) // 8)
        bias = getattr(module, "bias", None)
        n_b += bias.numel() if bias is not None else 0
        target_ids.update(id(t) for t in module.parameters())
        target_ids.update(id(t) for t in module.buffers())
    other = sum(p.numel() for p in model.parameters() if id(p) not in target_ids)
    kept = [m for _, m in iter_target_linears(model, None, filter_fn) if id(m) not in target_mods]
    kept_params = sum(p.numel() for m in kept for p in m.parameters())
    return FootprintReport(
        len(targets), n_w, n_v, n_b, other, value_bits, other_bits, packed, len(kept), kept_params,
        n_o,
    )  # fmt: skip
