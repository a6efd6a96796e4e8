"""Every ``python …`` command in the README's code blocks runs, so the documentation cannot drift
from the code: each is run as written, with tiny-model overrides appended (stories260K, a few
steps, one window) and its outputs sent to a temporary folder. The commands that need a GPU, a
cluster, the Hub or an hour are listed in SKIP with the reason."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from onebit.eval.zeroshot import TASKS_DIR

from .conftest import REPO, SHARED

README = REPO / "README.md"

SKIP = {  # the command as written (comments dropped) -> why this test does not run it
    "python -m pytest": "the test suite itself",
    "python train.py trainer=gpu": "needs a GPU",
    "python train.py experiment=onebit_llama7b": "8 GPUs and LLaMA-7B from the Hub",
    "python evaluate.py model=llama7b": "LLaMA-7B from the Hub",
    "python benchmarks/results.py experiment=results_smollm2_135m": (
        "about 2 hours of CPU; the same script runs above as results_stories260k"
    ),
}

# placeholders of the README -> what stands for them here ({run}: a finished stories260K run)
PLACEHOLDERS = {
    "outputs/train/runs/<time>": "{run}",
    "outputs/train/runs/<run>": "{run}",
    "/data/c4/*.parquet": str(SHARED / "data" / "c4" / "c4_validation_2k.parquet"),
    "my_domain.txt": str(SHARED / "data" / "wikitext2" / "wiki.test.raw"),
}
WIKI = "eval.wikitext2_path=${paths.shared_dir}/data/wikitext2/wiki.test.raw"
C4 = "eval.c4_path=${paths.shared_dir}/data/c4/c4_validation_2k.parquet"
SMALL_DATA = [  # self-generated data, small
    "data.num_sequences=8",
    "data.val_sequences=2",
    "data.seq_len=32",
    "data.batch_size=2",
    "data.gen_batch_size=8",
]


def readme_commands() -> list[str]:
    """The ``python …`` lines of the README's fenced code blocks, continuations joined,
    comments dropped."""
    text = README.read_text()
    out = []
    for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if line.strip().startswith("python "):
                out.append(shlex.join(shlex.split(line, comments=True)))
    return out


def _keys(words: list[str]) -> set[str]:
    return {w.split("=", 1)[0].lstrip("+~") for w in words if "=" in w}


def _tiny(words: list[str], tmp: Path) -> list[str]:
    """The overrides appended to one command: small model, data and budget; outputs in ``tmp``."""
    script, keys = words[1], _keys(words)
    if script == "-m" and words[2] == "onebit.lm_eval":  # the tasks from local files, 2 items
        data = json.dumps({"data_dir": str(SHARED / "data")})
        return ["--include_path", str(TASKS_DIR), "--metadata", data, "--limit", "2"]
    if script == "-m":  # python -m onebit.export_checkpoint CKPT OUT: OUT into tmp
        return []
    extra = [f"paths.log_dir={tmp}/logs", f"paths.cache_dir={tmp}/cache"]
    if script == "train.py" and "plan.enabled" not in keys:
        extra += ["trainer=cpu_smoke", "trainer.max_steps=2", "logger=none"]
        extra += [] if "model" in keys else ["model=stories260k"]
        if "data" not in keys:
            extra += SMALL_DATA
        else:
            extra += ["data.val_blocks=2", "data.num_workers=0"]
            extra += [] if "data.seq_len" in keys else ["data.seq_len=64", "data.batch_size=2"]
    elif script == "evaluate.py":
        extra += ["logger=none", "eval.max_windows=1", "eval.limit=2", "eval.c4_samples=2"]
        extra += [] if "eval.wikitext2_path" in keys else [WIKI]
        extra += [] if "eval.c4_path" in keys else [C4]
        extra += ["eval.tasks=[piqa]", "diagnose.tokens=256", "diagnose.seq_len=128"]
        if "source" not in keys and "model" not in keys:
            extra += ["model=stories260k"]
    elif script == "generate.py":
        extra += ["max_new_tokens=4"]
        if "source" in keys and "model" not in keys:
            extra += ["model=stories260k"]
    elif script == "benchmarks/results.py":
        extra += ["train.steps=2", "train.ablation_steps=2", "train.eval_every=1"]
        extra += ["rows=[teacher,svid,onebit]", "eval.max_windows=1", "eval.tasks=[]"]
        extra += ["plot=null", "logger=none", "eval.curve_windows=1"]
        extra += ["data.num_sequences=16", "data.val_sequences=4", "data.gen_batch_size=8"]
    return extra


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished stories260K run: checkpoints and an export, where the README says `<time>`."""
    if not SHARED.exists():
        pytest.skip(f"{SHARED} is absent (stories260K lives in ../shared beside the checkout)")
    run = tmp_path_factory.mktemp("readme") / "run"
    cmd = [sys.executable, "train.py", "model=stories260k", "trainer=cpu_smoke", "logger=none"]
    cmd += [*SMALL_DATA, f"hydra.run.dir={run}", f"paths.cache_dir={run.parent}/cache"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return run


def test_the_readme_has_its_commands() -> None:
    commands = readme_commands()
    assert "python train.py" in commands
    assert "python train.py -m optim.lr=1e-4,4e-4" in commands
    assert set(SKIP) <= set(commands), set(SKIP) - set(commands)  # no stale skip entry


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in dict.fromkeys(readme_commands()) if c not in SKIP])
def test_readme_command_runs(command: str, finished_run: Path, tmp_path: Path) -> None:
    words = shlex.split(command)
    for old, new in PLACEHOLDERS.items():
        words = [w.replace(old, new.format(run=finished_run)) for w in words]
    if words[1] == "-m" and words[2] == "onebit.export_checkpoint":
        words[-1] = str(tmp_path / words[-1])
    if words[1] == "-m" and words[2] == "onebit.lm_eval":  # lm-eval's tasks, as read offline
        i = words.index("--tasks") + 1
        words[i] = ",".join(f"onebit_{t}" for t in words[i].split(","))
    argv = [sys.executable, *words[1:], *_tiny(words, tmp_path)]
    p = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, f"{shlex.join(argv)}\n{p.stderr[-3000:]}"
