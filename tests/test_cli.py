"""The ``whepfan`` command line: argument parsing, errors, and a real ``whepfan serve``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from whepfan.cli import build_parser, main, settings_from_args

ROOT = Path(__file__).resolve().parent.parent


def test_serve_options_map_onto_settings() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--http", "127.0.0.1:9999",
            "--udp", "127.0.0.1:0",
            "--public-ip", "192.0.2.1",
            "--public-ip", "192.0.2.2",
            "--publish-token", "p",
            "--view-token", "v",
            "--ice-server", "stun:s.example",
            "--ice-server", "turn:t.example;secret=x",
            "--strict-etag",
            "--max-viewers", "9",
        ]
    )  # fmt: skip
    settings = settings_from_args(args, {"WHEPFAN_PUBLISH_TOKEN": "env", "WHEPFAN_VIEW_TOKEN": "e"})
    assert settings.http_port == 9999 and settings.udp_port == 0
    assert settings.public_ips == ("192.0.2.1", "192.0.2.2")
    assert (settings.publish_token, settings.view_token) == ("p", "v")
    assert len(settings.ice_servers) == 2 and settings.strict_etag and settings.max_viewers == 9
    assert not settings.allow_insecure_http


def test_flags_not_given_do_not_override_the_environment() -> None:
    args = build_parser().parse_args(["serve"])
    settings = settings_from_args(args, {"WHEPFAN_STRICT_ETAG": "1", "WHEPFAN_MAX_VIEWERS": "4"})
    assert settings.strict_etag and settings.max_viewers == 4


@pytest.mark.parametrize(
    "argv", [[], ["serve", "--http", "0.0.0.0:8080"], ["serve", "--max-viewers", "x"]]
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "whepfan" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_whepfan_serve_runs_logs_a_generated_token_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = _free_port()
    environ = {**os.environ, "PYTHONPATH": str(ROOT), "WHEPFAN_UDP": "127.0.0.1:0"}
    environ.pop("WHEPFAN_PUBLISH_TOKEN", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "whepfan.cli", "serve", "--http", f"127.0.0.1:{port}",
         "--public-ip", "127.0.0.1"],
        env=environ, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        status = None
        deadline = time.monotonic() + 30
        while status is None and time.monotonic() < deadline and process.poll() is None:
            try:
                request = urllib.request.Request(
                    f"http://127.0.0.1:{port}/whep/x", method="OPTIONS"
                )
                with urllib.request.urlopen(request, timeout=2) as response:
                    status = response.status
                    accept_post = response.headers["Accept-Post"]
            except OSError:
                time.sleep(0.1)  # the server is still starting: poll, not a timing assertion
        assert status == 200 and accept_post == "application/sdp"
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.stderr is not None
    log = process.stderr.read()
    assert "generated one:" in log and "shutting down" in log
