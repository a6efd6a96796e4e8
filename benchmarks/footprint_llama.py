"""Bits per weight and size at rest of LLaMA-7B and LLaMA-13B as OneBit models.

Built on the ``meta`` device from the real architectures (no weights, no download):

    python benchmarks/footprint_llama.py
"""

from __future__ import annotations

import torch

from onebit.models import llama_config
from onebit.quant import footprint


def main() -> None:
    from transformers import LlamaForCausalLM

    for name, size in (("LLaMA-7B", "7b"), ("LLaMA-13B", "13b")):
        with torch.device("meta"):
            model = LlamaForCausalLM(llama_config(size))
        print(f"## {name}\n```\n{footprint(model).format()}\n```")


if __name__ == "__main__":
    main()
