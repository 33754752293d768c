"""bench/_cpu.py: another process's CPU time off its CPU-time clock, at ns resolution."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.append(str(Path(__file__).resolve().parents[1] / "bench"))
from _cpu import process_cpu_seconds, stat_cpu_seconds


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def test_a_child_burning_cpu_reads_the_same_as_proc_but_finer() -> None:
    # The child spins until told to stop on stdin; its CPU clock and /proc's ticks must
    # agree to within a tick, and the clock must move between two reads a tick apart.
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, select\nwhile not select.select([sys.stdin], [], [], 0)[0]: pass",
        ],
        stdin=subprocess.PIPE,
    )
    try:
        time.sleep(0.3)
        first = process_cpu_seconds(child.pid)
        ticks = stat_cpu_seconds(_stat_fields(child.pid))
        time.sleep(0.02)
        second = process_cpu_seconds(child.pid)
        assert first is not None and second is not None
        assert abs(first - ticks) <= 0.03
        assert second > first
        # Finer than the 10 ms tick: nanoseconds, so a reading is almost never a whole tick.
        assert any(value * 100 % 1 for value in (first, second))
    finally:
        assert child.stdin is not None
        child.stdin.write(b"x")
        child.stdin.close()
        child.wait()
    assert process_cpu_seconds(child.pid) is None


def test_own_process_matches_process_time() -> None:
    own = process_cpu_seconds(os.getpid())
    assert own is not None and abs(own - time.process_time()) < 0.05
