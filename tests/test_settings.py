"""Settings: command line > WHEPFAN_* environment > TOML file > defaults."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from whepfan.config import MediaConfig
from whepfan.http.links import IceServer
from whepfan.settings import Settings, SettingsError, parse_host_port

TOML = """
http = "127.0.0.1:9000"
udp = "0.0.0.0:40000"
public_ips = ["198.51.100.7", "2001:db8::7"]
publish_token = "from-file"
view_token = "view-file"
strict_etag = true
max_viewers = 50
ice_servers = [
  "stun:stun.example.net",
  { url = "turn:turn.example.net?transport=udp", secret = "s", ttl = 120 },
]
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "whepfan.toml"
    path.write_text(TOML)
    return path


def test_defaults() -> None:
    settings = Settings.resolve(cli={}, environ={})
    assert (settings.http_host, settings.http_port) == ("127.0.0.1", 8080)
    assert (settings.udp_host, settings.udp_port) == ("0.0.0.0", 8189)
    assert settings.publish_token is None and settings.view_token is None
    assert settings.public_ips == () and settings.ice_servers == ()
    assert not settings.strict_etag and not settings.insecure_http


def test_toml_file(config_file: Path) -> None:
    settings = Settings.resolve(cli={}, environ={}, config_path=config_file)
    assert (settings.http_host, settings.http_port) == ("127.0.0.1", 9000)
    assert settings.udp_port == 40000
    assert settings.public_ips == ("198.51.100.7", "2001:db8::7")
    assert settings.publish_token == "from-file"
    assert settings.strict_etag and settings.max_viewers == 50
    assert settings.ice_servers == (
        IceServer(url="stun:stun.example.net"),
        IceServer(url="turn:turn.example.net?transport=udp", shared_secret="s", credential_ttl=120),
    )


def test_environment_overrides_file_and_cli_overrides_environment(config_file: Path) -> None:
    environ = {
        "WHEPFAN_CONFIG": str(config_file),
        "WHEPFAN_PUBLISH_TOKEN": "from-env",
        "WHEPFAN_VIEW_TOKEN": "view-env",
        "WHEPFAN_PUBLIC_IP": "192.0.2.1, 192.0.2.2",
        "WHEPFAN_STRICT_ETAG": "false",
        "WHEPFAN_MAX_VIEWERS": "7",
        "WHEPFAN_ICE_SERVER": "stun:a.example,turn:b.example;username=u;credential=p",
    }
    settings = Settings.resolve(
        cli={"publish_token": "from-cli", "max_viewers": "3"}, environ=environ
    )
    assert settings.publish_token == "from-cli"
    assert settings.view_token == "view-env"
    assert settings.public_ips == ("192.0.2.1", "192.0.2.2")  # a whole list is replaced
    assert not settings.strict_etag
    assert settings.max_viewers == 3
    assert [s.url for s in settings.ice_servers] == ["stun:a.example", "turn:b.example"]
    assert settings.http_port == 9000  # untouched keys still come from the file


def test_media_config_and_http_options() -> None:
    settings = Settings.resolve(
        cli={"udp": "127.0.0.1:0", "public_ip": ["192.0.2.9"], "max_viewers": "12"}, environ={}
    )
    media = settings.media_config()
    assert isinstance(media, MediaConfig)
    assert (media.udp_host, media.udp_port, media.public_ips) == ("127.0.0.1", 0, ("192.0.2.9",))
    assert media.max_viewers == 12
    options = settings.http_options()
    assert options.publish_token is None
    # A counter-offer goes at the connect deadline (10 s) before its 30 s TTL.
    assert options.counter_offer_ttl == 10.0 and media.connect_timeout == 10.0


def test_generated_publish_token_is_unguessable_and_only_when_missing() -> None:
    settings = Settings.resolve(cli={}, environ={})
    first = settings.with_generated_publish_token()
    second = settings.with_generated_publish_token()
    assert first.publish_token_generated and first.publish_token
    assert len(first.publish_token) >= 32 and first.publish_token != second.publish_token
    configured = Settings.resolve(cli={"publish_token": "mine"}, environ={})
    assert configured.with_generated_publish_token() is configured


def _pem_files(directory: Path) -> tuple[str, str]:
    """Two files that exist (settings check that TLS files can be read, not their PEM)."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_text("certificate")
    key.write_text("key")
    return str(cert), str(key)


def test_plain_http_off_loopback_needs_explicit_permission(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="allow-insecure-http"):
        Settings.resolve(cli={"http": "0.0.0.0:8080"}, environ={})
    settings = Settings.resolve(
        cli={"http": "0.0.0.0:8080", "allow_insecure_http": True}, environ={}
    )
    assert settings.insecure_http
    for host in ("127.0.0.1", "[::1]", "localhost", "127.5.5.5"):
        assert not Settings.resolve(cli={"http": f"{host}:1"}, environ={}).insecure_http
    cert, key = _pem_files(tmp_path)
    tls = Settings.resolve(
        cli={"http": "0.0.0.0:443", "tls_cert": cert, "tls_key": key}, environ={}
    )
    assert not tls.insecure_http and tls.tls_cert == Path(cert)


@pytest.mark.parametrize(
    ("cli", "environ", "message"),
    [
        ({"http": "nonsense"}, {}, "HOST:PORT"),
        ({"udp": "1.2.3.4:70000"}, {}, "HOST:PORT"),
        ({"public_ip": ["not-an-ip"]}, {}, "not an IP"),
        ({"max_viewers": "many"}, {}, "integer"),
        ({}, {"WHEPFAN_STRICT_ETAG": "perhaps"}, "boolean"),
        ({"ice_server": ["ftp://x"]}, {}, "--ice-server: ICE server 'ftp://x'"),
        ({"publish_token": "has space"}, {}, "whitespace"),
        ({"counter_offer_ttl": "0"}, {}, "positive"),
    ],
)
def test_invalid_settings(cli: dict[str, object], environ: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.resolve(cli=cli, environ=environ)


def test_bad_toml_files(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.toml"
    unknown.write_text('colour = "blue"\n')
    with pytest.raises(SettingsError, match="unknown setting"):
        Settings.resolve(cli={}, environ={}, config_path=unknown)
    broken = tmp_path / "broken.toml"
    broken.write_text("http = \n")
    with pytest.raises(SettingsError):
        Settings.resolve(cli={}, environ={}, config_path=broken)
    wrong_type = tmp_path / "wrong.toml"
    wrong_type.write_text("http = 8080\n")
    with pytest.raises(SettingsError, match="expected str"):
        Settings.resolve(cli={}, environ={}, config_path=wrong_type)
    with pytest.raises(SettingsError, match="cannot read"):
        Settings.resolve(cli={}, environ={}, config_path=tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:8080", ("::1", 8080)),
        (":9000", ("0.0.0.0", 9000)),
        ("example.net:0", ("example.net", 0)),
    ],
)
def test_parse_host_port(value: str, expected: tuple[str, int]) -> None:
    assert parse_host_port(value, what="x") == expected


# --- the worker packet budget: measured by default, or a number, or none ----------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (None, "auto"),
        ("auto", "auto"),
        (" AUTO ", "auto"),
        ("none", None),
        ("unbounded", None),
        ("off", None),
        ("225000", 225000.0),
        ("1.5e5", 150000.0),
    ],
)
def test_worker_packet_budget_is_auto_none_or_a_number(
    given: str | None, expected: float | str | None
) -> None:
    cli = {} if given is None else {"worker_packet_budget": given}
    assert Settings.resolve(cli=cli, environ={}).worker_packet_budget == expected
    environ = {} if given is None else {"WHEPFAN_WORKER_PACKET_BUDGET": given}
    assert Settings.resolve(cli={}, environ=environ).worker_packet_budget == expected


def test_worker_packet_budget_from_toml(tmp_path: Path) -> None:
    for text, expected in (('"auto"', "auto"), ('"none"', None), ("180000", 180000.0)):
        path = tmp_path / "budget.toml"
        path.write_text(f"worker_packet_budget = {text}\n")
        settings = Settings.resolve(cli={}, environ={}, config_path=path)
        assert settings.worker_packet_budget == expected


@pytest.mark.parametrize("bad", ["lots", "-5", "0", "", "auto-ish"])
def test_worker_packet_budget_rejects_anything_else(bad: str) -> None:
    if bad == "":
        # An empty variable counts as unset (WHEPFAN_* convention): the default stays.
        environ = {"WHEPFAN_WORKER_PACKET_BUDGET": bad}
        assert Settings.resolve(cli={}, environ=environ).worker_packet_budget == "auto"
        return
    with pytest.raises(SettingsError, match="--worker-packet-budget"):
        Settings.resolve(cli={"worker_packet_budget": bad}, environ={})
    with pytest.raises(SettingsError, match="WHEPFAN_WORKER_PACKET_BUDGET"):
        Settings.resolve(cli={}, environ={"WHEPFAN_WORKER_PACKET_BUDGET": bad})


def test_automatic_budget_is_measured_once_and_only_when_asked() -> None:
    calls: list[int] = []

    def measure() -> float:
        calls.append(1)
        return 123456.0

    automatic = Settings.resolve(cli={}, environ={})
    with pytest.raises(ValueError, match="measure"):
        automatic.capacity_policy()  # "auto" is not a budget until measured
    measured = automatic.with_measured_budget(measure)
    assert measured.capacity_policy().worker_packet_budget == 123456.0
    assert measured.with_measured_budget(measure) is measured
    fixed = Settings.resolve(cli={"worker_packet_budget": "9000"}, environ={})
    assert fixed.with_measured_budget(measure).capacity_policy().worker_packet_budget == 9000.0
    unbounded = Settings.resolve(cli={"worker_packet_budget": "none"}, environ={})
    assert unbounded.with_measured_budget(measure).capacity_policy().worker_packet_budget is None
    assert calls == [1]


# --- the /metrics token: open by default, a bearer token when set -----------------------


def test_metrics_token_from_every_source(tmp_path: Path) -> None:
    assert Settings.resolve(cli={}, environ={}).metrics_token is None
    path = tmp_path / "metrics.toml"
    path.write_text('metrics_token = "scrape-file"\n')
    assert Settings.resolve(cli={}, environ={}, config_path=path).metrics_token == "scrape-file"
    environ = {"WHEPFAN_CONFIG": str(path), "WHEPFAN_METRICS_TOKEN": "scrape-env"}
    assert Settings.resolve(cli={}, environ=environ).metrics_token == "scrape-env"
    cli = {"metrics_token": "scrape-cli"}
    assert Settings.resolve(cli=cli, environ=environ).metrics_token == "scrape-cli"


def test_metrics_token_on_the_command_line_beats_the_environment() -> None:
    from whepfan.cli import build_parser, settings_from_args

    environ = {"WHEPFAN_METRICS_TOKEN": "scrape-env"}
    given = build_parser().parse_args(["serve", "--metrics-token", "scrape-cli"])
    assert settings_from_args(given, environ).metrics_token == "scrape-cli"
    absent = build_parser().parse_args(["serve"])
    assert settings_from_args(absent, environ).metrics_token == "scrape-env"


@pytest.mark.parametrize("bad", ["two words", "tab\there", " "])
def test_metrics_token_follows_the_token_rules(bad: str) -> None:
    with pytest.raises(SettingsError, match="whitespace"):
        Settings.resolve(cli={"metrics_token": bad}, environ={})


def test_metrics_token_must_be_a_string_in_toml(tmp_path: Path) -> None:
    path = tmp_path / "metrics.toml"
    path.write_text("metrics_token = 1234\n")
    with pytest.raises(SettingsError, match="metrics_token: expected str"):
        Settings.resolve(cli={}, environ={}, config_path=path)


def test_open_metrics_off_loopback_is_flagged_only_when_reachable_and_tokenless() -> None:
    exposed = {"http": "0.0.0.0:8080", "allow_insecure_http": True}
    assert Settings.resolve(cli=exposed, environ={}).open_metrics_off_loopback
    guarded = {**exposed, "metrics_token": "scrape"}
    assert not Settings.resolve(cli=guarded, environ={}).open_metrics_off_loopback
    for host in ("127.0.0.1", "[::1]", "localhost"):
        local = Settings.resolve(cli={"http": f"{host}:8080"}, environ={})
        assert not local.open_metrics_off_loopback


# --- errors name the setting as the operator wrote it -----------------------------------


@pytest.mark.parametrize(
    ("cli", "environ", "message"),
    [
        ({}, {"WHEPFAN_MAX_VIEWERS": "many"}, "WHEPFAN_MAX_VIEWERS=many: not an integer"),
        ({"max_viewers": "many"}, {}, "--max-viewers many: not an integer"),
        ({}, {"WHEPFAN_MAX_VIEWERS": "-1"}, "WHEPFAN_MAX_VIEWERS=-1: cannot be negative"),
        ({}, {"WHEPFAN_UDP": "1.2.3.4:70000"}, "WHEPFAN_UDP=1.2.3.4:70000: not HOST:PORT"),
        ({}, {"WHEPFAN_STRICT_ETAG": "perhaps"}, "WHEPFAN_STRICT_ETAG=perhaps: not a boolean"),
        (
            {},
            {"WHEPFAN_PUBLIC_IP": "192.0.2.1, nine"},
            "WHEPFAN_PUBLIC_IP='192.0.2.1, nine': 'nine' is not an IP address",
        ),
        ({}, {"WHEPFAN_HTTP": "0.0.0.0:80"}, "WHEPFAN_HTTP=0.0.0.0:80: plain HTTP on 0.0.0.0"),
        ({}, {"WHEPFAN_WORKERS": "0"}, "WHEPFAN_WORKERS=0: is at least 1"),
        ({}, {"WHEPFAN_LOG_LEVEL": "loud"}, "WHEPFAN_LOG_LEVEL=loud: 'loud' is not debug"),
    ],
)
def test_errors_name_the_setting_as_given(
    cli: dict[str, object], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError) as error:
        Settings.resolve(cli=cli, environ=environ)
    assert str(error.value).startswith(message)


def test_the_command_line_value_is_the_one_named_when_it_overrides_the_environment() -> None:
    with pytest.raises(SettingsError, match=r"^--drain-timeout -3: cannot be negative$"):
        Settings.resolve(cli={"drain_timeout": "-3"}, environ={"WHEPFAN_DRAIN_TIMEOUT": "5"})


def test_toml_errors_name_the_file_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / "whepfan.toml"
    path.write_text('max_viewers = "many"\n')
    with pytest.raises(
        SettingsError, match=rf"^{re.escape(str(path))}: max_viewers: not an integer$"
    ):
        Settings.resolve(cli={}, environ={}, config_path=path)
    path.write_text('public_ips = ["192.0.2.1", "nine"]\n')
    with pytest.raises(
        SettingsError, match=rf"^{re.escape(str(path))}: public_ips: 'nine' is not an IP"
    ):
        Settings.resolve(cli={}, environ={}, config_path=path)


def test_errors_about_credentials_do_not_repeat_them() -> None:
    with pytest.raises(SettingsError) as error:
        Settings.resolve(cli={}, environ={"WHEPFAN_VIEW_TOKEN": "s3cret value"})
    assert str(error.value) == "WHEPFAN_VIEW_TOKEN: tokens are non-empty and contain no whitespace"
    with pytest.raises(SettingsError) as error:
        Settings.resolve(cli={"publish_token": "s3cret value"}, environ={})
    assert "s3cret" not in str(error.value) and str(error.value).startswith("--publish-token:")


def test_tls_files_are_checked_when_the_server_starts_not_when_resolving() -> None:
    # An example config names files of the machine it is for (tests/test_project.py).
    settings = Settings.resolve(
        cli={"tls_cert": "/no/cert.pem", "tls_key": "/no/key.pem"}, environ={}
    )
    assert settings.given_as("tls_key") == "--tls-key /no/key.pem"
    assert settings.given_as("view_token") == "view_token"  # not given: its name


def test_a_tls_file_from_the_config_file_is_named_by_its_path(tmp_path: Path) -> None:
    """Issue 13: a config file's origin is ``FILE: key``; for a file setting the path the
    server will open is added, so "cannot open" says which file."""
    config = tmp_path / "whepfan.toml"
    config.write_text('tls_cert = "/no/cert.pem"\ntls_key = "/no/key.pem"\n')
    settings = Settings.resolve(cli={}, environ={}, config_path=config)
    assert settings.given_as("tls_key") == f'{config}: tls_key = "/no/key.pem"'
    # The environment's and the command line's origins already hold the path.
    from_env = Settings.resolve(
        cli={"tls_key": "/no/key.pem"}, environ={"WHEPFAN_TLS_CERT": "/no/c.pem"}
    )
    assert from_env.given_as("tls_cert") == "WHEPFAN_TLS_CERT=/no/c.pem"


def test_tls_cert_without_key_names_the_one_given(tmp_path: Path) -> None:
    cert, _ = _pem_files(tmp_path)
    with pytest.raises(SettingsError) as error:
        Settings.resolve(cli={"tls_cert": cert}, environ={})
    assert str(error.value) == f"--tls-cert {cert}: --tls-cert and --tls-key go together"


# --- advertised candidates: the bound address unless told otherwise ---------------------


@pytest.mark.parametrize(
    ("udp", "public_ip", "advertised"),
    [
        ("127.0.0.1:0", None, ("127.0.0.1",)),
        ("198.51.100.7:8189", None, ("198.51.100.7",)),
        ("[::1]:8189", None, ("::1",)),
        ("localhost:0", None, ("127.0.0.1",)),
        # Only a wildcard bind leaves the choice to the transport (every interface).
        ("0.0.0.0:8189", None, ()),
        (":8189", None, ()),
        ("[::]:8189", None, ()),
        # --public-ip always wins (NAT: the bound address is not the reachable one).
        ("127.0.0.1:0", ["203.0.113.10"], ("203.0.113.10",)),
        ("0.0.0.0:8189", ["203.0.113.10", "2001:db8::1"], ("203.0.113.10", "2001:db8::1")),
    ],
)
def test_a_server_bound_to_one_address_advertises_that_address(
    udp: str, public_ip: list[str] | None, advertised: tuple[str, ...]
) -> None:
    settings = Settings.resolve(cli={"udp": udp, "public_ip": public_ip}, environ={})
    assert settings.advertised_ips() == advertised
    assert settings.media_config().public_ips == advertised


def test_the_ended_session_grace_reaches_the_http_layer_from_every_source() -> None:
    """RFC 9725 §4.3 / WHEP §4.3: how long a DELETE of a session that ended on its own
    (close_notify, consent lost) still answers 200; CLI over environment, as every option."""
    assert Settings.resolve(cli={}, environ={}).http_options().ended_session_grace == 60.0
    from_env = Settings.resolve(cli={}, environ={"WHEPFAN_ENDED_SESSION_GRACE": "5"})
    assert from_env.http_options().ended_session_grace == 5.0
    both = Settings.resolve(
        cli={"ended_session_grace": "0"}, environ={"WHEPFAN_ENDED_SESSION_GRACE": "5"}
    )
    assert both.http_options().ended_session_grace == 0.0
    with pytest.raises(SettingsError, match="cannot be negative"):
        Settings.resolve(cli={"ended_session_grace": "-1"}, environ={})
