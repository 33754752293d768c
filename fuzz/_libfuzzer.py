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
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import atheris  # type: ignore[import-untyped, import-not-found, unused-ignore]

from fuzz.run import SlowInputs

# The modules that parse peer input; their branches are the coverage signal. atheris
# instruments whole top-level packages (``include`` keeps only "whepfan" and "aioice"), so
# every other module of those packages is excluded by name: instrumenting the router, the
# HTTP app and the rest of aioice would triple the start-up time and add noise to coverage.
INSTRUMENTED = (
    "whepfan.errors",
    "whepfan.protocol.sdp",
    "whepfan.protocol.negotiation",
    "whepfan.protocol.ice",
    "whepfan.protocol.rtp",
    "whepfan.protocol.rtcp",
    "whepfan.protocol.codecs",
    "whepfan.protocol.demux",
    "whepfan.protocol.dtls",
    "whepfan.protocol._libssl",
    "whepfan.http.etag",
    "whepfan.http.headers",
    "whepfan.http.clientaddr",
    "whepfan.http.ratelimit",
    "whepfan.http.auth",
    "whepfan.http.layers",
    "whepfan.http.events",
    "aioice.stun",
)


def _modules_of(package: str) -> list[str]:
    """Every module name under a package, from its files: nothing is imported to list them."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return []
    root = Path(spec.origin).parent
    names = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names.append(".".join((package, *parts)))
    return names


def not_instrumented() -> list[str]:
    packages = sorted({name.split(".")[0] for name in INSTRUMENTED})
    return [
        name for package in packages for name in _modules_of(package) if name not in INSTRUMENTED
    ]


# Inputs between two progress writes of the statistics file.
PROGRESS_EVERY = 4096


class _Stats:
    """Inputs run and the slowest one, written as JSON for the parent."""

    def __init__(self, path: Path, runs: int, function: Callable[[bytes], None]) -> None:
        self.path = path
        self.runs = runs
        self.function = function
        self.count = 0
        self.busy_seconds = 0.0
        self.slow = SlowInputs()
        self.started = time.monotonic()
        self.written = False

    def note(self, data: bytes, seconds: float) -> None:
        self.count += 1
        self.busy_seconds += seconds
        self.slow.note(data, seconds)
        if self.count == self.runs:
            self.write()
        elif not self.count % PROGRESS_EVERY:
            # libFuzzer ends a -max_total_time run with exit(), past Python's atexit.
            self.write(final=False)

    def write(self, *, final: bool = True) -> None:
        if self.written:
            return
        self.written = final
        wall_seconds = time.monotonic() - self.started
        if final:
            slowest_seconds, slowest_input = self.slow.worst(self.function)
        else:
            slowest_seconds, slowest_input = self.slow.first_seen_worst()
        slowest_path = self.path.with_suffix(".slowest")
        slowest_path.write_bytes(slowest_input)
        document = {
            "runs": self.count,
            "busy_seconds": self.busy_seconds,
            "wall_seconds": wall_seconds,
            "slowest_seconds": slowest_seconds,
            "slowest_replayed": final,
            "slowest_bytes": len(slowest_input),
            "slowest_path": str(slowest_path),
        }
        self.path.write_text(json.dumps(document))


def main(argv: list[str]) -> None:
    name, stats_path, separator, *libfuzzer_args = argv
    if separator != "--":
        raise SystemExit("usage: python -m fuzz._libfuzzer TARGET STATS -- FLAGS... DIRS...")
    with atheris.instrument_imports(include=INSTRUMENTED, exclude=not_instrumented()):
        from fuzz.targets import TARGETS
    target = TARGETS[name]
    if not any(flag.startswith("-max_len=") for flag in libfuzzer_args):
        libfuzzer_args.insert(0, f"-max_len={target.max_len}")
    function = target.function
    runs = next((int(a.split("=", 1)[1]) for a in libfuzzer_args if a.startswith("-runs=")), -1)
    stats = _Stats(Path(stats_path), runs, function)
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
