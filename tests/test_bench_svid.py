"""benchmarks/bench_svid.py: a small run prints every row and check; bad --device values fail."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

from .conftest import REPO

_spec = importlib.util.spec_from_file_location("bench_svid", REPO / "benchmarks" / "bench_svid.py")
bench_svid = importlib.util.module_from_spec(_spec)
sys.modules["bench_svid"] = bench_svid  # its dataclasses look their module up there
_spec.loader.exec_module(bench_svid)

# The smallest run: the /4 shapes, no real weights, one run of one pass per method. The heap is
# left alone (--default-heap), so that the test process's allocator is not reconfigured.
QUICK = ["--quick", "--no-smollm2", "--repeats", "1", "--min-run-seconds", "0", "--cold-mib", "0"]


def _run(capsys: pytest.CaptureFixture[str], tmp_path, device: str) -> str:
    args = [*QUICK, "--model", str(tmp_path / "absent"), "--default-heap", "--device", device]
    try:
        bench_svid.main(args)
    finally:
        bench_svid.DEVICE = torch.device("cpu")
    return capsys.readouterr().out


def _check_table(out: str, device: str) -> None:
    assert f"- device: {device}" in out
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| random ")]
    methods = [r[2] for r in rows]
    assert len(rows) == 3 * len(bench_svid.METHODS)
    assert sorted(set(methods)) == sorted(bench_svid.METHODS)
    for r in rows:
        if r[2] in ("xnor", "nmf_sklearn", "read"):
            continue
        # every SVID method reaches the rank-1 optimum (float64 svdvals at these sizes)
        assert abs(float(r[6])) < 1e-6, r
    checks = [line for line in out.splitlines() if " error − sklearn error = " in line]
    assert len(checks) == 3 * 3  # nmf, nmf_torch, nmf_bf16 on each random shape
    from onebit import kernels

    for line in checks:
        rel = float(line.split("(relative ")[1].split(")")[0])
        assert rel <= 1e-6, line  # scikit-learn's error, to float32 rounding
        if kernels.available() and (": nmf error" in line or ": nmf_bf16 error" in line):
            assert "at most sklearn's on 1 of 1 matrices" in line, line  # the C++ op: no tolerance
    reads = [line for line in out.splitlines() if "one plain read of W takes" in line]
    assert len(reads) == 3  # the read floor, on each random shape


def test_quick_run_prints_every_method_and_the_error_checks(capsys, tmp_path) -> None:
    out = _run(capsys, tmp_path, "cpu")
    _check_table(out, "cpu")
    assert "model folder" in out and "not found" in out  # the absent model is said, not hidden


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quick_run_on_cuda(capsys, tmp_path) -> None:
    out = _run(capsys, tmp_path, "cuda")
    _check_table(out, "cuda")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--device", "foo"], "--device 'foo' is not a torch device"),
        (["--device", "meta"], "--device meta: only cpu and cuda are supported"),
        (["--repeats", "0"], "--repeats must be >= 1"),
    ],
)
def test_bad_arguments_name_the_option(argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        bench_svid.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_cuda_without_a_gpu_is_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        bench_svid.parse_args(["--device", "cuda"])
    assert "torch.cuda.is_available() is False" in capsys.readouterr().err
