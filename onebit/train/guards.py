"""Numerical guards: catch a non-finite loss or gradient at the step it happens, and say where.

The policy is :class:`GuardConfig`: ``stop`` raises :class:`NonFiniteError` naming the step, every
loss term and the first parameter, layer output or gradient that is NaN/inf; ``skip`` drops the
step (no weight or optimizer-state update; the step still counts toward ``max_steps`` and the
learning-rate schedule, as with fp16 loss scaling), counts it, and stops only after
``max_consecutive_skips`` skipped steps in a row (a model whose weights are NaN never recovers).

Plain PyTorch: the LightningModule calls these helpers; nothing here imports Lightning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from onebit.config_utils import check_choice, from_mapping
from onebit.errors import OneBitInputError, OneBitRunError

POLICIES = ("stop", "skip")


class NonFiniteError(OneBitRunError):
    """A NaN/inf loss or gradient stopped the run (the message names the step, terms and layer)."""


@dataclass
class GuardConfig:
    """What to do when the loss or a gradient is NaN/inf.

    Attributes:
        nonfinite: ``stop`` (raise, naming the step, the loss terms and the offending layer) or
            ``skip`` (drop the step and count it; ``train/nonfinite_skipped`` logs the count).
        max_consecutive_skips: with ``skip``, stop anyway after this many skipped steps in a row.
    """

    nonfinite: str = "stop"
    max_consecutive_skips: int = 10

    def __post_init__(self) -> None:
        check_choice("guard", "nonfinite", self.nonfinite, POLICIES)
        n = self.max_consecutive_skips
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise OneBitInputError(f"guard.max_consecutive_skips={n!r} must be an integer >= 1.")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> GuardConfig:
        return from_mapping(cls, dict(values), "guard")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def is_finite(t: Tensor) -> bool:
    """True when every entry of ``t`` is finite (one device-to-host sync)."""
    return bool(torch.isfinite(t.detach()).all())


def format_terms(terms: Mapping[str, Tensor]) -> str:
    """``loss=nan, kd=nan, hidden=0.4121``: every loss term, the total first."""
    keys = ["loss", *sorted(k for k in terms if k != "loss")]
    return ", ".join(f"{k}={float(terms[k].detach()):.4g}" for k in keys if k in terms)


def first_nonfinite(named: Iterable[tuple[str, Tensor | None]]) -> str | None:
    """The name of the first tensor that holds NaN or inf (None tensors are skipped)."""
    for name, t in named:
        if t is not None and t.is_floating_point() and not is_finite(t):
            return name
    return None


def _tensors(out: Any) -> Iterable[Tensor]:
    if isinstance(out, Tensor):
        yield out
    elif isinstance(out, Mapping):
        for v in out.values():
            yield from _tensors(v)
    elif isinstance(out, list | tuple):
        for v in out:
            yield from _tensors(v)


def first_nonfinite_output(model: nn.Module, run: Callable[[], Any]) -> str | None:
    """Run ``run()`` (a forward pass of ``model``) and name the first module whose output is
    non-finite, in the order modules finish: the innermost layer where NaN/inf appears."""
    found: list[str] = []

    def hook(name: str, module: nn.Module, args: Any, out: Any) -> None:
        if not found and any(t.is_floating_point() and not is_finite(t) for t in _tensors(out)):
            found.append(name)

    handles = [
        m.register_forward_hook(lambda mod, a, o, n=name: hook(n, mod, a, o))
        for name, m in model.named_modules()
        if name
    ]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def locate_nonfinite(
    student: nn.Module, teacher: nn.Module | None, forward: Callable[[nn.Module], Any]
) -> str:
    """Where a non-finite loss comes from, as a phrase: a parameter, a layer output or the loss.

    ``forward(model)`` runs ``model`` on the offending batch.
    """
    name = first_nonfinite(student.named_parameters())
    if name is not None:
        return f"parameter {name} of the student holds NaN/inf"
    name = first_nonfinite_output(student, lambda: forward(student))
    if name is not None:
        return f"the output of student layer {name} is the first NaN/inf"
    if teacher is not None:
        name = first_nonfinite_output(teacher, lambda: forward(teacher))
        if name is not None:
            return f"the output of teacher layer {name} is the first NaN/inf"
    return "every layer output is finite on a second forward pass (the loss itself overflowed)"
