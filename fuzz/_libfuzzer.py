"""The coverage-guided engine: one target under atheris/libFuzzer, in its own process.

``fuzz/run.py`` starts this module as a child (``python -m fuzz._libfuzzer TARGET STATS --
<libFuzzer flags> <corpus dirs>``) because ``atheris.Fuzz()`` never returns: libFuzzer
calls ``exit()`` when its ``-runs`` are done, without Python's atexit handlers, and on a
crash it writes the input to ``-artifact_prefix`` and exits non-zero. The child therefore
writes its own statistics (inputs run, time spent, the slowest input) to ``STATS`` when the
last run completes, and from an atexit handler when a crash ends the run early.

The parser modules are imported inside ``atheris.instrument_imports`` so that their
branches feed libFuzzer's coverage; the targets module itself and the standard library
are not instrumented.
"""

from __future__ import annotations

import atexit
import json
import sys
import time
from pathlib import Path

import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]

# Every module a target reaches that parses peer input; their branches are the coverage.
INSTRUMENTED = (
    "whepfan.protocol",
    "whepfan.http.etag",
    "whepfan.http.layers",
    "whepfan.http.events",
    "whepfan.errors",
    "aioice.stun",
)


class _Stats:
    """Inputs run and the slowest one, written as JSON for the parent."""

    def __init__(self, path: Path, runs: int) -> None:
        self.path = path
        self.runs = runs
        self.count = 0
        self.busy_seconds = 0.0
        self.slowest_seconds = 0.0
        self.slowest_input = b""
        self.started = time.monotonic()
        self.written = False

    def note(self, data: bytes, seconds: float) -> None:
        self.count += 1
        self.busy_seconds += seconds
        if seconds > self.slowest_seconds:
            self.slowest_seconds = seconds
            self.slowest_input = data
        if self.count == self.runs:
            self.write()

    def write(self) -> None:
        if self.written:
            return
        self.written = True
        slowest_path = self.path.with_suffix(".slowest")
        slowest_path.write_bytes(self.slowest_input)
        document = {
            "runs": self.count,
            "busy_seconds": self.busy_seconds,
            "wall_seconds": time.monotonic() - self.started,
            "slowest_seconds": self.slowest_seconds,
            "slowest_bytes": len(self.slowest_input),
            "slowest_path": str(slowest_path),
        }
        self.path.write_text(json.dumps(document))


def main(argv: list[str]) -> None:
    name, stats_path, separator, *libfuzzer_args = argv
    if separator != "--":
        raise SystemExit("usage: python -m fuzz._libfuzzer TARGET STATS -- FLAGS... DIRS...")
    with atheris.instrument_imports(include=INSTRUMENTED):
        from fuzz.targets import TARGETS
    target = TARGETS[name]
    if not any(flag.startswith("-max_len=") for flag in libfuzzer_args):
        libfuzzer_args.insert(0, f"-max_len={target.max_len}")
    function = target.function
    runs = next((int(a.split("=", 1)[1]) for a in libfuzzer_args if a.startswith("-runs=")), -1)
    stats = _Stats(Path(stats_path), runs)
    atexit.register(stats.write)
    clock = time.perf_counter

    def test_one_input(data: bytes) -> None:
        start = clock()
        try:
            function(data)
        finally:
            stats.note(data, clock() - start)

    atheris.Setup([sys.argv[0], *libfuzzer_args], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv[1:])
