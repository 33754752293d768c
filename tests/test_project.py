"""The project's shape: the README quick start is what CI runs, and the layers hold."""

import ast
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", quick_start, re.S)
    assert block, "README quick start has no bash block"
    return [
        line.strip()
        for line in block.group(1).splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_readme_quick_start_has_exactly_two_setup_commands() -> None:
    assert len(_readme_commands()) == 2


def test_readme_commands_install_only_into_a_virtualenv_of_debians_python() -> None:
    """Debian's own python3 refuses ``pip install`` outside a virtualenv (PEP 668,
    externally-managed-environment), root or not: both commands make ``.venv`` with it and
    run every pip and whepfan from there. Command 2 needs what the build of command 1
    needs (it may run first, on a machine where command 1 never ran)."""
    commands = _readme_commands()
    for command in commands:
        assert "/usr/bin/python3 -m venv .venv" in command
        pips = re.findall(r"(\S*)\bpip install\b", command)
        assert pips and set(pips) == {".venv/bin/"}, command
    assert commands[0].endswith("&& .venv/bin/whepfan demo")
    assert commands[1].endswith("&& .venv/bin/python -m pytest -q")
    packages = [set(re.findall(r'^P="([^"$]*)', command)[0].split()) for command in commands]
    assert {"gcc", "libc6-dev", "python3-dev", "python3-venv", "libssl-dev"} <= packages[0]
    assert packages[0] <= packages[1]


def test_readme_commands_install_intel_ipsec_mb_on_x86_64() -> None:
    """The compiled core's AES-GCM goes through intel-ipsec-mb when its header is there at
    build time (setup.py; Debian ships it for amd64 only), so both commands add
    libipsec-mb-dev on x86-64 and leave it out elsewhere."""
    for command in _readme_commands():
        assignment = command.split("; dpkg -s", 1)[0]
        for machine, expected in (("x86_64", True), ("aarch64", False)):
            fake_uname = f'uname() {{ echo {machine}; }}; export -f uname; {assignment}; echo "$P"'
            listed = subprocess.run(
                ["bash", "-c", fake_uname], capture_output=True, text=True, check=True
            ).stdout.split()
            assert ("libipsec-mb-dev" in listed) is expected, (machine, listed)
            assert {"gcc", "libssl-dev"} <= set(listed)


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    test_command = _readme_commands()[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


def _fake_tool(path: Path, status: int, log: Path) -> None:
    """An executable that records its name and arguments, then exits with ``status``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\necho "$0 $*" >> {log}\nexit {status}\n')
    path.chmod(0o755)


@pytest.mark.parametrize(
    ("pip_status", "pytest_status", "expected", "ran_pytest"),
    [(0, 0, 0, True), (0, 1, 1, True), (0, 5, 5, True), (1, 0, 1, False)],
)
def test_ci_fails_when_any_step_of_the_test_command_fails(
    tmp_path: Path, pip_status: int, pytest_status: int, expected: int, ran_pytest: bool
) -> None:
    """.ci/run's exit status is the first failing step's: pytest's 1 (failures) and 5 (no
    tests collected) turn CI red, and nothing after a failing step runs. The steps are
    stand-ins on a copy of the checkout's layout: installed packages (dpkg), npm and the
    virtualenv's pip and python."""
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    _fake_tool(bin_dir / "dpkg", 0, log)
    _fake_tool(bin_dir / "npm", 0, log)
    _fake_tool(bin_dir / "apt-get", 0, log)
    _fake_tool(tmp_path / ".venv" / "bin" / "pip", pip_status, log)
    _fake_tool(tmp_path / ".venv" / "bin" / "python", pytest_status, log)
    (tmp_path / ".ci").mkdir()
    (tmp_path / ".ci" / "run").write_text((ROOT / ".ci" / "run").read_text())
    result = subprocess.run(
        ["bash", str(tmp_path / ".ci" / "run")],
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == expected, result.stderr
    calls = log.read_text().splitlines()
    assert not [call for call in calls if "apt-get" in call]  # dpkg says all are installed
    assert any(call.endswith("python -m pytest -q") for call in calls) == ran_pytest


@pytest.mark.parametrize("command", [0, 1], ids=["command-1", "command-2"])
@pytest.mark.parametrize(
    ("installed", "update_status"),
    [(True, 100), (False, 0), (False, 100)],
    ids=["installed-broken-source", "missing", "missing-broken-source"],
)
def test_readme_commands_run_apt_get_only_for_missing_packages(
    tmp_path: Path, command: int, installed: bool, update_status: int
) -> None:
    """Issue 13: an ``apt-get update`` that fails (a broken source unrelated to whepfan)
    stopped the quick start even with every package installed. Each README command, as
    written, asks dpkg first and leaves apt-get alone when it says all are there; when one
    is missing it updates and installs exactly the packages it asked about, then carries
    on into the virtualenv; a failing update then stops it with apt-get's status."""
    log = tmp_path / "calls.log"
    bin_dir = tmp_path / "bin"
    _fake_tool(bin_dir / "dpkg", 0 if installed else 1, log)
    _fake_tool(bin_dir / "npm", 0, log)
    apt_get = bin_dir / "apt-get"
    apt_get.write_text(
        f'#!/bin/sh\necho "$0 $*" >> {log}\n'
        f'case "$1" in update) exit {update_status};; esac\nexit 0\n'
    )
    apt_get.chmod(0o755)
    for tool in ("python", "pip", "whepfan"):
        _fake_tool(tmp_path / ".venv" / "bin" / tool, 0, log)
    result = subprocess.run(
        ["bash", "-c", _readme_commands()[command]],
        cwd=tmp_path,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        check=False,
    )
    calls = log.read_text().splitlines()
    [dpkg] = [call.split()[1:] for call in calls if call.startswith(f"{bin_dir}/dpkg ")]
    assert dpkg[0] == "-s" and {"gcc", "python3-dev", "libssl-dev"} <= set(dpkg[1:])
    apt_calls = [call.split()[1:] for call in calls if call.startswith(f"{apt_get} ")]
    last_step = ".venv/bin/whepfan demo" if command == 0 else ".venv/bin/python -m pytest -q"
    if installed:
        assert (result.returncode, apt_calls) == (0, []), result.stderr
        assert calls[-1].endswith(last_step)
    elif update_status == 0:
        assert result.returncode == 0, result.stderr
        install = ["install", "-y", "-qq", "--no-install-recommends", *dpkg[1:]]
        assert apt_calls == [["update", "-qq"], install]
        assert calls[-1].endswith(last_step)
    else:
        assert result.returncode == update_status, result.stderr
        assert apt_calls == [["update", "-qq"]]
        assert calls[-1] == f"{apt_get} update -qq"  # nothing after it ran


# Paths that reach outside the repository: the repo's tests, benchmarks and docs must work
# and read on a fresh clone with nothing beside it. ("[k]": the pattern must not match itself.)
_OUTSIDE = re.compile(r"\.\./shared|\bshared/(?:reference|fixtures|hooks)\b|/wor[k]/")
_SCANNED = (
    "README.md",
    "CHANGELOG.md",
    "pyproject.toml",
    "setup.py",
    ".ci",
    "bench",
    "deploy",
    "docs",
    "fuzz",
    "tests",
    "whepfan",
)
_SKIPPED_DIRS = {"node_modules", "__pycache__", "build"}


def _repository_text_files() -> list[Path]:
    """The text files under _SCANNED, without caches and installs (hidden directories such
    as .mypy_cache or .venv, node_modules), build products and binaries."""
    found = []
    for entry in _SCANNED:
        top = ROOT / entry
        for path in [top] if top.is_file() else sorted(top.rglob("*")):
            inner = path.relative_to(top).parts if path != top else ()
            if (
                not path.is_file()
                or any(part.startswith(".") or part in _SKIPPED_DIRS for part in inner[:-1])
                or path.name == "_fastpath.c"  # generated by Cython
                or b"\0" in path.read_bytes()[:8192]
            ):
                continue
            found.append(path)
    return found


def test_the_outside_reference_scan_covers_every_tracked_top_level_entry() -> None:
    """A directory added to the repository is scanned too (fuzz/ once was not)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    top_level = {name.split("/", 1)[0] for name in listed.split("\0") if name}
    assert top_level - {".gitignore"} <= set(_SCANNED), sorted(top_level - set(_SCANNED))


def test_nothing_in_the_repository_reaches_outside_it() -> None:
    files = _repository_text_files()
    assert len(files) > 50  # the walk reaches the repository's files
    offenders = []
    for path in files:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if _OUTSIDE.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_protocol_layer_is_sans_io() -> None:
    """DESIGN.md §3: protocol modules never import asyncio, socket, time or threading."""
    forbidden = {"asyncio", "socket", "time", "threading", "selectors"}
    for path in (ROOT / "whepfan" / "protocol").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            else:
                continue
            assert not forbidden.intersection(names), f"{path.name} imports {names}"


def test_workers_and_media_never_import_the_layers_above_them() -> None:
    """DESIGN.md §3: ``workers/`` imports ``media/`` and ``protocol/``, never ``cluster/``,
    ``http/``, ``client/`` or the wiring (a layer above runs code in a worker process
    through a worker extension, workers/node.py); ``media/`` none of those nor ``workers/``."""
    above = {
        "workers": ("whepfan.cluster", "whepfan.http", "whepfan.client", "whepfan.server"),
        "media": ("whepfan.workers", "whepfan.cluster", "whepfan.http", "whepfan.client"),
    }
    for package, forbidden in above.items():
        for path in (ROOT / "whepfan" / package).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    modules = [node.module or ""]
                else:
                    continue
                for module in modules:
                    assert not module.startswith(forbidden), f"{package}/{path.name}: {module}"


# Issue 12: past this a module of the media or worker plane holds more than one concern
# (DESIGN.md §3: a concern with its own state and timer gets its own module).
MAX_MODULE_LINES = 900


def test_no_media_or_workers_module_is_over_900_lines() -> None:
    modules = [
        path
        for package in ("media", "workers")
        for path in (ROOT / "whepfan" / package).glob("*.py")
    ]
    assert len(modules) > 20  # both packages are found
    too_long = {
        f"{path.parent.name}/{path.name}": lines
        for path in modules
        if (lines := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not too_long, f"over {MAX_MODULE_LINES} lines: {too_long}"


def test_deploy_example_config_is_valid() -> None:
    """The README points at deploy/whepfan.toml: it must parse into real settings."""
    from whepfan.settings import Settings

    settings = Settings.resolve(cli={}, environ={}, config_path=ROOT / "deploy" / "whepfan.toml")
    media = settings.media_config()
    assert media.public_ips == ("203.0.113.10",)
    assert settings.workers == 2
