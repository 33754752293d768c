"""The ``whepfan`` command line: argument parsing, errors, and a real ``whepfan serve``."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from _server import LiveServer, settings_for

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


def test_serve_setting_errors_print_the_serve_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--max-viewers", "many"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: whepfan serve [-h] [--config FILE]")
    assert err.endswith("whepfan serve: error: --max-viewers many: not an integer\n")


@pytest.mark.parametrize(
    ("toml", "error"),
    [
        ('max_viewers = "many"\n', "{path}: max_viewers: not an integer"),
        ("max_viewers = \n", "{path}: Invalid value (at line 1, column 15)"),
        ("no_such_setting = 1\n", "{path}: unknown setting 'no_such_setting' (settings: "),
        (None, "cannot read {path}: No such file or directory"),
    ],
)
@pytest.mark.parametrize("given_by", ["--config", "WHEPFAN_CONFIG"])
def test_serve_config_file_errors_name_the_file_and_print_the_serve_usage(
    toml: str | None,
    error: str,
    given_by: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 13: a config file's errors printed the top-level usage line; they print
    ``whepfan serve``'s, then the file and what is wrong in it."""
    path = tmp_path / "whepfan.toml"
    if toml is not None:
        path.write_text(toml)
    argv = ["serve"]
    if given_by == "--config":
        argv += ["--config", str(path)]
    else:
        monkeypatch.setenv("WHEPFAN_CONFIG", str(path))
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: whepfan serve [-h] [--config FILE]")
    [message] = [line for line in err.splitlines() if "error:" in line]
    assert message.startswith("whepfan serve: error: " + error.format(path=path)), message


def test_environment_errors_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WHEPFAN_UDP", "127.0.0.1:99999")
    with pytest.raises(SystemExit) as exit_info:
        main(["serve"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: whepfan serve ")
    assert "whepfan serve: error: WHEPFAN_UDP=127.0.0.1:99999: not HOST:PORT" in err


def test_demo_setting_errors_print_the_demo_usage(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WHEPFAN_PUBLIC_IP", "not-an-ip")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: whepfan demo ")
    assert "WHEPFAN_PUBLIC_IP=not-an-ip: 'not-an-ip' is not an IP address" in err


def _serve_args(*extra: str) -> list[str]:
    # No calibration (it is not what these tests are about) and a known token.
    return [
        "serve",
        "--worker-packet-budget",
        "none",
        "--publish-token",
        "t",
        "--log-level",
        "error",
        *extra,
    ]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_udp_port_in_use_is_named(workers: str, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        status = main(
            _serve_args("--http", "127.0.0.1:0", "--udp", f"127.0.0.1:{port}", "--workers", workers)
        )
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: whepfan serve ")
    assert err.endswith(
        f"whepfan serve: error: media UDP port 127.0.0.1:{port}: in use by another process "
        "(another whepfan?); choose another with --udp HOST:PORT (or WHEPFAN_UDP)\n"
    )


def test_an_http_port_in_use_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status = main(_serve_args("--http", f"127.0.0.1:{port}", "--udp", "127.0.0.1:0"))
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: whepfan serve ")
    assert f"error: HTTP address 127.0.0.1:{port}: in use by another process" in err


def test_a_missing_tls_file_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not read: the key is missing")
    missing = tmp_path / "key.pem"
    status = main(
        _serve_args("--udp", "127.0.0.1:0", "--tls-cert", str(cert), "--tls-key", str(missing))
    )
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: whepfan serve ")
    assert err.endswith(f"whepfan serve: error: --tls-key {missing}: No such file or directory\n")


def test_a_missing_tls_file_named_in_the_config_file_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("not read: the key is missing")
    missing = tmp_path / "key.pem"
    config = tmp_path / "whepfan.toml"
    config.write_text(f'tls_cert = "{cert}"\ntls_key = "{missing}"\n')
    status = main(_serve_args("--udp", "127.0.0.1:0", "--config", str(config)))
    assert status == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: whepfan serve ")
    assert err.endswith(
        f'whepfan serve: error: {config}: tls_key = "{missing}": No such file or directory\n'
    )


def test_an_unusable_tls_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nnonsense\n-----END CERTIFICATE-----\n")
    key.write_text("nonsense")
    monkeypatch.setenv("WHEPFAN_TLS_CERT", str(cert))
    monkeypatch.setenv("WHEPFAN_TLS_KEY", str(key))
    assert main(_serve_args("--udp", "127.0.0.1:0")) == 2
    err = capsys.readouterr().err
    assert f"error: cannot load the TLS certificate {cert} with the key {key}: " in err


def test_whepfan_publish_that_cannot_connect_says_what_it_tried(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The server answers with a candidate nothing listens at (its socket is on 127.0.0.1).
    live = LiveServer(settings_for(token="t", public_ip=["127.0.0.2"]))
    try:
        status = main(
            ["publish", f"{live.url}/whip/cli", "--token", "t", "--no-audio",
             "--connect-timeout", "1", "--log-level", "error"]
        )  # fmt: skip
    finally:
        live.close()
    assert status == 1
    err = capsys.readouterr().err
    assert err.startswith("whepfan publish: not connected within 1 s: ICE checking, DTLS new")
    assert re.search(r"remote candidates from the answer: 127\.0\.0\.2:\d+ \d+ checks sent", err)


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
