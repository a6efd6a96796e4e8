"""Training checkpoints as files, in plain PyTorch (no Lightning): one file with a checksum
sidecar (:mod:`.single`), a sharded directory with a manifest (:mod:`.sharded`), and checking,
loading and choosing the one to resume from (:mod:`.verify`)."""

from onebit.checkpoint.sharded import (
    MANIFEST,
    check_sharded,
    is_sharded_checkpoint,
    read_manifest,
    sharded_hyper_parameters,
    sharded_shapes,
    write_manifest,
)
from onebit.checkpoint.single import (
    SIDECAR_SUFFIX,
    file_crc32,
    remove_stale_temporaries,
    sidecar_path,
    write_checkpoint,
    write_failure_reason,
)
from onebit.checkpoint.verify import (
    CheckResult,
    check_checkpoint,
    consolidate,
    find_resume_checkpoint,
    load_checkpoint_file,
    resolve_ckpt_path,
)

__all__ = [
    "MANIFEST",
    "SIDECAR_SUFFIX",
    "CheckResult",
    "check_checkpoint",
    "check_sharded",
    "consolidate",
    "file_crc32",
    "find_resume_checkpoint",
    "is_sharded_checkpoint",
    "load_checkpoint_file",
    "read_manifest",
    "remove_stale_temporaries",
    "resolve_ckpt_path",
    "sharded_hyper_parameters",
    "sharded_shapes",
    "sidecar_path",
    "write_checkpoint",
    "write_failure_reason",
    "write_manifest",
]
