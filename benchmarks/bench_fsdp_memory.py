"""Peak host memory per rank: one process, 2-process DDP and 2-process FSDP2, on SmolLM2-135M (CPU).

    python benchmarks/bench_fsdp_memory.py

Each configuration is a real ``train.py`` run (WikiText-2 test text from ``../shared``, sequences
of 128 tokens, 2 sequences per rank and step, 4 steps, fp32 throughout, no export) with the
callback below, which records each rank's peak resident set size (``VmHWM``) once the model is
set up (student built, SVID read from the cache, sharded under FSDP2) and at the end of training
(plus gradients and AdamW state). On CPU that is all of a rank's memory, Python and libraries
included, so compare columns rather than read them as the model's size. A first run fills the SVID
cache, so that no configuration pays for SVID. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
from harness import proc_status

REPO = Path(__file__).resolve().parent.parent


class PeakMemory(L.Callback):
    """Appends ``{"rank", "when", "vmhwm"}`` to ``path`` at fit start and train end."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def _write(self, trainer: L.Trainer, when: str) -> None:
        with open(self.path, "a") as f:
            line = {"rank": trainer.global_rank, "when": when, "vmhwm": proc_status("VmHWM")}
            f.write(json.dumps(line) + "\n")

    def on_fit_start(self, trainer, pl_module) -> None:
        self._write(trainer, "setup")

    def on_train_end(self, trainer, pl_module) -> None:
        self._write(trainer, "train")


CONFIGS = {
    "1 process": ["trainer=default", "trainer.devices=1"],
    "DDP, 2 processes": ["trainer=ddp", "trainer.devices=2"],
    "FSDP2, 2 processes": ["trainer=fsdp", "trainer.devices=2", "fsdp.param_dtype=null"],
}


def run(name: str, overrides: list[str], tmp: Path, steps: int) -> tuple[dict, float]:
    log = tmp / f"{name.split(',')[0].replace(' ', '_')}.jsonl"
    cmd = [
        sys.executable,
        "train.py",
        "model=smollm2_135m",
        "data=wikitext",
        "data.source=local",
        "data.path=${paths.shared_dir}/data/wikitext2/wiki.test.raw",
        "data.seq_len=128",
        "data.batch_size=2",
        "data.val_blocks=2",
        "data.num_workers=0",
        *overrides,
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "trainer.enable_progress_bar=false",
        "validate_before_training=false",
        "export=false",
        "logger=none",
        f"hydra.run.dir={tmp / 'runs' / log.stem}",
        f"paths.cache_dir={tmp / 'cache'}",
        "+callbacks.mem._target_=benchmarks.bench_fsdp_memory.PeakMemory",
        f"+callbacks.mem.path={log}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    rows: dict = {}
    for line in log.read_text().splitlines():
        r = json.loads(line)
        rows.setdefault(r["rank"], {})[r["when"]] = r["vmhwm"]
    return rows, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    if not (REPO.parent / "shared" / "data" / "wikitext2" / "wiki.test.raw").is_file():
        raise SystemExit("needs ../shared/data/wikitext2/wiki.test.raw beside the checkout")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        run("warm-up", CONFIGS["1 process"], tmp, 1)  # fills the SVID cache
        results = {name: run(name, o, tmp, args.steps) for name, o in CONFIGS.items()}
    gib = 2**30
    print(f"# Peak resident memory per rank, SmolLM2-135M, {args.steps} steps, CPU, fp32\n")
    print("| configuration | rank | after set-up (GiB) | after training (GiB) | wall (s) |")
    print("|---|---:|---:|---:|---:|")
    for name, (rows, seconds) in results.items():
        for rank in sorted(rows):
            r = rows[rank]
            print(
                f"| {name} | {rank} | {r['setup'] / gib:.2f} | {r['train'] / gib:.2f} "
                f"| {seconds:.0f} |"
            )


if __name__ == "__main__":
    main()
