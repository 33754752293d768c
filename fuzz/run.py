"""Run the parser fuzz targets: ``python -m fuzz.run --target sdp --runs 1000000``.

Two engines drive the same targets (``fuzz/targets.py``):

- ``atheris`` (the default when it is installed, ``pip install -e .[fuzz]``): libFuzzer,
  coverage-guided over the instrumented parser modules, one child process per target
  (``fuzz/_libfuzzer.py``). New interesting inputs go to a working corpus outside the
  repository (``--work-dir``); the committed seeds in ``fuzz/corpus/<target>/`` and the
  regression inputs in ``tests/data/fuzz/<target>/`` are read, never written.
- ``hypothesis``: coverage-free generation for machines without atheris: random bytes and
  mutations of the same seeds (byte changes, inserts, erasures, splices), shrunk on failure.

Either way, an input that crashes a target is kept as ``crash-<sha1>`` in
``tests/data/fuzz/<target>/`` (``--artifacts``), which the test suite replays
(``tests/test_fuzz_regressions.py``). Time per input is measured for every input: the
summary names the slowest one, so work that grows faster than the input shows up; libFuzzer's
``-timeout`` turns an input over ``--timeout`` seconds into a ``timeout-<sha1>`` artifact.

The last line on stdout is a JSON summary per target: runs, crashes, seconds, slowest input.
The exit status is 0 when no target crashed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import heapq
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "fuzz" / "corpus"
REGRESSIONS = REPO / "tests" / "data" / "fuzz"
# The fuzz targets (fuzz.targets.TARGETS keys), in the order ``--target all`` runs them;
# named here so that the atheris parent need not import the parsers, only its children do.
TARGET_NAMES = (
    "sdp",
    "offer",
    "sdpfrag",
    "stun",
    "rtp",
    "rtcp",
    "codecs",
    "dtls",
    "json",
    "if-match",
    "headers",
)
# libFuzzer names what it keeps after the event that produced it.
ARTIFACT_PREFIXES = ("crash-", "timeout-", "oom-", "leak-")


@dataclass(slots=True, kw_only=True)
class RunResult:
    """What one target's run did; printed as one JSON line."""

    target: str
    engine: str
    runs: int
    crashes: int
    # False when --max-seconds ended the run before --runs inputs.
    complete: bool
    seconds: float
    slowest_ms: float
    slowest_bytes: int
    slowest_path: str | None = None
    artifacts: list[str] = field(default_factory=list)


class SlowInputs:
    """The few slowest inputs of a run, timed again when it ends.

    A single wall-clock sample is at the mercy of the scheduler on a busy machine; an input
    that is slow because of the work it causes stays slow when replayed. So the summary
    reports, over the ``KEEP`` slowest inputs seen, the worst best-of-``REPLAYS`` time.
    """

    KEEP = 8
    REPLAYS = 3

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, bytes]] = []
        self._seen = 0

    def note(self, data: bytes, seconds: float) -> None:
        self._seen += 1
        entry = (seconds, self._seen, data)
        if len(self._heap) < self.KEEP:
            heapq.heappush(self._heap, entry)
        elif seconds > self._heap[0][0]:
            heapq.heapreplace(self._heap, entry)

    def first_seen_worst(self) -> tuple[float, bytes]:
        """(seconds, input) of the slowest input as first timed, not replayed."""
        seconds, _, data = max(self._heap, default=(0.0, 0, b""))
        return seconds, data

    def worst(self, function: Callable[[bytes], None]) -> tuple[float, bytes]:
        """(best-of-replays seconds, input) of the slowest kept input."""
        worst = (0.0, b"")
        for _, _, data in self._heap:
            times = []
            for _ in range(self.REPLAYS):
                start = time.perf_counter()
                # A crashing input is reported as a crash; here only its time counts.
                with contextlib.suppress(Exception):
                    function(data)
                times.append(time.perf_counter() - start)
            worst = max(worst, (min(times), data))
        return worst


def artifact_name(kind: str, data: bytes) -> str:
    """``crash-<sha1 of the input>``, libFuzzer's naming, so both engines keep an input once."""
    return f"{kind}-{hashlib.sha1(data).hexdigest()}"


def seed_inputs(target: str) -> list[bytes]:
    """Committed seeds and regression inputs of a target, in a stable order."""
    seeds = []
    for directory in (CORPUS / target, REGRESSIONS / target):
        if directory.is_dir():
            seeds += [path.read_bytes() for path in sorted(directory.iterdir()) if path.is_file()]
    return seeds


def _artifacts_in(directory: Path) -> set[str]:
    if not directory.is_dir():
        return set()
    return {path.name for path in directory.iterdir() if path.name.startswith(ARTIFACT_PREFIXES)}


# --------------------------------------------------------------------------- atheris


def run_atheris(
    target: str,
    *,
    runs: int,
    max_len: int | None,
    timeout: float,
    max_seconds: int | None,
    artifacts: Path,
    work_dir: Path,
    seed: int | None,
    log: Path | None,
) -> RunResult:
    """One target under libFuzzer in a child process (see ``fuzz/_libfuzzer.py``)."""
    corpus = work_dir / target / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    artifacts.mkdir(parents=True, exist_ok=True)
    stats_path = work_dir / target / "stats.json"
    stats_path.unlink(missing_ok=True)
    before = _artifacts_in(artifacts)
    flags = [
        f"-runs={runs}",
        f"-timeout={max(1, round(timeout))}",
        f"-artifact_prefix={artifacts}{os.sep}",
        "-print_final_stats=1",
    ]
    if max_len is not None:
        flags.append(f"-max_len={max_len}")
    if max_seconds is not None:
        flags.append(f"-max_total_time={max_seconds}")
    if seed is not None:
        flags.append(f"-seed={seed}")
    directories = [str(corpus)] + [
        str(directory)
        for directory in (CORPUS / target, REGRESSIONS / target)
        if directory.is_dir()
    ]
    command = [sys.executable, "-m", "fuzz._libfuzzer", target, str(stats_path), "--"]
    started = time.monotonic()
    with open(log, "ab") if log is not None else open(os.devnull, "wb") as sink:
        completed = subprocess.run(
            [*command, *flags, *directories],
            cwd=REPO,
            stdout=sink if log is not None else None,
            stderr=sink if log is not None else None,
            check=False,
        )
    seconds = time.monotonic() - started
    new = sorted(_artifacts_in(artifacts) - before)
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    if completed.returncode != 0 and not new:
        raise RuntimeError(f"libFuzzer for {target} exited {completed.returncode} and kept nothing")
    ran = int(stats.get("runs", 0))
    slowest_seconds = float(stats.get("slowest_seconds", 0.0))
    if stats and not stats.get("slowest_replayed", True):
        # A run libFuzzer ended by exit() kept only first timings: replay the slowest here.
        from fuzz.targets import TARGETS

        keep = SlowInputs()
        keep.note(Path(stats["slowest_path"]).read_bytes(), slowest_seconds)
        slowest_seconds = keep.worst(TARGETS[target].function)[0]
    return RunResult(
        target=target,
        engine="atheris",
        runs=ran,
        crashes=len(new) if completed.returncode != 0 else 0,
        complete=ran >= runs,
        seconds=round(seconds, 2),
        slowest_ms=round(1000 * slowest_seconds, 3),
        slowest_bytes=int(stats.get("slowest_bytes", 0)),
        slowest_path=stats.get("slowest_path"),
        artifacts=[str(artifacts / name) for name in new],
    )


# --------------------------------------------------------------------------- Hypothesis


def run_hypothesis(
    target: str,
    function: Callable[[bytes], None],
    seeds: Sequence[bytes],
    *,
    runs: int,
    max_len: int,
    artifacts: Path,
    seed: int | None,
) -> RunResult:
    """Coverage-free generation: random bytes and mutated seeds, shrunk on the first crash.

    Hypothesis replays the shrunk example last, so the last failing input seen is the
    minimal one, and that is what is kept.
    """
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as fixed_seed
    from hypothesis import strategies as st

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        data = bytearray(draw(st.sampled_from(seeds)))
        for _ in range(draw(st.integers(1, 8))):
            operation = draw(st.integers(0, 3))
            position = draw(st.integers(0, len(data)))
            if operation == 0 and data:
                data[min(position, len(data) - 1)] = draw(st.integers(0, 255))
            elif operation == 1:
                data[position:position] = draw(st.binary(min_size=1, max_size=16))
            elif operation == 2:
                del data[position : position + draw(st.integers(1, 16))]
            else:
                other = draw(st.sampled_from(seeds))
                start = draw(st.integers(0, len(other)))
                data[position:] = other[start:]
        return bytes(data[:max_len])

    inputs = st.binary(max_size=max_len)
    if seeds:
        inputs = st.one_of(inputs, mutated())
    count = 0
    slow = SlowInputs()
    failing: list[bytes] = []

    def timed(data: bytes) -> None:
        nonlocal count
        count += 1
        start = time.perf_counter()
        try:
            function(data)
        except BaseException:
            failing.append(data)
            raise
        finally:
            slow.note(data, time.perf_counter() - start)

    test = settings(
        max_examples=runs,
        database=None,
        deadline=None,
        phases=(Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
    )(given(inputs)(timed))
    if seed is not None:
        test = fixed_seed(seed)(test)
    started = time.monotonic()
    kept: list[str] = []
    try:
        test()
    except Exception:
        artifacts.mkdir(parents=True, exist_ok=True)
        path = artifacts / artifact_name("crash", failing[-1])
        path.write_bytes(failing[-1])
        kept.append(str(path))
    seconds = time.monotonic() - started
    slowest = slow.worst(function)
    return RunResult(
        target=target,
        engine="hypothesis",
        runs=count,
        crashes=len(kept),
        complete=count >= runs or bool(kept),
        seconds=round(seconds, 2),
        slowest_ms=round(1000 * slowest[0], 3),
        slowest_bytes=len(slowest[1]),
        artifacts=kept,
    )


# --------------------------------------------------------------------------- command line


def atheris_available() -> bool:
    return importlib.util.find_spec("atheris") is not None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__.split("\n")[0])
    parser.add_argument("--target", required=True, choices=[*TARGET_NAMES, "all"])
    parser.add_argument("--runs", type=int, default=100_000, help="inputs per target")
    parser.add_argument(
        "--engine",
        choices=("auto", "atheris", "hypothesis"),
        default="auto",
        help="auto: atheris when installed, else hypothesis",
    )
    parser.add_argument("--max-len", type=int, help="largest input (default: per target)")
    parser.add_argument(
        "--timeout", type=float, default=10.0, help="seconds before an input counts as a hang"
    )
    parser.add_argument(
        "--artifacts",
        type=Path,
        default=REGRESSIONS,
        help="where crashing inputs are kept, one folder per target (default: tests/data/fuzz)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "whepfan-fuzz",
        help="libFuzzer's growing corpus and run statistics (kept between runs)",
    )
    parser.add_argument(
        "--max-seconds", type=int, help="atheris: stop a target after this long, done or not"
    )
    parser.add_argument("--seed", type=int, help="random seed, for a repeatable run")
    parser.add_argument("--log", type=Path, help="append libFuzzer's output here, not stderr")
    parser.add_argument("--report", type=Path, help="also append each JSON summary line here")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    engine = options.engine
    if engine == "auto":
        engine = "atheris" if atheris_available() else "hypothesis"
    names = TARGET_NAMES if options.target == "all" else (options.target,)
    if engine == "hypothesis":
        from fuzz.targets import TARGETS
    results = []
    for name in names:
        if engine == "atheris":
            result = run_atheris(
                name,
                runs=options.runs,
                max_len=options.max_len,
                timeout=options.timeout,
                max_seconds=options.max_seconds,
                artifacts=options.artifacts / name,
                work_dir=options.work_dir,
                seed=options.seed,
                log=options.log,
            )
        else:
            target = TARGETS[name]
            result = run_hypothesis(
                name,
                target.function,
                seed_inputs(name),
                runs=options.runs,
                max_len=options.max_len or target.max_len,
                artifacts=options.artifacts / name,
                seed=options.seed if options.seed is not None else random.getrandbits(32),
            )
        line = json.dumps(asdict(result))
        print(line, flush=True)
        if options.report is not None:
            with options.report.open("a") as report:
                report.write(line + "\n")
        results.append(result)
    return 1 if any(result.crashes for result in results) else 0


if __name__ == "__main__":
    sys.exit(main())
