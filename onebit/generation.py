"""Text generation with a KV cache, timed: prefill and decode tokens per second.

A plain loop over a Hugging Face causal LM (any model: full precision, a OneBit student or a packed
export): one forward over the prompt fills the cache (prefill), then one step per new token
(decode). Greedy by default; sampling with temperature and top-k on request.

Decode runs, with ``decoder="auto"`` (default), as one C++ call per token where
:mod:`onebit.decoder` supports the model (LLaMA, Mistral, Qwen2 on the CPU, batch 1), and
otherwise, or with ``decoder="model"``, as one forward of the model per token.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from onebit.errors import OneBitInputError


@dataclass
class GenerationStats:
    """Token counts and wall times of one :func:`generate` call."""

    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float
    decoder: str = "model"  # "step" (onebit.decoder) or "model" (the model's forward)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("nan")

    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first (which the prefill produces) per second of decode."""
        steps = self.new_tokens - 1
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else float("nan")


def _next_token(
    logits: Tensor, do_sample: bool, temperature: float, top_k: int, gen: torch.Generator | None
) -> Tensor:
    """Shapes: logits (batch, vocab) → (batch, 1)."""
    if not do_sample:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / max(temperature, 1e-6)
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=gen)


DECODERS = ("auto", "step", "model")


def _step_decoder(model: nn.Module, input_ids: Tensor, max_new_tokens: int, decoder: str, cache):
    """The C++ step decoder loaded with the prompt's cache, or None (``decoder="model"``, or
    ``"auto"`` on a model it does not support)."""
    if decoder == "model" or max_new_tokens < 2:
        return None
    from onebit.decoder import StepDecoder, unsupported

    batch, prompt = input_ids.shape
    length = prompt + max_new_tokens
    why = unsupported(model, length, batch)
    if why:
        if decoder == "step":
            raise OneBitInputError(
                f"decoder=step cannot run this model: {why}; use decoder=auto or decoder=model."
            )
        return None
    step = StepDecoder(model, length)
    step.load_cache(cache, prompt)
    return step


@torch.no_grad()
def generate(
    model: nn.Module,
    input_ids: Tensor,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
    eos_token_id: int | None = None,
    warmup: bool = True,
    decoder: str = "auto",
) -> tuple[Tensor, GenerationStats]:
    """Generate up to ``max_new_tokens`` after ``input_ids`` with the model's KV cache.

    With ``warmup``, one untimed forward over the prompt's first token runs first, so that
    one-time set-up (kernel loading, first allocations) is not counted as prefill time.
    ``decoder``: ``auto`` (the C++ step decoder where it supports the model, else the model's
    forward), ``step`` (the step decoder, or ``OneBitInputError`` naming why not) or ``model``.
    Setting up the step decoder counts as prefill time.

    Shapes: input_ids (batch, prompt) → (batch, prompt + new).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if decoder not in DECODERS:
        raise ValueError(f"decoder={decoder!r} is not one of {', '.join(DECODERS)}.")
    gen = torch.Generator(device=input_ids.device).manual_seed(seed) if do_sample else None
    if warmup:
        model(input_ids=input_ids[:, :1], use_cache=True)
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True)
    nxt = _next_token(out.logits[:, -1], do_sample, temperature, top_k, gen)
    cache = out.past_key_values
    step = _step_decoder(model, input_ids, max_new_tokens, decoder, cache)
    t1 = time.perf_counter()
    ids = [input_ids, nxt]
    pos = input_ids.shape[1]
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None and bool((nxt == eos_token_id).all()):
            break
        if step is not None:
            logits = step.step(int(nxt), pos)
            pos += 1
        else:
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            logits = out.logits[:, -1]
        nxt = _next_token(logits, do_sample, temperature, top_k, gen)
        ids.append(nxt)
    t2 = time.perf_counter()
    result = torch.cat(ids, dim=1)
    stats = GenerationStats(
        prompt_tokens=input_ids.shape[1],
        new_tokens=result.shape[1] - input_ids.shape[1],
        prefill_s=t1 - t0,
        decode_s=t2 - t1,
        decoder="model" if step is None else "step",
    )
    return result, stats


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux: ru_maxrss is in KiB)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
