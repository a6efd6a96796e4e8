"""Generate text from a 1-bit export (through the packed CPU kernel) or a full-precision model.

    python generate.py path=outputs/train/runs/<time>/onebit_model prompt="Once upon a time"
    python generate.py source=hf model=smollm2_135m max_new_tokens=32

Prints the text, then prefill and decode tokens/s and the peak resident memory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from onebit.config_utils import register_resolvers, torch_dtype

log = logging.getLogger("onebit.generate")


def load_for_generation(cfg: DictConfig):
    """(model, tokenizer) for ``cfg.source``: export or hf (``onebit.loading.load_model``)."""

    from onebit.errors import OneBitInputError
    from onebit.loading import load_model

    if cfg.source not in ("export", "hf"):
        raise OneBitInputError(f"source={cfg.source} is not one of export, hf.")
    loaded = load_model(
        cfg.source,
        path=cfg.path,
        model=OmegaConf.to_container(cfg.model, resolve=True) if cfg.source == "hf" else None,
        dtype=torch_dtype("dtype", cfg.dtype),
        prefill=cfg.prefill,
    )
    return loaded.model, loaded.tokenizer


def run(cfg: DictConfig) -> dict:
    import torch

    from onebit import kernels
    from onebit.errors import OneBitInputError
    from onebit.generation import DECODERS, generate, peak_rss_bytes
    from onebit.models import context_length
    from onebit.quant.footprint import human_bytes

    n_new = cfg.max_new_tokens
    if not isinstance(n_new, int) or isinstance(n_new, bool) or n_new < 1:
        raise OneBitInputError(f"max_new_tokens={n_new!r} must be an integer >= 1.")
    if cfg.decoder not in DECODERS:
        raise OneBitInputError(f"decoder={cfg.decoder} is not one of {', '.join(DECODERS)}.")
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    model, tok = load_for_generation(cfg)
    if tok is None:
        where = cfg.path if cfg.source == "export" else f"model {cfg.model.name}"
        raise OneBitInputError(
            f"{where} has no tokenizer (a tiny random model, as smoke runs use, has none), so "
            "there is no text to generate from; use a model with a tokenizer."
        )
    model.eval()
    ids = tok(cfg.prompt, return_tensors="pt").input_ids
    ctx = context_length(model.config)
    if ctx is not None and ids.shape[1] + n_new > ctx:
        raise OneBitInputError(
            f"the prompt ({ids.shape[1]:,} tokens) plus max_new_tokens={n_new} is "
            f"{ids.shape[1] + n_new:,} tokens, above the model's context of {ctx:,} positions; "
            "nothing was generated: shorten the prompt or lower max_new_tokens."
        )
    out, stats = generate(
        model,
        ids,
        n_new,
        do_sample=bool(cfg.do_sample),
        temperature=float(cfg.temperature),
        top_k=int(cfg.top_k),
        seed=int(cfg.seed),
        eos_token_id=tok.eos_token_id,
        decoder=str(cfg.decoder),
    )
    text = tok.decode(out[0], skip_special_tokens=True)
    rss = peak_rss_bytes()
    print(text)
    print(
        f"\n[{cfg.source}] prompt {stats.prompt_tokens} tokens, {stats.new_tokens} new | "
        f"prefill {stats.prefill_tokens_per_s:.1f} tok/s | decode {stats.decode_tokens_per_s:.2f} "
        f"tok/s ({stats.decoder} decoder) | peak RSS {human_bytes(rss)} | "
        f"threads {torch.get_num_threads()} | "
        f"{kernels.status()}"
    )
    return {"text": text, "stats": stats, "peak_rss": rss}


register_resolvers()  # ${onebit.cwd:} in conf/paths, before Hydra composes


@hydra.main(config_path="conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from onebit.errors import run_cli

    run_cli(run, cfg)


if __name__ == "__main__":
    from onebit.train.preflight import exit_on_bad_command_line

    exit_on_bad_command_line(Path(__file__).resolve().parent / "conf", config_name="generate")
    main()
