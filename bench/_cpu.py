"""Another process's CPU time at nanosecond resolution, for the benchmarks.

/proc/<pid>/stat counts utime and stime in clock ticks (10 ms here): a short window of a
lightly loaded server can read 0 and a 4 s window is only good to 0.25 %. The kernel keeps
every process's CPU time in nanoseconds and exposes it as a POSIX CPU-time clock
(clock_getcpuclockid(3)); Python has no wrapper for that call, so the clock id is built the
way glibc builds it: ``(~pid << 3) | CPUCLOCK_SCHED`` (linux/posix-timers.h: a process-wide
clock, the thread bit 4 clear, CPUCLOCK_SCHED = 2 counting user + system time of all its
threads). Children are not included, as with utime + stime.
"""

from __future__ import annotations

import os
import time

CPUCLOCK_SCHED = 2
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_clock_id(pid: int) -> int:
    """The CPU-time clock of process ``pid`` (what clock_getcpuclockid returns)."""
    return ((~pid) << 3) | CPUCLOCK_SCHED


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` so far, at ns resolution; None once it is
    gone (EINVAL) or when the kernel refuses the clock."""
    try:
        return time.clock_gettime(process_clock_id(pid))
    except OSError:
        return None


def stat_cpu_seconds(fields: list[str]) -> float:
    """utime + stime from /proc/<pid>/stat fields (after the command name), in seconds at
    the clock tick's resolution: the fallback when the CPU clock cannot be read."""
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
