"""One way to load a model for evaluation, generation and export, whatever it was saved as.

    load_model("hf", model=spec)                  the full-precision model ``spec`` names
    load_model("export", path="out/onebit_model") a packed 1-bit export (``onebit.export``)
    load_model("checkpoint", path="last.ckpt")    the student of a ``train.py`` checkpoint

A checkpoint's student is built from its model's config without weights and takes the
checkpoint's tensors (:func:`student_from_checkpoint`): no teacher is loaded and no SVID runs, so
memory holds the checkpoint once. Plain PyTorch and Transformers: no Lightning, no Hydra.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from onebit.errors import OneBitInputError
from onebit.models import ModelSpec

SOURCES = ("hf", "export", "checkpoint")


@dataclass
class Loaded:
    """A loaded model, its tokenizer (None when it has none), a name for tables, and the spec of
    the full-precision model it is or was made from."""

    model: nn.Module
    tokenizer: Any | None
    name: str
    spec: ModelSpec | None


def student_from_checkpoint(path: str | Path) -> tuple[nn.Module, ModelSpec, Any, dict]:
    """(student, model spec, quant config, the checkpoint without its state dict) of the
    ``train.py`` checkpoint at ``path`` (a ``.ckpt`` file or a sharded directory), verified
    against its checksum and loaded without running pickled code.

    Raises:
        OneBitInputError: the checkpoint is missing, corrupt, not written by ``train.py``, or does
            not fit its model's architecture.
    """
    from onebit.checkpoint import load_checkpoint_file
    from onebit.export import student_from_state
    from onebit.models import model_config
    from onebit.quant import OneBitConfig

    ckpt = load_checkpoint_file(path)
    hp = ckpt.get("hyper_parameters") or {}
    if "model" not in hp or "quant" not in hp or "state_dict" not in ckpt:
        raise OneBitInputError(f"{path} is not a checkpoint written by train.py.")
    spec = ModelSpec.from_dict(hp["model"])
    quant = OneBitConfig.from_dict(hp["quant"])
    prefix = "student."
    state = {k[len(prefix) :]: v for k, v in ckpt.pop("state_dict").items() if k.startswith(prefix)}
    student = student_from_state(model_config(spec), quant, state, spec.torch_dtype)
    # what it was made from, as an export's config carries it (diagnostics need the teacher)
    student.config.onebit = {"model": hp["model"], "quant": hp["quant"]}
    return student, spec, quant, ckpt


def _tokenizer(spec: ModelSpec | None, beside: Path | None = None):
    """The tokenizer saved in ``beside`` (an export), else ``spec``'s; None when neither has
    one (tiny random models)."""
    from onebit.models import load_tokenizer

    if beside is not None:
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(beside, local_files_only=True)
        except (OSError, ValueError):
            pass
    return load_tokenizer(spec) if spec is not None else None


def load_model(
    source: str,
    path: str | Path | None = None,
    model: ModelSpec | dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    prefill: str = "fp32",
) -> Loaded:
    """The model of ``source`` (``hf``: ``model``; ``export`` and ``checkpoint``: ``path``) in
    ``dtype``, in eval mode; an export's packed layers run their prefill in ``prefill`` mode
    (``onebit.quant.packed_linear.set_prefill_mode_``).

    Raises:
        OneBitInputError: an unknown source, a missing path, or a model that cannot be loaded.
    """
    if source not in SOURCES:
        raise OneBitInputError(f"source={source} is not one of {', '.join(SOURCES)}.")
    if source == "hf":
        from onebit.models import load_causal_lm

        if model is None:
            raise OneBitInputError("source=hf needs a model (model=<name>).")
        spec = model if isinstance(model, ModelSpec) else ModelSpec.from_dict(dict(model))
        lm = load_causal_lm(spec).to(dtype).eval()
        return Loaded(lm, _tokenizer(spec), f"{spec.name} (full precision)", spec)
    if not path or not Path(path).exists():
        raise OneBitInputError(f"path={path} does not exist (source={source} needs it).")
    path = Path(path)
    if source == "export":
        from onebit.export import load_onebit
        from onebit.quant.packed_linear import set_prefill_mode_

        if not path.is_dir():
            raise OneBitInputError(f"path={path} is not a directory (source=export needs one).")
        lm = set_prefill_mode_(load_onebit(path, dtype=dtype), prefill)  # packed: the C++ kernel
        made_from = (getattr(lm.config, "onebit", None) or {}).get("model")
        spec = ModelSpec.from_dict(made_from) if made_from else None
        name = spec.name if spec is not None else path.name
        return Loaded(lm.eval(), _tokenizer(spec, beside=path), f"{name} (OneBit)", spec)
    student, spec, _, _ = student_from_checkpoint(path)
    return Loaded(student.to(dtype).eval(), _tokenizer(spec), f"{spec.name} (OneBit ckpt)", spec)
