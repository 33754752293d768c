"""TURN with a shared secret (``--turn-url`` / ``--turn-secret`` / ``--turn-credential-ttl``):
the credentials (draft-uberti-behave-turn-rest-00 §2.2) against a vector, the settings,
the ``Link: rel="ice-server"`` fields of a live server's OPTIONS and POST responses
(RFC 9725 §4.6), and, for real, an aiortc viewer whose UDP to the media port is blocked
playing through Debian's coturn with the credentials whepfan handed it (tests/_turn.py
draws the network).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from _server import LiveServer, live_server
from _signalling import (
    AUTH,
    exchange,
    local_offer,
    negotiate,
    placeholder_publisher,
    recvonly_peer,
)
from _turn import (
    SERVER_ADDRESS,
    TURN_REALM,
    TURN_SECRET,
    TURN_URL,
    LoggedProcess,
    TurnNetwork,
    allocate_from_viewer,
    ice_server_links,
    start_coturn,
    start_publisher,
    start_whepfan,
    view_through_turn,
)

from whepfan.http.links import turn_rest_credentials, turn_rest_servers
from whepfan.settings import Settings, SettingsError

SECRET = "north"
TTL = 600


def _expected_password(secret: str, username: str) -> str:
    """base64(HMAC-SHA1(secret, username)), computed here with the standard library."""
    return base64.b64encode(
        hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    ).decode()


# ------------------------------------------------------------------------- the credentials


def test_turn_rest_credentials_match_a_known_vector() -> None:
    # draft-uberti-behave-turn-rest-00 §2.2: username = "<expiry>:<user>", password =
    # base64(HMAC-SHA1(secret, username)); the constant was computed once with hmac.
    username, password = turn_rest_credentials("north", expiry=1_700_000_000)
    assert username == "1700000000:whepfan"
    assert password == "rOMIYoRy0terTXRbR6NUQfYdB/0="
    assert password == _expected_password("north", username)
    assert turn_rest_credentials("north", expiry=1_700_000_000, user="viewer-7") == (
        "1700000000:viewer-7",
        _expected_password("north", "1700000000:viewer-7"),
    )


def test_turn_servers_expire_a_ttl_after_the_request() -> None:
    (server,) = turn_rest_servers(["turn:t.example:3478?transport=udp"], SECRET, ttl=TTL)
    username, password = server.credentials(1_000_000.7) or ("", "")
    assert username == f"{1_000_000 + TTL}:whepfan"
    assert password == _expected_password(SECRET, username)
    assert server.link_value(1_000_000.7) == (
        f'<turn:t.example:3478?transport=udp>; rel="ice-server"; username="{username}"; '
        f'credential="{password}"; credential-type="password"'
    )


# ----------------------------------------------------------------------------- the settings


def test_turn_options_from_each_source(tmp_path: Path) -> None:
    toml = tmp_path / "whepfan.toml"
    toml.write_text(
        'turn_urls = ["turn:t.example:3478?transport=udp", "turns:t.example:5349"]\n'
        'turn_secret = "from-file"\nturn_credential_ttl = 120\n',
        encoding="utf-8",
    )
    from_file = Settings.resolve(cli={}, environ={}, config_path=toml)
    assert from_file.turn_urls == ("turn:t.example:3478?transport=udp", "turns:t.example:5349")
    assert [s.credentials(0) for s in from_file.http_options().ice_servers] == [
        ("120:whepfan", _expected_password("from-file", "120:whepfan"))
    ] * 2
    from_env = Settings.resolve(
        cli={},
        environ={"WHEPFAN_TURN_URL": "turn:e.example", "WHEPFAN_TURN_SECRET": "from-env"},
        config_path=toml,
    )
    assert from_env.turn_urls == ("turn:e.example",)
    assert from_env.turn_credential_ttl == 120
    from_cli = Settings.resolve(
        cli={"turn_secret": "from-cli", "turn_credential_ttl": "60"},
        environ={"WHEPFAN_TURN_SECRET": "from-env"},
        config_path=toml,
    )
    (first, _) = from_cli.http_options().ice_servers
    assert first.credentials(0) == ("60:whepfan", _expected_password("from-cli", "60:whepfan"))
    # The secret stays out of the settings' repr (which may be logged).
    assert "from-cli" not in repr(from_cli)


def test_turn_servers_follow_the_static_ice_servers() -> None:
    settings = Settings.resolve(
        cli={"ice_server": ["stun:s.example"], "turn_url": ["turn:t.example"], "turn_secret": "x"},
        environ={},
    )
    assert [s.url for s in settings.http_options().ice_servers] == [
        "stun:s.example",
        "turn:t.example",
    ]


@pytest.mark.parametrize(
    ("cli", "message"),
    [
        ({"turn_url": ["turn:t.example"]}, "--turn-url and --turn-secret go together"),
        ({"turn_secret": "x"}, "--turn-url and --turn-secret go together"),
        ({"turn_url": ["stun:t.example"], "turn_secret": "x"}, "credentials are for turn:"),
        ({"turn_url": ["http://t.example"], "turn_secret": "x"}, "is not a stun:, stuns:"),
        (
            {"turn_url": ["turn:t.example"], "turn_secret": "x", "turn_credential_ttl": "0"},
            "turn_credential_ttl must be positive",
        ),
        ({"turn_url": ["turn:t.example"], "turn_secret": "a\x01b"}, "control characters"),
    ],
)
def test_bad_turn_options_are_refused(cli: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError, match=re.escape(message)):
        Settings.resolve(cli=cli, environ={})


# ------------------------------------------------------------------ a live server's Links


@pytest.fixture
def turn_server() -> Iterator[LiveServer]:
    server = live_server(
        turn_url=["turn:turn.example.net:3478?transport=udp", "turns:turn.example.net:5349"],
        turn_secret=SECRET,
        turn_credential_ttl=str(TTL),
    )
    yield server
    server.close()


def _assert_fresh_credentials(links: list[dict[str, str]], before: float, after: float) -> None:
    assert [link["url"] for link in links] == [
        "turn:turn.example.net:3478?transport=udp",
        "turns:turn.example.net:5349",
    ]
    for link in links:
        expiry, user = link["username"].split(":")
        assert user == "whepfan"
        assert int(before) + TTL <= int(expiry) <= int(after) + TTL
        assert link["credential"] == _expected_password(SECRET, link["username"])
        assert link["credential-type"] == "password"


@pytest.mark.parametrize("protocol", ["whep", "whip"])
async def test_options_and_post_carry_fresh_turn_credentials(
    turn_server: LiveServer, protocol: str
) -> None:
    async with aiohttp.ClientSession(turn_server.url) as http:
        before = time.time()
        async with http.options(f"/{protocol}/links", headers=AUTH) as response:
            assert response.status in (200, 204)
            options_links = ice_server_links(response.headers.getall("Link", []))
        _assert_fresh_credentials(options_links, before, time.time())

        # A viewer needs a live stream; the publisher's own 201 is the WHIP case.
        publisher = placeholder_publisher()
        viewer = recvonly_peer()
        try:
            pc = publisher if protocol == "whip" else viewer
            if protocol == "whep":
                await negotiate(http, publisher, "/whip/links", AUTH)
            offer = await local_offer(pc)
            before = time.time()
            response, _ = await exchange(http, f"/{protocol}/links", offer, AUTH)
            post_links = ice_server_links(response.headers.getall("Link", []))
            _assert_fresh_credentials(post_links, before, time.time())
        finally:
            await publisher.close()
            await viewer.close()


# --------------------------------------------------------- through coturn, for real


@pytest.fixture(scope="module")
def network() -> Iterator[TurnNetwork]:
    created = TurnNetwork.create(f"wft-{os.getpid()}")
    yield created
    created.delete()


@pytest.fixture(scope="module")
def coturn(
    network: TurnNetwork, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoggedProcess]:
    turnserver = start_coturn(network, tmp_path_factory.mktemp("coturn"))
    yield turnserver
    turnserver.stop()


@pytest.fixture(scope="module")
def whepfan(
    network: TurnNetwork, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LoggedProcess]:
    state = tmp_path_factory.mktemp("whepfan")
    server = start_whepfan(network, state)
    publisher = start_publisher(network, state)
    publisher.wait_for_output(r"publishing to ")
    yield server
    publisher.stop()
    server.stop()
    assert "Traceback" not in server.log(), server.log()[-4000:]


def test_viewer_behind_a_udp_firewall_plays_through_coturn(
    network: TurnNetwork, coturn: LoggedProcess, whepfan: LoggedProcess
) -> None:
    report = view_through_turn(network)
    # It was offered exactly the one TURN server, with whepfan's credentials...
    (offered,) = report["offered"]
    assert offered["url"] == TURN_URL
    assert offered["credential"] == _expected_password(TURN_SECRET, offered["username"])
    assert [link["url"] for link in report["answered_with"]] == [TURN_URL]
    # ...its host candidate's checks to the media port were dropped, and the pair ICE
    # nominated is its relayed candidate on coturn to whepfan's host candidate.
    assert network.dropped_to_media_port() > 0
    assert report["local"] == ["relay", SERVER_ADDRESS], report
    assert report["remote"] == [SERVER_ADDRESS, 8189], report
    assert report["frames"] >= 30 and report["size"] == [320, 240], report
    # coturn authenticated the allocation with that time-limited username (RFC 8656 §7.2,
    # long-term credentials over the realm), so it verified whepfan's HMAC.
    log = coturn.log()
    username = re.escape(offered["username"])
    assert re.search(
        rf"realm <{TURN_REALM}> user <{username}>: incoming packet ALLOCATE processed, success",
        log,
    ), log[-4000:]
    # ...and let it reach whepfan (a channel binding installs the permission, RFC 8656 §12).
    assert re.search(
        rf"user <{username}>: incoming packet (CREATE_PERMISSION|CHANNEL_BIND) processed, success",
        log,
    ), log[-4000:]


def test_coturn_accepts_only_unexpired_credentials_from_the_shared_secret(
    network: TurnNetwork, coturn: LoggedProcess
) -> None:
    now = int(time.time())
    fresh = turn_rest_credentials(TURN_SECRET, expiry=now + TTL)
    allocated = allocate_from_viewer(network, *fresh)
    assert allocated["error"] is None and allocated["relayed"][0] == SERVER_ADDRESS, allocated
    # The number in the username is an expiry time (coturn's use-auth-secret, as the
    # draft's §2.2 timestamp): one in the past is refused, its HMAC right or not...
    expired = turn_rest_credentials(TURN_SECRET, expiry=now - 60)
    assert allocate_from_viewer(network, *expired)["error"][0] == 401
    # ...and so is a fresh username under another secret (RFC 8656 §7.2: 401 after the
    # retry with MESSAGE-INTEGRITY).
    other = turn_rest_credentials("not-" + TURN_SECRET, expiry=now + TTL)
    assert allocate_from_viewer(network, *other)["error"][0] == 401
