"""deploy/cluster/: the template unit passes ``systemd-analyze verify`` (as an instance,
whepfan@origin.service), every role's TOML resolves to valid settings, and the Redis
example config is one redis-server accepts."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from whepfan.settings import Settings, SettingsError

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "cluster"


def test_template_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    unit_text = (DEPLOY / "whepfan@.service").read_text()
    system_units = next(
        (p for p in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if p.is_dir()),
        None,
    )
    assert system_units is not None
    root = tmp_path / "root"
    shutil.copytree(system_units, root / "usr/lib/systemd/system", symlinks=True)
    exec_start = re.search(r"^ExecStart=(\S+)", unit_text, re.M)
    assert exec_start
    executable = root / exec_start.group(1).lstrip("/")
    executable.parent.mkdir(parents=True)
    executable.write_text("#!/bin/sh\nexit 0\n")
    executable.chmod(0o755)
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    (units / "whepfan@.service").write_text(unit_text)
    result = subprocess.run(
        [
            analyze,
            "verify",
            "--man=no",
            "--generators=no",
            f"--root={root}",
            str(units / "whepfan@origin.service"),
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    output = (result.stdout + result.stderr).strip()
    assert result.returncode == 0 and not output, output


@pytest.mark.parametrize("role", ["origin", "edge", "static-edge"])
def test_every_role_toml_resolves(role: str) -> None:
    settings = Settings.resolve(
        # As the unit gives them: the TLS files from its credentials directory.
        cli={"tls_cert": "/run/credentials/fullchain.pem", "tls_key": "/run/credentials/k"},
        environ={},
        config_path=DEPLOY / f"{role}.toml",
    )
    if role == "static-edge":
        assert settings.upstream is not None and "{stream}" in settings.upstream
        assert settings.cluster is None
    else:
        assert settings.cluster is not None and settings.cluster.startswith("redis://")
        assert settings.node_url is not None and settings.cluster_token is not None
        assert settings.workers == 6 and settings.placement_grant_ttl == 30
        # Session URLs are absolute under the node's URL (a 307 placed the viewer here).
        assert settings.http_options().public_url == settings.node_url


def test_redis_example_config_is_accepted_by_redis_server(tmp_path: Path) -> None:
    redis_server = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(redis_server).exists():
        pytest.skip("needs Debian's redis-server")
    # redis-server refuses a config it cannot read; this one is loaded as written, but
    # on a unix socket in tmp_path instead of the example's addresses (port 0: no TCP).
    example = (DEPLOY / "redis.conf").read_text()
    config = example.replace("bind 10.0.0.5 127.0.0.1", "bind 127.0.0.1")
    path = tmp_path / "redis.conf"
    path.write_text(config + "\nport 0\nunixsocket " + str(tmp_path / "r.sock") + "\n")
    process = subprocess.Popen(
        [redis_server, str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        socket_path = tmp_path / "r.sock"
        for _ in range(100):
            if socket_path.exists() or process.poll() is not None:
                break
            time.sleep(0.05)
        assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
        assert socket_path.exists()
    finally:
        process.terminate()
        process.wait(10)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"upstream": "http://o/whep/live"}, "{stream}"),
        ({"cluster": "redis://r/0", "cluster_token": "t"}, "--cluster needs --node-url"),
        ({"cluster": "http://r/0", "cluster_token": "t", "node_url": "http://n"}, "Redis URL"),
    ],
)
def test_cluster_settings_are_checked(given: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.resolve(cli=given, environ={})
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "given",
    [
        {"upstream": "http://o/whep/{stream}"},
        {"cluster": "redis://r/0", "cluster_token": "t", "node_url": "http://n"},
    ],
)
def test_an_edge_or_cluster_node_runs_any_number_of_workers(given: dict[str, str]) -> None:
    # The upstream session runs in one worker, relayed to the others (pool_backend.py).
    settings = Settings.resolve(cli={**given, "workers": "4"}, environ={})
    assert settings.workers == 4
    assert (settings.upstream, settings.cluster) == (given.get("upstream"), given.get("cluster"))


def test_a_short_cluster_token_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    """The token keys every 307's placement grant (HKDF adds no entropy)."""
    from whepfan import server

    base = {"cluster": "redis://127.0.0.1:6379/0", "node_url": "https://node.example"}
    short = Settings.resolve(cli={**base, "cluster_token": "change-me-cluster"}, environ={})
    long = Settings.resolve(cli={**base, "cluster_token": "k" * 32}, environ={})
    with caplog.at_level("WARNING", logger="whepfan.server"):
        server._warn_about_cluster_token(long)
        assert not caplog.records
        server._warn_about_cluster_token(short)
    assert [r.getMessage() for r in caplog.records] == [
        "the cluster token is 17 characters: it keys the placement grants of every 307, so use "
        "at least 32 random ones (e.g. openssl rand -base64 32)"
    ]
