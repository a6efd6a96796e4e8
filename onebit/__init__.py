"""OneBit: 1-bit LLM weights by quantization-aware distillation (Xu et al., 2024)."""

__version__ = "0.1.0"

from onebit.hf import register as _register_with_transformers

_register_with_transformers()  # AutoModelForCausalLM.from_pretrained(<export>) builds packed layers


def load_pretrained(path, dtype=None):
    """Load a 1-bit export directory as a model with packed layers (``onebit.export.load_onebit``).

    Runs through the C++ CPU kernel where it is available; no dense weight matrix is built.
    """
    from onebit.export import load_onebit

    return load_onebit(path, dtype=dtype)
