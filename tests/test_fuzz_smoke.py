"""A short fuzz run of every parser target through the real entry point, as CI runs it.

``python -m fuzz.run --target <name> --runs N`` with a few thousand inputs each: the same
runner and targets that run 10^6 inputs outside CI (``fuzz/README.md``), here long enough
to show that each target starts, reads its seeds and survives mutations of them. Inputs a
smoke run crashes on go to a temporary folder and fail the test, naming the file. The
Hypothesis engine (the fallback where atheris does not install) gets a shorter run of its
own, and the runner is shown to keep a crashing input, shrunk, under libFuzzer's name.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fuzz.run import REPO, TARGET_NAMES, artifact_name, atheris_available, run_hypothesis

SMOKE_RUNS = 2_000


def _fuzz(tmp_path: Path, *arguments: str) -> tuple[int, list[dict[str, object]]]:
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "fuzz.run",
            *arguments,
            "--artifacts",
            str(tmp_path / "artifacts"),
            "--work-dir",
            str(tmp_path / "work"),
            "--log",
            str(tmp_path / "fuzz.log"),
            "--seed",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    summaries = [json.loads(line) for line in completed.stdout.splitlines() if line.startswith("{")]
    return completed.returncode, summaries


@pytest.mark.parametrize("target", TARGET_NAMES)
def test_target_survives_a_smoke_run(tmp_path: Path, target: str) -> None:
    returncode, (summary,) = _fuzz(tmp_path, "--target", target, "--runs", str(SMOKE_RUNS))
    assert summary["crashes"] == 0, summary["artifacts"]
    assert returncode == 0
    assert summary["target"] == target
    assert summary["engine"] == ("atheris" if atheris_available() else "hypothesis")
    assert summary["runs"] == SMOKE_RUNS


def test_hypothesis_engine_runs_every_target(tmp_path: Path) -> None:
    returncode, summaries = _fuzz(
        tmp_path, "--target", "all", "--engine", "hypothesis", "--runs", "100"
    )
    assert returncode == 0, summaries
    assert [summary["target"] for summary in summaries] == list(TARGET_NAMES)
    assert all(summary["runs"] == 100 and summary["crashes"] == 0 for summary in summaries)


def _rejects_a_zero_after_a_one(data: bytes) -> None:
    if b"\x01\x00" in data:
        raise IndexError("a parser bug")


def test_hypothesis_engine_keeps_the_shrunk_crashing_input(tmp_path: Path) -> None:
    result = run_hypothesis(
        "demo",
        _rejects_a_zero_after_a_one,
        [b"\x01\x02\x03"],
        runs=2_000,
        max_len=64,
        artifacts=tmp_path,
        seed=7,
    )
    assert result.crashes == 1
    (kept,) = tmp_path.iterdir()
    assert kept.read_bytes() == b"\x01\x00"
    assert kept.name == artifact_name("crash", b"\x01\x00")
    assert result.artifacts == [str(kept)]
