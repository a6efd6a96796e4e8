"""Validation helpers shared by the library's config dataclasses (one clear sentence per error)."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, TypeVar

from onebit.errors import OneBitInputError

T = TypeVar("T")


def check_choice(section: str, key: str, value: Any, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` naming ``section.key`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise OneBitInputError(f"{section}.{key}={value!r} is not one of {', '.join(choices)}.")


def check_number(section: str, key: str, value: Any, *, allow_zero: bool = True) -> None:
    """Raise ``ValueError`` naming ``section.key`` unless ``value`` is finite and >= 0 (> 0)."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise OneBitInputError(f"{section}.{key}={value!r} must be a finite number {bound}.")


def check_int(section: str, key: str, value: Any, low: int) -> None:
    """Raise ``OneBitInputError`` naming ``section.key`` unless ``value`` is an integer (not a
    bool) >= ``low``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise OneBitInputError(f"{section}.{key}={value!r} must be an integer >= {low}.")


DTYPE_NAMES = ("float32", "bfloat16", "float16")


def torch_dtype(key: str, value: Any):
    """The torch dtype that ``value`` names (``float32``, ``bfloat16``, ``float16``); one
    sentence naming ``key`` for anything else."""
    import torch

    if value not in DTYPE_NAMES:
        raise OneBitInputError(f"{key}={value!r} is not one of {', '.join(DTYPE_NAMES)}.")
    return getattr(torch, value)


def from_mapping(cls: type[T], values: dict[str, Any], section: str) -> T:
    """Build dataclass ``cls`` from a plain mapping (e.g. a Hydra node), naming any unknown key."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise OneBitInputError(
            f"{section} has unknown key(s) {', '.join(unknown)}; "
            f"valid keys: {', '.join(sorted(known))}."
        )
    return cls(**values)


def launch_dir() -> str:
    """The directory the command was started from: Hydra's ``runtime.cwd`` inside a job, the
    process's working directory before one (a multirun resolves ``hydra.sweep.dir`` there)."""
    import os

    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.cwd)
    return os.getcwd()


def register_resolvers() -> None:
    """The config's own interpolations (``${onebit.cwd:}``, used by ``conf/paths``); scripts call
    this before Hydra composes their config."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("onebit.cwd"):
        OmegaConf.register_new_resolver("onebit.cwd", launch_dir)
