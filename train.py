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
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from onebit.config_utils import register_resolvers
from onebit.train.build import (
    build_callbacks,
    build_loggers,
    check_launcher,
    container,
    instantiate,
    make_trainer,
)

log = logging.getLogger("onebit.train")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, export and report; returns the final metrics and where everything went.

    The run directory is locked while the run uses it (onebit.train.rundir): a second run there is
    refused, and nothing is written to it before every check has passed."""
    if cfg.get("plan") and cfg.plan.enabled:
        from onebit.train.planner import plan_run

        return plan_run(cfg)
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

    import onebit.train.parallel  # noqa: F401  (also registers the name trainer.strategy=fsdp2)
    from onebit.errors import Preempted
    from onebit.fileio import atomic_write_text
    from onebit.heap import apply_warm_heap
    from onebit.models import ModelSpec, load_tokenizer
    from onebit.train.checkpoint_io import AtomicCheckpointIO
    from onebit.train.module import OneBitDistillation
    from onebit.train.preflight import preflight_run
    from onebit.train.report import export_student
    from onebit.train.report import summary as run_summary

    torch.set_float32_matmul_precision("high")
    heap = apply_warm_heap(cfg.get("warm_heap", True))  # before the models load: they allocate too
    spec = ModelSpec.from_dict(container(cfg.model))
    out_dir = Path(cfg.paths.output_dir)

    module = OneBitDistillation(  # checks every config value; loads nothing yet
        model=spec,
        quant=container(cfg.quant),
        loss=container(cfg.loss),
        optim=container(cfg.optim),
        guard=container(cfg.get("guard")),
        svid_cache_dir=cfg.get("svid_cache_dir"),
        parallel={
            "activation_checkpointing": bool(cfg.get("activation_checkpointing", False)),
            **(container(cfg.get("fsdp")) or {}),
        },
        blockwise=container(cfg.get("blockwise")),
    )
    module.blockwise_state_path = str(out_dir / "blockwise_state.pt")  # a killed stage resumes
    module.blockwise_seed = int(cfg.seed)
    datamodule = instantiate(cfg.data, _convert_="all")
    if hasattr(datamodule, "tokenizer") and datamodule.tokenizer is None:
        datamodule.tokenizer = lambda: load_tokenizer(spec)

    loggers = build_loggers(cfg)  # nothing is written until log_hyperparams below
    callbacks = build_callbacks(cfg)
    trainer = make_trainer(
        container(cfg.trainer),
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
    ckpt_path = preflight_run(cfg, module, datamodule, trainer.world_size)
    L.seed_everything(cfg.seed, workers=True)  # after the checks: it logs to the run's train.log
    log.info(heap)
    if trainer.is_global_zero:
        _save_config(cfg, out_dir)
    for lg in loggers:
        lg.log_hyperparams(container(cfg))

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
    if module.kept_massive:
        result["kept_massive"] = module.kept_massive
    ckpt = next((c for c in callbacks if hasattr(c, "best_model_path")), None)
    if ckpt is not None:
        result["checkpoint_last"] = ckpt.last_model_path or None
        result["checkpoint_best"] = ckpt.best_model_path or None
    diag = next((c for c in callbacks if type(c).__name__ == "Diagnostics"), None)
    if diag is not None and diag.last is not None:
        result["diagnostics"] = {"first": diag.first.summary(), "last": diag.last.summary()}
    if cfg.get("export") and trainer.is_global_zero:
        result["export"] = str(
            export_student(cfg, module, spec, out_dir / "onebit_model", student, final)
        )
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
        print(run_summary(result, spec.name, held_out), flush=True)
    return result


register_resolvers()  # ${onebit.cwd:} in conf/paths, before Hydra composes


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from onebit.errors import run_cli
    from onebit.train.report import log_file_per_rank

    log_file_per_rank()
    run_cli(run, cfg)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from onebit.train.preflight import exit_on_bad_command_line

    exit_on_bad_command_line(Path(__file__).resolve().parent / "conf", config_name="train")
    main()
