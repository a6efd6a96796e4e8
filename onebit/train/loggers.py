"""W&B without surprises: online only when the user has configured it, never a prompt or a wait."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any


def wandb_configured() -> bool:
    """True when W&B credentials exist (``WANDB_API_KEY``, or ``wandb login``'s ~/.netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC", str(Path.home() / ".netrc")))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("//")[-1].split("/")[0]
    return rc.authenticators(host) is not None


def resolve_wandb_mode(mode: str = "auto") -> str:
    """``auto`` → ``online`` if configured (or WANDB_MODE says so), else ``offline``."""
    if mode != "auto":
        return mode
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    return "online" if wandb_configured() else "offline"


def make_wandb_logger(
    project: str = "onebit",
    name: str | None = None,
    mode: str = "auto",
    save_dir: str = ".",
    **kwargs: Any,
):
    """A Lightning ``WandbLogger`` in the resolved mode; secrets come only from the environment."""
    from lightning.pytorch.loggers import WandbLogger

    resolved = resolve_wandb_mode(mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("WANDB_CONSOLE", "off")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=project,
        name=name,
        save_dir=save_dir,
        mode=resolved,
        offline=resolved == "offline",
        **kwargs,
    )


def log_eval_table(wandb_node: dict[str, Any], config: dict[str, Any], row: dict[str, Any]) -> None:
    """``evaluate.py``'s row to W&B (``logger=wandb``): the paper's table and the whole row as the
    run summary, in a run of job type ``evaluate``."""
    import wandb

    from onebit.eval.table import row_cells, table_head

    run = wandb.init(
        project=wandb_node.get("project", "onebit"),
        name=wandb_node.get("name"),
        dir=wandb_node.get("save_dir"),
        mode=resolve_wandb_mode(wandb_node.get("mode", "auto")),
        job_type="evaluate",
        config=config,
    )
    run.log({"eval/table": wandb.Table(columns=table_head([row]), data=[row_cells(row)])})
    run.summary.update({"eval": row})
    run.finish()
