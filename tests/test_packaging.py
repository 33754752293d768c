"""Packaging: every import in whepfan/ is a declared dependency, the wheel built from the
checkout installs into a fresh virtualenv and its ``whepfan demo`` streams media a WHEP
viewer decodes, and the systemd unit in deploy/ passes ``systemd-analyze verify``."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

import aiohttp
import orjson
import pytest
from _peers import DecodingViewer, only_loopback_candidates

from whepfan.protocol.negotiation import remote_transport
from whepfan.protocol.sdp import SessionDescription

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "whepfan"
RUNTIME = "runtime"  # the group name of [project] dependencies below

# Building the extension and installing the wheel's dependencies (from pip's cache after
# the first run) each take minutes on a busy machine: generous ceilings, not thresholds.
BUILD_TIMEOUT = 1200
START_TIMEOUT = 120


# --- every import is declared ---------------------------------------------------------


def _normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    """The distribution a PEP 508 requirement names (``PyJWT[crypto]>=2.8``: pyjwt)."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, f"not a requirement: {requirement!r}"
    return _normalise(match.group(0))


def _declared_groups() -> dict[str, set[str]]:
    """Each declared distribution, with the groups that declare it: RUNTIME for
    ``[project] dependencies``, otherwise the extra's name. ``whepfan[x]`` inside an extra
    (the test extra pulls in ``load``) declares x's distributions for that extra too."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {RUNTIME: project["dependencies"], **project["optional-dependencies"]}
    declared: dict[str, set[str]] = {}
    for group, requirements in groups.items():
        for requirement in requirements:
            name = _requirement_name(requirement)
            if name == "whepfan":
                extras = re.search(r"\[(.*?)\]", requirement)
                for extra in extras.group(1).split(",") if extras else ():
                    for inner in groups[extra.strip()]:
                        declared.setdefault(_requirement_name(inner), set()).add(group)
                continue
            declared.setdefault(name, set()).add(group)
    return declared


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    module: str  # the top-level module name
    eager: bool  # runs when the module is imported (not in a function, TYPE_CHECKING or try)

    def __str__(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line} imports {self.module}"


class _ImportWalker(ast.NodeVisitor):
    """Absolute imports of one module, each marked eager or deferred: inside a function,
    an ``if TYPE_CHECKING:`` block or a ``try`` that handles ImportError, an import does
    not run (or may fail) when the module is imported, so an extra may provide it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.found: list[Import] = []
        self._deferred = 0

    def _nested(self, nodes: list[ast.stmt]) -> None:
        self._deferred += 1
        for node in nodes:
            self.visit(node)
        self._deferred -= 1

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._nested(node.body)

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> None:
        self._nested(node.body)

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
            isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
        ):
            self._nested(node.body)
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Try(self, node: ast.Try) -> None:
        handled = {
            name.id
            for handler in node.handlers
            if handler.type is not None
            for name in ast.walk(handler.type)
            if isinstance(name, ast.Name)
        }
        if handled & {"ImportError", "ModuleNotFoundError"}:
            self._nested(node.body)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                self.visit(child)
        else:
            self.generic_visit(node)

    def _add(self, node: ast.stmt, module: str) -> None:
        top = module.split(".")[0]
        self.found.append(Import(self.path, node.lineno, top, eager=self._deferred == 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level == 0 and node.module:
            self._add(node, node.module)


# Python-level imports in Cython sources (``cimport`` is compile-time and needs no
# distribution); they run when the extension module is imported.
_CYTHON_IMPORT = re.compile(r"^\s*(?:import\s+([\w.]+)|from\s+([\w.]+)\s+import\s)", re.M)


def _imports() -> list[Import]:
    found: list[Import] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        walker = _ImportWalker(path)
        walker.visit(ast.parse(path.read_text(), str(path)))
        found.extend(walker.found)
    for path in sorted([*PACKAGE.rglob("*.pyx"), *PACKAGE.rglob("*.pxi")]):
        text = path.read_text()
        for match in _CYTHON_IMPORT.finditer(text):
            module = (match.group(1) or match.group(2)).split(".")[0]
            line = text.count("\n", 0, match.start()) + 1
            found.append(Import(path, line, module, eager=True))
    return found


def test_every_import_in_whepfan_is_a_declared_dependency() -> None:
    """An import of a third-party module needs its distribution declared directly, not
    reached through another dependency (av arrives with aiortc, but whepfan imports it):
    in ``dependencies`` when it runs at import time, else in ``dependencies`` or an extra."""
    declared = _declared_groups()
    providers = importlib.metadata.packages_distributions()
    imports = _imports()
    third_party = [
        found
        for found in imports
        if found.module not in sys.stdlib_module_names
        and found.module not in {"whepfan", "__future__"}
    ]
    # The walk sees the imports it must see (a check that finds nothing proves nothing).
    assert {"aiohttp", "numpy", "av", "cryptography"} <= {found.module for found in third_party}
    problems = []
    for found in third_party:
        dists = {_normalise(dist) for dist in providers.get(found.module, [])}
        if not dists:
            problems.append(f"{found}, which no installed distribution provides")
            continue
        groups = set().union(*(declared.get(dist, set()) for dist in dists))
        if not groups:
            problems.append(f"{found} from {'/'.join(sorted(dists))}, not declared")
        elif found.eager and RUNTIME not in groups:
            problems.append(
                f"{found} at import time, but {'/'.join(sorted(dists))} is only in the "
                f"{'/'.join(sorted(groups))} extra: move it to dependencies or defer the import"
            )
    assert not problems, "\n".join(problems)


def test_import_walk_tells_eager_from_deferred_imports(tmp_path: Path) -> None:
    source = tmp_path / "sample.py"
    source.write_text(
        "from __future__ import annotations\n"
        "import numpy as np\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from matplotlib.figure import Figure\n"
        "try:\n"
        "    import uvloop\n"
        "except ImportError:\n"
        "    uvloop = None\n"
        "def plot() -> None:\n"
        "    import matplotlib.pyplot\n"
        "from . import sibling\n"
    )
    walker = _ImportWalker(source)
    walker.visit(ast.parse(source.read_text()))
    assert [(found.line, found.module, found.eager) for found in walker.found] == [
        (1, "__future__", True),
        (2, "numpy", True),
        (3, "typing", True),
        (5, "matplotlib", False),
        (7, "uvloop", False),
        (11, "matplotlib", False),
    ]


# --- the wheel, in a fresh virtualenv ---------------------------------------------------


def _clean_environment() -> dict[str, str]:
    """This process's environment without what would point another interpreter at the
    checkout (a module imported during collection may have set PYTHONPATH for its own
    subprocesses; bench/capacity.py does) or configure whepfan."""
    dropped = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV"}
    return {
        key: value
        for key, value in os.environ.items()
        if key not in dropped and not key.startswith("WHEPFAN_")
    }


def _run(argv: list[str | Path], **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(arg) for arg in argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=BUILD_TIMEOUT,
        env=_clean_environment(),
        **kwargs,  # type: ignore[call-overload]
    )
    assert result.returncode == 0, (
        f"`{shlex.join(str(arg) for arg in argv)}` exited {result.returncode}:\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


def _checkout_copy(destination: Path) -> Path:
    """The files git would put in a fresh clone (tracked, plus new files not ignored), so
    the wheel cannot depend on build products lying in the working tree (the in-place
    extension, the generated C file, build/)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("building the wheel from the checkout needs git and a git checkout")
    listed = _run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT
    ).stdout
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the working tree is not copied
            target = destination / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return destination


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    """This module's own scratch directory. Its wheel, venv and demo live for minutes, and
    pytest prunes its numbered base directories (keeping three) whenever another pytest
    run of the same user starts, which on a shared machine is often."""
    with tempfile.TemporaryDirectory(prefix="whepfan-packaging-") as name:
        yield Path(name)


@dataclass(frozen=True)
class Built:
    wheel: Path
    source: Path  # the copy of the checkout it was built from


@pytest.fixture(scope="module")
def built(work: Path) -> Built:
    """``pip wheel --no-deps`` of the checkout (pip's build isolation fetches the build
    requirements of pyproject.toml)."""
    source = _checkout_copy(work / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", work / "dist", source])
    (wheel,) = (work / "dist").glob("whepfan-*.whl")
    return Built(wheel, source)


@pytest.fixture(scope="module")
def wheel_venv(built: Built, work: Path) -> Path:
    """A fresh virtualenv with the wheel installed; pip resolves its dependencies."""
    venv = work / "venv"
    _run([sys.executable, "-m", "venv", venv])
    _run([venv / "bin" / "python", "-m", "pip", "install", "-q", built.wheel])
    # pip skips a wheel whose version it believes installed: make sure this one landed.
    assert (venv / "bin" / "whepfan").is_file(), "pip installed no whepfan script"
    return venv


@pytest.mark.slow
def test_wheel_holds_the_compiled_core_every_module_and_page_and_no_tests(built: Built) -> None:
    # A compiled wheel is tagged for its interpreter and platform, never py3-none-any.
    name = built.wheel.name
    assert re.fullmatch(r"whepfan-[^-]+-cp3\d+-cp3\d+-linux_\w+\.whl", name), name
    names = set(zipfile.ZipFile(built.wheel).namelist())
    assert any(re.fullmatch(r"whepfan/_fastpath\.cpython-\d+-[\w-]+\.so", n) for n in names)
    package = built.source / "whepfan"
    expected = {
        f"whepfan/{path.relative_to(package).as_posix()}"
        for path in [
            *package.rglob("*.py"),
            *package.rglob("*.pyi"),
            *(package / "static").rglob("*"),
            package / "py.typed",
        ]
        if path.is_file()
    }
    assert expected <= names, sorted(expected - names)
    assert not [n for n in names if n.startswith(("tests/", "bench/", "docs/"))]


@pytest.mark.slow
def test_wheel_venv_imports_whepfan_from_its_own_site_packages(
    wheel_venv: Path, work: Path
) -> None:
    elsewhere = work / "elsewhere"
    elsewhere.mkdir()
    result = _run(
        [
            wheel_venv / "bin" / "python",
            "-c",
            "import whepfan._fastpath as core, whepfan.client.source as source; "
            "print(core.__file__); print(source.__file__)",
        ],
        cwd=elsewhere,  # not the checkout, whose whepfan/ would shadow the installed one
    )
    for line in result.stdout.split():
        assert Path(line).resolve().is_relative_to(wheel_venv.resolve()), line


def _free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Demo:
    base_url: str
    watch_url: str
    whep_url: str
    udp: str  # the media socket's HOST:PORT


@pytest.fixture(scope="module")
def wheel_demo(wheel_venv: Path, work: Path) -> Iterator[Demo]:
    """The wheel venv's ``whepfan demo`` on free loopback ports, until it prints its URLs.
    No ``--public-ip``: a socket bound to 127.0.0.1 advertises that address by default."""
    demo_dir = work / "demo"
    demo_dir.mkdir()
    log_path = demo_dir / "demo.log"
    http = f"127.0.0.1:{_free_port(socket.SOCK_STREAM)}"
    udp = f"127.0.0.1:{_free_port(socket.SOCK_DGRAM)}"
    argv = [wheel_venv / "bin" / "whepfan", "demo", "--http", http, "--udp", udp]
    env = _clean_environment()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(arg) for arg in argv],
            cwd=demo_dir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        watch = None
        while watch is None and process.poll() is None and time.monotonic() < deadline:
            watch = re.search(r"watch:\s+(http://\S+)", log_path.read_text())
            time.sleep(0.1)
        assert watch, f"no watch URL from `whepfan demo`:\n{log_path.read_text()[-4000:]}"
        yield Demo(f"http://{http}", watch.group(1), f"http://{http}/whep/demo", udp)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            status = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    log_text = log_path.read_text()
    assert status == 0, log_text[-4000:]
    assert "Traceback" not in log_text, log_text[-4000:]


@pytest.mark.slow
async def test_wheel_demo_serves_its_pages_and_media_a_whep_viewer_decodes(
    wheel_demo: Demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert wheel_demo.watch_url == f"{wheel_demo.base_url}/watch/demo"
    only_loopback_candidates(monkeypatch)
    viewer = DecodingViewer()
    async with aiohttp.ClientSession() as http:
        for page in ("/watch/demo", "/static/whep.js", "/static/watch.js"):
            async with http.get(wheel_demo.base_url + page) as response:
                assert response.status == 200, page
                assert len(await response.read()) > 0, page
        offer = await viewer.offer()
        async with http.post(
            wheel_demo.whep_url, data=offer, headers={"Content-Type": "application/sdp"}
        ) as response:
            assert response.status == 201, await response.text()
            answer = await response.text()
            session = response.headers["Location"]
        try:
            # Every media section's one candidate is the address the media socket is
            # bound to (issue 13: the machine's other addresses were advertised too,
            # where nothing listened).
            candidates = remote_transport(SessionDescription.parse(answer)).candidates
            assert {f"{c.address}:{c.port}" for c in candidates} == {wheel_demo.udp}
            await viewer.accept(answer)
            await viewer.wait_frames(30, timeout=30)
            # The session URL is relative to the endpoint's (RFC 9725 §4.2). Deleted
            # before the peer closes: its DTLS close_notify ends the session too.
            async with http.delete(urljoin(wheel_demo.whep_url, session)) as response:
                assert response.status == 200
        finally:
            await viewer.close()
    assert viewer.audio_frames > 0
    # The pattern moves: the last decoded frame differs from the first.
    first, last = (viewer.video_frames[i].to_ndarray(format="gray") for i in (0, -1))
    assert (first != last).any()


@pytest.mark.slow
def test_wheel_loadtest_viewers_receive_and_decrypt_the_wheel_demo(
    wheel_demo: Demo, wheel_venv: Path, work: Path
) -> None:
    """The wheel's own WHEP load generator (the compiled receiver) against its demo."""
    report_path = work / "loadtest.json"
    _run(
        [
            wheel_venv / "bin" / "whepfan",
            "loadtest",
            wheel_demo.whep_url,
            "--viewers",
            "2",
            "--duration",
            "3",
            "--setup-timeout",
            "30",
            "--quiet",
            "--json",
            report_path,
        ],
        cwd=work,
    )
    report = orjson.loads(report_path.read_bytes())
    assert report["summary"]["received_media"] == 2
    for viewer in report["viewers"]:
        assert viewer["outcome"] == "connected", viewer
        assert viewer["first_keyframe"] is not None, viewer
        assert viewer["counters"]["decrypted"] > 0, viewer
        assert viewer["counters"]["decrypt_failures"] == 0, viewer


# --- the systemd unit -------------------------------------------------------------------


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` in a scratch root (``--root``): the system's own units
    (for the targets the unit orders itself after) and a stand-in at the unit's ExecStart
    path, which verify checks is executable. Any diagnostic, even one verify only warns
    about (an unknown key, a bad value), fails the test."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    unit_text = (ROOT / "deploy" / "whepfan.service").read_text()
    system_units = next(
        (
            path
            for path in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system"))
            if path.is_dir()
        ),
        None,
    )
    assert system_units is not None, "systemd-analyze is installed but no system units are"
    root = tmp_path / "root"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    exec_start = re.search(r"^ExecStart=(\S+)", unit_text, re.M)
    assert exec_start, "the unit has no ExecStart"
    executable = root / exec_start.group(1).lstrip("/")
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\nexit 0\n")
    executable.chmod(0o755)
    unit = root / "etc/systemd/system/whepfan.service"
    unit.parent.mkdir(parents=True)
    unit.write_text(unit_text)
    result = subprocess.run(
        [analyze, "verify", "--man=no", "--generators=no", f"--root={root}", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), (
        result.stdout + result.stderr
    )
