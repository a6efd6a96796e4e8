"""In-place conversion of a Hugging Face causal LM into a OneBit student.

``quantize_`` swaps every linear layer inside every decoder block (LLaMA/Llama-2/3, Mistral,
Qwen2/3: q, k, v, o, gate, up, down; OPT: q, k, v, out_proj, fc1, fc2; GPT-2: c_attn, c_proj, c_fc,
c_proj, whose ``Conv1D`` stores its weight transposed) for :class:`OneBitLinear`. Embeddings, norms
and ``lm_head`` are outside the decoder blocks and stay full precision; ``freeze_`` turns their
gradients off.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator

from torch import nn

from onebit.errors import OneBitInputError
from onebit.quant.config import OneBitConfig
from onebit.quant.linear import OneBitLinear
from onebit.quant.packed_linear import PackedOneBitLinear
from onebit.quant.svid import svid
from onebit.quant.svid_cache import SvidCache, cached_svid

FilterFn = Callable[[nn.Module, str], bool]


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of an ``nn.Linear``, a OneBit layer or GPT-2's ``Conv1D``
    (whose weight is stored ``(in, out)``)."""
    if hasattr(module, "in_features"):
        return module.out_features, module.in_features
    if _is_conv1d(module):
        return module.nf, module.weight.shape[0]
    raise TypeError(f"cannot read the shape of {type(module).__name__}")


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _block_class(module: nn.Module) -> type:
    """The module's own class; for a block already sharded by FSDP2's ``fully_shard`` (which
    gives it the class ``FSDP<Class>``, a subclass of both), the class it had before."""
    cls = type(module)
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return cls
    if issubclass(cls, FSDPModule):
        return next(c for c in cls.__mro__[1:] if not issubclass(c, FSDPModule))
    return cls


def find_decoder_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of decoder blocks of a causal LM, and its qualified name.

    It is the longest ``ModuleList`` whose children are all of one class (``model.layers`` in LLaMA,
    ``model.decoder.layers`` in OPT, ``transformer.h`` in GPT-2); when the model's config names the
    number of layers, the list must have exactly that many.
    """
    config = getattr(model, "config", None)
    n_layers = None
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        n_layers = getattr(config, key, None) if config is not None else None
        if isinstance(n_layers, int):
            break
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({_block_class(m) for m in module}) != 1:
            continue
        if isinstance(n_layers, int) and len(module) != n_layers:
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        raise ValueError(
            f"could not find the decoder blocks of {type(model).__name__}: no ModuleList of "
            f"{n_layers if n_layers is not None else 'identical'} blocks."
        )
    return best


def iter_target_linears(
    model: nn.Module, config: OneBitConfig | None = None, filter_fn: FilterFn | None = None
) -> Iterator[tuple[str, nn.Module]]:
    """The (qualified name, module) pairs that ``quantize_`` replaces or has replaced.

    Yields full-precision linears (``nn.Linear``, GPT-2 ``Conv1D``) and already converted
    ``OneBitLinear``/``PackedOneBitLinear`` layers inside the decoder blocks, minus those matching
    ``config.skip_modules`` or rejected by ``filter_fn(module, name)``.
    """
    skip = config.skip_modules if config is not None else ()
    prefix, blocks = find_decoder_blocks(model)
    for i, block in enumerate(blocks):
        for sub, module in block.named_modules():
            if not (_is_linear(module) or isinstance(module, OneBitLinear | PackedOneBitLinear)):
                continue
            name = f"{prefix}.{i}.{sub}" if prefix else f"{i}.{sub}"
            if any(fnmatch.fnmatchcase(name, pat) for pat in skip):
                continue
            if filter_fn is not None and not filter_fn(module, name):
                continue
            yield name, module


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def quantize_(
    model: nn.Module,
    config: OneBitConfig | None = None,
    filter_fn: FilterFn | None = None,
    progress: bool = False,
    svid_cache: SvidCache | None = None,
    after_block: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """Replace, in place, each targeted decoder-block linear by a SVID-initialised OneBitLinear.

    Args:
        model: a Hugging Face causal LM (or any model with one ``ModuleList`` of decoder blocks).
        config: layer and initialisation options; ``config.skip_modules`` globs stay full precision.
        filter_fn: ``filter_fn(module, qualified_name) -> bool``; only modules it accepts are
            replaced.
        progress: show a progress bar over the layers.
        svid_cache: value vectors to reuse by layer name (``onebit.quant.svid_cache``); layers
            it lacks are computed and added to it (the caller saves it).
        after_block: called with each decoder block, in order, once its linears are replaced
            and before the next block's are (e.g. to shard it at once: FSDP2).

    Returns:
        ``model`` itself, with its targeted layers replaced. Layers already converted are left
        alone.
    """
    config = config or OneBitConfig()
    if config.keep_massive:
        raise OneBitInputError(
            f"quant.keep_massive={config.keep_massive} chooses layers from the teacher's outputs "
            "on calibration text, which quantize_ does not have: resolve it first "
            "(config.with_kept(onebit.quant.massive_layer_names(teacher, ids, k))), as "
            "OneBitDistillation does."
        )
    targets = [(n, m) for n, m in iter_target_linears(model, config, filter_fn) if _is_linear(m)]
    prefix, blocks = find_decoder_blocks(model)
    handed_over = 0  # blocks already passed to after_block

    def hand_over(upto: int) -> None:
        nonlocal handed_over
        while after_block is not None and handed_over < upto:
            after_block(blocks[handed_over])
            handed_over += 1

    if progress:
        from tqdm.auto import tqdm

        targets = tqdm(targets, desc="OneBit: SVID", unit="layer")
    for name, module in targets:
        hand_over(int(name.removeprefix(f"{prefix}.").split(".", 1)[0]))  # the blocks before
        transposed = _is_conv1d(module)
        ab = None
        if svid_cache is not None and module.weight.device.type != "meta":
            W = module.weight.T if transposed else module.weight
            ab = cached_svid(
                svid_cache,
                name,
                W,
                lambda W=W: svid(W, config.svid_method, config.svid_max_iter, config.svid_tol),
            )
        _set_submodule(model, name, OneBitLinear.from_linear(module, config, transposed, ab))
    hand_over(len(blocks))
    return model


def freeze_(model: nn.Module) -> nn.Module:
    """Turn gradients off for everything except the OneBit layers (latent weight, g, h, bias).

    Embeddings, norms and ``lm_head`` stay full precision and frozen, as in the paper.
    """
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, OneBitLinear):
            module.requires_grad_(True)
    return model


def pack_(model: nn.Module) -> nn.Module:
    """Replace, in place, every OneBitLinear by its :class:`PackedOneBitLinear` for inference."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, OneBitLinear)]
    for name, module in targets:
        _set_submodule(model, name, PackedOneBitLinear.from_onebit(module))
    return model
