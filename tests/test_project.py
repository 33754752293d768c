"""The project's shape: the README quick start is what CI runs, and the layers hold."""

import ast
import re
from pathlib import Path

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


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    test_command = _readme_commands()[1]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines


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


def test_deploy_example_config_is_valid() -> None:
    """The README points at deploy/whepfan.toml: it must parse into real settings."""
    from whepfan.settings import Settings

    settings = Settings.resolve(cli={}, environ={}, config_path=ROOT / "deploy" / "whepfan.toml")
    media = settings.media_config()
    assert media.public_ips == ("203.0.113.10",)
    assert settings.workers == 2
