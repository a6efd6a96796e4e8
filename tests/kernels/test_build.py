"""The C++ kernels build on first use, or the pure-PyTorch path is used with one warning."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from onebit import kernels


def test_kernels_build_here() -> None:
    # The CI machines have g++ and ninja (requirements-common.txt): the kernels must be on.
    assert kernels.available(), kernels.status()
    assert hasattr(torch.ops.onebit, "svid_rank1_als")


def test_failed_build_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "_state", {})

    def no_compiler() -> None:
        raise RuntimeError("Error building extension 'onebit_cpu'\nc++: not found")

    monkeypatch.setattr(kernels, "_build", no_compiler)
    with pytest.warns(
        RuntimeWarning, match=r"could not be built \(RuntimeError: c\+\+: not found\)"
    ):
        assert not kernels.available()
    assert not kernels.use_kernel(torch.zeros(1))
    assert kernels.status() == "C++ kernels: off (RuntimeError: c++: not found)"


def test_env_switch_turns_the_kernels_off() -> None:
    code = "from onebit import kernels; print(kernels.status())"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**__import__("os").environ, "ONEBIT_KERNELS": "0"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "C++ kernels: off (disabled by ONEBIT_KERNELS=0)"


def test_disabled_block_switches_to_torch_and_back() -> None:
    t = torch.zeros(2)
    assert kernels.use_kernel(t)
    with kernels.disabled():
        assert not kernels.use_kernel(t)
    assert kernels.use_kernel(t)
    assert not kernels.use_kernel(torch.zeros(2, device="meta"))
