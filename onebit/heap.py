"""Keep freed host memory in the process, so that large CPU temporaries reuse pages already mapped.

glibc's ``malloc`` serves blocks above its mmap threshold (at most 32 MiB, adjusted as the program
runs) with fresh pages from the kernel and returns them on ``free``. A training step on CPU makes
and frees many such blocks: the logits of SmolLM2-135M at 4 × 128 tokens are 100 MB each, and the
KD loss and ``lm_head``'s backward pass make several more. Every fresh page is faulted in and
zeroed by the kernel, every step again. :func:`warm_heap` turns that off (every block comes from
the heap, which glibc extends with ``brk``, or with ``mmap`` where ``brk`` cannot) and trims the
heap only when more than 1 GiB is free at its top, so freed blocks stay in the process and the
next step reuses them (docs/benchmarks.md, "One distillation step"). The process's resident
memory then stays near its peak instead of shrinking between steps.

The settings apply to allocations made after the call, on Linux with glibc; elsewhere (macOS,
musl, Windows) nothing changes and the function says so. GPU memory is not affected.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
M_TOP_PAD = -2
M_MMAP_MAX = -4
TRIM_BYTES = 1 << 30
TOP_PAD_BYTES = 256 << 20


def warm_heap() -> str:
    """Keep freed memory in the process (glibc only); returns one line saying what was done."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(M_MMAP_MAX, 0) == 1
        ok = libc.mallopt(M_TRIM_THRESHOLD, TRIM_BYTES) == 1 and ok
        ok = libc.mallopt(M_TOP_PAD, TOP_PAD_BYTES) == 1 and ok
    except (OSError, AttributeError):  # no C library by that name, or one without mallopt
        ok = False
    if ok:
        return (
            "heap: warm (glibc mallopt: no mmap for large blocks, the heap trimmed only above "
            "1 GiB free, grown 256 MiB at a time)"
        )
    return "heap: allocator defaults (glibc mallopt not available)"


def apply_warm_heap(warm: object) -> str:
    """The ``warm_heap`` key of ``train.py`` and ``benchmarks/results.py``: :func:`warm_heap` when
    true, nothing when false; returns the line to log.

    Raises:
        OneBitInputError: ``warm`` is not a boolean.
    """
    from onebit.errors import OneBitInputError

    if not isinstance(warm, bool):
        raise OneBitInputError(f"warm_heap={warm!r} must be true or false.")
    return warm_heap() if warm else "heap: allocator defaults (warm_heap=false)"
