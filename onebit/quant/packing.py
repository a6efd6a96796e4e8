"""Packing ±1 signs 8 to a byte, and back.

Bits (recorded in every export's config): along the last dimension, element ``j`` goes to byte ``j
// 8``, bit ``j % 8`` (least significant bit first, "little" bit order); a set bit means +1, a clear
bit −1 (``sign(w) = +1 if w >= 0``). The last byte of a row is padded with clear bits when the
length is not a multiple of 8; ``unpack_signs`` needs the original length to drop them.

Layout: a packed layer (:class:`onebit.quant.PackedOneBitLinear`) holds those bytes in the C++
kernels' tiles (:func:`tile_signs`: 16 rows × 32 columns per 64 bytes), in memory and in exports
of format 2, which are read without a copy. Format 1 exports, row-major (``pack_signs``'s
``(out, ceil(in / 8))``), are still read: their signs are tiled when loaded.
"""

from __future__ import annotations

import torch
from torch import Tensor

BIT_ORDER = "little"
FORMAT_VERSION = 2  # of a 1-bit export (onebit.export): bump when its tensors or config change
READ_FORMATS = (1, 2)  # 1: row-major signs (tiled when loaded); 2: tiled signs
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


TILE_ROWS = 16  # rows of a tile of the kernels' layout (tile_signs)
TILE_COLUMNS = 32  # signs per row and tile: one little-endian 32-bit word


def tiled_shape(out_features: int, in_features: int) -> tuple[int, int, int, int]:
    """The shape of :func:`tile_signs`'s result for an ``out × in`` sign matrix."""
    return (-(-out_features // TILE_ROWS), -(-in_features // TILE_COLUMNS), TILE_ROWS, 4)


def tile_signs(packed: Tensor, in_features: int) -> Tensor:
    """Row-major packed signs (``pack_signs``'s) in the C++ kernels' tiled layout.

    Tile ``(t, w)`` holds, for its 16 rows ``16t .. 16t+15``, the 32 signs of columns
    ``32w .. 32w+31`` of each row as 4 bytes (the same bits as the row-major bytes ``4w .. 4w+3``),
    so one 64-byte cache line carries 16 rows × 32 columns, and a kernel reads a whole matrix as
    one sequential stream, 16 rows at a time. Rows past ``out`` and columns past ``in`` are
    clear bits.

    Shapes: packed (out, ceil(in / 8)) uint8 → (ceil(out / 16), ceil(in / 32), 16, 4) uint8.
    """
    row_bytes = (in_features + 7) // 8
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != row_bytes:
        raise ValueError(
            f"packed signs must be uint8 (out, {(in_features + 7) // 8}) for {in_features} "
            f"columns, got {packed.dtype} {tuple(packed.shape)}."
        )
    tiles, words, rows, _ = tiled_shape(packed.shape[0], in_features)
    full = torch.zeros(tiles * rows, words * 4, dtype=torch.uint8, device=packed.device)
    full[: packed.shape[0], : packed.shape[1]] = packed
    return full.reshape(tiles, rows, words, 4).transpose(1, 2).contiguous()


def untile_signs(tiles: Tensor, out_features: int, in_features: int) -> Tensor:
    """The row-major packed signs of a :func:`tile_signs` result.

    Shapes: tiles (ceil(out / 16), ceil(in / 32), 16, 4) uint8 → (out, ceil(in / 8)) uint8.
    """
    shape = tiled_shape(out_features, in_features)
    if tiles.dtype != torch.uint8 or tuple(tiles.shape) != shape:
        raise ValueError(
            f"tiled signs of a {out_features}×{in_features} matrix must be uint8 {shape}, got "
            f"{tiles.dtype} {tuple(tiles.shape)}."
        )
    rows = tiles.transpose(1, 2).reshape(shape[0] * TILE_ROWS, shape[1] * 4)
    return rows[:out_features, : (in_features + 7) // 8].contiguous()
