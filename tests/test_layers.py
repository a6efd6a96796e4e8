"""The layers of the package: the method library, the file formats (exports, checkpoints) and
the export command import neither Lightning nor Hydra, so a user's own training loop (README,
"Your own loop") pulls in neither; Lightning lives in ``onebit.train``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO

APP_PACKAGES = ("lightning", "lightning_fabric", "pytorch_lightning", "hydra", "omegaconf")


@pytest.mark.parametrize(
    "module",
    [
        "onebit.quant",
        "onebit.distill",
        "onebit.export",
        "onebit.models",
        "onebit.checkpoint",
        "onebit.export_checkpoint",
        "onebit.eval.perplexity",
    ],
)
def test_the_library_imports_neither_lightning_nor_hydra(module: str) -> None:
    code = (
        f"import importlib, sys; importlib.import_module({module!r}); "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({APP_PACKAGES!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]", f"{module} imports {done.stdout.strip()}"


def test_the_check_sees_lightning_when_it_is_imported() -> None:
    """The check above can fail: the LightningModule's file does import Lightning."""
    code = (
        "import sys, onebit.train.module; "
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({APP_PACKAGES!r})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert "lightning" in done.stdout, done.stderr[-2000:]


def test_the_sharded_checkpoint_meta_file_is_lightnings() -> None:
    """``onebit.checkpoint.sharded`` names Lightning's ``meta.pt`` without importing Lightning."""
    from lightning.fabric.strategies.model_parallel import _METADATA_FILENAME

    from onebit.checkpoint.sharded import LIGHTNING_META

    assert LIGHTNING_META == _METADATA_FILENAME
