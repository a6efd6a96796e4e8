"""Helpers of the reliability tests: tiny runs of train.py in process or as a subprocess, the CLI's
exit status and last stderr line, and checkpoint comparison."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from ..conftest import REPO
from ..train.conftest import TINY, compose_train

FAULTS = "tests.reliability.faults"


@pytest.fixture
def one_thread():
    """One intra-op thread (the subprocess runs get OMP_NUM_THREADS=1): the same sums, bitwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny(tmp: Path, *overrides: str):
    """The tiny train config (tiny llama, 24 generated sequences of 16 tokens, CSV logs)."""
    return compose_train([*TINY, "logger=none", *overrides], tmp)


def cli(cfg) -> tuple[int, str, float]:
    """``run_cli(train.run, cfg)`` in this process: (exit status, last stderr line, seconds)."""
    import train
    from onebit.errors import run_cli

    err = io.StringIO()
    start = time.perf_counter()
    code = 0
    with contextlib.redirect_stderr(err):
        try:
            run_cli(train.run, cfg)
        except SystemExit as e:
            code = e.code
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
    return code, (lines[-1] if lines else ""), time.perf_counter() - start


def assert_one_sentence(line: str, prefix: str = "error: ") -> None:
    assert line.startswith(prefix), line
    assert line.endswith("."), line
    assert "Traceback" not in line and "\n" not in line


def train_proc(
    run_dir: Path,
    *overrides: str,
    wait: bool = True,
    cache: Path | None = None,
    base: Sequence[str] = TINY,
):
    """``python train.py``, tiny config, in ``run_dir``, one thread; a Popen if not ``wait``."""
    cmd = [
        sys.executable,
        "train.py",
        *base,
        "logger=none",
        f"hydra.run.dir={run_dir}",
        f"paths.cache_dir={cache or run_dir.parent / 'cache'}",
        *overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(a: Path, b: Path) -> None:
    """Two checkpoints hold the same step, student weights and AdamW state, bitwise."""
    ca, cb = load(a), load(b)
    assert ca["global_step"] == cb["global_step"]
    assert ca["state_dict"].keys() == cb["state_dict"].keys()
    for k, v in ca["state_dict"].items():
        torch.testing.assert_close(cb["state_dict"][k], v, atol=0, rtol=0, msg=k)
    sa, sb = ca["optimizer_states"][0]["state"], cb["optimizer_states"][0]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(sb[i][key], sa[i][key], atol=0, rtol=0, msg=f"{i}.{key}")
