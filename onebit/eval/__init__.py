"""Evaluation: perplexity by the GPTQ protocol, zero-shot accuracy through lm-evaluation-harness."""

from onebit.eval.perplexity import PerplexityResult, c4_ids, perplexity, wikitext2_ids

__all__ = ["PerplexityResult", "c4_ids", "perplexity", "wikitext2_ids"]
