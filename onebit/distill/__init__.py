"""Quantization-aware knowledge distillation losses (plain PyTorch)."""

from onebit.distill.losses import (
    DistillLoss,
    DistillLossConfig,
    hidden_mse,
    lm_cross_entropy,
    logit_kd,
)

__all__ = ["DistillLoss", "DistillLossConfig", "hidden_mse", "lm_cross_entropy", "logit_kd"]
