"""Quantization-aware knowledge distillation losses (plain PyTorch)."""

from onebit.distill.blockwise import BlockwiseConfig, blockwise_reconstruct_
from onebit.distill.losses import (
    DistillLoss,
    DistillLossConfig,
    attention_kl,
    hidden_mse,
    lm_cross_entropy,
    logit_kd,
)

__all__ = [
    "BlockwiseConfig",
    "DistillLoss",
    "DistillLossConfig",
    "attention_kl",
    "blockwise_reconstruct_",
    "hidden_mse",
    "lm_cross_entropy",
    "logit_kd",
]
