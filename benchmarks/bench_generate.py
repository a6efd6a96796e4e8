"""Load-and-generate benchmark: memory and tokens/s of 1-bit exports against full precision.

Rows, each measured in a fresh subprocess (so its resident memory is its own):

    llama7b-random (OneBit)  a LLaMA-7B-architecture export with random signs, value vectors and
                             fp16 embeddings/lm_head (LLaMA-7B itself cannot be downloaded here),
                             built without any dense matrix and written to --llama7b-dir
    smollm2_135m (OneBit)    SmolLM2-135M quantized with SVID (no training: speed and memory do
                             not depend on it), exported in fp16
    smollm2_135m (FP)        the full-precision SmolLM2-135M (fp32, dequantized from its GGUF)

For each: file size, resident memory after loading (safetensors maps the file: pages count once
touched) and the process's peak (VmHWM, at the end), prefill tokens/s over
--prompt-tokens random tokens and decode tokens/s over --new-tokens greedy tokens with the KV
cache (onebit.generation.generate, the loop generate.py uses, with its default decoder: the C++
step of onebit.decoder for these LLaMA-architecture models). The decode limit is the bytes a
token must read (every packed or dense weight once, lm_head included, embeddings excluded) over
the read bandwidth measured here first (sum of a 1 GiB fp32 tensor).

    python benchmarks/bench_generate.py                  # ~5 minutes; writes 1.3 GB under /tmp
    python benchmarks/bench_generate.py --skip-llama7b   # the SmolLM2 rows only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from harness import header, proc_status, read_bandwidth

REPO_ROOT = Path(__file__).resolve().parent.parent

SMOLLM2 = REPO_ROOT / "conf" / "model" / "smollm2_135m.yaml"


def llama7b_config():
    from onebit.models import llama_config

    return llama_config("7b")


def build_llama7b_export(path: Path, seed: int = 0) -> Path:
    """A random LLaMA-7B-architecture OneBit export, built layer by layer (~1.4 GB of RAM)."""
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import LlamaForCausalLM

    from onebit.export import save_onebit
    from onebit.quant import OneBitConfig, PackedOneBitLinear
    from onebit.quant.convert import _set_submodule, iter_target_linears

    g = torch.Generator().manual_seed(seed)
    with init_empty_weights(include_buffers=False):  # parameters on meta: nothing allocated
        model = LlamaForCausalLM(llama7b_config())
    for name, lin in list(iter_target_linears(model)):
        p = PackedOneBitLinear(lin.in_features, lin.out_features, dtype=torch.float16)
        with torch.no_grad():
            p.packed_signs.copy_(torch.randint(0, 256, p.packed_signs.shape, generator=g))
            p.in_scale.copy_(0.5 + torch.rand(lin.in_features, generator=g))
            p.out_scale.copy_(0.01 * (0.5 + torch.rand(lin.out_features, generator=g)))
        _set_submodule(model, name, p)
    for module in model.modules():  # embeddings, norms, lm_head: random fp16
        for pname, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                t = torch.empty(param.shape, dtype=torch.float16)
                if pname == "weight" and param.ndim == 1:
                    t.fill_(1.0)
                else:
                    t.copy_(0.02 * torch.randn(param.shape, generator=g))
                setattr(module, pname, nn.Parameter(t, requires_grad=False))
    quant = OneBitConfig()
    return save_onebit(
        model, path, quant, dtype=torch.float16, extra={"note": "random weights (benchmark)"}
    )


def weight_bytes_per_token(model) -> int:
    """Bytes of every decoder-block weight (packed or dense) and lm_head; embeddings excluded."""
    total = 0
    emb = model.get_input_embeddings().weight
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.data_ptr() == emb.data_ptr() and "lm_head" not in name:
            continue
        if "rotary" in name:
            continue
        total += t.numel() * t.element_size()
    return total


def child(args: argparse.Namespace) -> None:
    """Runs in the subprocess: load, generate, print one JSON line."""
    from omegaconf import OmegaConf

    from onebit.generation import generate

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.child_kind == "export":
        from onebit.export import load_onebit

        model = load_onebit(args.child_path)
    else:
        from onebit.models import load_causal_lm

        model = load_causal_lm(OmegaConf.to_container(OmegaConf.load(SMOLLM2)))
    load_s = time.perf_counter() - t0
    rss_loaded = proc_status("VmRSS")
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, args.prompt_tokens))
    generate(model, ids[:, :4], max_new_tokens=2)  # warm-up (first-call costs)
    _, stats = generate(model, ids, max_new_tokens=args.new_tokens)
    print(
        json.dumps(
            {
                "load_s": load_s,
                "rss_loaded": rss_loaded,
                "peak_rss": proc_status("VmHWM"),  # this process's own peak (not the parent's)
                "prefill_tok_s": stats.prefill_tokens_per_s,
                "decode_tok_s": stats.decode_tokens_per_s,
                "bytes_per_token": weight_bytes_per_token(model),
                "threads": torch.get_num_threads(),
                "decoder": stats.decoder,
            }
        )
    )


def measure(kind: str, path: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child-kind",
        kind,
        "--child-path",
        path,
        "--prompt-tokens",
        str(args.prompt_tokens),
        "--new-tokens",
        str(args.new_tokens),
        "--threads",
        str(args.threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{kind} {path} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def smollm2_export(path: Path) -> Path:
    from omegaconf import OmegaConf

    from onebit.export import save_onebit
    from onebit.models import load_causal_lm
    from onebit.quant import OneBitConfig, freeze_, quantize_

    spec = OmegaConf.to_container(OmegaConf.load(SMOLLM2))
    student = freeze_(quantize_(load_causal_lm(spec), OneBitConfig()))
    return save_onebit(student, path, OneBitConfig(), dtype=torch.float16, extra={"model": spec})


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--llama7b-dir", type=Path, default=Path("/tmp/onebit-llama7b-random"))
    p.add_argument("--smollm2-dir", type=Path, default=Path("/tmp/onebit-smollm2-svid"))
    p.add_argument("--skip-llama7b", action="store_true")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--child-kind", help=argparse.SUPPRESS)
    p.add_argument("--child-path", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_kind:
        child(args)
        return
    from onebit.quant.footprint import human_bytes

    t_start = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    bw = read_bandwidth()
    rows = []
    if not args.skip_llama7b:
        if not (args.llama7b_dir / "config.json").is_file():
            print(f"building {args.llama7b_dir} ...", file=sys.stderr, flush=True)
            build_llama7b_export(args.llama7b_dir)
        rows.append(("llama7b-random (OneBit)", args.llama7b_dir, "export"))
    print(f"building {args.smollm2_dir} ...", file=sys.stderr, flush=True)
    smollm2_export(args.smollm2_dir)
    rows.append(("smollm2_135m (OneBit)", args.smollm2_dir, "export"))
    rows.append(("smollm2_135m (FP, fp32)", None, "hf"))
    lines = [
        *header("Load and generate: 1-bit exports vs full precision"),
        f"- read bandwidth measured now: {bw:.1f} GB/s; prompt {args.prompt_tokens} random "
        f"tokens, {args.new_tokens} greedy new tokens, after a 2-token warm-up",
        "",
        "| model | on disk | RSS after load | peak RSS | load (s) | prefill tok/s "
        "| decode tok/s | decoder | weight bytes / token | decode limit (bw ÷ bytes) "
        "| % of limit |",
        "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for name, path, kind in rows:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        r = measure(kind, str(path) if path else "", args)
        limit = bw * 1e9 / r["bytes_per_token"]
        disk = human_bytes(dir_size(path)) if path else "(GGUF)"
        lines.append(
            f"| {name} | {disk} | {human_bytes(r['rss_loaded'])} | {human_bytes(r['peak_rss'])} "
            f"| {r['load_s']:.1f} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} "
            f"| {r['decoder']} | {human_bytes(r['bytes_per_token'])} | {limit:.1f} "
            f"| {r['decode_tok_s'] / limit:.0%} |"
        )
    lines += ["", f"Total wall time: {time.perf_counter() - t_start:.0f} s"]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
