"""The command-line tools refuse bad input with one sentence and exit status 2 (issue: reliability
II, items 10-12): a typo'd or mistyped key, a required value left unset, a prompt beyond the
model's context, a non-positive max_new_tokens, a model without a tokenizer, an override a source
ignores."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import REPO
from .conftest import assert_one_sentence, cli, tiny


def _run(script: str, *args: str, cwd: Path = REPO) -> tuple[int, str, str]:
    p = subprocess.run(
        [sys.executable, script, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    return p.returncode, (lines[-1] if lines else ""), p.stdout


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory) -> Path:
    """The export and checkpoint of a tiny smoke run (a random model: no tokenizer)."""
    tmp = tmp_path_factory.mktemp("smoke")
    code, line, _ = cli(tiny(tmp, "trainer.max_steps=2"))
    assert code == 0, line
    return tmp / "out"


@pytest.fixture(scope="module")
def stories_export(tmp_path_factory, stories_path_module) -> Path:
    from onebit.export import save_onebit
    from onebit.models import load_causal_lm, load_tokenizer
    from onebit.quant import OneBitConfig, freeze_, quantize_

    spec = {"name": "stories260k", "source": "local", "path": str(stories_path_module)}
    student = freeze_(quantize_(load_causal_lm(spec), OneBitConfig()))
    out = tmp_path_factory.mktemp("stories") / "export"
    return save_onebit(student, out, OneBitConfig(), tokenizer=load_tokenizer(spec))


@pytest.fixture(scope="module")
def stories_path_module() -> Path:
    from ..conftest import shared_path

    return shared_path("models", "stories260K-hf")


# 11. keys and values the config does not take ----------------------------------------------
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["optim.lrr=1"],
            "error: optim.lrr is not a key of the config; check its spelling (python train.py "
            "--cfg job lists every key), or add a new key with +optim.lrr=...",
        ),
        (
            ["model=local"],
            "error: model.path must be set (it has no default here): add model.path=... to the "
            "command line.",
        ),
        (["loss.alpha=0.5"], "error: loss.alpha is now called loss.hidden_weight."),
        (["loss.kd_scale=0.01"], "error: loss.kd_scale is now called loss.kd_weight."),
    ],
)
def test_train_refuses_a_command_that_does_not_compose(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    code, line, _ = _run("train.py", *args, f"hydra.run.dir={tmp_path}/run")
    assert code == 2, line
    assert line == expected
    assert not (tmp_path / "run").exists()  # refused before Hydra made the run directory


def test_a_value_of_the_wrong_type_names_its_key(tmp_path: Path) -> None:
    code, line, _ = _run("train.py", "trainer.max_steps=abc", f"hydra.run.dir={tmp_path}/run")
    assert code == 2, line
    assert_one_sentence(line)
    assert "trainer.max_steps" in line and "'abc'" in line


def test_a_parquet_text_column_of_numbers_is_one_sentence(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "numbers.parquet"
    pq.write_table(pa.table({"text": list(range(100))}), f)
    code, line, _ = _run(
        "train.py",
        "model=stories260k",
        "data=c4",
        "data.source=local",
        f"data.path={f}",
        "logger=none",
        f"hydra.run.dir={tmp_path}/run",
        "model.path=${paths.shared_dir}/models/stories260K-hf",
    )
    assert code == 2, line
    assert line == (
        f"error: column 'text' of {f} holds int64, not text (data.text_field names the column of "
        "strings to train on)."
    )


# 10. generate: the context, max_new_tokens -------------------------------------------------
def test_generate_refuses_a_prompt_beyond_the_context(stories_export: Path, tmp_path) -> None:
    prompt = "Once upon a time there was a cat. " * 150
    code, line, _ = _run(
        "generate.py", f"path={stories_export}", f"prompt={prompt!r}", f"hydra.run.dir={tmp_path}"
    )
    assert code == 2, line
    assert_one_sentence(line)
    assert line.startswith("error: the prompt (")
    assert "plus max_new_tokens=64 is" in line
    assert line.endswith(
        "tokens, above the model's context of 512 positions; nothing was generated: shorten the "
        "prompt or lower max_new_tokens."
    )


@pytest.mark.parametrize("n", ["0", "-3"])
def test_generate_refuses_max_new_tokens_below_one(n: str, tmp_path) -> None:
    code, line, _ = _run(
        "generate.py", f"path={tmp_path}", f"max_new_tokens={n}", f"hydra.run.dir={tmp_path}/r"
    )
    assert code == 2, line
    assert line == f"error: max_new_tokens={n} must be an integer >= 1."


# 12. a model without a tokenizer; an override a source ignores; where eval.json went -------
def test_generate_and_evaluate_refuse_a_model_without_a_tokenizer(
    tiny_export: Path, tmp_path: Path
) -> None:
    export = tiny_export / "onebit_model"
    code, line, _ = _run("generate.py", f"path={export}", f"hydra.run.dir={tmp_path}/g")
    assert code == 2, line
    assert line == (
        f"error: {export} has no tokenizer (a tiny random model, as smoke runs use, has none), "
        "so there is no text to generate from; use a model with a tokenizer."
    )
    code, line, _ = _run(
        "evaluate.py",
        "source=export",
        f"path={export}",
        "logger=none",
        f"hydra.run.dir={tmp_path}/e",
    )
    assert code == 2, line
    assert line == (
        f"error: {export} has no tokenizer (a tiny random model, as smoke runs use, has none), "
        "so there is no text to evaluate it on; use a model with one."
    )


def test_evaluate_refuses_a_model_override_its_source_ignores(
    tiny_export: Path, tmp_path: Path
) -> None:
    ckpt = tiny_export / "checkpoints" / "last.ckpt"
    code, line, _ = _run(
        "evaluate.py",
        "source=checkpoint",
        f"path={ckpt}",
        "model=stories260k",
        "logger=none",
        f"hydra.run.dir={tmp_path}",
    )
    assert code == 2, line
    assert line == (
        "error: model=stories260k is not used with source=checkpoint: the checkpoint names its "
        "own model; drop the override (or use source=hf to evaluate that model)."
    )


def test_generate_times_prefill_after_a_warm_up(monkeypatch) -> None:
    """The first call of a model pays set-up; with the warm-up the prefill time excludes it."""
    import torch

    import onebit.generation as generation
    from onebit.models import tiny_causal_lm

    model = tiny_causal_lm("llama").eval()
    clock = {"t": 0.0, "calls": 0}
    real_forward = model.forward

    def forward(*args, **kwargs):
        clock["calls"] += 1
        clock["t"] += 100.0 if clock["calls"] == 1 else 1.0  # set-up on the first call only
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(generation.time, "perf_counter", lambda: clock["t"])
    ids = torch.tensor([[1, 2, 3, 4]])
    # decoder="model": every new token through the (clocked) forward
    _, stats = generation.generate(model, ids, 3, decoder="model")
    assert stats.prefill_s == 1.0 and stats.decode_s == 2.0
    clock.update(t=0.0, calls=0)
    _, stats = generation.generate(model, ids, 3, warmup=False, decoder="model")
    assert stats.prefill_s == 100.0
