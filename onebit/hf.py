"""A OneBit export as a Hugging Face model: ``import onebit``, then
``AutoModelForCausalLM.from_pretrained(export)`` builds :class:`PackedOneBitLinear` layers.

An export's ``config.json`` (:mod:`onebit.export`) carries

* ``"model_type": "onebit_<base>"`` (``onebit_llama``, ``onebit_qwen2``, ...): transformers
  without ``onebit`` refuses it ("does not recognize this architecture") instead of building dense
  layers with random weights; :func:`register` maps each to a subclass of the base architecture's
  config and causal-LM class that differs only in that name;
* a standard ``quantization_config`` block, ``"quant_method": "onebit"``, read by
  :class:`OneBitQuantizationConfig`: the format version, the sign convention and bit order, the
  value vectors' dtype, the quantized module names and the layer's options (``quant``).

:class:`OneBitHfQuantizer` replaces the quantized modules on the ``meta`` device before
transformers loads the weights, so the packed signs, g, h, γ, biases and outlier weights are read
straight into the packed layers: no dense weight matrix, no random initialisation. ``dtype=`` casts
the floating tensors (the signs stay bits), ``device_map="cpu"`` works as for any model, and
``save_pretrained`` / ``push_to_hub`` write the same format back.

Plain transformers and PyTorch: no Lightning, no Hydra.
"""

from __future__ import annotations

from typing import Any

QUANT_METHOD = "onebit"
MODEL_TYPE_PREFIX = "onebit_"
# the architectures quantize_ converts (tiny and full models of each are tested)
BASE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2")
SIGN_CONVENTION = "bit 1 = +1 (w >= 0), bit 0 = -1"

_registered: dict[str, tuple[type, type]] = {}


def onebit_model_type(base: str) -> str:
    return MODEL_TYPE_PREFIX + base


def base_model_type(model_type: str) -> str:
    """``onebit_llama`` → ``llama`` (a base type is returned as it is)."""
    return model_type.removeprefix(MODEL_TYPE_PREFIX)


def _config_and_quantizer() -> tuple[type, type]:
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class OneBitQuantizationConfig(QuantizationConfigMixin):
        """The ``quantization_config`` of a OneBit export (``quant_method: onebit``).

        Args:
            format_version: of the packed format (:data:`onebit.quant.packing.FORMAT_VERSION`).
            modules: names of the quantized linears (``model.layers.0.self_attn.q_proj``, ...).
            quant: the ``OneBitConfig`` the student was trained with (``output_norm``,
                ``output_gain``, ``outliers``, ``norm_eps`` shape the packed layer).
            sign_convention: how a bit maps to a sign.
            bit_order: of the 8 signs in a byte (:data:`onebit.quant.packing.BIT_ORDER`).
            value_dtype: dtype g, h, γ and the full-precision parts were saved in.
        """

        def __init__(
            self,
            format_version: int = 1,
            modules: list[str] | None = None,
            quant: dict[str, Any] | None = None,
            sign_convention: str = SIGN_CONVENTION,
            bit_order: str = "little",
            value_dtype: str = "float16",
            **kwargs: Any,
        ) -> None:
            self.quant_method = QUANT_METHOD
            self.format_version = format_version
            self.modules = list(modules or [])
            self.quant = dict(quant or {})
            self.sign_convention = sign_convention
            self.bit_order = bit_order
            self.value_dtype = value_dtype

        def to_dict(self) -> dict[str, Any]:
            return {
                "quant_method": QUANT_METHOD,
                "format_version": self.format_version,
                "modules": list(self.modules),
                "quant": dict(self.quant),
                "sign_convention": self.sign_convention,
                "bit_order": self.bit_order,
                "value_dtype": self.value_dtype,
            }

    class OneBitHfQuantizer(HfQuantizer):
        """Loads a OneBit export: the quantized linears become :class:`PackedOneBitLinear`
        (empty, on ``meta``) before the weights are read into them."""

        requires_calibration = True  # only exports: transformers cannot train a OneBit student
        quantization_config: OneBitQuantizationConfig

        def validate_environment(self, *args: Any, **kwargs: Any) -> None:
            from onebit.errors import OneBitInputError
            from onebit.quant.packing import BIT_ORDER, READ_FORMATS

            c = self.quantization_config
            if c.format_version not in READ_FORMATS:
                raise OneBitInputError(
                    f"this export has OneBit format version {c.format_version}, the installed "
                    f"onebit reads {' and '.join(map(str, READ_FORMATS))}."
                )
            if c.bit_order != BIT_ORDER:
                raise OneBitInputError(
                    f"this export packs its signs in bit order {c.bit_order!r}; onebit reads "
                    f"{BIT_ORDER!r}."
                )

        def _process_model_before_weight_loading(self, model, **kwargs: Any):
            replace_with_packed_(model, self.quantization_config)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs: Any):
            from onebit.quant import PackedOneBitLinear

            for module in model.modules():  # the export's row-major signs, in the kernels' tiles
                if isinstance(module, PackedOneBitLinear):
                    module.tile_()
            info = getattr(model.config, "onebit", None)
            if isinstance(info, dict):  # the checksum was of the export's file, not of a re-save
                info.pop("weights_sha256", None)
            return model.eval()

        def param_needs_quantization(self, model, param_name: str, **kwargs: Any) -> bool:
            return False  # the file holds the packed tensors already

        def is_serializable(self) -> bool:
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    return OneBitQuantizationConfig, OneBitHfQuantizer


def replace_with_packed_(model, config) -> None:
    """Swap each module named in ``config.modules`` for an empty :class:`PackedOneBitLinear` of
    its shape (on the module's device; ``meta`` during ``from_pretrained``)."""
    import torch

    from onebit.errors import OneBitInputError
    from onebit.quant import OneBitConfig, PackedOneBitLinear
    from onebit.quant.convert import _set_submodule, linear_shape

    quant = OneBitConfig.from_dict(config.quant)
    for name in config.modules:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise OneBitInputError(f"module {name} of the export is not in the model.") from None
        if isinstance(old, PackedOneBitLinear):
            continue
        try:
            out_f, in_f = linear_shape(old)
        except TypeError:
            raise OneBitInputError(f"module {name} of the export is not a linear layer.") from None
        weight = old.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        new = PackedOneBitLinear(
            in_f,
            out_f,
            bias=getattr(old, "bias", None) is not None,
            output_norm=quant.output_norm,
            norm_eps=quant.norm_eps,
            device=weight.device,
            dtype=dtype,
            out_gain=quant.output_gain,
            outliers=min(quant.outliers, in_f * out_f),
        )
        if config.format_version == 1:  # row-major signs, written as they are: tiled after
            new.hold_row_signs_()
        _set_submodule(model, name, new)


def quantization_config(modules: list[str], quant: dict[str, Any], value_dtype: str) -> dict:
    """The ``quantization_config`` block an export's config.json carries."""
    from onebit.quant.packing import BIT_ORDER, FORMAT_VERSION

    return {
        "quant_method": QUANT_METHOD,
        "format_version": FORMAT_VERSION,
        "modules": list(modules),
        "quant": dict(quant),
        "sign_convention": SIGN_CONVENTION,
        "bit_order": BIT_ORDER,
        "value_dtype": value_dtype,
    }


def register() -> None:
    """Register the ``onebit`` quantization with transformers and the ``onebit_<base>`` model
    types (config, causal LM, tokenizer) of :data:`BASE_MODEL_TYPES`. Idempotent; ``import
    onebit`` calls it."""
    if _registered:
        return
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )

    config_cls, quantizer_cls = _config_and_quantizer()
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(config_cls)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(quantizer_cls)
    for base in BASE_MODEL_TYPES:
        register_model_type(base)


def register_model_type(base: str) -> str:
    """Register ``onebit_<base>`` (config, causal LM, tokenizer) for the transformers model type
    ``base``; returns the new name. The types of :data:`BASE_MODEL_TYPES` are registered by
    ``import onebit``; call this for an export of another architecture before loading it."""
    from transformers import (
        CONFIG_MAPPING,
        MODEL_FOR_CAUSAL_LM_MAPPING,
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
    )
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING

    name = onebit_model_type(base)
    if name in _registered:
        return name
    from onebit.errors import OneBitInputError

    if base not in CONFIG_MAPPING:
        raise OneBitInputError(f"model type {base!r} is not one transformers knows.")
    base_config = CONFIG_MAPPING[base]
    if base_config not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise OneBitInputError(f"model type {base!r} has no causal LM class in transformers.")
    base_model = MODEL_FOR_CAUSAL_LM_MAPPING[base_config]
    cfg = type(f"OneBit{base_config.__name__}", (base_config,), {"model_type": name})
    cfg.__module__ = __name__
    model = type(f"OneBit{base_model.__name__}", (base_model,), {"config_class": cfg})
    model.__module__ = __name__
    AutoConfig.register(name, cfg)
    AutoModelForCausalLM.register(cfg, model)
    if base_config in TOKENIZER_MAPPING:  # exports whose tokenizer files name no class
        AutoTokenizer.register(cfg, tokenizer_class=TOKENIZER_MAPPING[base_config])
    _registered[name] = (cfg, model)
    return name
