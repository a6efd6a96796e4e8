"""onebit.heap: with a warm heap, a large block freed and allocated again reuses mapped pages."""

from __future__ import annotations

import ctypes.util
import subprocess
import sys
import textwrap

import pytest

from .conftest import REPO

# In a fresh process (the test process's allocator stays as it is): a 200 MB tensor made and
# freed, again and again; the minor page faults of the last three rounds.
PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from onebit.heap import warm_heap
    line = warm_heap() if sys.argv[1] == "warm" else "defaults"
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):  # a small object may take the start of a freed block: let the heap settle
        x = torch.ones(50_000_000)
        del x
    before = faults()
    for _ in range(3):
        x = torch.ones(50_000_000)
        del x
    print(faults() - before)
    print(line)
    """
)


def _faults(heap: str) -> tuple[int, str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, heap], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    faults, line = out.stdout.strip().splitlines()[-2:]
    return int(faults), line


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or ctypes.util.find_library("c") is None,
    reason="glibc's mallopt: Linux only",
)
def test_a_warm_heap_reuses_the_pages_of_a_freed_block() -> None:
    cold, cold_line = _faults("default")
    warm, warm_line = _faults("warm")
    assert cold_line == "defaults"
    if warm_line.startswith("heap: allocator defaults"):
        pytest.skip("this C library has no mallopt (not glibc)")
    assert warm_line.startswith("heap: warm")
    # 200 MB in 4 KiB pages is 48,828 faults a round when the block comes fresh from the kernel
    # (fewer with huge pages); from the warm heap the pages are already there
    assert cold > 30_000
    assert warm < cold / 100, (warm, cold)
