"""The optimisation recipe of OneBit distillation, shared by every training loop.

AdamW with decoupled weight decay (none on biases), a linear warm-up and a cosine decay, as in the
paper. Parameters fall in groups by role, each with its own learning rate as a multiple of
``lr``:

    latent weights   W (only its sign reaches the forward pass)   lr · latent_lr
    value vectors    g = in_scale, h = out_scale, gains,          lr · scale_lr
                     full-precision outlier weights
    biases           kept from the source layer, no decay         lr

``latent_lr = scale_lr = 1`` is the paper's single learning rate. The LightningModule
(``onebit.train.module.OneBitDistillation``) builds its optimizer here; the results benchmark
(``benchmarks/results.py``) trains through that module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from onebit.config_utils import check_number, from_mapping
from onebit.errors import OneBitInputError

SCALE_SUFFIXES = ("in_scale", "out_scale", "out_gain", "outlier_value")


@dataclass
class OptimConfig:
    """AdamW with linear warm-up and cosine decay: the paper's recipe by default.

    Attributes:
        lr: peak learning rate.
        betas: Adam betas (paper: 0.9, 0.98).
        weight_decay: decoupled weight decay on latent weights and value vectors (not biases).
        eps: Adam epsilon.
        warmup_steps: linear warm-up from 0 to ``lr``.
        min_lr_ratio: the cosine decays to ``lr * min_lr_ratio`` at the last step.
        latent_lr: learning rate of the latent weights as a multiple of ``lr`` (paper: 1).
        scale_lr: learning rate of the value vectors g, h (and output gains and outlier weights)
            as a multiple of ``lr`` (paper: 1).
    """

    lr: float = 4e-4
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 500
    min_lr_ratio: float = 0.0
    latent_lr: float = 1.0
    scale_lr: float = 1.0

    def __post_init__(self) -> None:
        check_number("optim", "lr", self.lr, allow_zero=False)
        check_number("optim", "weight_decay", self.weight_decay)
        check_number("optim", "eps", self.eps, allow_zero=False)
        check_number("optim", "warmup_steps", self.warmup_steps)
        check_number("optim", "min_lr_ratio", self.min_lr_ratio)
        check_number("optim", "latent_lr", self.latent_lr)
        check_number("optim", "scale_lr", self.scale_lr)
        self.betas = tuple(self.betas)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise OneBitInputError(f"optim.betas={list(self.betas)} must be two numbers in [0, 1).")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> OptimConfig:
        return from_mapping(cls, values, "optim")


def cosine_with_warmup(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR factor: linear warm-up to 1 over ``warmup`` steps, then a cosine down to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """AdamW parameter groups of the trainable parameters of ``model``, by role (module docstring).

    Full-precision linears kept in a student (``quant.skip_modules``) are frozen by ``freeze_``;
    if a caller unfreezes them, their weights learn with the latent weights' rate. Empty groups
    are dropped, so the group list depends only on what ``model`` holds.
    """
    latents, scales, biases = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith(".bias"):
            biases.append(p)
        elif name.endswith(SCALE_SUFFIXES):
            scales.append(p)
        else:
            latents.append(p)
    groups = [
        {"params": latents, "weight_decay": optim.weight_decay, "lr": optim.lr * optim.latent_lr,
         "name": "latent"},
        {"params": scales, "weight_decay": optim.weight_decay, "lr": optim.lr * optim.scale_lr,
         "name": "scale"},
        {"params": biases, "weight_decay": 0.0, "lr": optim.lr, "name": "bias"},
    ]  # fmt: skip
    return [g for g in groups if g["params"]]


def make_optimizer(
    model: nn.Module, optim: OptimConfig, total_steps: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over :func:`param_groups` and its per-step warm-up + cosine schedule.

    Raises:
        OneBitInputError: when ``model`` has no trainable parameter.
    """
    groups = param_groups(model, optim)
    if not groups:
        raise OneBitInputError("the student has no trainable parameter; nothing to distil.")
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)
    warmup = min(optim.warmup_steps, total_steps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_with_warmup(s, warmup, total_steps, optim.min_lr_ratio)
    )
    return opt, sched
