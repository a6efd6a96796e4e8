"""A multi-process strategy inside Hydra's basic launcher is refused with one sentence."""

from __future__ import annotations

import subprocess
import sys

from ..conftest import REPO


def test_ddp_sweep_with_the_basic_launcher_is_refused(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "train.py", "-m", "trainer=ddp", "model=tiny_llama", "logger=none",
         "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "error: trainer.strategy=ddp under Hydra's basic launcher (python train.py -m) would "
        "re-run the whole sweep in every worker process; sweep with hydra/launcher=slurm (one "
        "job per sweep point) or launch each point yourself."
    )
    assert not list((tmp_path / "sweep").rglob("*.ckpt"))


def test_an_fsdp_sweep_names_the_strategy_built_by_its_target(tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "train.py", "-m", "trainer=fsdp", "trainer.accelerator=cpu",
         "model=tiny_llama", "logger=none", "optim.lr=1e-3,2e-3",
         f"hydra.sweep.dir={tmp_path}/sweep"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert (
        out.stderr.strip()
        .splitlines()[-1]
        .startswith("error: trainer.strategy=fsdp2 under Hydra's basic launcher")
    )


def test_trainer_fsdp_builds_fsdp2_by_its_target() -> None:
    """conf/trainer/fsdp.yaml names the strategy by ``_target_``; its arguments are config keys."""
    from hydra import compose, initialize_config_dir

    from onebit.config_utils import register_resolvers
    from onebit.train.build import container, make_trainer, strategy_name
    from onebit.train.parallel import FSDP2Strategy

    register_resolvers()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["trainer=fsdp", "trainer.strategy.save_distributed_checkpoint=false"],
        )
    t = container(cfg.trainer)
    assert t["strategy"]["_target_"] == "onebit.train.parallel.FSDP2Strategy"
    assert strategy_name(t["strategy"]) == "fsdp2"
    assert strategy_name("ddp") == "ddp" and strategy_name(None) == "auto"
    t.update(accelerator="cpu", devices=1, enable_progress_bar=False)
    trainer = make_trainer(t, logger=False, enable_checkpointing=False)
    assert type(trainer.strategy) is FSDP2Strategy
    assert trainer.strategy._save_distributed_checkpoint is False
