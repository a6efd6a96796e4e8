"""Fault injection for the reliability tests, as Lightning callbacks that ``train.py`` builds from
``+callbacks.<name>._target_=tests.reliability.faults.<Class>`` overrides (in process or in a
subprocess: ``tests`` is importable from the repository root)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import time
from pathlib import Path

import lightning as L
import torch


class BatchLog(L.Callback):
    """Appends ``{"pid", "step", "ids"}`` per training batch to ``path`` (``step``: the optimizer
    steps done before it; ``ids``: a hash of its token ids), to check the data position."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        ids = batch["input_ids"].detach().cpu().contiguous().numpy().tobytes()
        line = {
            "pid": os.getpid(),
            "step": trainer.global_step,
            "ids": hashlib.sha1(ids).hexdigest(),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


class SlowSteps(L.Callback):
    """Sleeps ``seconds`` after each batch, so that a kill from outside lands within a run."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        time.sleep(self.seconds)


class SendSignal(L.Callback):
    """Sends ``signal`` to this process once, after the optimizer step ``at_step`` (1-based);
    with ``rank``, only that rank's process gets it."""

    def __init__(self, at_step: int, signal: str = "SIGTERM", rank: int | None = None) -> None:
        self.at_step, self.signum, self.sent = at_step, getattr(signal_module, signal), False
        self.rank = rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if not self.sent and trainer.global_step == self.at_step:
            self.sent = True
            os.kill(os.getpid(), self.signum)


signal_module = signal


class InjectNaN(L.Callback):
    """Puts a NaN into the student during training step ``at_step`` (1-based), once.

    ``where``: ``param`` (the first entry of parameter ``target``, before the step's forward; it
    stays NaN), ``output`` (the output of module ``target`` in that step's forward only),
    ``output_always`` (from that step on) or ``grad`` (the gradient of parameter ``target`` in that
    step's backward only: inf). With ``rank``, only on that rank.
    """

    def __init__(
        self, at_step: int, target: str, where: str = "param", rank: int | None = None
    ) -> None:
        self.at_step, self.target, self.where, self.rank = at_step, target, where, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 != self.at_step:
            return
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        student = pl_module.student
        if self.where == "param":
            with torch.no_grad():
                student.get_parameter(self.target).view(-1)[0] = float("nan")
        elif self.where in ("output", "output_always"):
            handle = None

            def hook(module, args, out):
                if self.where == "output":
                    handle.remove()
                return out * float("nan")

            handle = student.get_submodule(self.target).register_forward_hook(hook)
        elif self.where == "grad":
            p = student.get_parameter(self.target)
            handle = None

            def grad_hook(g):
                handle.remove()
                return g * float("inf")

            handle = p.register_hook(grad_hook)
        else:
            raise ValueError(self.where)


class RecordStep(L.Callback):
    """Saves the student's trainable tensors and AdamW step counts before and after training step
    ``at_step`` (1-based) to ``path``, to check that a skipped step changed nothing."""

    def __init__(self, at_step: int, path: str) -> None:
        self.at_step, self.path, self.before = at_step, Path(path), None

    def _state(self, pl_module, trainer):
        params = {
            n: p.detach().clone()
            for n, p in pl_module.student.named_parameters()
            if p.requires_grad
        }
        opt = trainer.optimizers[0]
        steps = [float(s["step"]) for s in opt.state.values() if "step" in s]
        return {"params": params, "adam_steps": steps, "global_step": trainer.global_step}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step + 1 == self.at_step:
            self.before = self._state(pl_module, trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.before is not None and trainer.global_step == self.at_step:
            torch.save({"before": self.before, "after": self._state(pl_module, trainer)}, self.path)
            self.before = None


class _ArmedWrite(L.Callback):
    """Arms a fault in the checkpoint writer when the step ``at_step`` ends (the periodic save of
    that step follows: checkpoint callbacks run after the others)."""

    def __init__(self, at_step: int, after_bytes: int = 4096) -> None:
        self.at_step, self.after_bytes, self.armed = at_step, after_bytes, False

    def setup(self, trainer, pl_module, stage) -> None:
        from onebit.checkpoint import single as checkpoint

        original = checkpoint._ChecksumWriter.write
        fault = self

        def write(writer, data):
            if fault.armed and writer.size + len(data) > fault.after_bytes:
                fault.fire(writer, data)
            return original(writer, data)

        checkpoint._ChecksumWriter.write = write
        self._restore = lambda: setattr(checkpoint._ChecksumWriter, "write", original)

    def teardown(self, trainer, pl_module, stage) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.armed = trainer.global_step == self.at_step

    def fire(self, writer, data) -> None:
        raise NotImplementedError


class KillDuringSave(_ArmedWrite):
    """SIGKILLs this process in the middle of writing the checkpoint of step ``at_step``."""

    def fire(self, writer, data) -> None:
        half = max(0, self.after_bytes - writer.size)
        writer.f.write(bytes(data[:half]))
        writer.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)


class DiskFullDuringSave(_ArmedWrite):
    """Raises ENOSPC in the middle of writing the checkpoint of step ``at_step``, as a full disk."""

    def fire(self, writer, data) -> None:
        self.armed = False
        writer.f.write(bytes(data[: max(0, self.after_bytes - writer.size)]))
        writer.f = _FullDisk(writer.f)  # the writer's next write meets a full disk


class _FullDisk:
    def __init__(self, f) -> None:
        self.f = f

    def write(self, data) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def flush(self) -> None:
        self.f.flush()
