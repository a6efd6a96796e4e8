"""Model sources: tiny random-init causal LMs of each supported architecture.

The tiny builders give every architecture OneBit supports (LLaMA, Mistral, Qwen2, Qwen3, OPT, GPT-2)
in a few thousand parameters, for tests and smoke runs that must not touch the network.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

TINY_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "opt", "gpt2")


def tiny_config(arch: str, **overrides: Any):
    """A tiny Hugging Face config of architecture ``arch`` (hidden 32, 2 layers, vocab 128)."""
    import transformers as tf

    llama_like = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if arch == "llama":
        cfg = tf.LlamaConfig(**llama_like)
    elif arch == "mistral":
        cfg = tf.MistralConfig(**llama_like, sliding_window=None)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(**llama_like)
    elif arch == "qwen3":
        cfg = tf.Qwen3Config(**llama_like, head_dim=8)
    elif arch == "opt":
        cfg = tf.OPTConfig(
            vocab_size=128,
            hidden_size=32,
            ffn_dim=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=32,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        )
    elif arch == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=128,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=128,
            bos_token_id=0,
            eos_token_id=0,
        )
    else:
        raise ValueError(f"model.arch={arch!r} is not one of {', '.join(TINY_ARCHS)}.")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_causal_lm(arch: str = "llama", seed: int = 0, **overrides: Any) -> nn.Module:
    """A tiny random-init causal LM of architecture ``arch``, in eval mode, deterministic in
    ``seed``.
    """
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    return model.eval()
