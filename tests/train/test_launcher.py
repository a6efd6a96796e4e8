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
