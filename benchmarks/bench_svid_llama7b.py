"""SVID of all 224 LLaMA-7B-shaped matrices on CPU: how long OneBit's initialisation takes.

LLaMA-7B has 32 decoder blocks of 7 linears: q, k, v, o (4096×4096), gate, up (11008×4096) and
down (4096×11008). Each matrix is drawn at random (``0.02 · r_i · c_j · z_ij``, lognormal row and
column scales, as in bench_svid.py), stored in bf16 as LLaMA checkpoints are, and decomposed with
``svid(W, "nmf")``; only the decomposition is timed (drawing the matrices is not). For scale, the
official scikit-learn NMF is timed on one matrix of each shape and extrapolated to 224.

    python benchmarks/bench_svid_llama7b.py                # ~2 minutes on 2 cores
    python benchmarks/bench_svid_llama7b.py --layers 4     # a quicker subset
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from harness import header

from onebit.models import llama_linear_shapes

REPO_ROOT = Path(__file__).resolve().parent.parent

SHAPES = llama_linear_shapes("7b")  # (out, in) of LLaMA-7B's linears, per decoder block


def draw(out_f: int, in_f: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(out_f, in_f, generator=g)
    r = torch.empty(out_f, 1).log_normal_(0.0, 0.5, generator=g)
    c = torch.empty(1, in_f).log_normal_(0.0, 0.5, generator=g)
    return (0.02 * r * c * z).bfloat16()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=32, help="decoder blocks (LLaMA-7B: 32)")
    p.add_argument("--no-sklearn", action="store_true", help="skip the scikit-learn estimate")
    args = p.parse_args(argv)

    from onebit.quant.svid import factors_error, svid

    t_start = time.perf_counter()
    svid(draw(64, 64, seed=0), "nmf")  # warm-up: builds or loads the C++ kernels
    per_shape: dict[tuple[int, int], list[float]] = {}
    errors = []
    total = 0.0
    n = 0
    for layer in range(args.layers):
        for i, (name, shape) in enumerate(SHAPES.items()):
            W = draw(*shape, seed=layer * 7 + i)
            t0 = time.perf_counter()
            a, b = svid(W, "nmf")
            dt = time.perf_counter() - t0
            total += dt
            n += 1
            per_shape.setdefault(shape, []).append(dt)
            if layer == 0:
                errors.append((name, factors_error(W, a, b)))
        print(f"block {layer + 1}/{args.layers}: {total:.2f} s so far", file=sys.stderr, flush=True)
    sk_total = None
    sk_rows = []
    if not args.no_sklearn:
        svid(draw(64, 64, seed=0), "nmf_sklearn")  # warm-up: scikit-learn's import is not SVID
        sk_total = 0.0
        for shape, times in per_shape.items():
            W = draw(*shape, seed=10_000 + shape[0])
            t0 = time.perf_counter()
            svid(W, "nmf_sklearn")
            dt = time.perf_counter() - t0
            sk_rows.append((shape, dt))
            sk_total += dt * len(times)
    lines = [
        *header("SVID of every LLaMA-7B-shaped matrix"),
        "",
        "| shape (out×in) | matrices | median s / matrix | total s |",
        "|---|---:|---:|---:|",
    ]
    for shape, times in per_shape.items():
        lines.append(
            f"| {shape[0]}×{shape[1]} | {len(times)} | {statistics.median(times):.4f} "
            f"| {sum(times):.2f} |"
        )
    lines += [
        f"| **all** | **{n}** | | **{total:.2f}** |",
        "",
        "relative error ‖W − sign(W)⊙abᵀ‖/‖W‖ in block 0: "
        + ", ".join(f"{nm} {e:.5f}" for nm, e in errors),
    ]
    if sk_total is not None:
        lines += [
            "",
            "scikit-learn NMF (the official code), one matrix per shape: "
            + ", ".join(f"{s[0]}×{s[1]} {t:.3f} s" for s, t in sk_rows)
            + f"; extrapolated to these {n} matrices: {sk_total:.1f} s "
            f"({sk_total / total:.1f}x our time)",
        ]
    lines += ["", f"Total wall time (drawing the matrices included): "
              f"{time.perf_counter() - t_start:.0f} s"]  # fmt: skip
    print("\n".join(lines))


if __name__ == "__main__":
    main()
