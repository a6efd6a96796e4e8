"""Distil a full-precision LLM into its OneBit (1-bit weight) student.

    python train.py                             # SmolLM2-135M, self-generated data, CPU, ~10 min
    python train.py model=stories260k trainer.max_steps=50
    python train.py experiment=onebit_llama7b trainer.num_nodes=1
    python train.py -m optim.lr=1e-4,4e-4             # a sweep, one process per job

This is the one place where config becomes objects (model spec, data module, LightningModule,
trainer).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from onebit.config_utils import register_resolvers, torch_dtype

log = logging.getLogger("onebit.train")


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def _build_group(cfg: DictConfig, group: str) -> list:
    """The objects of config group ``group``, one per entry with a ``_target_`` (``logger``:
    wandb, csv, tensorboard or none; ``callbacks``: checkpoints, resume, diagnostics and
    evaluation)."""
    node = cfg.get(group) or {}
    return [
        _instantiate(spec, _convert_="all") for spec in node.values() if spec and "_target_" in spec
    ]


def build_loggers(cfg: DictConfig) -> list:
    """Lightning loggers from the ``logger`` group."""
    return _build_group(cfg, "logger")


def _instantiate(node: Any, **kwargs: Any) -> Any:
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
    return _build_group(cfg, "callbacks")


def preflight(cfg: DictConfig, module, datamodule, world_size: int) -> Path | None:
    """Every check that needs no weights, before anything is loaded or written; returns the
    checkpoint to resume from (``ckpt_path``: none, ``auto``, a directory or a file)."""
    from onebit.checkpoint import resolve_ckpt_path
    from onebit.export import check_export_destination
    from onebit.models import model_config
    from onebit.train.preflight import (
        check_checkpoint_fits,
        check_loss_weights,
        check_no_secrets,
        check_seq_len,
    )
    from onebit.train.rundir import check_fresh_run_dir, launch_rank

    check_no_secrets(_container(cfg))
    check_loss_weights(module.loss_config)
    hf_config = model_config(module.spec)  # a missing, offline or remote-code model fails here
    if hasattr(datamodule, "preflight"):  # offline, missing, empty or too short data
        datamodule.preflight(world_size)
    check_seq_len(getattr(datamodule, "seq_len", None), module.spec.name, hf_config)
    out_dir = Path(cfg.paths.output_dir)
    ckpt = resolve_ckpt_path(cfg.get("ckpt_path"), out_dir / "checkpoints")
    if ckpt is not None:
        check_checkpoint_fits(ckpt, module.spec, hf_config, module.quant)
    elif launch_rank() == 0:  # a new run never overwrites a finished or interrupted one
        check_fresh_run_dir(out_dir)
    if cfg.get("export"):  # the end-of-run export may replace an earlier export, nothing else
        torch_dtype("export_dtype", cfg.export_dtype)
        check_export_destination(out_dir / "onebit_model")
    return ckpt


def plan(cfg: DictConfig) -> dict[str, Any]:
    """Print the per-GPU memory plan of this configuration (onebit.train.planner) and return it."""
    from onebit.errors import OneBitInputError
    from onebit.models import ModelSpec, model_config
    from onebit.train.planner import KNOWN_ARCHITECTURES, PlanSettings, count_model, plan_memory

    spec = ModelSpec.from_dict(_container(cfg.model))
    try:
        config = model_config(spec)
    except OneBitInputError:
        if spec.name not in KNOWN_ARCHITECTURES:
            raise
        config = KNOWN_ARCHITECTURES[spec.name]()  # offline: the published architecture
    p, t = cfg.plan, cfg.trainer
    world = p.world_size
    if world is None:
        devices, nodes = t.get("devices", 1), t.get("num_nodes", 1) or 1
        world = devices * nodes if isinstance(devices, int) else 8
    strategy = p.strategy or ("fsdp" if "fsdp" in str(t.get("strategy", "")) else "ddp")
    try:
        settings = PlanSettings(
            strategy=strategy,
            world_size=int(world),
            batch_size=int(cfg.data.batch_size),
            seq_len=int(cfg.data.seq_len),
            activation_checkpointing=bool(cfg.get("activation_checkpointing", False)),
            recipe=p.recipe,
            hidden_loss=float(cfg.loss.get("alpha", 1.0)) > 0,
            gpu_gib=float(p.gpu_gib),
        )
    except ValueError as e:
        raise OneBitInputError(f"plan: {e}") from None
    result = plan_memory(count_model(config), settings)
    print(result.format(spec.name))
    return {"plan_gib": result.total / 2**30, "fits": result.fits}


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
    strategy = str(t.get("strategy", "auto"))
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


def _make_trainer(trainer_cfg: dict[str, Any], **kwargs: Any):
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
    try:
        return L.Trainer(**trainer_cfg, **kwargs)
    except (MisconfigurationException, ValueError, TypeError) as e:
        first = first_line(e)
        raise OneBitInputError(
            f"the trainer config cannot run here: {first.rstrip('.')} (trainer.* are the "
            "arguments of lightning.Trainer; trainer=ddp and trainer=fsdp set the strategy)."
        ) from None


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, export and report; returns the final metrics and where everything went.

    The run directory is locked while the run uses it (onebit.train.rundir): a second run there is
    refused, and nothing is written to it before every check has passed."""
    if cfg.get("plan") and cfg.plan.enabled:
        return plan(cfg)
    check_launcher(cfg)
    from onebit.train.rundir import RunDirLock, launch_rank

    if launch_rank() != 0:  # rank 0 holds the lock for every rank of the run
        return _run(cfg)
    with RunDirLock(Path(cfg.paths.output_dir)):
        return _run(cfg)


def _save_config(cfg: DictConfig, out_dir: Path) -> None:
    """The accepted command's config in ``.hydra/`` (Hydra's own copy is off: it would be
    written before the command is checked)."""
    from hydra.core.hydra_config import HydraConfig

    from onebit.train.rundir import save_run_config

    hydra_cfg, overrides = None, []
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        overrides = list(hydra_cfg.overrides.task)
    save_run_config(out_dir, cfg, hydra_cfg, overrides)


def _run(cfg: DictConfig) -> dict[str, Any]:
    import lightning as L
    import torch
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    import onebit.train.parallel  # noqa: F401  (registers trainer.strategy=fsdp2)
    from onebit.checkpoint import atomic_write_text
    from onebit.errors import Preempted
    from onebit.models import ModelSpec, load_tokenizer
    from onebit.train.checkpoint_io import AtomicCheckpointIO
    from onebit.train.module import OneBitDistillation

    torch.set_float32_matmul_precision("high")
    spec = ModelSpec.from_dict(_container(cfg.model))
    out_dir = Path(cfg.paths.output_dir)

    module = OneBitDistillation(  # checks every config value; loads nothing yet
        model=spec,
        quant=_container(cfg.quant),
        loss=_container(cfg.loss),
        optim=_container(cfg.optim),
        guard=_container(cfg.get("guard")),
        svid_cache_dir=cfg.get("svid_cache_dir"),
        parallel={
            "activation_checkpointing": bool(cfg.get("activation_checkpointing", False)),
            **(_container(cfg.get("fsdp")) or {}),
        },
        blockwise=_container(cfg.get("blockwise")),
    )
    module.blockwise_state_path = str(out_dir / "blockwise_state.pt")  # a killed stage resumes
    module.blockwise_seed = int(cfg.seed)
    datamodule = _instantiate(cfg.data, _convert_="all")
    if hasattr(datamodule, "tokenizer") and datamodule.tokenizer is None:
        datamodule.tokenizer = lambda: load_tokenizer(spec)

    loggers = build_loggers(cfg)  # nothing is written until log_hyperparams below
    callbacks = build_callbacks(cfg)
    trainer = _make_trainer(
        _container(cfg.trainer),
        logger=loggers or False,
        callbacks=callbacks,
        default_root_dir=str(out_dir),
        plugins=[AtomicCheckpointIO()],
    )
    if cfg.get("global_batch_size") is not None:
        from onebit.train.preflight import per_device_batch

        datamodule.batch_size = per_device_batch(
            cfg.global_batch_size, trainer.world_size, trainer.accumulate_grad_batches
        )
    ckpt_path = preflight(cfg, module, datamodule, trainer.world_size)
    L.seed_everything(cfg.seed, workers=True)  # after the checks: it logs to the run's train.log
    if trainer.is_global_zero:
        _save_config(cfg, out_dir)
    for lg in loggers:
        lg.log_hyperparams(_container(cfg))

    result: dict[str, Any] = {"output_dir": str(out_dir)}
    if ckpt_path is not None:
        result["resumed_from"] = str(ckpt_path)
    try:
        if cfg.get("validate_before_training") and ckpt_path is None:
            before = trainer.validate(module, datamodule=datamodule, verbose=False)
            result["metrics_before"] = {
                k: float(v) for k, v in (before[0] if before else {}).items()
            }
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:  # Lightning's: SIGTERM before training started, nothing to save
        raise Preempted(
            "SIGTERM before training started; nothing was trained or saved.", 15
        ) from None
    except Preempted as e:  # ResumeCheckpoint: saved at the end of a step
        raise Preempted(
            f"{e}; run the same command with ckpt_path=auto and hydra.run.dir={out_dir} to "
            f"resume (or ckpt_path={e.checkpoint}).",
            e.signum,
            e.checkpoint,
        ) from None

    # the student as one module for the export (FSDP2: gathered to rank 0; every rank takes part)
    student = module.plain_student() if cfg.get("export") else None
    if trainer.is_global_zero:
        report = module.footprint_report(student)
        result["footprint"] = report.to_dict()
        log.info("OneBit footprint:\n%s", report.format())
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)
    final = {k: float(v) for k, v in (metrics[0] if metrics else {}).items()}
    result["metrics"] = final
    result["global_step"] = trainer.global_step
    result["nonfinite_skipped"] = module.nonfinite_skipped
    if module.blockwise_result is not None:
        result["blockwise"] = module.blockwise_result
    if module.sign_init_errors:
        result["sign_init_errors"] = module.sign_init_errors
    ckpt = next((c for c in callbacks if hasattr(c, "best_model_path")), None)
    if ckpt is not None:
        result["checkpoint_last"] = ckpt.last_model_path or None
        result["checkpoint_best"] = ckpt.best_model_path or None
    diag = next((c for c in callbacks if type(c).__name__ == "Diagnostics"), None)
    if diag is not None and diag.last is not None:
        result["diagnostics"] = {"first": diag.first.summary(), "last": diag.last.summary()}
    if cfg.get("export") and trainer.is_global_zero:
        result["export"] = str(_export(cfg, module, spec, out_dir / "onebit_model", student))
    for lg in loggers:
        summary = getattr(getattr(lg, "experiment", None), "summary", None)
        if summary is not None and trainer.is_global_zero:
            summary.update({f"final/{k}": v for k, v in final.items()})
            if "footprint" in result:
                summary.update({f"footprint/{k}": v for k, v in result["footprint"].items()})
        if type(lg).__name__ == "WandbLogger" and trainer.is_global_zero:
            result["wandb_dir"] = str(Path(lg.experiment.dir).parent)
            lg.experiment.finish()  # flush the summary now, not at interpreter exit
    if trainer.is_global_zero:
        atomic_write_text(out_dir / "result.json", json.dumps(result, indent=2))
        held_out = (
            "generated text"
            if hasattr(datamodule, "cache_path")
            else (f"{getattr(datamodule, 'name', 'data')} validation blocks")
        )
        print(_summary(result, spec.name, held_out), flush=True)
    return result


def _export(cfg: DictConfig, module, spec, path: Path, student=None) -> Path:
    """The packed 1-bit student, written beside ``path`` and renamed into place."""

    from onebit.checkpoint import write_failure_reason
    from onebit.errors import OneBitRunError
    from onebit.export import save_onebit
    from onebit.models import load_tokenizer

    dtype = torch_dtype("export_dtype", cfg.export_dtype)
    tokenizer = None
    try:
        tokenizer = load_tokenizer(spec)
    except Exception as e:  # the export is still usable without it
        log.warning("tokenizer not exported: %s", e)
    try:
        return save_onebit(
            student if student is not None else module.student,
            path,
            module.quant,
            dtype,
            tokenizer,
            extra={"model": spec.to_dict()},
        )
    except OSError as e:
        reason = write_failure_reason(e)
        kept = "the previous export there is intact" if path.exists() else "none existed before"
        raise OneBitRunError(
            f"could not export the 1-bit model to {path} ({reason}); nothing was replaced "
            f"({kept}) and the checkpoints are complete: free space and rerun with "
            f"ckpt_path=auto hydra.run.dir={path.parent} to export again."
        ) from e


def _summary(result: dict[str, Any], name: str, held_out: str) -> str:
    m = result.get("metrics", {})
    lines = ["", f"== OneBit distillation of {name}: done =="]
    if "val/ppl" in m and "val/ppl_teacher" in m:
        was = result.get("metrics_before", {}).get("val/ppl")
        lines.append(
            f"perplexity on held-out {held_out}: student {m['val/ppl']:.2f}"
            + (f" (at initialisation: {was:.2f})" if was else "")
            + f", teacher {m['val/ppl_teacher']:.2f}"
            + f", ratio {m['val/ppl'] / m['val/ppl_teacher']:.2f}"
        )
    errors = result.get("sign_init_errors")
    if errors:
        svid_err = statistics.median(e["svid"] for e in errors.values())
        gptq_err = statistics.median(e["gptq"] for e in errors.values())
        lines.append(
            f"quant.sign_init=gptq: median relative output error of the {len(errors)} layers on "
            f"the calibration text {svid_err:.3f} (SVID) -> {gptq_err:.3f}"
        )
    bw = (result.get("blockwise") or {}).get("blocks")
    if bw:
        before = sum(b["rel_err_before"] for b in bw) / len(bw)
        after = sum(b["rel_err_after"] for b in bw) / len(bw)
        lines.append(
            f"block-wise stage: {len(bw)} blocks in {result['blockwise']['seconds']:.0f} s; block "
            f"output error (relative) mean {before:.3f} -> {after:.3f}, last block "
            f"{bw[-1]['rel_err_before']:.3f} -> {bw[-1]['rel_err_after']:.3f}"
        )
    d = result.get("diagnostics")
    if d:
        first, last = d["first"], d["last"]
        lines.append(
            f"diagnostics: {100 * last['flip_frac']:.2f} % of the signs differ from the teacher's "
            f"({100 * first['flip_frac']:.2f} % at the first validation); residual-stream "
            f"error after the last block {last['block_rel_err_last']:.3f} (first validation "
            f"{first['block_rel_err_last']:.3f}), mean over blocks "
            f"{last['block_rel_err_mean']:.3f} ({first['block_rel_err_mean']:.3f})"
        )
    fp = result.get("footprint")
    if fp:
        from onebit.quant.footprint import human_bytes

        lines.append(
            f"size: {human_bytes(fp['fp16_bytes'])} in FP16 -> {human_bytes(fp['onebit_bytes'])} "
            f"as 1-bit ({fp['bits_per_weight']:.4f} bits per quantized weight)"
        )
    for key, label in (
        ("checkpoint_last", "last checkpoint"),
        ("checkpoint_best", "best checkpoint"),
        ("export", "1-bit model"),
        ("wandb_dir", "W&B run"),
    ):
        if result.get(key):
            lines.append(f"{label:>16}: {result[key]}")
    lines.append(f"{'everything':>16}: {result['output_dir']}")
    return "\n".join(lines)


def _log_file_per_rank() -> None:
    """Under torchrun or srun every rank runs Hydra with the same run directory: ranks other
    than 0 log to ``train_rank<N>.log`` beside rank 0's ``train.log``. (Processes that Lightning
    starts itself already get ``train_ddp_process_<N>.log``.)"""
    rank = os.environ.get("RANK") or (
        os.environ.get("SLURM_PROCID") if int(os.environ.get("SLURM_NTASKS", "1")) > 1 else None
    )
    if not rank or rank == "0":
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler) and "_ddp_process_" not in handler.baseFilename:
            path = Path(handler.baseFilename)
            handler.close()
            handler.baseFilename = str(path.with_name(f"{path.stem}_rank{rank}{path.suffix}"))


register_resolvers()  # ${onebit.cwd:} in conf/paths, before Hydra composes


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from onebit.errors import run_cli

    _log_file_per_rank()
    run_cli(run, cfg)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from onebit.train.preflight import exit_on_bad_command_line

    exit_on_bad_command_line(Path(__file__).resolve().parent / "conf", config_name="train")
    main()
