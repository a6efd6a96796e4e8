"""The OneBit method in plain PyTorch: layer, SVID, packing and model conversion."""

from onebit.quant.calibrate import (
    calibrate_output_gains_,
    init_from_calibration_,
    massive_layer_names,
)
from onebit.quant.config import OneBitConfig
from onebit.quant.convert import find_decoder_blocks, freeze_, iter_target_linears, pack_, quantize_
from onebit.quant.footprint import FootprintReport, footprint, layer_bits_per_weight
from onebit.quant.gptq import gptq_init_, gptq_signs, refit_value_vectors
from onebit.quant.linear import OneBitLinear, onebit_forward
from onebit.quant.packed_linear import PackedOneBitLinear
from onebit.quant.packing import pack_signs, unpack_signs
from onebit.quant.ste import sign, sign_ste
from onebit.quant.svid import (
    rank1_optimal_error,
    relative_error,
    svid,
    svid_approx,
    svid_error,
    xnor_approx,
    xnor_error,
)

__all__ = [
    "FootprintReport",
    "OneBitConfig",
    "OneBitLinear",
    "PackedOneBitLinear",
    "calibrate_output_gains_",
    "find_decoder_blocks",
    "footprint",
    "freeze_",
    "gptq_init_",
    "gptq_signs",
    "init_from_calibration_",
    "iter_target_linears",
    "layer_bits_per_weight",
    "massive_layer_names",
    "onebit_forward",
    "pack_",
    "pack_signs",
    "quantize_",
    "rank1_optimal_error",
    "refit_value_vectors",
    "relative_error",
    "sign",
    "sign_ste",
    "svid",
    "svid_approx",
    "svid_error",
    "unpack_signs",
    "xnor_approx",
    "xnor_error",
]
