"""The decode kernel on every instruction set: AVX-512, AVX2 and portable C++, chosen at run time,
each exact (to fp32 rounding) against a float64 reference on odd shapes; the AVX2 path also from a
build for an AVX2-only target (x86-64-v3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from onebit import kernels
from onebit.quant.packing import pack_signs, tile_signs

from ..conftest import REPO

pytestmark = pytest.mark.skipif(not kernels.available(), reason="needs the C++ kernels")

# (out, in): 1 and odd widths (a partial byte, a partial 8- or 16-lane step), fewer rows than a
# block of 8, a block and a remainder, and one LLaMA-7B width
SHAPES = [(1, 1), (3, 7), (9, 15), (17, 17), (8, 16), (33, 129), (23, 1000), (12, 4096), (300, 257)]


def _available_isas() -> list[str]:
    out = []
    for name in kernels.ISAS:
        with kernels.forced_isa(name) as used:
            if used == name:
                out.append(name)
    return out


def _check_exact(name: str) -> None:
    torch.manual_seed(0)
    for out_f, in_f in SHAPES:
        W = torch.randn(out_f, in_f)
        P, S = tile_signs(pack_signs(W), in_f), torch.where(W >= 0, 1.0, -1.0).double()
        for tokens in (1, 2, 5, 8):  # the decode path: up to GEMV_MAX_TOKENS = 8
            x = torch.randn(tokens, in_f)
            expected = x.double() @ S.t()
            z = torch.ops.onebit.sign_matmul(x, P, in_f, out_f, 8)
            scale = x.abs().sum(dim=1, keepdim=True).double()  # fp32 rounding of a sum of |x|
            err = ((z.double() - expected).abs() / scale).max().item()
            assert err < 1e-6, (name, out_f, in_f, tokens, err)


def test_this_cpu_has_a_portable_path_and_its_best() -> None:
    isas = _available_isas()
    assert isas[0] == "scalar" and kernels.isa() == isas[-1]
    assert f"decode {kernels.isa()}" in kernels.status()


@pytest.mark.parametrize("name", kernels.ISAS)
def test_each_instruction_set_is_exact_on_odd_shapes(name: str) -> None:
    if name not in _available_isas():
        pytest.skip(f"this CPU has no {name}")
    with kernels.forced_isa(name) as used:
        assert used == name
        _check_exact(name)
    assert kernels.isa() == _available_isas()[-1]  # the block restores the best


def test_the_instruction_sets_agree_with_each_other() -> None:
    torch.manual_seed(1)
    W, x = torch.randn(37, 300), torch.randn(3, 300)
    P = tile_signs(pack_signs(W), 300)
    results = {}
    for name in _available_isas():
        with kernels.forced_isa(name):
            results[name] = torch.ops.onebit.sign_matmul(x, P, 300, 37, 8)
    for z in results.values():
        torch.testing.assert_close(z, results["scalar"], rtol=0, atol=1e-4)


_CHILD = """
import json, pathlib, tempfile, torch
from onebit import kernels
from tests.kernels.test_isa import _check_exact
from tests.test_decoder import _compare, _export
_check_exact(kernels.isa())
with tempfile.TemporaryDirectory() as d:  # the decode step (dense GEMV, attention) on this build
    m = _export(pathlib.Path(d), "llama", hidden_size=128, num_attention_heads=2,
                num_key_value_heads=1, head_dim=64)
    assert _compare(m, steps=8) < 1e-5
print(json.dumps({"isa": kernels.isa(), "status": kernels.status()}))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("march", "isa"), [("x86-64-v3", "avx2_lut"), ("x86-64-v3", "avx2"), ("native", "scalar")]
)
def test_a_build_for_an_avx2_target_runs_the_avx2_path(march: str, isa: str) -> None:
    """ONEBIT_KERNEL_MARCH=x86-64-v3 compiles for AVX2 without AVX-512 (its own cached build);
    ONEBIT_KERNEL_ISA forces the path at run time. The kernel and the decode step are exact."""
    if isa not in _available_isas():
        pytest.skip(f"this CPU has no {isa}")
    env = {**os.environ, "ONEBIT_KERNEL_MARCH": march, "ONEBIT_KERNEL_ISA": isa}
    done = subprocess.run(
        [sys.executable, "-c", _CHILD], cwd=REPO, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads(done.stdout.strip().splitlines()[-1])
    assert info["isa"] == isa and f"decode {isa}" in info["status"]
