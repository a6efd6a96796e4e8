"""The SVID kernel's row blocking, side by side: rounds of ``torch.ops.onebit.svid_rank1_als`` with
``block_rows`` 1, 2, 4 and 8, the rows of a block interleaved or one after another, against one
plain read of the same matrix.

    python benchmarks/bench_svid_kernel.py            # LLaMA-7B shapes, fp32 and bf16 (~30 s)
    python benchmarks/bench_svid_kernel.py --rounds 3 --repeats 9

The matrices are ``bench_svid.py``'s LLaMA-like random weights (4096×4096, 11008×4096,
4096×11008), as fp32 and as bf16. Every block size and schedule gives the same bits (asserted
here, and in ``tests/quant/test_svid.py``); only the time differs. Each timed run calls the op
``--calls`` times with ``tol = -1`` (never met) and ``max_iter = --rounds``, i.e. exactly that
many rounds (3: what the default ``tol`` takes on these matrices); the configurations take turns,
run after run, so that a busy moment of the machine hits them alike. The table gives the median
over ``--repeats`` runs of the time per round, the bytes of W read per second at that pace, and
the speed-up over one row at a time. "4 rows, interleaved" runs the 4 rows' dot products
together (4 row streams); "4 rows, one by one" runs them one row after another and then updates z
once for the 4 rows. "default" is the op's
(``block_rows=0, interleave=-1``): 4 rows one by one for fp32 weights, 8 rows interleaved for
bf16/fp16 (see ``svid.cpp``).
"one read" is ``W.sum(dim=1)``: one pass over W by PyTorch, the pace of memory for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from harness import header

REPO_ROOT = Path(__file__).resolve().parent.parent

from bench_svid import FULL_SHAPES, random_llm_like  # noqa: E402

from onebit import kernels  # noqa: E402

BLOCKS = (1, 2, 4, 8)


def timed(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="ALS rounds per call (default 3)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per configuration")
    p.add_argument("--calls", type=int, default=10, help="op calls per timed run")
    args = p.parse_args(argv)
    if not kernels.available():
        sys.exit(f"bench_svid_kernel: {kernels.status()}")
    op = torch.ops.onebit.svid_rank1_als
    note = f"{args.rounds} rounds per call, median of {args.repeats} runs × {args.calls} calls"
    print("\n".join([*header("The SVID kernel's row schedules", note), ""]))
    print("| matrix | dtype | kernel | ms per round | GB/s | vs 1 row |")
    print("|---|---|---|---:|---:|---:|")
    for i, (name, shape) in enumerate(FULL_SHAPES.items()):
        w32 = random_llm_like(*shape, seed=i)  # the seeds bench_svid.py uses by default
        for dtype in (torch.float32, torch.bfloat16):
            W = w32.to(dtype)
            ref = op(W, args.rounds, -1.0, 1)
            configs: dict[str, tuple[Callable[[], object], int]] = {
                "one read (W.sum(dim=1))": (lambda W=W: W.sum(dim=1), 1)
            }
            schedules = [("default", 0, -1), ("1 row", 1, 0)] + [
                (f"{rows} rows, {'interleaved' if inter else 'one by one'}", rows, inter)
                for rows in BLOCKS[1:]
                for inter in (1, 0)
            ]
            for key, rows, inter in schedules:
                a, b, n = op(W, args.rounds, -1.0, rows, inter)
                if not (torch.equal(a, ref[0]) and torch.equal(b, ref[1]) and n == ref[2]):
                    raise AssertionError(f"{key} changed the result on {name}")
                configs[key] = (
                    lambda W=W, rows=rows, inter=inter: op(W, args.rounds, -1.0, rows, inter),
                    int(ref[2]),
                )
            times: dict[str, list[float]] = {k: [] for k in configs}
            for fn, _ in configs.values():
                fn()  # warm-up
            for _ in range(args.repeats):
                for key, (fn, rounds) in configs.items():
                    times[key].append(timed(fn, args.calls) / rounds)
            base = statistics.median(times["1 row"])
            for key, ts in times.items():
                t = statistics.median(ts)
                gbs = W.numel() * W.element_size() / t / 1e9
                label = f"{name} {shape[0]}×{shape[1]}"
                dt = str(dtype).removeprefix("torch.")
                print(f"| {label} | {dt} | {key} | {t * 1e3:.3f} | {gbs:.1f} | {base / t:.2f}× |")


if __name__ == "__main__":
    main()
