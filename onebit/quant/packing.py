"""Packing ±1 signs 8 to a byte, and back.

Format (recorded in every export's config): along the last dimension, element ``j`` goes to byte ``j
// 8``, bit ``j % 8`` (least significant bit first, "little" bit order); a set bit means +1, a clear
bit −1 (``sign(w) = +1 if w >= 0``). The last byte of a row is padded with clear bits when the
length is not a multiple of 8; ``unpack_signs`` needs the original length to drop them.
"""

from __future__ import annotations

import torch
from torch import Tensor

BIT_ORDER = "little"
FORMAT_VERSION = 1  # of a 1-bit export (onebit.export): bump when its tensors or config change
_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_signs(w: Tensor) -> Tensor:
    """Pack the signs of ``w`` (``w >= 0`` ↦ bit 1) into uint8, 8 per byte along the last dim.

    Shapes: w (..., n) → (..., ceil(n / 8)) uint8.
    """
    n = w.shape[-1]
    bits = (w >= 0).to(torch.uint8)
    pad = (-n) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*w.shape[:-1], -1, 8)  # (..., n/8, 8)
    return (bits * _WEIGHTS.to(bits.device)).sum(-1, dtype=torch.uint8)


def unpack_signs(packed: Tensor, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Unpack uint8 bytes into ±1 values of ``dtype``, keeping the first ``n`` per row.

    Shapes: packed (..., m) uint8 with ``m == ceil(n / 8)`` → (..., n).
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed signs must be uint8, got {packed.dtype}.")
    if packed.shape[-1] != (n + 7) // 8:
        raise ValueError(
            f"packed signs have {packed.shape[-1]} bytes per row, "
            f"but {n} signs need {(n + 7) // 8}."
        )
    bits = packed.unsqueeze(-1).bitwise_and(_WEIGHTS.to(packed.device)).ne(0)  # (..., m, 8)
    bits = bits.reshape(*packed.shape[:-1], -1)[..., :n]
    return bits.to(dtype) * 2 - 1
