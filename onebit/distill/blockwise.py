"""Block-wise reconstruction of a OneBit student: Block-AP, after EfficientQAT (Chen et al., 2024).

Before end-to-end distillation, each decoder block ``i`` of the student is trained on its own, in
order, to reproduce the teacher's block:

    min_θ  L( B_i(x_i^s; θ),  B_i^fp(x_i^t) )

where ``x_i^t`` is the full-precision model's input of block ``i`` and ``x_i^s`` the output of the
student's blocks ``0..i-1``, already reconstructed: each quantized block learns to undo the error of
the quantized prefix, against the full-precision block on full-precision inputs. AdamW trains only
block ``i``'s OneBitLinear parameters, with separate learning rates by role (``recipe``): latent
weights at ``latent_lr``, value vectors g, h, gains and outlier weights at ``lr``, biases at ``lr``
without decay; each rate follows a cosine from its peak to 0, without warm-up.

``loss="channel_norm"`` divides each hidden channel of the error by the teacher's RMS of that
channel (on the cached targets of the block). LLaMA-class models carry "massive activations" (Sun
et al., 2024): a few residual channels ~1000x larger than the rest, on which a plain MSE spends
almost all of its weight; normalised, every channel counts alike. ``loss="mse"`` is the plain MSE.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from onebit.config_utils import check_choice, check_int, check_number, from_mapping
from onebit.distill.recipe import SCALE_SUFFIXES, cosine_with_warmup
from onebit.errors import OneBitInputError, OneBitRunError
from onebit.fileio import atomic_path
from onebit.quant.convert import find_decoder_blocks
from onebit.quant.linear import OneBitLinear

BLOCKWISE_LOSSES = ("mse", "channel_norm")


@dataclass
class BlockwiseConfig:
    """Options of the block-wise reconstruction stage.

    Attributes:
        steps: AdamW steps per decoder block; 0 turns the stage off.
        batch_size: sequences per step (and per cached chunk).
        lr: learning rate of the value vectors g, h, output gains, outlier weights and biases.
        latent_lr: learning rate of the latent weights.
        weight_decay: decoupled weight decay (not on biases).
        grad_clip: maximum gradient norm; 0 or None: no clipping.
        loss: ``mse`` or ``channel_norm`` (module docstring).
        sequences: training sequences the callers (``train.py``, the results benchmark) read for
            the stage; :func:`blockwise_reconstruct_` itself takes the ids it is given.
    """

    steps: int = 0
    batch_size: int = 4
    lr: float = 1e-3
    latent_lr: float = 1e-4
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    loss: str = "channel_norm"
    sequences: int = 32

    def __post_init__(self) -> None:
        for key, low in (("steps", 0), ("batch_size", 1), ("sequences", 1)):
            check_int("blockwise", key, getattr(self, key), low)
        for key in ("lr", "latent_lr", "weight_decay"):
            check_number("blockwise", key, getattr(self, key))
        if self.grad_clip is not None:
            check_number("blockwise", "grad_clip", self.grad_clip)
        check_choice("blockwise", "loss", self.loss, BLOCKWISE_LOSSES)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> BlockwiseConfig:
        return from_mapping(cls, values, "blockwise")


class _Stop(Exception):
    """Raised by the capture hook to end a forward pass at decoder block 0."""


class _Interrupted(Exception):
    """Raised after saving the state of block ``_stop_after`` (tests of resumption)."""


def _out(y: Any) -> Tensor:
    return y[0] if isinstance(y, tuple) else y  # a tuple in older transformers


def _sharded(model: nn.Module) -> bool:
    """Some module of ``model`` is sharded with FSDP2's ``fully_shard``."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


@torch.no_grad()
def _capture(model: nn.Module, ids: Tensor, mask: Tensor | None, bs: int) -> list[list]:
    """``[x, args, kwargs]`` of decoder block 0 for each chunk of ``bs`` sequences of ``ids``.

    The forward pass stops at block 0, except on an FSDP2-sharded model: that runs to the end,
    so that FSDP2's post-forward hooks run and leave its root and block 0 idle (stopped, they stay
    mid-forward with block 0 gathered) before the blocks are called on their own.
    """
    block, got = find_decoder_blocks(model)[1][0], []
    stop = not _sharded(model)

    def hook(_m, args, kwargs):
        kwargs = dict(kwargs)
        x = args[0] if args else kwargs.pop("hidden_states")
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        got.append([x, tuple(args[1:]), kwargs])
        if stop:
            raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, len(ids), bs):
            kw = {} if mask is None else {"attention_mask": mask[i : i + bs]}
            with contextlib.suppress(_Stop):
                model(input_ids=ids[i : i + bs], use_cache=False, **kw)
    finally:
        handle.remove()
    return got


def _tokens(t: Tensor, mask: Tensor | None) -> Tensor:
    """The valid tokens of ``t``. Shapes: t (b, T, d); mask (b, T) bool → (n, d)."""
    return t.flatten(0, -2) if mask is None else t[mask]


def _sq_err(s: Tensor, t: Tensor, scale: Tensor | None, mask: Tensor | None) -> Tensor:
    """Squared (per-channel scaled) error at the valid tokens. Shapes: s, t (b, T, d) → (n, d)."""
    d = _tokens(s - t, mask).float()
    return (d if scale is None else d / scale).pow(2)


def _channel_rms(targets: list[Tensor], masks: list) -> Tensor:
    """The teacher's RMS of each hidden channel over every valid token. Shapes: → (d,)."""
    tokens = [_tokens(t, m).float() for t, m in zip(targets, masks)]
    rms = (sum(x.pow(2).sum(0) for x in tokens) / max(1, sum(len(x) for x in tokens))).sqrt()
    return rms.clamp_min(float(rms.max()) * 1e-6 + 1e-30)  # a dead channel must not divide by 0


def _evaluate(block, inputs, targets, masks, scale) -> tuple[float, float, list[Tensor]]:
    """(loss, ||s − t|| / ||t||, outputs) of ``block`` over every cached chunk."""
    outs = [_out(block(x, *a, **k)) for x, a, k in inputs]
    errs = [_sq_err(s, t, scale, m) for s, t, m in zip(outs, targets, masks)]
    err = sum(float(_sq_err(s, t, None, m).sum()) for s, t, m in zip(outs, targets, masks))
    ref = sum(float(_tokens(t, m).float().pow(2).sum()) for t, m in zip(targets, masks))
    loss = sum(float(e.sum()) for e in errs) / max(1, sum(e.numel() for e in errs))
    return loss, math.sqrt(err / max(ref, 1e-30)), outs


def _seed_global_rng(seed: int, device: torch.device) -> None:
    """Seed the global RNGs a forward pass on ``device`` draws from (dropout)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)


def _train(block, params, inputs, targets, masks, scale, cfg, seed, bar) -> None:
    latents, scales, biases = [], [], []
    for name, p in block.named_parameters():
        if p in params:
            is_scale = name.endswith(SCALE_SUFFIXES)
            (biases if name.endswith(".bias") else scales if is_scale else latents).append(p)
    groups = [
        {"params": latents, "lr": cfg.latent_lr, "weight_decay": cfg.weight_decay},
        {"params": scales, "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"params": biases, "lr": cfg.lr, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if not groups:
        return
    trained = [p.requires_grad_(True) for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: cosine_with_warmup(s, 0, cfg.steps, 0.0)
    )
    gen = torch.Generator().manual_seed(seed)
    epochs = -(-cfg.steps // len(inputs))
    order = torch.cat([torch.randperm(len(inputs), generator=gen) for _ in range(epochs)])
    device = inputs[0][0].device
    block.train()
    # dropout (OPT has some) draws from the global RNG: forked and seeded, so runs are reproducible
    with torch.enable_grad(), torch.random.fork_rng([device] if device.type == "cuda" else []):
        _seed_global_rng(int(torch.randint(2**62, (1,), generator=gen)), device)
        for step, j in enumerate(order[: cfg.steps].tolist()):
            x, a, k = inputs[j]
            loss = _sq_err(_out(block(x, *a, **k)), targets[j], scale, masks[j]).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                nn.utils.clip_grad_norm_(trained, cfg.grad_clip)
            opt.step()
            sched.step()
            if bar is not None and (step % 10 == 0 or step == cfg.steps - 1):
                bar.set_postfix(loss=f"{loss.item():.4g}")
    opt.zero_grad(set_to_none=True)
    block.eval()
    for p in trained:
        p.requires_grad_(False)


def _fingerprint(n_blocks, hidden, ids, mask, config, seed) -> dict[str, Any]:
    digest = hashlib.sha256(ids.cpu().numpy().tobytes())
    if mask is not None:
        digest.update(mask.cpu().numpy().tobytes())
    return {
        "blocks": n_blocks,
        "hidden_size": hidden,
        "ids_shape": list(ids.shape),
        "ids_sha256": digest.hexdigest(),
        "config": dataclasses.asdict(config),
        "seed": seed,
    }


def _save(path: str, state: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _read(path: str, device: torch.device) -> Any:
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        raise OneBitInputError(f"the block-wise state {path} cannot be read ({e}).") from None


def _load(path: str, fingerprint: dict[str, Any], device: torch.device) -> dict[str, Any]:
    state = _read(path, device)
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        raise OneBitInputError(
            f"the block-wise state {path} belongs to another run (model, ids, config or seed "
            "differ); delete it or pass another state_path."
        )
    return state


def _block_file(path: str, i: int) -> str:
    return f"{path}.block{i:04d}"


def _local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: its local shard for a DTensor (FSDP2), else ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def _block_state(block: nn.Module) -> dict[str, Tensor]:
    """``block``'s state dict as plain tensors (a sharded block: this rank's shards)."""
    return {k: _local(v).detach().clone() for k, v in block.state_dict().items()}


def _load_block_state(block: nn.Module, state: dict[str, Tensor], path: str) -> None:
    """Copy ``state`` (:func:`_block_state`'s) into ``block`` in place."""
    own = block.state_dict()
    if own.keys() != state.keys() or any(_local(v).shape != state[k].shape for k, v in own.items()):
        raise OneBitInputError(
            f"the block-wise state {path} does not fit this student's block (another model, or "
            "another sharding: each rank resumes from its own file)."
        )
    for k, v in own.items():
        _local(v).copy_(state[k])


@torch.no_grad()
def blockwise_reconstruct_(
    teacher: nn.Module,
    student: nn.Module,
    ids: Tensor,
    config: BlockwiseConfig,
    attention_mask: Tensor | None = None,
    state_path: str | os.PathLike | None = None,
    progress: bool = True,
    seed: int = 0,
    _stop_after: int | None = None,
) -> dict[str, Any]:
    """Train each decoder block of ``student`` in turn to reproduce ``teacher``'s (in place).

    Block ``i`` learns from the student's own inputs (the output of its reconstructed blocks
    ``0..i-1``) towards the teacher block's output on the teacher's inputs (module docstring).
    Every cached activation stays on the models' device: four copies of ``(N, T, hidden)``.
    Only the OneBitLinear parameters of the current block that required gradients on entry are
    trained; gradient flags and training modes are restored on return, the teacher runs in eval
    mode. Randomness (chunk order, dropout) comes from generators seeded by ``seed`` and the block
    index, never from the global RNG.

    FSDP2-sharded models (``fully_shard`` per decoder block and on the root, as ``trainer=fsdp``
    does) work too, when every rank calls this with the same ``ids``: each block all-gathers its
    parameters for a forward and averages its gradients over the ranks, so every rank trains the
    block a single process would.

    Args:
        teacher: the full-precision causal LM.
        student: its OneBit student (same architecture, ``quantize_`` + ``freeze_``).
        ids: calibration token ids.
        config: steps, batch size, learning rates and loss.
        attention_mask: 1 for real tokens, 0 for padding (ignored by the loss), or None.
        state_path: a file to resume from: rewritten (atomically) after each block, read when it
            exists, and left in place at the end (the caller deletes it, with the block files
            ``<state_path>.block<i>``). It holds (tensors and plain types only, for
            ``torch.load(weights_only=True)``) the next block's index, both models' cached inputs
            of the next block, the results so far and a fingerprint; each finished block's state
            dict is written once to its own file beside it (so the writes grow linearly with the
            number of blocks). A state of another run (number of blocks, hidden size, ids, mask,
            config or seed) is refused. A sharded student's block files hold this rank's
            shards: give each rank its own ``state_path``.
        progress: show a progress bar over the blocks with the current loss.
        seed: seed of the chunk order and dropout.

    Returns:
        ``{"blocks": [{"block", "loss_before", "loss_after", "rel_err_before",
        "rel_err_after"}, ...], "seconds": float}``; ``rel_err = ||s − t|| / ||t||`` of the block
        output over all sequences; ``blocks`` is empty when ``config.steps == 0``.

    Raises:
        OneBitInputError: bad ``ids``/``attention_mask``, models with different block counts, a
            missing folder for ``state_path`` or a state file of another run.
        OneBitRunError: a block's loss is not finite after training.

    Shapes: ids (N, T) integer; attention_mask (N, T).
    """
    start_time = time.perf_counter()
    if config.steps == 0:
        return {"blocks": [], "seconds": 0.0}
    if ids.ndim != 2 or ids.numel() == 0 or ids.is_floating_point():
        raise OneBitInputError(f"ids must be a non-empty (N, T) integer tensor, not {ids.shape}.")
    if attention_mask is not None and attention_mask.shape != ids.shape:
        raise OneBitInputError(
            f"attention_mask {tuple(attention_mask.shape)} must have the shape of ids "
            f"{tuple(ids.shape)}."
        )
    t_blocks, s_blocks = find_decoder_blocks(teacher)[1], find_decoder_blocks(student)[1]
    if len(t_blocks) != len(s_blocks):
        raise OneBitInputError(
            f"the teacher has {len(t_blocks)} decoder blocks and the student {len(s_blocks)}."
        )
    path = None if state_path is None else os.fspath(state_path)
    if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise OneBitInputError(f"the folder of the block-wise state {path} does not exist.")
    device = next(teacher.parameters()).device
    ids = ids.to(device)
    mask = None if attention_mask is None else attention_mask.to(device)
    masks = [None if mask is None else mask[i : i + config.batch_size].bool()
             for i in range(0, len(ids), config.batch_size)]  # fmt: skip
    modes = {m: m.training for m in [*student.modules(), *teacher.modules()]}
    flags = {p: p.requires_grad for p in student.parameters()}
    params = {p for m in s_blocks.modules() if isinstance(m, OneBitLinear) for p in m.parameters()}
    params = {p for p in params if flags[p]}
    teacher.eval()
    student.eval()
    t_in = _capture(teacher, ids, mask, config.batch_size)
    s_in = _capture(student, ids, mask, config.batch_size)
    fingerprint = _fingerprint(len(s_blocks), t_in[0][0].shape[-1], ids, mask, config, seed)
    start, results = 0, []
    if path is not None and os.path.exists(path):
        state = _load(path, fingerprint, device)
        for i in range(state["next_block"]):
            file = _block_file(path, i)
            _load_block_state(s_blocks[i], _read(file, device), file)
        start, results = state["next_block"], state["results"]
        for cache, xs in ((t_in, state["teacher_inputs"]), (s_in, state["student_inputs"])):
            for chunk, x in zip(cache, xs):
                chunk[0] = x
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(s_blocks), initial=start, desc="OneBit: block-wise", unit="block")
    try:
        student.requires_grad_(False)
        for i in range(start, len(s_blocks)):
            targets = [_out(t_blocks[i](x, *a, **k)) for x, a, k in t_in]
            scale = _channel_rms(targets, masks) if config.loss == "channel_norm" else None
            loss0, rel0, _ = _evaluate(s_blocks[i], s_in, targets, masks, scale)
            _train(
                s_blocks[i], params, s_in, targets, masks, scale, config, seed * 100_003 + i, bar
            )
            loss1, rel1, outs = _evaluate(s_blocks[i], s_in, targets, masks, scale)
            if not math.isfinite(loss1):
                raise OneBitRunError(
                    f"block-wise reconstruction of block {i} diverged (loss {loss1}); lower "
                    "blockwise.lr and blockwise.latent_lr."
                )
            results.append({"block": i, "loss_before": loss0, "loss_after": loss1,
                            "rel_err_before": rel0, "rel_err_after": rel1})  # fmt: skip
            for cache, xs in ((t_in, targets), (s_in, outs)):
                for chunk, x in zip(cache, xs):
                    chunk[0] = x
            if path is not None:  # the block's own file first, then the state that names it
                _save(_block_file(path, i), _block_state(s_blocks[i]))
                _save(path, {
                    "fingerprint": fingerprint, "next_block": i + 1, "results": results,
                    "teacher_inputs": [c[0] for c in t_in], "student_inputs": [c[0] for c in s_in],
                })  # fmt: skip
            if bar is not None:
                bar.update(1)
            if _stop_after == i:
                raise _Interrupted(f"stopped after block {i}")
    finally:
        if bar is not None:
            bar.close()
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for m, mode in modes.items():
            m.training = mode
    return {"blocks": results, "seconds": time.perf_counter() - start_time}
