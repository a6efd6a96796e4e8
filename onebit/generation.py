"""Text generation with a KV cache, timed: prefill and decode tokens per second.

A plain loop over a Hugging Face causal LM (any model: full precision, a OneBit student or a packed
export): one forward over the prompt fills the cache (prefill), then one forward per new token
(decode). Greedy by default; sampling with temperature and top-k on request.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class GenerationStats:
    """Token counts and wall times of one :func:`generate` call."""

    prompt_tokens: int
    new_tokens: int
    prefill_s: float
    decode_s: float

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
) -> tuple[Tensor, GenerationStats]:
    """Generate up to ``max_new_tokens`` after ``input_ids`` with the model's KV cache.

    With ``warmup``, one untimed forward over the prompt's first token runs first, so that
    one-time set-up (kernel loading, first allocations) is not counted as prefill time.

    Shapes: input_ids (batch, prompt) → (batch, prompt + new).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    gen = torch.Generator(device=input_ids.device).manual_seed(seed) if do_sample else None
    if warmup:
        model(input_ids=input_ids[:, :1], use_cache=True)
    t0 = time.perf_counter()
    out = model(input_ids=input_ids, use_cache=True)
    nxt = _next_token(out.logits[:, -1], do_sample, temperature, top_k, gen)
    t1 = time.perf_counter()
    ids = [input_ids, nxt]
    cache = out.past_key_values
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None and bool((nxt == eos_token_id).all()):
            break
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        nxt = _next_token(out.logits[:, -1], do_sample, temperature, top_k, gen)
        ids.append(nxt)
    t2 = time.perf_counter()
    result = torch.cat(ids, dim=1)
    stats = GenerationStats(
        prompt_tokens=input_ids.shape[1],
        new_tokens=result.shape[1] - input_ids.shape[1],
        prefill_s=t1 - t0,
        decode_s=t2 - t1,
    )
    return result, stats


def peak_rss_bytes() -> int:
    """This process's peak resident memory (Linux: ru_maxrss is in KiB)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
