"""Sign-Value-Independent Decomposition (SVID), the OneBit initialisation.

    W = sign(W) ⊙ |W|,      |W| ≈ a bᵀ  (rank 1, a ≥ 0 of length out, b ≥ 0 of length in)

so that ``W ≈ sign(W) ⊙ (a bᵀ)`` and ``x Wᵀ ≈ ((x ⊙ b) sign(W)ᵀ) ⊙ a``: ``h = a`` (out_scale) and
``g = b`` (in_scale). The error of the decomposition is the rank-1 error of ``|W|`` because
``sign(W)² = 1``.

Methods:
    svd:  exact rank-1 SVD of |W| by ``torch.linalg.svd`` (the reference, slow on large matrices).
    nmf:  rank-1 NMF by alternating non-negative least squares,
              a ← max(0, A b) / ||b||²,     b ← max(0, Aᵀ a) / ||a||²,
          started from ``b = 1``. For a non-negative A and a non-negative b the ``max`` never clips,
          so each round is one power iteration on AᵀA and the fixed point is the top singular pair
          (Perron–Frobenius): the NMF optimum *is* the SVD optimum for rank 1. It stops when a
          round moves the direction of b by at most ``tol`` or after ``max_iter`` rounds.
    nmf_sklearn: the official code's scikit-learn ``NMF(n_components=1, init="random",
          random_state=0)`` (200 iterations of coordinate descent, tol 1e-4), for reproduction.
    none: a = b = 1 (no value vectors: the "plain copy of W" ablation).

Every method returns ``a`` and ``b`` scaled to the same root-mean-square value; the product ``a bᵀ``
is unchanged by that and the output LayerNorm makes the layer invariant to it anyway.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from onebit import kernels

_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _balance(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Rescale (a, b) → (a·c, b/c) so both have the same RMS; a bᵀ is unchanged."""
    ra = a.pow(2).mean().sqrt()
    rb = b.pow(2).mean().sqrt()
    if ra == 0 or rb == 0:
        return a, b
    c = (rb / ra).sqrt()
    return a * c, b / c


def _abs_into(block: Tensor, W_rows: Tensor) -> None:
    """``block`` ← |W_rows| in fp32 (from fp32 directly; from bf16/fp16/fp64 through a copy)."""
    if W_rows.dtype == torch.float32:
        torch.abs(W_rows, out=block)
    else:
        block.copy_(W_rows).abs_()


_SUM_ROWS = 32  # rows per float32 partial sum of Aᵀa, as in the C++ op (kFlushRows)
_SUM_COLS = 2048  # columns per float32 partial sum of A b


def _matvec(block: Tensor, b: Tensor) -> Tensor:
    """``block b`` in float64, from float32 GEMVs over 2048 columns at a time: one float32 GEMV
    over all 11008 columns (MKL) rounded enough to leave the error 3e-14 (relative) above
    scikit-learn's at 4096×11008; in 2048-column pieces it ends below scikit-learn's at the three
    LLaMA-7B shapes, for 1.03-1.14× the time of a round on CPU.

    Shapes: block (rows, in), b (in,) → (rows,) float64.
    """
    out = torch.zeros(block.shape[0], dtype=torch.float64, device=block.device)
    for j in range(0, block.shape[1], _SUM_COLS):
        out += torch.mv(block[:, j : j + _SUM_COLS], b[j : j + _SUM_COLS])
    return out


def _t_matvec(block: Tensor, a: Tensor) -> Tensor:
    """``blockᵀ a`` in float64, from float32 sums over 32 rows at a time (one batched matmul): a
    single float32 GEMV over thousands of rows drifts by ~1e-6 and leaves the rank-1 error
    ~1e-13 (relative) above scikit-learn's.

    Shapes: block (rows, in), a (rows,) → (in,) float64.
    """
    rows, in_f = block.shape
    n = rows // _SUM_ROWS * _SUM_ROWS
    z = torch.zeros(in_f, dtype=torch.float64, device=block.device)
    if n:
        parts = torch.bmm(a[:n].view(-1, 1, _SUM_ROWS), block[:n].view(-1, _SUM_ROWS, in_f))
        z += parts.view(-1, in_f).sum(0, dtype=torch.float64)
    if n < rows:
        z += torch.mv(block[n:].T, a[n:])
    return z


def _als_pass(
    W: Tensor, b: Tensor, rows: int, buf: Tensor, buf_is_abs: bool = False
) -> tuple[Tensor, Tensor]:
    """One ALS round in one pass over W: returns (a, b') with a = A b/‖b‖², b' = Aᵀ a/‖a‖².

    ``Aᵀ a`` is summed in float64 over float32 sums of 32 rows (as the C++ op does), so that
    the direction of b' is exact to float32 rounding and the stopping rule can resolve it.
    ``buf_is_abs``: ``buf`` already holds the whole of A = |W| in fp32 (one block), so the round
    reads it instead of making it again.
    """
    a = torch.empty(W.shape[0], dtype=torch.float32, device=W.device)
    z = torch.zeros(b.shape, dtype=torch.float64, device=b.device)
    for r0 in range(0, W.shape[0], rows):
        block = buf[: min(rows, W.shape[0] - r0)]
        if not buf_is_abs:
            _abs_into(block, W[r0 : r0 + rows])  # A_R
        a_r = a[r0 : r0 + block.shape[0]]
        a_r.copy_(_matvec(block, b))  # A_R b
        z += _t_matvec(block, a_r)  # A_Rᵀ (A_R b), while A_R is in cache
    bb = b.dot(b)
    a.div_(bb).clamp_min_(0)
    aa = a.dot(a)
    return a, z.div_(bb * aa).float().clamp_min_(0)


def direction_change(b: Tensor, b_prev: Tensor) -> float:
    """``‖b/‖b‖ − b_prev/‖b_prev‖‖`` in float64: how far a round moved the direction of b."""
    x, y = b.double(), b_prev.double()
    nx, ny = x.norm(), y.norm()
    if nx == 0 or ny == 0:
        return 0.0 if nx == ny else 2.0
    return float((x / nx - y / ny).norm())


def _rank1_als(
    W: Tensor, max_iter: int, tol: float, chunk_bytes: int = 4 << 20
) -> tuple[Tensor, Tensor, int]:
    """Alternating non-negative least squares for rank 1 on ``A = |W|``; see the module docstring.

    One round (a ← A b/‖b‖², b ← Aᵀ a/‖a‖²) is a *single* pass over W. On CPU the C++ op
    ``torch.ops.onebit.svid_rank1_als`` (``onebit.kernels``) runs the whole loop: it reads each row
    once, as stored (fp32, bf16 or fp16), and uses it twice from cache, ``a_r = |w_r|·b`` and then
    ``z += a_r |w_r|`` into a per-thread z; |W| is never materialised. Without it (and on GPU)
    rows are taken in blocks of about ``chunk_bytes``, made absolute into a reused buffer and used
    by two GEMVs while hot. On GPU, and for a CPU matrix of at most ``chunk_bytes``, the one block
    is the whole of |W| in fp32: it is made once and every round reads it.

    Stopping rule: after a round that moves the unit vector b/‖b‖ by at most ``tol``, or by no
    less than the round before did (power iteration moves it less every round, so that only
    happens at the float32 floor), or after ``max_iter`` rounds. A move of δ leaves the next
    iterate about δ·(σ₂/σ₁)² from the optimum, and the error's excess is quadratic in that; on
    the LLaMA-7B shapes ``tol = 1e-6`` stops after three rounds, 2-4e-15 (relative) above the
    optimum, and on real weights after three to six.

    Returns (a, b, rounds) with b the least-squares b for a, so that
    ``‖A − a bᵀ‖² = ‖A‖² − ‖a‖²·‖b‖²``.
    """
    if W.dtype in _KERNEL_DTYPES and kernels.use_kernel(W):
        return torch.ops.onebit.svid_rank1_als(W, max_iter, tol)
    out_f, in_f = W.shape
    dev = W.device
    rows = out_f if dev.type != "cpu" else max(1, min(out_f, chunk_bytes // (4 * in_f)))
    buf = torch.empty(rows, in_f, dtype=torch.float32, device=dev)
    # One block (always on GPU; small matrices on CPU): make A = |W| once, not once per round.
    whole = rows >= out_f
    if whole:
        _abs_into(buf, W)
    b = torch.ones(in_f, dtype=torch.float32, device=dev)
    moved_before = math.inf
    it = 0
    for it in range(1, max_iter + 1):  # noqa: B007 - the count is returned
        a, b_next = _als_pass(W, b, rows, buf, buf_is_abs=whole)
        moved = direction_change(b_next, b)
        b = b_next
        if moved <= tol or moved >= moved_before:
            break
        moved_before = moved
    return a, b, it


def svid(
    weight: Tensor, method: str = "nmf", max_iter: int = 200, tol: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Rank-1 decomposition ``|W| ≈ a bᵀ`` with ``a, b >= 0``.

    Args:
        weight: the full-precision weight ``W``.
        method: ``nmf``, ``svd``, ``nmf_sklearn`` or ``none`` (see the module docstring).
        max_iter: iteration cap for ``nmf`` and ``nmf_sklearn``.
        tol: ``nmf`` stops after a round that moves the unit vector ``b/‖b‖`` by at
            most ``tol`` (see ``_rank1_als``).

    Returns:
        ``(a, b)`` in float32 on ``weight``'s device: ``a`` is the paper's h (out_scale), ``b``
        its g.

    Shapes: weight (out, in) → a (out,), b (in,).
    """
    if weight.ndim != 2:
        raise ValueError(f"svid expects a 2-D weight, got shape {tuple(weight.shape)}.")
    out_f, in_f = weight.shape
    dev = weight.device
    if method == "none":
        return (torch.ones(out_f, device=dev), torch.ones(in_f, device=dev))
    if method == "svd":
        U, S, Vh = torch.linalg.svd(weight.detach().abs().float(), full_matrices=False)
        u, v = U[:, 0], Vh[0]
        if u.sum() < 0:  # the Perron vector is non-negative
            u, v = -u, -v
        s = S[0].sqrt()
        a, b = (u * s).clamp_min(0), (v * s).clamp_min(0)
    elif method == "nmf":
        a, b, _ = _rank1_als(weight.detach(), max_iter, tol)
    elif method == "nmf_sklearn":
        a, b = _svid_sklearn(weight.detach().abs().float(), max_iter)
    else:
        raise ValueError(f"svid method={method!r} is not one of nmf, svd, nmf_sklearn, none.")
    return _balance(a, b)


def _svid_sklearn(A: Tensor, max_iter: int) -> tuple[Tensor, Tensor]:
    try:
        from sklearn.decomposition import NMF
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "svid method 'nmf_sklearn' needs scikit-learn: pip install scikit-learn"
        ) from e
    import warnings

    from sklearn.exceptions import ConvergenceWarning

    model = NMF(n_components=1, init="random", random_state=0, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W = model.fit_transform(A.cpu().numpy())
    H = model.components_
    a = torch.from_numpy(W[:, 0].copy()).float().to(A.device)
    b = torch.from_numpy(H[0].copy()).float().to(A.device)
    return a, b


def svid_approx(weight: Tensor, a: Tensor, b: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The dense matrix ``sign(W) ⊙ (a bᵀ)`` that a SVID-initialised layer represents.

    ``dtype=torch.float64`` scores the factors themselves: a float32 product ``a_i b_j`` is
    rounded, which moves the relative error by ~1e-11 at the LLaMA-7B shapes, far more than the
    methods differ by.

    Shapes: weight (out, in), a (out,), b (in,) → (out, in).
    """
    from onebit.quant.ste import sign

    return sign(weight.detach().to(dtype)) * torch.outer(a.to(dtype), b.to(dtype))


def xnor_approx(weight: Tensor, per_row: bool = True) -> Tensor:
    """The XNOR-Net style 1-bit baseline ``sign(W) · mean|W|`` (per output row, or one scalar).

    Shapes: weight (out, in) → (out, in).
    """
    from onebit.quant.ste import sign

    W = weight.detach().float()
    scale = W.abs().mean(dim=1, keepdim=True) if per_row else W.abs().mean()
    return sign(W) * scale


def relative_error(weight: Tensor, approx: Tensor) -> float:
    """``||W − approx||_F / ||W||_F``, accumulated in float64.

    The squares are added by ``torch.sum`` (cascaded sums: exact to ~1e-16 here), not
    ``matrix_norm``, whose sum was off by 3e-14 relative at 4096×4096, as much as the SVID methods
    differ by.
    """
    W = weight.detach().double()
    err2 = float((W - approx.detach().double()).pow(2).sum())
    return math.sqrt(err2 / float(W.pow(2).sum()))


def factors_error(weight: Tensor, a: Tensor, b: Tensor) -> float:
    """Relative Frobenius error of ``sign(W) ⊙ (a bᵀ)`` for given factors, scored in float64."""
    return relative_error(weight, svid_approx(weight, a, b, torch.float64))


def svid_error(weight: Tensor, method: str = "nmf", **kwargs) -> float:
    """Relative Frobenius error of the SVID of ``weight`` with ``method`` (in float64)."""
    return factors_error(weight, *svid(weight, method, **kwargs))


def xnor_error(weight: Tensor, per_row: bool = True) -> float:
    """Relative Frobenius error of the XNOR baseline ``sign(W) · mean|W|``."""
    return relative_error(weight, xnor_approx(weight, per_row))


def rank1_optimal_error(weight: Tensor, method: str = "svdvals", max_iter: int = 1000) -> float:
    """The smallest possible relative rank-1 error of ``|W|``, in float64.

    ``svdvals``: from all singular values (exact; minutes at the LLaMA-7B shapes). ``power``:
    σ₁² by power iteration on ``|W|`` until it stops rising by more than 1e-15 relatively (or
    ``max_iter`` rounds): seconds, and within ~1e-15 of ``svdvals`` when σ₂ ≪ σ₁, as on LLM weights.
    """
    A = weight.detach().abs().double()
    if method == "svdvals":
        S = torch.linalg.svdvals(A)
        return math.sqrt(float(S[1:].pow(2).sum() / S.pow(2).sum()))
    if method != "power":
        raise ValueError(f"rank1_optimal_error method={method!r} is not one of svdvals, power.")
    total = float(A.pow(2).sum())
    v = torch.ones(A.shape[1], dtype=torch.float64, device=A.device)
    s1 = 0.0
    for _ in range(max_iter):
        u = A @ v
        w = A.T @ u
        new = float(w.pow(2).sum() / u.pow(2).sum())  # ‖Aᵀu‖²/‖u‖², rising to σ₁²
        v = w / w.norm()
        if new - s1 <= 1e-15 * new:
            s1 = max(s1, new)
            break
        s1 = new
    return math.sqrt(max(total - s1, 0.0) / total)
