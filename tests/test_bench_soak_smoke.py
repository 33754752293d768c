"""bench/soak.py --smoke, run as a user runs it (a subprocess: whepfan serve, whepfan
publish and whepfan loadtest behind it), checked for what a soak must show: every cycle
created and deleted its session, every whole viewer received media, the sessions come
back to the steady viewers and the publisher, and the samples carry the figures. Then
the flatness verdict on made-up samples. No timing thresholds: RSS and lag depend on
the machine and what else runs on it."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
BENCHMARK = REPOSITORY / "bench" / "soak.py"
TIMEOUT = 300  # a generous ceiling for a shared CI machine, not a performance threshold


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["soak"] = module
    spec.loader.exec_module(module)
    return module


# Runs its argv with SIGINT ignored, as a shell starts a background job (`soak.py &`).
IGNORING_SIGINT = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


@pytest.mark.slow
def test_the_soak_smoke_run_leaves_nothing_behind(tmp_path: Path) -> None:
    report = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, "-c", IGNORING_SIGINT, str(BENCHMARK), "--smoke", "--json", str(report)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPOSITORY,
    )
    assert result.returncode in (0, 1), result.stderr
    data = json.loads(report.read_text())
    tally = data["tally"]
    # --smoke: 100 warm-up + 300 cycles, one in 50 a whole viewer.
    assert tally["posted"] + tally["handshakes"] == 400
    assert tally["created"] == tally["deleted"] == tally["posted"]
    assert tally["errors"] == tally["refused"] == 0
    assert tally["handshakes"] == 8
    assert tally["handshakes_received_media"] == tally["handshakes"]
    samples = data["samples"]
    assert len(samples) == 11  # after the warm-up, then every tenth
    for sample in samples:
        assert sample["rss_bytes"] > 0 and sample["fds"] > 0 and sample["lag_seconds"] > 0
        # The steady viewers and the publisher are all that is left between cycles.
        assert (sample["viewers"], sample["publishers"]) == (4, 1)
    # The live stream flowed the whole time.
    assert all(s["sent_packets_per_second"] > 0 for s in samples[1:])
    assert data["flat"]["sessions"] and data["flat"]["fds"]
    assert "flat: " in result.stdout
    # Stopped by its SIGINT even so: it left (DELETE) rather than publish again against
    # the stopped server until it was killed.
    assert "publishing again" not in data["logs"]["publish.log"], data["logs"]["publish.log"]


def test_the_verdict_compares_the_last_sample_with_the_first() -> None:
    soak = _module()

    def sample(rss: int, fds: int, viewers: float, lag: float) -> object:
        return soak.Sample(
            cycles=0,
            at=0.0,
            rss_bytes=rss,
            fds=fds,
            processes=1,
            viewers=viewers,
            publishers=1.0,
            lag_seconds=lag,
            sent_packets_per_second=None,
        )

    start = sample(100 << 20, 30, 4, 0.001)
    assert all(soak.verdict([start, sample(105 << 20, 33, 4, 0.008)], rss_tolerance=0.1).values())
    grown = soak.verdict([start, sample(120 << 20, 60, 5, 0.05)], rss_tolerance=0.1)
    assert grown == {"rss": False, "fds": False, "sessions": False, "lag": False}


def test_max_seconds_stops_starting_cycles_and_takes_the_last_sample() -> None:
    """--max-seconds: cycles after the warm-up stop starting once the budget is spent;
    those in flight finish, the last sample follows at once, and the count is exact."""
    soak = _module()

    class Deployment:
        url = "http://127.0.0.1:9"

    class TimedSoak(soak.Soak):  # type: ignore[name-defined]
        cycle_seconds = 0.02

        def __init__(self) -> None:
            super().__init__(Deployment(), concurrency=4, handshake_every=0, max_seconds=0.3)
            self.finished = 0
            self.started_late = 0
            self.sampled_at: list[int] = []

        async def _post_and_delete(self, http: object) -> None:
            if self.out_of_time:
                self.started_late += 1
            await asyncio.sleep(self.cycle_seconds)
            self.finished += 1

        async def sample(self, http: object) -> None:
            self.sampled_at.append(self._cycles)

    timed = TimedSoak()
    asyncio.run(timed.run(None, 10**6, 40))
    assert timed.started_late == 0
    assert timed.finished == timed._cycles == 40 + timed.measured_cycles
    # 4 at a time, 20 ms each, for 0.3 s: about 60 cycles, nowhere near the 10^6 asked.
    assert 20 <= timed.measured_cycles <= 80, timed.measured_cycles
    assert timed.sampled_at == [40, timed._cycles]  # after the warm-up, then at the stop
    assert 60 <= timed.measured_rate <= 250, timed.measured_rate


def test_max_seconds_must_be_positive() -> None:
    soak = _module()
    assert soak.parse_args(["--max-seconds", "1800"]).max_seconds == 1800.0
    assert soak.parse_args([]).max_seconds is None
    with pytest.raises(SystemExit):
        soak.parse_args(["--max-seconds", "0"])
