"""Config nodes into Lightning objects for ``train.py``: loggers and callbacks from their config
groups (one object per entry with a ``_target_``), and the Trainer, with every value this machine
cannot run refused in one sentence."""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf


def container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_group(cfg: DictConfig, group: str) -> list:
    """The objects of config group ``group``, one per entry with a ``_target_`` (``logger``:
    wandb, csv, tensorboard or none; ``callbacks``: checkpoints, resume, diagnostics and
    evaluation)."""
    node = cfg.get(group) or {}
    return [
        instantiate(spec, _convert_="all") for spec in node.values() if spec and "_target_" in spec
    ]


def build_loggers(cfg: DictConfig) -> list:
    """Lightning loggers from the ``logger`` group."""
    return build_group(cfg, "logger")


def instantiate(node: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, letting our one-sentence errors through unwrapped."""
    from hydra.errors import InstantiationException

    from onebit.errors import OneBitInputError

    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, OneBitInputError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def build_callbacks(cfg: DictConfig) -> list:
    """Lightning callbacks from the ``callbacks`` group."""
    return build_group(cfg, "callbacks")


def strategy_name(strategy: Any) -> str:
    """The name of ``trainer.strategy``: the text itself (``ddp``, ``auto``), or for a strategy
    built by ``_target_`` its class's ``strategy_name`` (``fsdp2`` for
    :class:`onebit.train.parallel.FSDP2Strategy`)."""
    if strategy is None:
        return "auto"
    target = strategy.get("_target_") if hasattr(strategy, "get") else None
    if target is None:
        return str(strategy)
    from hydra.utils import get_class

    cls = get_class(str(target))
    name = getattr(cls, "strategy_name", None)
    return name if isinstance(name, str) else cls.__name__.lower()


def check_launcher(cfg: DictConfig) -> None:
    """Refuse a multi-process strategy inside Hydra's basic launcher.

    The basic launcher runs every sweep job one after another in this one process; DDP and FSDP
    start their worker processes by re-running the command line, which then re-runs the whole
    sweep in each worker. Each sweep point must be its own launch (SLURM via submitit, or a loop).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from onebit.errors import OneBitInputError

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    launcher = str(HydraConfig.get().launcher.get("_target_", ""))
    t = cfg.trainer
    strategy = strategy_name(t.get("strategy", "auto"))
    devices, nodes = t.get("devices", 1), t.get("num_nodes", 1) or 1
    many = (isinstance(devices, int) and devices > 1) or nodes > 1 or devices in ("auto", -1)
    distributed = strategy.startswith(("ddp", "fsdp", "model_parallel", "deepspeed"))
    if "BasicLauncher" in launcher and (distributed or (many and strategy != "auto")):
        raise OneBitInputError(
            f"trainer.strategy={strategy} under Hydra's basic launcher (python train.py -m) "
            "would re-run the whole sweep in every worker process; sweep with "
            "hydra/launcher=slurm (one job per sweep point) or launch each point yourself."
        )


def _accepts(annotation: Any, value: Any) -> bool:
    """Whether ``value`` fits ``annotation`` as far as a command-line value can be checked
    (unions, literals, None, int, float, str; anything else is not judged)."""
    import types
    import typing

    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(a, value) for a in typing.get_args(annotation))
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is type(None):
        return value is None
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    return not isinstance(value, str) or annotation is typing.Any


def check_trainer_types(trainer_cfg: dict[str, Any]) -> None:
    """Refuse a ``trainer.*`` text value where ``lightning.Trainer`` takes a number (or other
    non-text): ``trainer.max_steps=abc`` is named, not a traceback from inside Lightning."""
    import typing

    import lightning as L

    from onebit.errors import OneBitInputError

    try:
        hints = typing.get_type_hints(L.Trainer.__init__)
    except Exception:  # an annotation that does not resolve: leave the checking to Lightning
        return
    for key, value in trainer_cfg.items():
        if isinstance(value, str) and key in hints and not _accepts(hints[key], value):
            kind = hints[key]
            kind = kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")
            raise OneBitInputError(
                f"trainer.{key}={value!r} is not a value lightning.Trainer takes for {key} "
                f"(it takes {kind})."
            )


def make_trainer(trainer_cfg: dict[str, Any], **kwargs: Any):
    """``lightning.Trainer(**trainer_cfg, **kwargs)``; a trainer config this machine cannot run
    (no GPU for ``accelerator=gpu``, an unknown strategy, ...) is one sentence, exit status 2."""
    import lightning as L
    import torch
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from onebit.errors import OneBitInputError, first_line

    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise OneBitInputError(
            f"trainer.accelerator={accelerator} but this machine has no GPU that torch can use; "
            "on CPU add trainer.accelerator=cpu (with trainer=ddp or trainer=fsdp also "
            "trainer.devices=<processes>, over gloo) or use trainer=default."
        )
    check_trainer_types(trainer_cfg)
    strategy = trainer_cfg.get("strategy")
    if isinstance(strategy, dict) and "_target_" in strategy:  # conf/trainer/fsdp.yaml
        trainer_cfg = {**trainer_cfg, "strategy": instantiate(strategy, _convert_="all")}
    try:
        return L.Trainer(**trainer_cfg, **kwargs)
    except (MisconfigurationException, ValueError, TypeError) as e:
        first = first_line(e)
        raise OneBitInputError(
            f"the trainer config cannot run here: {first.rstrip('.')} (trainer.* are the "
            "arguments of lightning.Trainer; trainer=ddp and trainer=fsdp set the strategy)."
        ) from None
