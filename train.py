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
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("onebit.train")


def _container(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_loggers(cfg: DictConfig) -> list:
    """Lightning loggers from the ``logger`` group (wandb, csv, tensorboard, or none)."""
    from lightning.pytorch import loggers as pl_loggers

    from onebit.loggers import make_wandb_logger

    out = []
    node = _container(cfg.get("logger")) or {}
    if "wandb" in node:
        out.append(make_wandb_logger(**node["wandb"]))
    if "csv" in node:
        out.append(pl_loggers.CSVLogger(**node["csv"], name="csv"))
    if "tensorboard" in node:
        out.append(pl_loggers.TensorBoardLogger(**node["tensorboard"], name="tensorboard"))
    return out


def build_callbacks(cfg: DictConfig) -> list:
    from onebit.callbacks import OneBitCheckpoint

    node = _container(cfg.get("callbacks")) or {}
    out = []
    if "checkpoint" in node:
        out.append(OneBitCheckpoint(**node["checkpoint"]))
    for key, spec in node.items():
        if key != "checkpoint" and isinstance(spec, dict) and "_target_" in spec:
            out.append(hydra.utils.instantiate(spec))
    return out


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train, export and report; returns the final metrics and where everything went."""
    import lightning as L
    import torch

    from onebit.models import ModelSpec, load_tokenizer
    from onebit.module import OneBitDistillation

    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision("high")
    spec = ModelSpec.from_dict(_container(cfg.model))
    out_dir = Path(cfg.paths.output_dir)

    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    if hasattr(datamodule, "tokenizer") and datamodule.tokenizer is None:
        datamodule.tokenizer = lambda: load_tokenizer(spec)
    module = OneBitDistillation(
        model=spec,
        quant=_container(cfg.quant),
        loss=_container(cfg.loss),
        optim=_container(cfg.optim),
    )
    loggers = build_loggers(cfg)
    callbacks = build_callbacks(cfg)
    trainer = L.Trainer(
        **_container(cfg.trainer),
        logger=loggers or False,
        callbacks=callbacks,
        default_root_dir=str(out_dir),
    )
    for lg in loggers:
        lg.log_hyperparams(_container(cfg))

    result: dict[str, Any] = {"output_dir": str(out_dir)}
    if cfg.get("validate_before_training") and not cfg.get("ckpt_path"):
        before = trainer.validate(module, datamodule=datamodule, verbose=False)
        result["metrics_before"] = {k: float(v) for k, v in (before[0] if before else {}).items()}
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))

    if trainer.is_global_zero:
        report = module.footprint_report()
        result["footprint"] = report.to_dict()
        log.info("OneBit footprint:\n%s", report.format())
    metrics = trainer.validate(module, datamodule=datamodule, verbose=False)
    final = {k: float(v) for k, v in (metrics[0] if metrics else {}).items()}
    result["metrics"] = final
    ckpt = next((c for c in callbacks if hasattr(c, "best_model_path")), None)
    if ckpt is not None:
        result["checkpoint_last"] = ckpt.last_model_path or None
        result["checkpoint_best"] = ckpt.best_model_path or None
    if cfg.get("export") and trainer.is_global_zero:
        from onebit.export import save_onebit

        dtype = getattr(torch, cfg.export_dtype)
        tokenizer = None
        try:
            tokenizer = load_tokenizer(spec)
        except Exception as e:  # the export is still usable without it
            log.warning("tokenizer not exported: %s", e)
        path = save_onebit(
            module.student,
            out_dir / "onebit_model",
            module.quant,
            dtype,
            tokenizer,
            extra={"model": spec.to_dict()},
        )
        result["export"] = str(path)
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
        (out_dir / "result.json").write_text(json.dumps(result, indent=2))
        held_out = (
            "generated text"
            if hasattr(datamodule, "cache_path")
            else (f"{getattr(datamodule, 'name', 'data')} validation blocks")
        )
        print(_summary(result, spec.name, held_out), flush=True)
    return result


def _summary(result: dict[str, Any], name: str, held_out: str) -> str:
    m = result.get("metrics", {})
    lines = ["", f"== OneBit distillation of {name}: done =="]
    if "val/ppl" in m and "val/ppl_teacher" in m:
        was = result.get("metrics_before", {}).get("val/ppl")
        lines.append(
            f"perplexity on held-out {held_out}: student {m['val/ppl']:.2f}"
            + (f" (SVID init before training: {was:.2f})" if was else "")
            + f", teacher {m['val/ppl_teacher']:.2f}"
            + f", ratio {m['val/ppl'] / m['val/ppl_teacher']:.2f}"
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


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from onebit.errors import run_cli

    run_cli(run, cfg)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
