"""benchmarks/bench_llamacpp.py: its OneBit rows run anywhere (llama.cpp's needs the optional
llama-cpp-python) and the step decoder's row generates the model forward's tokens; without
llama-cpp-python it names the install command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .conftest import REPO, shared_path


def test_the_onebit_row_measures_an_export(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from onebit.export import save_onebit
    from onebit.quant import OneBitConfig, freeze_, quantize_

    src = shared_path("models", "stories260K-hf")
    student = freeze_(quantize_(AutoModelForCausalLM.from_pretrained(src), OneBitConfig()))
    export = save_onebit(student, tmp_path / "e", OneBitConfig(), dtype=torch.float16)
    rows = {}
    for child in ("onebit", "onebit_model"):
        done = subprocess.run(
            [sys.executable, "benchmarks/bench_llamacpp.py", "--child", child, "--threads", "1",
             "--export", str(export), "--prompt-tokens", "8", "--new-tokens", "12"],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        rows[child] = r = json.loads(done.stdout.strip().splitlines()[-1])
        assert len(r["tokens"]) == 12 and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
        assert r["peak_rss"] > 0 and 0 < r["first_token_s"] < 60
    assert rows["onebit"]["decoder"] == "step" and rows["onebit_model"]["decoder"] == "model"
    assert rows["onebit"]["tokens"] == rows["onebit_model"]["tokens"]


def test_without_llama_cpp_python_it_says_how_to_install_it(tmp_path: Path) -> None:
    (tmp_path / "llama_cpp.py").write_text("raise ImportError('not here')\n")
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_llamacpp.py")],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )  # fmt: skip
    assert done.returncode == 1
    assert "pip install --no-binary llama-cpp-python -r benchmarks/requirements-llamacpp.txt" in (
        done.stderr
    )
