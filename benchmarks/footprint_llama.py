"""Bits per weight and size at rest of LLaMA-7B and LLaMA-13B as OneBit models.

Built on the ``meta`` device from the real architectures (no weights, no download):

    python benchmarks/footprint_llama.py
"""

from __future__ import annotations

import torch

from onebit.quant import footprint

SHAPES = {  # hidden, intermediate, layers, heads (vocab 32000, untied lm_head)
    "LLaMA-7B": (4096, 11008, 32, 32),
    "LLaMA-13B": (5120, 13824, 40, 40),
}


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    for name, (hidden, inter, layers, heads) in SHAPES.items():
        cfg = LlamaConfig(
            vocab_size=32000,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
        print(f"## {name}\n```\n{footprint(model).format()}\n```")


if __name__ == "__main__":
    main()
