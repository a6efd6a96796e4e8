"""The end of a ``train.py`` run: the packed export, the summary it prints, and per-rank log
files under torchrun or srun."""

from __future__ import annotations

import logging
import os
import statistics
from pathlib import Path
from typing import Any

from onebit.config_utils import torch_dtype

log = logging.getLogger("onebit.train")


def export_student(cfg, module, spec, path: Path, student=None, metrics=None) -> Path:
    """The packed 1-bit student, written beside ``path`` and renamed into place, with a model
    card naming the teacher, the command and ``metrics`` (the final validation)."""

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
            card={
                "base": spec.path if spec.source == "hub" else spec.name,
                "command": train_command(),
                "metrics": metrics or {},
            },
        )
    except OSError as e:
        reason = write_failure_reason(e)
        kept = "the previous export there is intact" if path.exists() else "none existed before"
        raise OneBitRunError(
            f"could not export the 1-bit model to {path} ({reason}); nothing was replaced "
            f"({kept}) and the checkpoints are complete: free space and rerun with "
            f"ckpt_path=auto hydra.run.dir={path.parent} to export again."
        ) from e


def train_command() -> str | None:
    """The ``train.py`` command of this run, from Hydra's record of its overrides (None when the
    config was composed some other way, e.g. in a test)."""
    import shlex

    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return shlex.join(["python", "train.py", *HydraConfig.get().overrides.task])


def summary(result: dict[str, Any], name: str, held_out: str) -> str:
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
    kept = result.get("kept_massive")
    if kept:
        lines.append(
            f"quant.keep_massive: {len(kept)} layers kept full precision: {', '.join(kept)}"
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


def log_file_per_rank() -> None:
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
