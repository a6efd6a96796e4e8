"""OneBit: 1-bit LLM weights by quantization-aware distillation (Xu et al., 2024)."""

__version__ = "0.1.0"
