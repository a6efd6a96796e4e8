"""Calibrate the output gains γ of a OneBit student from its teacher's layer outputs.

A OneBit layer's output LayerNorm gives every token an RMS of 1 over the output channels, whatever
scale the teacher's layer writes (0.1 for an attention output, tens to thousands for some MLP
outputs). With ``OneBitConfig(output_gain=True)`` each layer has a per-channel gain γ after the
LayerNorm; this module sets it so that each channel of the student's output has its teacher's
scale:

    rms:  γ_c = sqrt(mean_t (y_t,c − b_c)²) / sqrt(mean_t ŷ_t,c²)
    ls:   γ_c = Σ_t (y_t,c − b_c) ŷ_t,c / Σ_t ŷ_t,c²        (least squares, per channel)

where ``y`` is the teacher layer's output, ``b`` the (shared) bias (and, with ``outliers``, the
product with the weights kept in full precision) and ``ŷ`` the student layer's output before its
gain, at the same tokens. The student is calibrated *sequentially* in one
forward pass: each layer's gain is set from its own output as the forward reaches it and applied
at once, so every later layer is calibrated on the inputs the calibrated student gives it.

Teacher and student run in step (:func:`teacher_alongside`): just before each student decoder
block, the teacher's block of the same index runs on the teacher's own hidden state, so the
teacher's outputs are held for one block at a time (``ls``: tokens × Σ out of one block's
linears; ``rms``: one number per channel) and the teacher runs once for ``sign_init=gptq`` and
the gains together.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import Tensor, nn

from onebit.quant.convert import find_decoder_blocks, iter_target_linears
from onebit.quant.gptq import gptq_init_, gptq_pass
from onebit.quant.linear import OneBitLinear, add_skips

GAIN_CALIBRATIONS = ("rms", "ls")


def init_from_calibration_(
    teacher: nn.Module,
    student: nn.Module,
    config,
    ids: Tensor | None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """The initialisation steps that read the teacher on training text (in place), on the first
    ``config.calibration_sequences`` rows of ``ids``: ``sign_init=gptq``
    (:func:`onebit.quant.gptq.gptq_init_`), then ``gain_init`` ``rms``/``ls``
    (:func:`calibrate_output_gains_`, on the student as the first step left it). Nothing when
    ``config.needs_calibration`` is false.

    Returns:
        ``sign_init=gptq``'s per-layer errors (empty otherwise).

    Raises:
        ValueError: calibration is asked for and ``ids`` is None.

    Shapes: ids (n, seq) token ids.
    """
    if not config.needs_calibration:
        return {}
    if ids is None:
        raise ValueError(
            f"quant.sign_init={config.sign_init} / quant.gain_init={config.gain_init} need "
            "calibration sequences."
        )
    ids = ids[: config.calibration_sequences]
    gptq = config.sign_init == "gptq"
    if not (config.output_gain and config.gain_init != "ones"):
        return (
            gptq_init_(teacher, student, ids, config.gptq_damp, progress=progress) if gptq else {}
        )
    title = "OneBit: GPTQ signs and gains"
    signs = (
        gptq_pass(teacher, student, config.gptq_damp, None, progress, title)
        if gptq
        else contextlib.nullcontext({})
    )
    with signs as errors:  # in one pass: each teacher layer's GPTQ hook runs before its gain hook
        calibrate_output_gains_(teacher, student, ids, config.gain_init)
    return errors


@contextlib.contextmanager
def teacher_alongside(teacher: nn.Module, student: nn.Module) -> Iterator[None]:
    """While active, a forward pass of ``student`` runs each decoder block of ``teacher`` just
    before the student's block of the same index, with the student block's arguments and the
    teacher's own hidden state (its block 0 gets the student's block-0 input: the parts outside
    the blocks are the teacher's). Hooks on the teacher's layers then fire block by block, each
    just before the student's block of the same index. Run the student with ``use_cache=False``
    (a shared KV cache would take the teacher's keys too).

    Raises:
        ValueError: the models have different numbers of decoder blocks.
    """
    t_blocks, s_blocks = find_decoder_blocks(teacher)[1], find_decoder_blocks(student)[1]
    if len(t_blocks) != len(s_blocks):
        raise ValueError(
            f"the teacher has {len(t_blocks)} decoder blocks and the student {len(s_blocks)}."
        )
    hidden: list[Tensor] = []

    def pre_hook(i: int):
        def hook(_m, args, kwargs):
            if args:
                x, rest, kw = args[0], args[1:], kwargs
            else:
                kw = dict(kwargs)
                x, rest = kw.pop("hidden_states"), ()
            y = t_blocks[i](x if i == 0 else hidden.pop(), *rest, **kw)
            hidden.append(y[0] if isinstance(y, tuple) else y)

        return hook

    handles = [
        b.register_forward_pre_hook(pre_hook(i), with_kwargs=True) for i, b in enumerate(s_blocks)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        hidden.clear()


@torch.no_grad()
def massive_layer_names(teacher: nn.Module, ids: Tensor, k: int) -> list[str]:
    """The ``k`` decoder-block linears of ``teacher`` whose outputs on ``ids`` most exceed what a
    OneBit layer with its output LayerNorm can write (``max |y| > sqrt(out − 1)``), ranked by
    ``max |y| / sqrt(out − 1)``; fewer if fewer exceed it. Keeping them in full precision
    (``quant.skip_modules``) is the lever for "massive activations".

    Shapes: ids (batch, seq) token ids.
    """
    ratio: dict[str, float] = {}
    hooks = []
    for name, module in iter_target_linears(teacher):

        def hook(_m, _i, y, name=name):
            ratio[name] = float(y.detach().abs().max()) / max(y.shape[-1] - 1, 1) ** 0.5

        hooks.append(module.register_forward_hook(hook))
    try:
        teacher(input_ids=ids)
    finally:
        for h in hooks:
            h.remove()
    ranked = sorted((r, n) for n, r in ratio.items() if r > 1.0)[::-1]
    return [n for _, n in ranked[:k]]


@torch.no_grad()
def calibrate_output_gains_(
    teacher: nn.Module,
    student: nn.Module,
    ids: Tensor,
    mode: Literal["rms", "ls"] = "rms",
    attention_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Set every ``out_gain`` of ``student`` from ``teacher`` on the tokens ``ids`` (in place).

    Args:
        teacher: the full-precision model; its modules have the student's names.
        student: a OneBit student quantized with ``output_gain=True``: a quantized copy of
            ``teacher`` (its blocks' inputs come from the student's own embedding).
        ids: calibration token ids.
        mode: ``rms`` (match each channel's RMS) or ``ls`` (least squares per channel).
        attention_mask: 1 for real tokens (padding is left out of the statistics), or None.

    Returns:
        The gains set, by layer name.

    Shapes: ids (batch, seq); attention_mask (batch, seq) → {name: (out,)}.
    """
    if mode not in GAIN_CALIBRATIONS:
        raise ValueError(f"gain calibration mode {mode!r} is not one of {GAIN_CALIBRATIONS}.")
    s_modules = dict(student.named_modules())
    layers = {
        n: s_modules[n]
        for n, _ in iter_target_linears(teacher)
        if isinstance(s_modules.get(n), OneBitLinear) and s_modules[n].out_gain is not None
    }
    if not layers:
        raise ValueError("the student has no output gains to calibrate (quant.output_gain=false).")
    keep = None if attention_mask is None else attention_mask.reshape(-1).bool()

    def rows(y: Tensor) -> Tensor:  # (tokens, out) float32, real tokens only
        y = y.detach().float().reshape(-1, y.shape[-1])
        return y if keep is None else y[keep]

    t_modules = dict(teacher.named_modules())
    stats: dict[str, Tensor] = {}  # rms: teacher mean square per channel; ls: teacher outputs
    hooks = []
    for name, layer in layers.items():

        def t_hook(_m, inp, out, name=name, layer=layer):
            # what the 1-bit path has to write: the output less the bias and the outlier weights'
            # share (``outliers``: the student's kept weights are the teacher's own at this point)
            y = rows(out - add_skips(layer, torch.zeros_like(out), inp[0]))
            stats[name] = y.pow(2).mean(0) if mode == "rms" else y

        hooks.append(t_modules[name].register_forward_hook(t_hook))

    gains: dict[str, Tensor] = {}
    for name, layer in layers.items():
        layer.out_gain.fill_(1.0)

        def s_hook(mod, inp, out, name=name):
            skips = add_skips(mod, torch.zeros_like(out), inp[0])  # bias + W_K x
            y_hat = out - skips  # the output before the gain (γ = 1)
            u = rows(y_hat)
            if mode == "rms":
                gain = stats[name].sqrt() / u.pow(2).mean(0).sqrt().clamp_min(1e-12)
            else:
                gain = (stats[name] * u).sum(0) / u.pow(2).sum(0).clamp_min(1e-12)
            mod.out_gain.copy_(gain)
            gains[name] = gain
            stats.pop(name)
            return y_hat * gain.to(out.dtype) + skips  # later layers see the calibrated output

        hooks.append(layer.register_forward_hook(s_hook))
    try:  # block by block: the teacher's statistics of a block are used up by the student's
        with teacher_alongside(teacher, student):
            student(input_ids=ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return gains
