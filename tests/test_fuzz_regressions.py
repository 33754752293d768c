"""Every input a fuzz run ever crashed a parser with, replayed through its target.

``python -m fuzz.run`` keeps each crashing input in ``tests/data/fuzz/<target>/`` (named
``crash-<sha1>`` or ``timeout-<sha1>``, as libFuzzer names them); once the parser is fixed,
the input stays here so the bug cannot come back. The committed seed corpora
(``fuzz/corpus/<target>/``) are replayed too: they are real traffic, RFC examples and our
own output, and every one of them must parse or be refused with ParseError.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz.run import CORPUS, REGRESSIONS, TARGET_NAMES
from fuzz.targets import TARGETS


def _inputs(root: Path) -> list[tuple[str, Path]]:
    return [
        (target.name, path)
        for target in sorted(root.iterdir())
        if target.is_dir()
        for path in sorted(target.iterdir())
        if path.is_file()
    ]


REGRESSION_INPUTS = _inputs(REGRESSIONS)
SEED_INPUTS = _inputs(CORPUS)


def _id(case: tuple[str, Path]) -> str:
    return f"{case[0]}/{case[1].name[:18]}"


def test_runner_and_registry_name_the_same_targets() -> None:
    assert tuple(TARGETS) == TARGET_NAMES


def test_every_input_folder_belongs_to_a_target() -> None:
    # A folder for a renamed or misspelt target would silently never be replayed.
    folders = {path.name for root in (REGRESSIONS, CORPUS) for path in root.iterdir()}
    assert folders <= set(TARGETS)


def test_every_target_has_seeds() -> None:
    assert {name for name, _ in SEED_INPUTS} == set(TARGETS)


@pytest.mark.parametrize("case", REGRESSION_INPUTS, ids=_id)
def test_crashing_input_no_longer_crashes(case: tuple[str, Path]) -> None:
    name, path = case
    TARGETS[name].function(path.read_bytes())


@pytest.mark.parametrize("case", SEED_INPUTS, ids=_id)
def test_seed_input_is_handled(case: tuple[str, Path]) -> None:
    name, path = case
    TARGETS[name].function(path.read_bytes())
