"""Per-layer time of the packed 1-bit layer against dense layers, side by side in one run.

For LLaMA-7B layer shapes (out × in) and 1 token (decode) or 512 tokens (prefill), it times

    dense fp32      F.linear(x, W) with W fp32 (what the teacher does)
    dense bf16      F.linear(x, W) with x and W bf16
    official-style  the whole sign matrix unpacked from the bits on every call, then the layer's
                    math densely (the official inference code does this, in fp16 on GPU); this is
                    PackedOneBitLinear with the C++ kernels disabled
    onebit          PackedOneBitLinear with the C++ kernel (exact fp32: bit masks for decode,
                    unpacked ±1 tiles + BLAS GEMM for prefill); includes g, h and the LayerNorm
    onebit bf16     the same with prefill="bf16" (512 tokens only; lossy, see the README)
    onebit int8     the same with prefill="int8" (512 tokens only; lossy, see the README)

Methods are run round-robin (one call of each per round, after a warm-up round), so they share
the machine's state; the table gives the median per call. Each method cycles through copies of
its weights totalling at least 128 MiB (4× the 32 MiB L3 cache), so that weights stream from
memory as they do in a real model instead of staying in cache (a single packed 4096×4096 layer,
2 MiB, would). "GB/s" is the weight bytes a method must
read per call (dense: 4 or 2 bytes per weight; packed: 1/8 byte per weight plus g and h) divided by
its time, next to this machine's read bandwidth measured in the same run (sum of a 1 GiB fp32
tensor, same threads). Run:

    python benchmarks/bench_packed.py                   # ~2 minutes on 2 cores
    python benchmarks/bench_packed.py --rounds 5 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from harness import header, read_bandwidth

from onebit.models import llama_linear_shapes

REPO_ROOT = Path(__file__).resolve().parent.parent

_LLAMA7B = llama_linear_shapes("7b")
SHAPES = {
    "q/k/v/o_proj": _LLAMA7B["q_proj"],
    "gate/up_proj": _LLAMA7B["gate_proj"],
    "down_proj": _LLAMA7B["down_proj"],
}


def make_layer(out_f: int, in_f: int, seed: int):
    """A packed layer with random signs and positive value vectors, and the dense W it encodes."""
    from onebit.quant import PackedOneBitLinear
    from onebit.quant.packing import pack_signs, tile_signs

    g = torch.Generator().manual_seed(seed)
    W = 0.02 * torch.randn(out_f, in_f, generator=g)
    layer = PackedOneBitLinear(in_f, out_f, output_norm=True)
    with torch.no_grad():
        layer.packed_signs.copy_(tile_signs(pack_signs(W), in_f))
        layer.in_scale.copy_(W.abs().mean(0))
        layer.out_scale.copy_(W.abs().mean(1))
    return layer.eval(), W


def l3_bytes(default: int = 32 * 2**20) -> int:
    """This CPU's last-level cache (Linux sysfs), or ``default``."""
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        return int(text.rstrip("KMG")) * scale
    except (OSError, ValueError):
        return default


# each method's weights cycle through at least twice the L3 (a shared L3 of a cloud host can be
# hundreds of MB), so that they stream from memory as a real model's do
WORKING_SET = max(128 * 2**20, 2 * l3_bytes())


def copies(nbytes: int) -> int:
    """How many copies of ``nbytes`` of weights exceed WORKING_SET."""
    return max(1, -(-WORKING_SET // nbytes))


def shuffled(layer, seed: int):
    """A copy of a packed layer with other random signs (same shapes, its own memory)."""
    from onebit.quant import PackedOneBitLinear

    g = torch.Generator().manual_seed(seed)
    p = PackedOneBitLinear(layer.in_features, layer.out_features, output_norm=True)
    with torch.no_grad():
        p.packed_signs.copy_(torch.randint(0, 256, p.packed_signs.shape, generator=g))
        p.in_scale.copy_(layer.in_scale)
        p.out_scale.copy_(layer.out_scale)
    return p.eval()


def with_prefill(layers: list, x: torch.Tensor, mode: str, k: int) -> torch.Tensor:
    layer = layers[k % len(layers)]
    layer.prefill = mode
    try:
        return layer(x)
    finally:
        layer.prefill = "fp32"


def with_isa(layers: list, x: torch.Tensor, isa: str, k: int) -> torch.Tensor:
    """A decode call of the packed layer with the kernel on instruction set ``isa``."""
    from onebit import kernels

    with kernels.forced_isa(isa):
        return layers[k % len(layers)](x)


def run(args: argparse.Namespace) -> list[str]:
    from onebit import kernels

    if args.threads:
        torch.set_num_threads(args.threads)
    if not kernels.available():
        raise SystemExit(f"the C++ kernels are needed for this benchmark: {kernels.status()}")
    bw = read_bandwidth(max(3, args.rounds))
    rows = []
    for name, (out_f, in_f) in SHAPES.items():
        layer, W = make_layer(out_f, in_f, seed=out_f + in_f)
        packed_bytes = out_f * ((in_f + 7) // 8) + 4 * (out_f + in_f)
        # Weights stream from memory as in a real model, not from cache: each method cycles
        # through enough copies of its weights to exceed WORKING_SET (twice this CPU's L3).
        dense32 = [W] + [W.roll(k, 0) for k in range(1, copies(4 * W.numel()))]
        dense16 = [w.bfloat16() for w in (dense32 * 4)[: copies(2 * W.numel())]]
        packed = [layer] + [shuffled(layer, k) for k in range(1, copies(packed_bytes))]
        for tokens in (1, 512):
            x = torch.randn(tokens, in_f)
            x_bf16 = x.bfloat16()

            def official(k: int, x=x, packed=packed) -> torch.Tensor:
                with kernels.disabled():
                    return packed[k % len(packed)](x)

            methods: dict[str, tuple[Callable[[int], torch.Tensor], int]] = {
                "dense fp32": (
                    lambda k, x=x, ws=dense32: F.linear(x, ws[k % len(ws)]),
                    4 * out_f * in_f,
                ),
                "dense bf16": (
                    lambda k, x=x_bf16, ws=dense16: F.linear(x, ws[k % len(ws)]),
                    2 * out_f * in_f,
                ),
                "official-style": (official, packed_bytes),
                "onebit": (lambda k, x=x, ls=packed: ls[k % len(ls)](x), packed_bytes),
            }
            if tokens == 1:  # the decode kernel on each lower instruction set this CPU has
                for isa in kernels.ISAS[1 : kernels.ISAS.index(kernels.isa())]:
                    methods[f"onebit {isa}"] = (
                        partial(with_isa, packed, x, isa),
                        packed_bytes,
                    )
            if tokens > 1:
                methods["onebit bf16"] = (partial(with_prefill, packed, x, "bf16"), packed_bytes)
                methods["onebit int8"] = (partial(with_prefill, packed, x, "int8"), packed_bytes)
            times: dict[str, list[float]] = {m: [] for m in methods}
            calls = dict.fromkeys(methods, 0)
            with torch.no_grad():
                for r in range(args.rounds + 1):  # round 0 warms up and is discarded
                    for m, (fn, _) in methods.items():
                        reps = 1 if tokens > 1 or m == "official-style" else args.decode_reps
                        t0 = time.perf_counter()
                        for _ in range(reps):
                            fn(calls[m])
                            calls[m] += 1
                        if r:
                            times[m].append((time.perf_counter() - t0) / reps)
            print(f"[{name} {out_f}×{in_f}, {tokens} token(s)] done", file=sys.stderr, flush=True)
            base = statistics.median(times["dense fp32"])
            for m, (_, nbytes) in methods.items():
                t = statistics.median(times[m])
                rows.append(
                    f"| {name} | {out_f}×{in_f} | {tokens} | {m} | {t * 1e3:.3f} "
                    f"| {base / t:.2f}x | {nbytes / t / 1e9:.1f} | {nbytes / t / 1e9 / bw:.0%} |"
                )
        del dense32, dense16, packed
    head = [
        *header("Packed 1-bit layer vs dense layers"),
        f"- read bandwidth measured now (sum of 1 GiB fp32): {bw:.1f} GB/s",
        f"- median over {args.rounds} rounds (round-robin, after one warm-up round); decode "
        f"calls of the fast methods are repeated {args.decode_reps}× per round and averaged",
        "- GB/s: weight bytes read per call / time; % bw: that over the measured bandwidth; "
        f"weights cycle through copies of ≥ {WORKING_SET >> 20} MiB per method (not cached)",
        "",
        "| layer | out×in | tokens | method | ms / call | vs dense fp32 | GB/s | % bw |",
        "|---|---|---:|---|---:|---:|---:|---:|",
    ]
    return head + rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (median)")
    p.add_argument("--decode-reps", type=int, default=20, help="decode calls per round")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    lines = run(args)
    lines += ["", f"Total wall time: {time.perf_counter() - t0:.0f} s"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
