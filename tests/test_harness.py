"""benchmarks/harness.py: every benchmark table opens with its command, machine and date."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

from .conftest import REPO


def test_a_benchmark_table_is_headed_by_command_machine_and_date(tmp_path) -> None:
    (tmp_path / "probe.py").write_text(
        "import harness; print('\\n'.join(harness.header('Title', 'a note')))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "benchmarks")}
    done = subprocess.run(
        [sys.executable, "probe.py", "--flag", "a b"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[:3] == ["# Title", "", "- command: `python probe.py --flag 'a b'`"]
    assert (
        lines[3].startswith("- machine: ") and " cores; " in lines[3] and "), python " in lines[3]
    )
    flags = lines[3].split(" cores; ", 1)[1].split(")", 1)[0].split()  # e.g. avx2 fma avx512f
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file() and flags and flags[0] not in ("none", "unknown"):
        have = next(ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags"))
        assert set(flags) <= set(have.split(":", 1)[1].split())  # only flags the CPU has
    assert "torch threads" in lines[3] and "C++ kernels" in lines[3]
    assert lines[4] == f"- date: {datetime.date.today().isoformat()}"
    assert lines[5] == "- a note"


def test_proc_status_reads_this_process_peak_memory() -> None:
    import harness

    now = harness.proc_status("VmRSS")
    peak = harness.proc_status("VmHWM")  # read second: the peak of a moment later
    assert peak >= now > 10 * 2**20  # a Python process with torch loaded
    assert harness.proc_status("NoSuchKey") == 0
