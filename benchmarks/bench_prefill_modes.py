"""Accuracy and speed of the packed layer's prefill modes (fp32, bf16, int8), and accuracy of its
decode paths, on a real export.

Loads a 1-bit export, evaluates WikiText-2 perplexity (GPTQ protocol, the first --windows windows
of --seqlen tokens) with each prefill mode of ``PackedOneBitLinear`` (every window is one many-token
forward, so the mode decides all the arithmetic of the packed layers), and times the forward passes.
The same windows and the same model are used for every mode, in one process; the reference path
(whole sign matrix unpacked, F.linear, fp32) is the baseline the kernel must match.

Decode: on the first --decode-tokens tokens of the text, the step decoder (``onebit.decoder``, one
token at a time through the decode kernel) on each instruction set this CPU has, against the
reference path's forward over the whole sequence: the largest logit difference relative to the
largest |logit|, and how many of the greedy next-token choices differ. With
--generate-tokens, greedy generation through the step decoder is compared with the reference
path's token by token.

    python benchmarks/bench_prefill_modes.py --export outputs/train/runs/<time>/onebit_model
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from harness import header

REPO_ROOT = Path(__file__).resolve().parent.parent

WIKITEXT2 = REPO_ROOT.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", type=Path, required=True, help="a 1-bit export directory")
    p.add_argument("--wikitext2", type=Path, default=WIKITEXT2, help="wiki.test.raw")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--decode-tokens", type=int, default=256, help="0: no decode table")
    p.add_argument("--generate-tokens", type=int, default=64)
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    from onebit import kernels
    from onebit.eval.perplexity import perplexity, wikitext2_ids
    from onebit.export import load_onebit
    from onebit.models import ModelSpec, load_tokenizer
    from onebit.quant.packed_linear import PREFILL_MODES, set_prefill_mode_

    model = load_onebit(args.export, dtype=torch.float32)  # fp32 activations around the layers
    try:
        tok = AutoTokenizer.from_pretrained(args.export, local_files_only=True)
    except (OSError, ValueError):
        tok = load_tokenizer(ModelSpec.from_dict(model.config.onebit["model"]))
    ids = wikitext2_ids(tok, args.wikitext2)
    seqlen = min(args.seqlen, getattr(model.config, "max_position_embeddings", args.seqlen))
    rows = []
    for mode in ("reference", *PREFILL_MODES):
        print(f"{mode} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        if mode == "reference":
            with kernels.disabled():
                res = perplexity(model, ids, seqlen, max_windows=args.windows)
        else:
            set_prefill_mode_(model, mode)
            res = perplexity(model, ids, seqlen, max_windows=args.windows)
        rows.append((mode, res, time.perf_counter() - t0))
    ref_ppl = rows[0][1].ppl
    ref_t = rows[0][2]
    fp32_t = rows[1][2]
    lines = [
        *header(
            "Prefill modes of the packed layer: WikiText-2 perplexity and time",
            f"export: `{args.export}`; {rows[0][1].n_tokens:,} tokens in {args.windows} windows "
            f"of {seqlen}",
        ),
        "",
        "| prefill | Wiki2 ppl | vs reference | time (s) | speed-up vs reference "
        "| vs fp32 kernel |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode, res, t in rows:
        lines.append(
            f"| {mode} | {res.ppl:.4f} | {(res.ppl / ref_ppl - 1) * 100:+.3f} % | {t:.1f} "
            f"| {ref_t / t:.2f}x | {fp32_t / t:.2f}x |"
        )
    if args.decode_tokens:
        lines += ["", *decode_table(model, ids[: args.decode_tokens], args.generate_tokens)]
    print("\n".join(lines))


def decode_table(model, seq: torch.Tensor, new_tokens: int) -> list[str]:
    """Markdown rows: each instruction set's step decoder against the reference forward."""
    from onebit import kernels
    from onebit.decoder import StepDecoder, unsupported
    from onebit.generation import generate

    why = unsupported(model, len(seq) + new_tokens)
    if why:
        return [f"(no decode table: the step decoder cannot run this model: {why})"]
    with torch.no_grad(), kernels.disabled():
        ref = model(input_ids=seq[None]).logits[0].float()
        prompt = seq[None, :16]
        ref_gen = generate(model, prompt, new_tokens, decoder="model", warmup=False)[0]
    scale = float(ref.abs().max())
    rows = [
        f"Decode: {len(seq)} tokens of the text fed one at a time (teacher-forced), and "
        f"{new_tokens} greedy tokens after its first 16; reference: kernels off, the forward",
        "",
        "| decode path | max \\|Δ logit\\| / max \\|logit\\| | argmax differs | greedy tokens "
        "equal |",
        "|---|---:|---:|---:|",
    ]
    for isa in kernels.ISAS[: kernels.ISAS.index(kernels.isa()) + 1]:
        with torch.no_grad(), kernels.forced_isa(isa):
            dec = StepDecoder(model, len(seq))
            got = torch.cat([dec.step(int(t), i) for i, t in enumerate(seq.tolist())])
            gen = generate(model, prompt, new_tokens, decoder="step", warmup=False)[0]
        diff = float((got - ref).abs().max()) / scale
        argmax = int((got.argmax(-1) != ref.argmax(-1)).sum())
        equal = int((gen == ref_gen).all(0).long().cumprod(0).sum()) - prompt.shape[1]
        rows.append(f"| step, {isa} | {diff:.2e} | {argmax} of {len(seq)} | {equal} of "
                    f"{new_tokens} |")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
