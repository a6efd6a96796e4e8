"""What the benchmarks here share: the heading of every table (the command, the machine and the
date), the machine's measured read bandwidth, this process's memory and the CPU clocks.

Run the benchmarks from the repository root (``python benchmarks/<name>.py``); the script's folder
is on Python's path then, so ``from harness import ...`` finds this file.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path


def command() -> str:
    """The command line this process was started with, as a user types it (``python`` and the
    script as given, then its arguments), quoted for a shell."""
    return shlex.join(["python", *sys.argv])


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# The CPU flags that decide the kernels' paths and the dense GEMMs' speed.
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
         "amx_tile", "amx_bf16")  # fmt: skip


def cpu_flags() -> str:
    """Which of :data:`FLAGS` this CPU has (Linux /proc/cpuinfo), space-separated."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return " ".join(f for f in FLAGS if f in have) or "none of " + " ".join(FLAGS)
    except OSError:
        pass
    return "unknown"


def machine() -> str:
    """CPU model, cores and flags, python, torch and its threads, the C++ kernels' build."""
    import torch

    from onebit import kernels

    built = f"C++ kernels on, decode {kernels.isa()}" if kernels.available() else kernels.status()
    return (
        f"{cpu_model()} ({os.cpu_count()} cores; {cpu_flags()}), python "
        f"{platform.python_version()}, torch {torch.__version__}, torch threads "
        f"{torch.get_num_threads()}; {built}"
    )


def header(title: str, *notes: str) -> list[str]:
    """Markdown lines that open a table: title, command, machine, date, then ``notes``."""
    today = datetime.date.today().isoformat()
    lines = [f"# {title}", "", f"- command: `{command()}`", f"- machine: {machine()}"]
    return [*lines, f"- date: {today}", *(f"- {n}" for n in notes)]


def read_bandwidth(rounds: int = 5, gib: float = 1.0) -> float:
    """GB/s of ``t.sum()`` over a ``gib`` GiB fp32 tensor (median of ``rounds`` after a warm-up):
    what a kernel that only reads its weights could reach."""
    import torch

    t = torch.ones(int(gib * 2**28))
    t.sum()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        t.sum()
        times.append(time.perf_counter() - t0)
    return t.numel() * 4 / statistics.median(times) / 1e9


def proc_status(key: str) -> int:
    """A memory figure of this process from Linux's /proc/self/status in bytes (``VmRSS``,
    ``VmHWM``: the peak resident set); 0 where there is none."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def load_average() -> str:
    """The 1-minute load average (other processes on the CPUs make the timings noisy)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:  # pragma: no cover - not on every platform
        return "n/a"


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat), else None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its finished children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system
