"""Callbacks of the training application."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint

from onebit.config_utils import check_int
from onebit.errors import OneBitInputError

log = logging.getLogger("onebit.train.callbacks")


class OneBitCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also writes ``last.ckpt`` when training ends between two saves.

    A run stopped by ``max_steps`` at a step that is not a multiple of ``every_n_train_steps`` (or
    not a validation step) would otherwise leave ``last.ckpt`` behind the weights it exports.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        if not self.save_last or self.dirpath is None:
            return
        if self._last_global_step_saved == trainer.global_step:
            return
        path = str(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
        trainer.save_checkpoint(path)
        self.last_model_path = path
        self._last_global_step_saved = trainer.global_step


class ResumeCheckpoint(Checkpoint):
    """Periodic checkpoints to resume from, and a clean stop on SIGTERM/SIGUSR1 (pre-emption).

    Every ``every_n_train_steps`` optimizer steps the whole training state (student, optimizer,
    schedule, loop counters, data position) is saved as ``<dirpath>/step{N:08d}.ckpt`` through the
    trainer's checkpoint I/O (atomic, with a checksum: :mod:`onebit.checkpoint`); the newest
    ``keep`` are kept, an older one is deleted only after a newer one is complete.

    On one of ``signals`` the run finishes the optimizer step in progress, saves the same kind of
    checkpoint and raises :class:`~onebit.errors.Preempted` at once: no validation, no other save
    in the grace time the scheduler gives (``train.py`` then exits with status 128 + signal; in
    DDP a signal on any rank stops every rank at the same step). With ``requeue`` (``auto``: on
    SIGUSR1 inside a SLURM job, i.e. after ``sbatch --signal=USR1@<seconds>``), rank 0 runs
    ``scontrol requeue`` so that the job starts again and resumes with ``ckpt_path=auto``. SIGTERM
    is not requeued by ``auto``: SLURM sends it on ``scancel`` and on pre-emption, which SLURM
    requeues itself when configured to.

    Args:
        dirpath: the run's checkpoint directory.
        every_n_train_steps: steps between saves; 0 saves only on a signal.
        keep: periodic checkpoints kept (>= 1; 2 keeps the previous one should the newest be lost).
        signals: names of the signals that save and stop (``SIGTERM``, ``SIGUSR1``, ...).
        requeue: ``auto``, ``true`` or ``false``.
    """

    FILE = re.compile(r"^step(\d{8})\.ckpt$")

    def __init__(
        self,
        dirpath: str,
        every_n_train_steps: int = 500,
        keep: int = 2,
        signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGUSR1"),
        requeue: bool | str = "auto",
    ) -> None:
        for key, value, low in (("every_n_train_steps", every_n_train_steps, 0), ("keep", keep, 1)):
            check_int("callbacks.resume", key, value, low)
        bad = [s for s in signals if not isinstance(getattr(signal, str(s), None), signal.Signals)]
        if bad:
            raise OneBitInputError(
                f"callbacks.resume.signals has {', '.join(map(str, bad))}, not signal names."
            )
        if requeue not in (True, False, "auto"):
            raise OneBitInputError(
                f"callbacks.resume.requeue={requeue!r} is not one of auto, true, false."
            )
        self.dirpath = Path(dirpath)
        self.every_n_train_steps, self.keep, self.requeue = every_n_train_steps, keep, requeue
        self.signals = tuple(getattr(signal, str(s)) for s in signals)
        self.stopped_by: str | None = None  # the signal's name, once the run stopped on it
        self.last_saved: Path | None = None
        self._received: int | None = None
        self._handlers: dict[int, Any] = {}
        self._last_step: int | None = None

    # -- signals --------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        # only a flag: the save happens at the end of the optimizer step in progress
        if self._received is None:
            self._received = signum

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.signals:
            self._handlers[sig] = signal.signal(sig, self._on_signal)

    def _restore(self) -> None:
        for sig, handler in self._handlers.items():
            if handler is not None:
                signal.signal(sig, handler)
        self._handlers = {}

    # -- hooks ----------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from onebit.checkpoint import remove_stale_temporaries

        self._last_step = trainer.global_step
        if trainer.is_global_zero:
            for p in remove_stale_temporaries(self.dirpath):
                log.info("removed %s, left by an interrupted write", p)
        self._install()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        if step == self._last_step:  # accumulating: no optimizer step ended with this batch
            return
        self._last_step = step
        # Lightning's own SIGTERM flag is set when the signal came before training started
        stop = self._received is not None or trainer.received_sigterm
        if trainer.world_size > 1:  # one rank's signal stops every rank at the same step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop or (self.every_n_train_steps and step % self.every_n_train_steps == 0):
            self.save(trainer)
        if stop:
            from onebit.errors import Preempted

            signum = self._received or signal.SIGTERM
            self.stopped_by = signal.Signals(signum).name
            if trainer.is_global_zero and self._should_requeue(signum):
                self._requeue()
            raise Preempted(
                f"{self.stopped_by} at step {step}: the training state is saved in "
                f"{self.last_saved}",
                signum,
                str(self.last_saved),
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    # -- saving ---------------------------------------------------------------------------------
    def save(self, trainer: L.Trainer) -> Path:
        """Save the training state at this step and drop periodic checkpoints beyond ``keep``."""
        path = self.dirpath / f"step{trainer.global_step:08d}.ckpt"
        trainer.save_checkpoint(path)  # every rank takes part; rank 0 writes
        self.last_saved = path
        if trainer.is_global_zero:
            self._prune(trainer, trainer.global_step)
        return path

    def _prune(self, trainer: L.Trainer, step: int) -> None:
        # only checkpoints up to this step: later ones belong to an abandoned attempt and are
        # overwritten when the run gets there
        ours = sorted(
            (int(m.group(1)), p)
            for p in self.dirpath.glob("step*.ckpt")
            if (m := self.FILE.match(p.name)) and int(m.group(1)) <= step
        )
        for _, p in ours[: -self.keep]:
            trainer.strategy.remove_checkpoint(p)

    def _should_requeue(self, signum: int) -> bool:
        if self.requeue == "auto":
            return signum == signal.SIGUSR1 and "SLURM_JOB_ID" in os.environ
        return bool(self.requeue)

    @staticmethod
    def _requeue() -> None:
        job = os.environ.get("SLURM_JOB_ID")
        if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
            job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        if not job:
            log.warning("requeue asked for, but SLURM_JOB_ID is not set; not requeued")
            return
        try:
            done = subprocess.run(["scontrol", "requeue", job], check=False, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("scontrol requeue %s failed: %s", job, e)
            return
        if done.returncode == 0:
            log.info("requeued SLURM job %s", job)
        else:
            log.warning("scontrol requeue %s exited with %s", job, done.returncode)


class PerplexityEval(L.Callback):
    """Perplexity of the student on WikiText-2 or C4 (GPTQ protocol) at every validation.

    Logged as ``val/ppl_<name>`` (``val/ppl_wikitext2``, ``val/ppl_c4``), so that the checkpoint
    callback can monitor it. Windows are split over ranks and the sums reduced, so every rank logs
    the same number. ``max_windows`` keeps it affordable during training.
    """

    def __init__(
        self,
        name: str = "wikitext2",
        path: str | None = None,
        seqlen: int = 2048,
        stride: int | None = None,
        max_windows: int | None = None,
        c4_samples: int = 256,
    ) -> None:
        if name not in ("wikitext2", "c4"):
            from onebit.errors import OneBitInputError

            raise OneBitInputError(f"callbacks: perplexity name={name!r} is not wikitext2 or c4.")
        self.name, self.path, self.seqlen, self.stride = name, path, seqlen, stride
        self.max_windows, self.c4_samples = max_windows, c4_samples
        self._ids = None

    def _stream(self, pl_module: L.LightningModule):
        if self._ids is None:
            from onebit.eval.perplexity import c4_ids, wikitext2_ids
            from onebit.models import load_tokenizer

            tok = load_tokenizer(pl_module.spec)
            ctx = getattr(pl_module.student.config, "max_position_embeddings", None)
            self.seqlen = min(self.seqlen, ctx or self.seqlen)
            self._ids = (
                wikitext2_ids(tok, self.path)
                if self.name == "wikitext2"
                else c4_ids(tok, self.path, self.seqlen, self.c4_samples)
            )
        return self._ids

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        from onebit.eval.perplexity import perplexity

        res = perplexity(
            pl_module.student,
            self._stream(pl_module),
            self.seqlen,
            self.stride,
            self.max_windows,
            pl_module.device,
        )
        pl_module.log(f"val/ppl_{self.name}", res.ppl, sync_dist=False)


class ZeroShotEval(L.Callback):
    """Zero-shot accuracy of the student at the end of training (lm-eval, local data).

    Logged as ``test/acc_<task>`` and ``test/acc_norm_<task>``; ``limit`` items per task.
    """

    def __init__(
        self, tasks: list[str], data_dir: str, limit: int | None = None, batch_size: int = 8
    ) -> None:
        self.tasks, self.data_dir, self.limit, self.batch_size = tasks, data_dir, limit, batch_size
        self.results: dict[str, dict] = {}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from onebit.eval.zeroshot import zero_shot
        from onebit.models import load_tokenizer

        student = pl_module.student
        was_training = student.training
        self.results = zero_shot(
            student,
            load_tokenizer(pl_module.spec),
            tuple(self.tasks),
            self.data_dir,
            limit=self.limit,
            batch_size=self.batch_size,
        )
        student.train(was_training)
        metrics = {}
        for task, s in self.results.items():
            for key in ("acc", "acc_norm"):
                if s.get(key) is not None:
                    metrics[f"test/{key}_{task}"] = float(s[key])
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)


class Diagnostics(L.Callback):
    """Where the student departs from its teacher (``onebit.diagnostics``), at every validation.

    On the first ``max_sequences`` sequences of the first validation batch (the same tokens every
    time), logs ``diag/flip_frac`` (signs that differ from the teacher's ``sign(W)``),
    ``diag/block_rel_err/<i>`` (the residual stream's relative error after block ``i``), their
    mean, maximum and last, the spread of the layers' output-scale ratios
    (``diag/log10_rms_ratio_*``), each model's mean attention on the first token over blocks
    (``diag/attn_sink_teacher_mean``, ``diag/attn_sink_student_mean``) and the perplexity ratio
    of the last positions (``diag/ppl_ratio_last_positions``); to W&B also a table with one row
    per quantized layer. With
    ``validate_before_training`` the first point is the initialised student.

    In a run of several processes (DDP, FSDP2) every rank diagnoses the same sequences: the
    first validation batches of all ranks, gathered (``max_sequences`` of them in all), so the
    report is the one a single process would give on the same global batch; a sharded (FSDP2)
    student's forward passes and signs are gathered from all ranks, which all take part.
    """

    def __init__(self, max_sequences: int = 4, layer_table: bool = True) -> None:
        self.max_sequences, self.layer_table = max_sequences, layer_table
        self._ids = None
        self.first = None  # the first report (before training with validate_before_training)
        self.last = None  # the latest report (onebit.diagnostics.Diagnostics)

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if self._ids is None and batch_idx == 0:
            ids = batch["input_ids"].detach()
            if trainer.world_size > 1:  # every rank's first batch, rank by rank (sizes may differ)
                parts = [None] * trainer.world_size
                torch.distributed.all_gather_object(parts, ids.cpu())
                ids = torch.cat([p for p in parts if p.shape[-1] == parts[0].shape[-1]]).to(
                    ids.device
                )
            self._ids = ids[: self.max_sequences].clone()

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or self._ids is None:
            return
        from onebit.diagnostics import diagnose

        student = pl_module.student
        was_training = student.training
        self.last = diagnose(pl_module.teacher, student.eval(), self._ids.to(pl_module.device))
        student.train(was_training)
        if self.first is None:
            self.first = self.last
        metrics = {f"diag/{k}": v for k, v in self.last.summary().items()}
        for b in self.last.blocks:
            metrics[f"diag/block_rel_err/{b.index}"] = b.rel_err
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=trainer.global_step)
            if self.layer_table and type(lg).__name__ == "WandbLogger":
                lg.log_table("diag/layers", **_layer_table(self.last), step=trainer.global_step)


def _layer_table(report) -> dict[str, list]:
    columns = ["layer", "teacher_rms", "student_rms", "rms_ratio", "teacher_absmax",
               "student_absmax", "teacher_absmax_token", "flip_frac"]  # fmt: skip
    data = [
        [
            r.name,
            r.teacher.rms_median,
            r.student.rms_median,
            r.rms_ratio,
            r.teacher.absmax,
            r.student.absmax,
            r.teacher.absmax_token,
            r.flip_frac,
        ]
        for r in report.layers
        if r.student is not None
    ]
    return {"columns": columns, "data": data}
