"""C++ CPU kernels, built on first use with ``torch.utils.cpp_extension`` (g++ and ninja).

The ops are registered as ``torch.ops.onebit.*``. Every caller has a pure-PyTorch path that gives
the same numbers (to float32 rounding), used when the kernels are unavailable: no compiler, the
build failed, a non-CPU tensor, or ``ONEBIT_KERNELS=0`` in the environment. A failed build is
reported once, as a warning naming the cause, never as an error.

The build is cached under ``$ONEBIT_KERNEL_CACHE`` (default ``~/.cache/onebit/kernels``) in a
folder named by a hash of the sources, the torch version and this CPU's instruction-set flags
(the code is compiled with ``-march=native``), so the first call on a machine takes about a
minute and later ones milliseconds. ``python -m onebit.kernels`` builds them ahead of time and
says which path is in use.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_SOURCES = ("svid.cpp", "packed.cpp", "decoder.cpp")
_HEADERS = ("packed.h",)  # hashed with the sources, not compiled on their own
_lock = threading.Lock()
_state: dict[str, object] = {}
_off = 0  # > 0 inside ``disabled()``


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _sources() -> list[Path]:
    here = Path(__file__).parent / "csrc"
    return [here / s for s in _SOURCES if (here / s).exists()]


def build_dir() -> Path:
    """Where this machine's build lives (created on demand)."""
    h = hashlib.sha256()
    for src in _sources() + [Path(__file__).parent / "csrc" / n for n in _HEADERS]:
        h.update(src.read_bytes())
    h.update(torch.__version__.encode())
    h.update(_cpu_flags().encode())
    h.update(_march().encode())
    root = os.environ.get("ONEBIT_KERNEL_CACHE") or Path.home() / ".cache" / "onebit" / "kernels"
    return Path(root) / h.hexdigest()[:16]


def _march() -> str:
    """The compiler's target: ``native`` (this CPU), or ``ONEBIT_KERNEL_MARCH`` (e.g. ``x86-64-v3``,
    AVX2 without AVX-512, to build and test the AVX2 path on an AVX-512 machine)."""
    return os.environ.get("ONEBIT_KERNEL_MARCH", "native")


def _build() -> None:
    from torch.utils import cpp_extension

    path = build_dir()
    path.mkdir(parents=True, exist_ok=True)
    if not any(path.glob("*.so")):
        print(
            f"onebit: building the C++ CPU kernels in {path} (once per machine, ~15 s)",
            file=sys.stderr,
            flush=True,
        )
    cpp_extension.load(
        name="onebit_cpu",
        sources=[str(s) for s in _sources()],
        build_directory=str(path),
        extra_cflags=["-O3", f"-march={_march()}", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        is_python_module=False,
        verbose=False,
    )


def available() -> bool:
    """Whether the C++ kernels are loaded (building them on the first call)."""
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        if os.environ.get("ONEBIT_KERNELS", "1") == "0":
            _state.update(ok=False, why="disabled by ONEBIT_KERNELS=0")
            return False
        try:
            _build()
            _state.update(ok=True, why=f"built in {build_dir()}")
        except Exception as e:  # no compiler, no ninja, a compile error: fall back, say why
            first = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            _state.update(ok=False, why=f"{type(e).__name__}: {first}")
            warnings.warn(
                "onebit: the C++ CPU kernels could not be built "
                f"({_state['why']}); using the pure-PyTorch path (same numbers, slower). "
                "Install g++ and `pip install ninja`, or set ONEBIT_KERNELS=0 to silence this.",
                RuntimeWarning,
                stacklevel=2,
            )
        return bool(_state["ok"])


ISAS = ("scalar", "avx2", "avx2_lut", "avx512", "avx512_lut")


def isa() -> str | None:
    """The decode kernel's instruction set in use, the best this CPU has or
    ``ONEBIT_KERNEL_ISA``: ``avx512_lut`` (AVX-512; one token by table lookup, more by masked
    adds), ``avx512`` (masked adds only), ``avx2_lut`` (AVX2; one token by table lookup, more by
    FMAs), ``avx2`` (FMAs only) or ``scalar``; None without the kernels."""
    return ISAS[torch.ops.onebit.kernel_isa(-1)] if available() else None


@contextmanager
def forced_isa(name: str) -> Iterator[str]:
    """Run the decode kernel with instruction set ``name`` (capped at what this CPU has) inside
    the block; yields the one in use. For tests and benchmarks of each path."""
    if name not in ISAS:
        raise ValueError(f"isa {name!r} is not one of {', '.join(ISAS)}.")
    if not available():
        raise RuntimeError(f"the C++ kernels are not available: {_state['why']}")
    before = torch.ops.onebit.kernel_isa(-1)
    try:
        yield ISAS[torch.ops.onebit.kernel_isa(ISAS.index(name))]
    finally:
        torch.ops.onebit.kernel_isa(before)


def status() -> str:
    """One line: which path is in use and why."""
    ok = available()
    where = f", decode {isa()}" if ok else ""
    return f"C++ kernels: {'on' if ok else 'off'}{where} ({_state['why']})"


def use_kernel(*tensors: torch.Tensor) -> bool:
    """True when every tensor is on the CPU and the kernels are available and not disabled."""
    return _off == 0 and all(t.device.type == "cpu" for t in tensors) and available()


@contextmanager
def disabled() -> Iterator[None]:
    """Run the pure-PyTorch paths inside this block (for comparisons and tests)."""
    global _off
    _off += 1
    try:
        yield
    finally:
        _off -= 1
