"""One run per run directory, and nothing written there before the run is accepted.

``train.py`` keeps a whole run in one directory (``hydra.run.dir``): checkpoints, logs, the saved
config (``.hydra/``), ``result.json`` and the export. The rules:

* a directory that already holds a run (a checkpoint, ``result.json`` or an export) is used again
  only to resume it (``ckpt_path``); a fresh run there is refused, so a finished run is never
  overwritten;
* while a run uses a directory it holds an exclusive ``flock`` on it, and a second run is refused.
  The kernel drops the lock when the process ends, however it ends, so a SIGKILLed run never
  blocks its own resume;
* ``.hydra/`` is written by ``train.py`` only once the command is accepted (Hydra's own copy is
  off), so a rejected command leaves an existing run directory as it was; a resume keeps the
  original ``.hydra/`` and records its own config under ``.hydra/resumed-<time>/``.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import Any

from onebit.errors import OneBitInputError
from onebit.export import is_onebit_export


def launch_rank() -> int:
    """This process's global rank as its launcher tells it (torchrun, SLURM, Lightning's own
    DDP processes), before any process group exists; 0 for a single process."""
    env = os.environ
    if env.get("RANK"):
        return int(env["RANK"])
    if env.get("SLURM_PROCID") and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"])
    node, local = int(env.get("NODE_RANK", "0") or 0), int(env.get("LOCAL_RANK", "0") or 0)
    return 1 if node or local else 0


def run_contents(run_dir: Path) -> list[str]:
    """What in ``run_dir`` shows that it holds a run: checkpoints, ``result.json``, the export."""
    found = []
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir():
        names = sorted(
            p.name
            for p in ckpts.iterdir()
            if not p.name.startswith(".") and (p.suffix == ".ckpt" or p.is_dir())
        )
        if names:
            more = f" and {len(names) - 1} more" if len(names) > 1 else ""
            found.append(f"checkpoints/{names[-1]}{more}")
    if (run_dir / "result.json").exists():
        found.append("result.json")
    if is_onebit_export(run_dir / "onebit_model"):
        found.append("onebit_model")
    return found


def check_fresh_run_dir(run_dir: Path) -> None:
    """Refuse to start a new run in a directory that holds one.

    Raises:
        OneBitInputError: ``run_dir`` has checkpoints, ``result.json`` or an export.
    """
    found = run_contents(run_dir)
    if found:
        raise OneBitInputError(
            f"hydra.run.dir={run_dir} already holds a run ({', '.join(found)}); resume it with "
            "ckpt_path=auto, or give a new hydra.run.dir for a new run (nothing there was "
            "changed)."
        )


def _lock_holder(path: Path) -> int | None:
    """The process holding a ``flock`` on ``path``, from /proc/locks (Linux), when it says."""
    try:
        ino = os.stat(path).st_ino
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].endswith(f":{ino}"):
                return int(parts[4])
    except (OSError, ValueError):
        pass
    return None


class RunDirLock:
    """An exclusive ``flock`` on a run directory for as long as a run uses it.

    The directory itself is locked (no lock file is created in it). A second holder is refused
    with one sentence; the lock goes when the holder's process does, whatever ends it.
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self._fd: int | None = None
        self._fork_hook = False

    def acquire(self) -> RunDirLock:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            pid = _lock_holder(self.run_dir)
            who = f"process {pid}" if pid else "another process"
            raise OneBitInputError(
                f"hydra.run.dir={self.run_dir} is in use by another run ({who}); wait for it "
                "to end, or give another hydra.run.dir (nothing there was changed)."
            ) from None
        except OSError:  # a file system without flock: run unlocked rather than not at all
            os.close(fd)
            return self
        self._fd = fd
        if not self._fork_hook:  # forked children (DataLoader workers) must not keep the lock
            os.register_at_fork(after_in_child=self._drop_in_child)
            self._fork_hook = True
        return self

    def _drop_in_child(self) -> None:
        """In a forked child: close its copy of the locked descriptor, so that the lock ends with
        the run's own process (a SIGKILLed run's workers outlive it by a moment)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def save_run_config(run_dir: Path, config: Any, hydra_config: Any, overrides: list[str]) -> Path:
    """Write the accepted command's config where Hydra would (``.hydra/``), or, when the run
    directory already has one (a resume), under ``.hydra/resumed-<time>/``; returns the folder."""
    from omegaconf import OmegaConf

    from onebit.fileio import atomic_write_text

    base = run_dir / ".hydra"
    out = base
    if (base / "config.yaml").exists():
        out = base / f"resumed-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
        n = 1
        while out.exists():
            n += 1
            out = base / f"resumed-{time.strftime('%Y-%m-%d_%H-%M-%S')}-{n}"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(config))
    if hydra_config is not None:
        atomic_write_text(out / "hydra.yaml", OmegaConf.to_yaml({"hydra": hydra_config}))
    atomic_write_text(out / "overrides.yaml", OmegaConf.to_yaml(list(overrides)))
    return out
