"""train.py end to end on tiny models: every config composes, bad input fails with one sentence."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from onebit.distill import DistillLossConfig
from onebit.models import ModelSpec
from onebit.quant import OneBitConfig
from onebit.train.module import OptimConfig

from ..conftest import REPO
from .conftest import compose_train

MODELS = sorted(p.stem for p in (REPO / "conf" / "model").glob("*.yaml"))
# the paper's runs (experiment/results_*.yaml configure benchmarks/results.py instead)
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("onebit_*.yaml"))


def _train_cli(tmp_path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python train.py`` with ``overrides``, no logger, and every path under ``tmp_path``."""
    return subprocess.run(
        [
            sys.executable,
            "train.py",
            *overrides,
            "logger=none",
            f"paths.log_dir={tmp_path}",
            f"paths.cache_dir={tmp_path}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.fixture
def offline() -> None:
    from onebit.hub import hub_reachable

    if hub_reachable():
        pytest.skip("the Hugging Face Hub is reachable from here")


def _validate(cfg) -> None:
    resolved = {
        k: OmegaConf.to_container(cfg[k], resolve=True)
        for k in ("quant", "loss", "optim", "trainer")
    }
    OneBitConfig.from_dict(resolved["quant"])
    DistillLossConfig.from_dict(resolved["loss"])
    OptimConfig.from_dict(resolved["optim"])
    import inspect

    import lightning as L

    assert set(resolved["trainer"]) <= set(inspect.signature(L.Trainer).parameters)


@pytest.mark.parametrize("model", MODELS)
def test_every_model_config_composes(model: str, tmp_path) -> None:
    overrides = [f"model={model}"] + (["model.path=/some/dir"] if model == "local" else [])
    cfg = compose_train(overrides, tmp_path)
    spec = ModelSpec.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    assert spec.name == model
    assert OmegaConf.to_container(cfg.data, resolve=True)["model"]["name"] == model
    _validate(cfg)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment: str, tmp_path) -> None:
    cfg = compose_train([f"experiment={experiment}"], tmp_path)
    assert cfg.quant.svid_method == "nmf_sklearn" and cfg.loss.kd_reduction == "batchmean"
    assert cfg.data.seq_len == 2048 and cfg.optim.betas == [0.9, 0.98]
    _validate(cfg)


def test_cfg_job_from_the_command_line() -> None:
    out = subprocess.run(
        [sys.executable, "train.py", "experiment=onebit_llama7b", "--cfg", "job"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "huggyllama/llama-7b" in out.stdout and "lr: 0.0004" in out.stdout


def test_unknown_group_option_lists_the_valid_ones() -> None:
    out = subprocess.run(
        [sys.executable, "train.py", "model=llama9b"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "llama9b" in out.stderr and "llama7b" in out.stderr and "smollm2_135m" in out.stderr


def test_missing_local_model_is_one_clear_sentence(tmp_path) -> None:
    out = _train_cli(tmp_path, "model=local", f"model.path={tmp_path}/nope")
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last == f"error: model.path={tmp_path}/nope does not exist."


@pytest.mark.slow
def test_two_job_multirun_completes(tmp_path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "-m",
            "model=tiny_llama",
            "trainer=cpu_smoke",
            "logger=csv",
            "data.num_sequences=8",
            "data.val_sequences=2",
            "data.seq_len=16",
            "data.batch_size=2",
            "optim.lr=1e-3,2e-3",
            f"paths.log_dir={tmp_path}",
            f"paths.cache_dir={tmp_path}/cache",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = sorted(tmp_path.rglob("result.json"))
    assert len(results) == 2
    lrs = sorted(
        float(OmegaConf.load(r.parent / ".hydra" / "config.yaml").optim.lr) for r in results
    )
    assert lrs == [1e-3, 2e-3]


def test_slurm_launcher_config_composes() -> None:
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            ["hydra/launcher=slurm", "experiment=onebit_llama13b"],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["nodes"] == 2 and launcher["tasks_per_node"] == 8


def test_offline_hub_data_set_fails_fast_with_one_sentence(tmp_path, stories_path, offline) -> None:
    import time

    start = time.perf_counter()
    out = _train_cli(tmp_path, "model=stories260k", f"model.path={stories_path}", "data=c4")
    elapsed = time.perf_counter() - start
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "allenai/c4" in last and "data.path=" in last
    assert elapsed < 60  # process start-up and imports included; the hub probe itself is ~ms


def test_offline_hub_model_fails_at_once_naming_it(tmp_path, offline) -> None:
    out = _train_cli(
        tmp_path,
        "model=llama7b",
        "data=self_generated",
        env={**os.environ, "HF_HOME": str(tmp_path / "hf")},
    )
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert "'huggyllama/llama-7b' is not in the local Hugging Face cache" in last
    assert "model.source=local model.path=" in last
