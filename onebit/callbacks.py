"""Callbacks of the training application."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


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
