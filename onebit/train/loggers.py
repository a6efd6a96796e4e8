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
