"""SVID: exact rank-1 error (SVD), NMF at least as good as sklearn's, better than XNOR."""

from __future__ import annotations

import contextlib
import itertools
import math

import pytest
import torch

from onebit.quant import (
    rank1_optimal_error,
    relative_error,
    svid,
    svid_approx,
    svid_error,
    xnor_error,
)


def _llm_like(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    """Gaussian weights with lognormal row and column scales, as trained LLM weights have."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.exp(0.5 * torch.randn(out_f, 1, generator=g))
    cols = torch.exp(0.5 * torch.randn(1, in_f, generator=g))
    return 0.02 * torch.randn(out_f, in_f, generator=g) * rows * cols


@pytest.mark.parametrize("method", ["nmf", "svd", "nmf_sklearn"])
def test_factors_are_nonnegative_with_the_right_shapes(method: str) -> None:
    a, b = svid(_llm_like(48, 80), method)
    assert a.shape == (48,) and b.shape == (80,)
    assert (a >= 0).all() and (b >= 0).all()
    assert a.dtype == b.dtype == torch.float32


def test_svd_error_equals_the_exact_rank1_error() -> None:
    W = _llm_like(96, 160)
    S = torch.linalg.svdvals(W.abs().double())
    exact = math.sqrt(float(S[1:].pow(2).sum() / W.double().pow(2).sum()))
    assert svid_error(W, "svd") == pytest.approx(exact, rel=1e-6)
    assert rank1_optimal_error(W) == pytest.approx(exact, rel=1e-12)


def _path(path: str):
    """The C++ op (skipped when it cannot be built here) or the pure-PyTorch path (the GPU one)."""
    from onebit import kernels

    if path == "torch":
        return kernels.disabled()
    if not kernels.available():
        pytest.skip(f"no C++ kernels: {kernels.status()}")
    return contextlib.nullcontext()


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("shape", [(64, 64), (172, 64), (96, 257), (1024, 2752)])
def test_nmf_error_is_at_most_sklearns(shape: tuple[int, int], path: str) -> None:
    """No tolerance: both errors in float64 from the float32 factors (svid_error)."""
    W = _llm_like(*shape, seed=shape[0])
    with _path(path):
        ours = svid_error(W, "nmf")
    sk, best = svid_error(W, "nmf_sklearn"), rank1_optimal_error(W)
    assert ours <= sk, (ours - sk) / sk
    assert (ours - best) / best < 1e-12


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_nmf_error_is_at_most_sklearns_on_every_real_matrix(stories_path, path: str) -> None:
    from transformers import AutoModelForCausalLM

    from onebit.quant import iter_target_linears

    model = AutoModelForCausalLM.from_pretrained(stories_path)
    weights = [m.weight.detach() for _, m in iter_target_linears(model)]
    assert len(weights) == 35
    with _path(path):
        ours = [svid_error(W, "nmf") for W in weights]
    worse = [
        (i, (x - y) / y)
        for i, (x, y) in enumerate(zip(ours, [svid_error(W, "nmf_sklearn") for W in weights]))
        if x > y
    ]
    assert not worse


def _als_iterate(W: torch.Tensor, rounds: int) -> torch.Tensor:
    """b after ``rounds`` rounds of the rank-1 ALS from b = 1, in float64."""
    A = W.abs().double()
    b = torch.ones(W.shape[1], dtype=torch.float64)
    for _ in range(rounds):
        a = A @ b / b.dot(b)
        b = A.T @ a / a.dot(a)
    return b


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("threads", [1, 2])
def test_z_is_summed_to_float32_accuracy_over_many_rows(path: str, threads: int) -> None:
    """Aᵀa over 16384 rows: float32 sums of 32 rows added in float64 keep b within a few float32
    roundings of the float64 iterate (one float32 sum over the rows drifted to 4-5e-6)."""
    from onebit.quant.svid import _rank1_als

    W = _llm_like(16384, 256, seed=1)
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with _path(path):
            _, b, rounds = _rank1_als(W, 3, -1.0)  # tol < 0: exactly max_iter rounds
    finally:
        torch.set_num_threads(prev)
    ref = _als_iterate(W, 3)
    assert rounds == 3
    assert float(((b.double() - ref) / ref).abs().max()) < 3e-7


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("tol", [1e-3, 1e-6])
def test_nmf_stops_after_the_first_round_that_moves_b_by_at_most_tol(path: str, tol: float):
    from onebit.quant.svid import _rank1_als, direction_change

    W = _llm_like(300, 401, seed=3)
    with _path(path):
        _, _, k = _rank1_als(W, 200, tol)
        b = [_rank1_als(W, n, -1.0)[1] if n else torch.ones(401) for n in range(k + 1)]
    moves = [direction_change(b[n], b[n - 1]) for n in range(1, k + 1)]
    assert k >= 2 and moves[-1] <= tol, moves
    assert all(m > tol for m in moves[:-1]), moves
    assert all(x > y for x, y in itertools.pairwise(moves)), moves  # power iteration: ever smaller


def test_optimum_by_power_iteration_equals_the_one_from_all_singular_values() -> None:
    for shape in [(64, 64), (300, 401), (401, 300)]:
        W = _llm_like(*shape, seed=shape[0])
        exact = rank1_optimal_error(W)
        assert abs(rank1_optimal_error(W, "power") - exact) < 1e-14
    with pytest.raises(ValueError, match="method='eig' is not one of svdvals, power"):
        rank1_optimal_error(W, "eig")


def test_power_is_no_second_name_for_nmf() -> None:
    """``power`` ran the same iteration as ``nmf``; one name per computation now."""
    from onebit.errors import OneBitInputError
    from onebit.quant import OneBitConfig

    with pytest.raises(OneBitInputError, match=r"svid_method.*'power'.*nmf, svd, nmf_sklearn"):
        OneBitConfig(svid_method="power")
    with pytest.raises(ValueError, match="is not one of nmf, svd, nmf_sklearn, none"):
        svid(_llm_like(4, 6), "power")


def test_svid_beats_xnor_on_llm_like_weights() -> None:
    W = _llm_like(128, 256)
    assert svid_error(W, "nmf") < xnor_error(W) - 0.01


def test_svid_beats_xnor_on_real_weights(stories_path) -> None:
    from transformers import AutoModelForCausalLM

    from onebit.quant import iter_target_linears

    model = AutoModelForCausalLM.from_pretrained(stories_path)
    pairs = [
        (svid_error(m.weight, "nmf"), xnor_error(m.weight)) for _, m in iter_target_linears(model)
    ]
    assert len(pairs) == 35  # 5 blocks × (q, k, v, o, gate, up, down)
    svid_mean = sum(p[0] for p in pairs) / len(pairs)
    xnor_mean = sum(p[1] for p in pairs) / len(pairs)
    assert all(s < x for s, x in pairs), pairs
    assert svid_mean < xnor_mean


def test_none_gives_unit_scales_and_approx_is_consistent() -> None:
    W = _llm_like(8, 12)
    a, b = svid(W, "none")
    assert torch.equal(a, torch.ones(8)) and torch.equal(b, torch.ones(12))
    a, b = svid(W, "svd")
    exact = relative_error(W, svid_approx(W, a, b, torch.float64))
    assert svid_approx(W, a, b, torch.float64).dtype == torch.float64
    assert exact == pytest.approx(svid_error(W, "svd"), rel=1e-12)
    # the float32 product a_i b_j is rounded: close, not equal
    assert relative_error(W, svid_approx(W, a, b)) == pytest.approx(exact, rel=1e-6)


def test_balance_keeps_the_product() -> None:
    W = _llm_like(30, 50)
    a, b = svid(W, "nmf")
    assert a.pow(2).mean().sqrt().item() == pytest.approx(b.pow(2).mean().sqrt().item(), rel=1e-4)


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="method='qr'"):
        svid(torch.randn(4, 4), "qr")
    with pytest.raises(ValueError, match="2-D weight"):
        svid(torch.randn(4), "nmf")


@pytest.mark.parametrize("shape", [(1, 1), (7, 33), (64, 172), (300, 401), (513, 257)])
def test_cpp_kernel_matches_the_torch_path(shape: tuple[int, int]) -> None:
    from onebit import kernels

    if not kernels.available():
        pytest.skip(f"no C++ kernels: {kernels.status()}")
    W = _llm_like(*shape, seed=sum(shape))  # (300, 401) and (513, 257) use two threads
    # the default tol leaves the vectors ~1e-6 apart at most: compare at the float32 fixed point
    # instead (tol 1e-13 runs until the direction stops moving less)
    with kernels.disabled():
        a_ref, b_ref = svid(W, "nmf", max_iter=1000, tol=1e-13)
    a, b = svid(W, "nmf", max_iter=1000, tol=1e-13)
    torch.testing.assert_close(a, a_ref, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(b, b_ref, rtol=2e-5, atol=1e-7)
    # abs: at (1, 1) the optimum is 0, and float32 a, b reproduce |w| only to ~1e-8 of it
    assert svid_error(W, "nmf") == pytest.approx(rank1_optimal_error(W), rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_path_one_block_equals_many_blocks(dtype: torch.dtype) -> None:
    """The torch path makes |W| once when it fits in one block (as on GPU) and per block of rows
    otherwise; both reach the same fixed point."""
    from onebit import kernels
    from onebit.quant.svid import _rank1_als

    W = _llm_like(300, 401).to(dtype)
    with kernels.disabled():
        a1, b1, _ = _rank1_als(W, 1000, 1e-13, chunk_bytes=1 << 30)  # one block: the whole |W|
        a16, b16, _ = _rank1_als(W, 1000, 1e-13, chunk_bytes=4 * 401 * 16)  # blocks of 16 rows
    torch.testing.assert_close(a1, a16, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(b1, b16, rtol=2e-5, atol=1e-7)
    err = relative_error(W, svid_approx(W, a1, b1))
    assert err == pytest.approx(rank1_optimal_error(W), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpp_kernel_reads_half_precision_weights_as_stored(dtype: torch.dtype) -> None:
    from onebit import kernels

    if not kernels.available():
        pytest.skip(f"no C++ kernels: {kernels.status()}")
    W = _llm_like(300, 401).to(dtype)  # the same values in fp32 give the same arithmetic
    for x, y in zip(svid(W, "nmf"), svid(W.float(), "nmf"), strict=True):
        torch.testing.assert_close(x, y, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cpp_kernel_row_blocks_change_no_bit(dtype: torch.dtype) -> None:
    """Blocks of 2, 4 or 8 rows, interleaved or one row after another, and the defaults by dtype
    (0, -1), give exactly the one-row kernel's a, b and rounds, on shapes with partial blocks (rows
    not a multiple of 8) and column tails (not of 16)."""
    from onebit import kernels

    if not kernels.available():
        pytest.skip(f"no C++ kernels: {kernels.status()}")
    op = torch.ops.onebit.svid_rank1_als
    threads = torch.get_num_threads()
    try:
        for nt in (1, 2):
            torch.set_num_threads(nt)
            for shape in [(1, 1), (3, 17), (9, 33), (13, 64), (300, 401), (513, 257)]:
                W = _llm_like(*shape, seed=sum(shape)).to(dtype)
                a1, b1, n1 = op(W, 5, 0.0, 1)  # tol 0: until b's direction stops moving less
                for rows in (0, 2, 4, 8):
                    for interleave in (-1, 0, 1):
                        a, b, n = op(W, 5, 0.0, rows, interleave)
                        where = (nt, shape, rows, interleave)
                        assert n == n1 and torch.equal(a, a1) and torch.equal(b, b1), where
        with pytest.raises(
            RuntimeError, match=r"block_rows must be 0 \(by dtype\), 1, 2, 4 or 8, got 3"
        ):
            op(W, 5, 0.0, 3)
        with pytest.raises(
            RuntimeError, match=r"interleave must be -1 \(by dtype\), 0 or 1, got 2"
        ):
            op(W, 5, 0.0, 4, 2)
    finally:
        torch.set_num_threads(threads)
