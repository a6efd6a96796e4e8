"""Write the packed 1-bit model of a ``train.py`` checkpoint.

    python -m onebit.export_checkpoint outputs/train/runs/<time>/checkpoints/last.ckpt out_dir

The checkpoint is a ``.ckpt`` file or a sharded FSDP2 checkpoint directory; a sharded one is
consolidated in this process (no GPUs, no process group). Only the model's config is read from
the Hub or the local model directory: the student is built without weights and takes the
checkpoint's tensors, so memory holds the checkpoint once.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

DTYPES = ("float16", "bfloat16", "float32")


def export_checkpoint(checkpoint: str | Path, out: str | Path, dtype: str = "float16") -> Path:
    """The export directory written from ``checkpoint``.

    Raises:
        OneBitInputError: the checkpoint is missing, corrupt or not written by ``train.py``.
    """
    from onebit.export import check_export_destination, save_onebit
    from onebit.loading import student_from_checkpoint
    from onebit.models import load_tokenizer

    check_export_destination(out)  # before reading gigabytes
    student, spec, quant, _ = student_from_checkpoint(checkpoint)
    try:
        tokenizer = load_tokenizer(spec)
    except Exception:  # the export is usable without it
        tokenizer = None
    base = spec.path if spec.source == "hub" else spec.name
    command = shlex.join(["python", "-m", "onebit.export_checkpoint", str(checkpoint), str(out)])
    return save_onebit(
        student,
        Path(out),
        quant,
        getattr(torch, dtype),
        tokenizer,
        extra={"model": spec.to_dict()},
        card={"base": base, "command": command},
    )


def main(argv: list[str] | None = None) -> None:
    from onebit.checkpoint import write_failure_reason
    from onebit.errors import EXIT_INPUT, EXIT_RUN, OneBitInputError

    parser = argparse.ArgumentParser(
        prog="python -m onebit.export_checkpoint",
        description="Write the packed 1-bit model of a train.py checkpoint (.ckpt file or "
        "sharded FSDP2 checkpoint directory).",
    )
    parser.add_argument("checkpoint", help="a .ckpt file or a sharded checkpoint directory")
    parser.add_argument(
        "out",
        help="the export directory to write: new, empty, or an earlier OneBit export (replaced "
        "atomically); any other folder is refused",
    )
    parser.add_argument("--dtype", default="float16", choices=DTYPES, help="of g, h and the rest")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint, args.out, args.dtype)
    except OneBitInputError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(EXIT_INPUT) from None
    except OSError as e:
        reason = write_failure_reason(e)
        kept = "an earlier export there is intact" if Path(args.out).exists() else "none existed"
        print(
            f"error: could not write the 1-bit model to {args.out} ({reason}); nothing was "
            f"replaced ({kept}): free space and run the command again.",
            file=sys.stderr,
        )
        raise SystemExit(EXIT_RUN) from None
    print(f"1-bit model: {path}")


if __name__ == "__main__":
    main()
