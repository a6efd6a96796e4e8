"""Data-aware initialisation of OneBit layers: signs by GPTQ's error feedback, value vectors by
least squares, both weighted by the layer's calibration inputs (``quant.sign_init=gptq``).

SVID starts a layer at ``W ≈ diag(a) sign(W) diag(b)``, which minimises an error in the weights,
not in the layer's outputs. What a layer has to get right is ``X Wᵀ`` on the inputs ``X`` it sees,
and that error is ``tr(E H Eᵀ)`` for ``E = M − W`` and the inputs' Gram matrix ``H = XᵀX``. Here,
for each layer, on the teacher's inputs over the calibration sequences:

1. **Signs** (GPTQ, Frantar et al. 2023, with OneBit's value vectors as its quantizer): the input
   columns are quantized in order; column ``i`` becomes ``g_i · h ⊙ sign(w_i)``, with ``h`` SVID's
   ``a`` and ``g_i`` the least-squares scale of the column given its signs, and its error is
   spread over the columns not yet quantized through the Cholesky factor of ``H⁻¹`` — so each sign
   is chosen knowing what the previous ones got wrong on this data.
2. **Value vectors**: ``g`` and ``h`` are refitted by alternating least squares on the same
   weighted error, signs fixed (``h``: one ratio per output row; ``g``: one ``in × in`` linear
   system, ``((S ⊙ h)ᵀ (S ⊙ h) ⊙ H) g = Σ_j h_j S_j ⊙ (H W_j)``).
3. **Outlier weights** (``quant.outliers``) are held exactly: GPTQ does not quantize their
   positions, the least squares leave them out, and their full-precision values are set so that the
   1-bit and sparse paths together give the teacher's weight there.

Everything runs in one teacher forward pass over the calibration sequences: a hook on each
teacher linear builds that layer's Gram matrix, initialises the student's layer of the same name
and drops it, so only one Gram matrix is held at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from onebit.quant.convert import _is_conv1d, iter_target_linears
from onebit.quant.linear import OneBitLinear


def _damped(H: Tensor, damp: float) -> tuple[Tensor, Tensor]:
    """(H with unused inputs given a unit diagonal and ``damp · mean(diag H)`` added to its
    diagonal, the mask of unused inputs). Shapes: H (n, n) → (n, n), (n,) bool."""
    H = H.clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    H.diagonal().add_(damp * torch.diag(H).mean())
    return H, dead


def gptq_signs(
    W: Tensor, H: Tensor, h: Tensor, keep: Tensor | None = None, block_size: int = 128
) -> tuple[Tensor, Tensor]:
    """Signs and input scales of ``W ≈ diag(h) S diag(g)`` chosen column by column with GPTQ's
    error feedback under the (damped, positive definite) input Gram matrix ``H``.

    Column ``i`` of the running weight ``w`` is quantized to ``g_i h ⊙ sign(w)`` with
    ``g_i = Σ_j |w_j| h_j / Σ_j h_j²`` (least squares given the signs; rows in ``keep`` left
    out), and ``(w − q) / U_ii · U_i,i+1:`` is subtracted from the later columns, ``U`` being the
    upper Cholesky factor of ``H⁻¹`` (Frantar et al.'s lazy block updates, ``block_size`` columns
    at a time). Entries in ``keep`` are not quantized: their error is zero.

    Returns ``(signs ±1, g)``. Shapes: W (out, in); H (in, in); h (out,); keep (out, in) bool →
    (out, in), (in,); float32.
    """
    W = W.detach().float().clone()
    in_f = W.shape[1]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H.float())), upper=True)
    h = h.float()
    keep = torch.zeros_like(W, dtype=torch.bool) if keep is None else keep
    hh = (h * h)[:, None] * (~keep)  # (out, in): h² where the entry is quantized
    signs = torch.empty_like(W)
    g = torch.empty(in_f, dtype=W.dtype, device=W.device)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]
        err = torch.zeros_like(W1)
        for k in range(i2 - i1):
            i, w, kept = i1 + k, W1[:, k], keep[:, i1 + k]
            s = torch.where(w >= 0, 1.0, -1.0)
            g[i] = (w.abs() * h).masked_fill(kept, 0).sum() / hh[:, i].sum().clamp_min(1e-12)
            q = torch.where(kept, w, g[i] * h * s)
            e = (w - q) / U1[k, k]
            W1[:, k:] -= e[:, None] * U1[k, k:][None, :]
            err[:, k] = e
            signs[:, i] = s
        W[:, i2:] -= err @ U[i1:i2, i2:]
    return signs, g


def refit_value_vectors(
    W: Tensor,
    signs: Tensor,
    H: Tensor,
    g: Tensor,
    h: Tensor,
    keep: Tensor | None = None,
    iters: int = 5,
) -> tuple[Tensor, Tensor]:
    """``g`` and ``h`` minimising ``tr(E H Eᵀ)``, ``E = diag(h) S diag(g) − W`` off ``keep``, by
    alternating least squares from the given ones (each step exact given the other vector).

    Shapes: W, signs (out, in); H (in, in) positive definite; g (in,); h (out,) → (in,), (out,).
    """
    T = W.float().masked_fill(keep, 0) if keep is not None else W.float()
    S = signs.float() if keep is None else signs.float().masked_fill(keep, 0)
    H = H.float()
    TH = T @ H
    g, h = g.float(), h.float()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(iters):
        P = S * g[None, :]
        PH = P @ H
        h = (PH * T).sum(1) / (PH * P).sum(1).clamp_min(1e-12)
        Sh = S * h[:, None]
        A = (Sh.T @ Sh) * H
        A += 1e-6 * A.diagonal().mean().clamp_min(1e-12) * eye
        g = torch.linalg.solve(A, (Sh * TH).sum(0))
    return g, h


def weighted_error(W: Tensor, M: Tensor, H: Tensor) -> float:
    """``tr(E H Eᵀ) / tr(W H Wᵀ)`` for ``E = M − W``: the relative output error of ``M`` on the
    inputs whose Gram matrix is ``H``. Shapes: W, M (out, in); H (in, in)."""
    E = (M - W).float()
    return float(((E @ H) * E).sum() / ((W.float() @ H) * W.float()).sum().clamp_min(1e-30))


def _keep_mask(layer: OneBitLinear) -> Tensor | None:
    if layer.outlier_index is None:
        return None
    keep = torch.zeros(
        layer.out_features, layer.in_features, dtype=torch.bool, device=layer.weight.device
    )
    keep.view(-1)[layer.outlier_index.long()] = True
    return keep


@torch.no_grad()
def init_layer_(layer: OneBitLinear, W: Tensor, H: Tensor, damp: float = 0.01) -> dict[str, float]:
    """Initialise one SVID-initialised OneBit layer from its teacher weight ``W`` and input Gram
    matrix ``H`` (in place): GPTQ signs, refitted ``g`` and ``h``, exact outlier weights.

    The latent weight becomes ``sign · latent_init_scale`` (``latent_init=sign``) or
    ``sign · |W|`` (``latent_init=weight``). Returns the weighted relative errors of SVID's start
    and of this one (``svid``, ``gptq``).

    Shapes: W (out, in); H (in, in).
    """
    W = W.detach().float().to(layer.weight.device)
    Hd, dead = _damped(H.float().to(W.device), damp)
    keep = _keep_mask(layer)
    h0, g0 = layer.out_scale.detach().float(), layer.in_scale.detach().float()
    quantized = 1.0 if keep is None else (~keep).float()
    target = W * quantized
    before = weighted_error(target, h0[:, None] * layer.signs() * g0 * quantized, Hd)
    signs, g = gptq_signs(W, Hd, h0, keep)
    g, h = refit_value_vectors(W, signs, Hd, g, h0, keep)
    g = torch.where(dead, g0, g)  # inputs never seen: SVID's value
    M = h[:, None] * signs * g[None, :]
    after = weighted_error(target, M * quantized, Hd)
    c = layer.config
    magnitude = c.latent_init_scale if c.latent_init == "sign" else W.abs().clamp_min(1e-12)
    layer.weight.copy_(signs * magnitude)
    layer.in_scale.copy_(g)
    layer.out_scale.copy_(h)
    if keep is not None:  # 1-bit path + sparse path = the teacher's weight at the kept positions
        index = layer.outlier_index.long()
        layer.outlier_value.copy_((W - M).flatten()[index])
    return {"svid": before, "gptq": after}


def _rows(x: Tensor, keep: Tensor | None) -> Tensor:
    x = x.detach().float().reshape(-1, x.shape[-1])
    return x if keep is None else x[keep]


def gptq_hooks(
    teacher: nn.Module,
    student: nn.Module,
    damp: float,
    attention_mask: Tensor | None,
    errors: dict[str, dict[str, float]],
    bar=None,
) -> list:
    """Forward hooks on ``teacher``'s target linears that initialise the student's layer of the
    same name from the teacher layer's weight and the inputs it sees (:func:`init_layer_`),
    recording each layer's errors in ``errors``; the caller runs the teacher's blocks and removes
    the returned handles."""
    s_modules = dict(student.named_modules())
    keep = None if attention_mask is None else attention_mask.reshape(-1).bool()

    def hook(module, inp, _out, name: str) -> None:
        x = _rows(inp[0], keep)
        W = module.weight.T if _is_conv1d(module) else module.weight
        errors[name] = init_layer_(s_modules[name], W, x.T @ x, damp)
        if bar is not None:
            bar.update()

    return [
        m.register_forward_hook(lambda m, i, o, n=n: hook(m, i, o, n))
        for n, m in gptq_targets(teacher, student)
    ]


def gptq_targets(teacher: nn.Module, student: nn.Module) -> list[tuple[str, nn.Module]]:
    """The teacher linears whose student layer of the same name is a OneBit layer."""
    s_modules = dict(student.named_modules())
    return [
        (name, module)
        for name, module in iter_target_linears(teacher)
        if isinstance(s_modules.get(name), OneBitLinear)
    ]


@contextlib.contextmanager
def gptq_pass(
    teacher: nn.Module,
    student: nn.Module,
    damp: float = 0.01,
    attention_mask: Tensor | None = None,
    progress: bool = False,
    desc: str = "OneBit: GPTQ signs",
) -> Iterator[dict[str, dict[str, float]]]:
    """While open, a teacher forward pass initialises every OneBit layer of ``student``
    (:func:`gptq_hooks`); yields the per-layer errors, filled as the layers are done. The hooks
    and the progress bar (``progress``, titled ``desc``) go when it closes."""
    errors: dict[str, dict[str, float]] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(gptq_targets(teacher, student)), desc=desc, unit="layer")
    hooks = gptq_hooks(teacher, student, damp, attention_mask, errors, bar)
    try:
        yield errors
    finally:
        for handle in hooks:
            handle.remove()
        if bar is not None:
            bar.close()


@torch.no_grad()
def gptq_init_(
    teacher: nn.Module,
    student: nn.Module,
    ids: Tensor,
    damp: float = 0.01,
    attention_mask: Tensor | None = None,
    progress: bool = False,
) -> dict[str, dict[str, float]]:
    """Initialise every OneBit layer of ``student`` from its teacher layer's weight and inputs on
    ``ids`` (:func:`init_layer_`, in place), in one teacher forward pass.

    Args:
        teacher: the full-precision model; its modules have the student's names.
        student: a SVID-initialised OneBit student (before training).
        ids: calibration token ids (training text).
        damp: GPTQ's dampening, a fraction of the mean diagonal of each Gram matrix.
        attention_mask: 1 for real tokens (padding is left out of the Gram matrices), or None.
        progress: show a progress bar over the layers.

    Returns:
        Per layer name, the weighted relative output error of SVID's start and of this one.

    Shapes: ids (batch, seq); attention_mask (batch, seq).
    """
    with gptq_pass(teacher, student, damp, attention_mask, progress) as errors:
        teacher(input_ids=ids, attention_mask=attention_mask)
    return errors
