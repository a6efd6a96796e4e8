"""FSDP2 for OneBit: Lightning's ``ModelParallelStrategy`` as a pure data-parallel sharding
strategy, with atomic, checksummed sharded checkpoints.

``trainer=fsdp`` builds :class:`FSDP2Strategy` from its ``_target_`` (``conf/trainer/fsdp.yaml``,
where its arguments are keys: ``trainer.strategy.save_distributed_checkpoint=false``); it is also
registered as ``trainer.strategy=fsdp2``. It builds a one-dimensional device mesh over every rank of
every node, so that :meth:`onebit.train.module.OneBitDistillation.configure_model` can
``fully_shard`` each decoder block of student and teacher over it. Unlike Lightning's ``fsdp``
strategy it runs on CPU (gloo), so the tests exercise the same code path as a GPU cluster.

A sharded checkpoint ``step00000040.ckpt`` is a directory: one ``.distcp`` file per rank written
by ``torch.distributed.checkpoint``, Lightning's ``meta.pt`` and our ``onebit-manifest.json``
(size and CRC-32 of every file, the step). It is written under a temporary name and renamed into
place by rank 0 once every rank has finished, so a run killed mid-write leaves the previous
checkpoint intact. The file format is :mod:`onebit.checkpoint.sharded`;
:func:`onebit.checkpoint.consolidate` turns one into an ordinary single-file state dict (no process
group needed), from which ``onebit.export`` writes the 1-bit model.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

from onebit.checkpoint import check_checkpoint
from onebit.checkpoint.sharded import write_manifest
from onebit.errors import OneBitInputError


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) over all ranks of all nodes.

    The module shards itself in ``configure_model`` over ``self.device_mesh["data_parallel"]``
    (here every rank), so this strategy only sets the mesh up and writes checkpoints.

    Args:
        save_distributed_checkpoint: each rank writes its own shard (a directory per checkpoint,
            nothing gathered); False gathers the full state on rank 0 into one file.
        process_group_backend: ``nccl`` on GPU and ``gloo`` on CPU when None.
    """

    strategy_name = "fsdp2"

    def __init__(
        self,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size="auto",
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            **kwargs,
        )

    def setup_environment(self) -> None:
        # one mesh dimension over every process: data parallel only (no tensor parallelism)
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.tmp{self.broadcast(os.getpid())}")
        step = checkpoint.get("global_step")
        if self.is_global_zero and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp)  # every rank writes its shard
        self.barrier()
        if self.is_global_zero:
            write_manifest(tmp, step)
            old = path.with_name(f".{path.name}.old.tmp{os.getpid()}")
            if path.exists():  # e.g. last.ckpt: keep the old one until the new one is in place
                os.replace(path, old)
            os.replace(tmp, path)
            if old.is_dir():
                shutil.rmtree(old)
            elif old.exists():
                old.unlink()
        self.barrier()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None):
        path = Path(checkpoint_path)
        if path.is_dir():
            result = check_checkpoint(path)  # cached: ckpt_path was checked before the run
            if not result.ok:
                raise OneBitInputError(f"checkpoint {path} {result.reason}.")
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)

    def remove_checkpoint(self, filepath: Any) -> None:
        path = Path(filepath)
        if not path.is_dir():
            return super().remove_checkpoint(filepath)
        if self.is_global_zero:
            shutil.rmtree(path)


if "fsdp2" not in StrategyRegistry:
    StrategyRegistry.register(
        "fsdp2", FSDP2Strategy, description="FSDP2 (fully_shard per decoder block), CPU or GPU"
    )
